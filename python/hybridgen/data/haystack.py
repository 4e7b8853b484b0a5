"""Needle-in-a-haystack prompts: essays up to a token budget with one planted fact, then a
question about it, in the model's chat format."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .assets import essays

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day."
QUESTION = "What is the best thing to do in San Francisco?"
ANSWER_KEYWORDS = ("sandwich", "dolores park")


@dataclass
class Haystack:
    input_ids: torch.Tensor  # [1, n]
    needle_position: int  # token index where the needle starts (approximately)
    question: str
    keywords: tuple[str, ...]

    def found(self, answer: str) -> bool:
        """Whether an answer names the planted fact."""
        low = answer.lower()
        return any(k in low for k in self.keywords)


def build(
    tokenizer,
    context_tokens: int,
    depth: float = 0.5,
    needle: str = NEEDLE,
    question: str = QUESTION,
    keywords=ANSWER_KEYWORDS,
) -> Haystack:
    """A chat prompt of about ``context_tokens`` tokens: essay text with ``needle`` inserted at
    ``depth`` (0 = start, 1 = end, at a sentence boundary), followed by ``question``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    wrapper = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"\n\n{needle}\n\n{question} Answer in one sentence."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    overhead = len(tokenizer(wrapper, add_special_tokens=False)["input_ids"])
    budget = context_tokens - overhead
    if budget < 16:
        raise ValueError(f"context_tokens ({context_tokens}) is too small for the question ({overhead} tokens)")
    pieces, have = [], 0
    for _, text in essays():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces.append(ids[: budget - have])
        have += len(pieces[-1])
        if have >= budget:
            break
    hay_ids = [t for p in pieces for t in p]
    hay = tokenizer.decode(hay_ids)
    cut = int(len(hay) * depth)
    boundary = hay.rfind(". ", 0, cut)
    cut = boundary + 2 if boundary >= 0 else cut
    text = hay[:cut] + needle + " " + hay[cut:]
    content = f"{text}\n\n{question} Answer in one sentence."
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    input_ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    needle_position = len(tokenizer(prompt[: prompt.find(needle)], add_special_tokens=False)["input_ids"])
    return Haystack(input_ids=input_ids, needle_position=needle_position, question=question, keywords=tuple(keywords))
