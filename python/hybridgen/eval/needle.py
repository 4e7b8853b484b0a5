"""Needle in a haystack: a fact planted at several depths of essay haystacks of several lengths;
a policy retrieves it when its greedy answer names the fact."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import torch
from tqdm import tqdm

from .. import haystack
from ..config import HybridConfig

#: Ten depths from the start (0) to the end (1) of the haystack.
DEPTHS = tuple(i / 9 for i in range(10))


@dataclass
class NeedleTrial:
    policy: str
    context: int
    depth: float
    found: bool
    answer: str


def retrieval(trials: Sequence[NeedleTrial]) -> float:
    """Share of trials whose answer names the fact."""
    return sum(t.found for t in trials) / len(trials) if trials else float("nan")


class _StopWhenFound:
    """Ends generation once the answer names the fact (later tokens cannot unname it)."""

    def __init__(self, tokenizer, hay, prompt_len: int):
        self.tokenizer, self.hay, self.prompt_len = tokenizer, hay, prompt_len

    def __call__(self, input_ids, scores, **kwargs):
        answer = self.tokenizer.decode(input_ids[0, self.prompt_len :], skip_special_tokens=True)
        return torch.full((input_ids.shape[0],), self.hay.found(answer), dtype=torch.bool, device=input_ids.device)


def needle_trials(model, tokenizer, policy: str, contexts: Sequence[int], config_for: Callable[[int], Optional[HybridConfig]],
                  depths: Sequence[float] = DEPTHS, max_new_tokens: int = 24, progress: bool = False) -> list[NeedleTrial]:
    """Runs ``policy`` on every (context, depth) haystack. ``config_for(context)`` gives the
    policy's configuration (``None``: the model's own attention, unpatched)."""
    from ..hf import patch, unpatch

    trials = []
    grid = [(n, d) for n in contexts for d in depths]
    for n, depth in tqdm(grid, desc=f"needle ({policy})", leave=False, disable=not progress):
        hay = haystack.build(tokenizer, n, depth)
        config = config_for(n)
        if config is not None:
            patch(model, config)
        try:
            with torch.inference_mode():
                out = model.generate(hay.input_ids.to(model.device), max_new_tokens=max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.eos_token_id,
                                     stopping_criteria=[_StopWhenFound(tokenizer, hay, hay.input_ids.shape[1])])
        finally:
            if config is not None:
                unpatch(model)
        answer = tokenizer.decode(out[0, hay.input_ids.shape[1]:], skip_special_tokens=True).strip()
        trials.append(NeedleTrial(policy, n, depth, hay.found(answer), answer))
    return trials


def as_rows(trials: Sequence[NeedleTrial]) -> list[dict]:
    return [asdict(t) for t in trials]
