"""Needle in a haystack: a fact planted at several depths of essay haystacks of several lengths;
a policy retrieves it when its greedy answer names the fact.

Each haystack is prefilled once and replayed into every policy's cache
(:mod:`hybridgen.eval.replay`); the answer is then decoded greedily, token by token, through
that cache, until it names the fact, ends, or reaches ``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
from tqdm import tqdm

from ..config import HybridConfig
from ..data import haystack
from ..guard import require_hybrid_run
from ..hf.compat import cache_arg
from .replay import record_prefill, replay

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


def _answer(model, tokenizer, recorded, config, hay, max_new_tokens: int) -> str:
    """Greedy answer through ``config``'s cache (``None``: the model's own attention)."""
    from ..hf import patch, unpatch

    if config is not None:
        patch(model, config)
    try:
        cache, logits, tokens, steps = replay(model, recorded, config), recorded.logits, [], 0
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                token = int(logits.argmax())
                if token == tokenizer.eos_token_id:
                    break
                tokens.append(token)
                if hay.found(tokenizer.decode(tokens, skip_special_tokens=True)):
                    break  # later tokens cannot unname the fact
                step = torch.tensor([[token]], device=model.device)
                logits = model(step, **cache_arg(cache), use_cache=True).logits[0, -1]
                steps += 1
        if config is not None and steps:
            require_hybrid_run(
                cache, what=f"needle with policy {config.policy}", decode_steps=steps, context_tokens=recorded.length
            )
    finally:
        if config is not None:
            unpatch(model)
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def needle_trials(
    model,
    tokenizer,
    policies: Mapping[str, Callable[[int], Optional[HybridConfig]]],
    contexts: Sequence[int],
    depths: Sequence[float] = DEPTHS,
    max_new_tokens: int = 24,
    progress: bool = False,
) -> list[NeedleTrial]:
    """Every policy on every (context, depth) haystack. ``policies`` maps a name to a function
    giving its configuration for a context length (``None``: the model's own attention)."""
    trials = []
    grid = [(n, d) for n in contexts for d in depths]
    for n, depth in tqdm(grid, desc="needle haystacks", leave=False, disable=not progress):
        hay = haystack.build(tokenizer, n, depth)
        recorded = record_prefill(model, hay.input_ids)
        for policy, config_for in policies.items():
            answer = _answer(model, tokenizer, recorded, config_for(n), hay, max_new_tokens)
            trials.append(NeedleTrial(policy, n, depth, hay.found(answer), answer))
    return trials


def as_rows(trials: Sequence[NeedleTrial]) -> list[dict]:
    return [asdict(t) for t in trials]
