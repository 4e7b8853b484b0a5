"""Every policy on one harness: perplexity on long texts and needle retrieval at one context and
one token budget, in one table (the evidence behind the README's accuracy claims)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .common import policy_config
from .kmin import mean_nll, record_windows
from .needle import DEPTHS, needle_trials, retrieval


def compare_policies(
    model,
    tokenizer,
    policies: Sequence[str],
    texts: dict,
    *,
    context: int,
    score: int,
    gpu_budget: int,
    k: int,
    sinks: int = 4,
    k_min: Optional[int] = None,
    depths: Sequence[float] = DEPTHS,
    progress: bool = False,
) -> dict:
    """``texts``: name -> list of ``[1, context]`` windows. Returns ``{"rows": [...], "needle": [...]}``;
    each row has the perplexity per text, its change against ``full`` and the needle retrieval."""
    if "full" not in policies:
        policies = ["full", *policies]

    def config(policy, n=context):
        return policy_config(policy, gpu_budget=gpu_budget, k=k, sinks=sinks, context=n, k_min=k_min)

    rows = {policy: {"policy": policy} for policy in policies}
    for name, wins in texts.items():
        recorded = record_windows(model, wins, context - score)
        for policy, row in rows.items():
            row[f"ppl_{name}"] = math.exp(mean_nll(model, wins, context - score, config(policy), progress, recorded))
        del recorded
    needles = needle_trials(
        model,
        tokenizer,
        {p: (lambda n, p=p: config(p, n)) for p in policies},
        [context],
        depths=depths,
        progress=progress,
    )
    for policy, row in rows.items():
        trials = [t for t in needles if t.policy == policy]
        row.update(needle=retrieval(trials), needle_found=sum(t.found for t in trials), needle_trials=len(trials))
    rows = list(rows.values())
    full = next(r for r in rows if r["policy"] == "full")
    for row in rows:
        for name in texts:
            row[f"delta_{name}"] = row[f"ppl_{name}"] / full[f"ppl_{name}"] - 1
    return {"rows": rows, "needle": [t.__dict__ for t in needles]}


def markdown_table(rows: list[dict], texts: Sequence[str]) -> str:
    head = "| policy | " + " | ".join(f"ppl {t} (Δ vs full)" for t in texts) + " | needle |"
    lines = [head, "|" + "---|" * (len(texts) + 2)]
    for r in rows:
        cells = [f"{r[f'ppl_{t}']:.3f} ({100 * r[f'delta_{t}']:+.2f} %)" for t in texts]
        lines.append(f"| `{r['policy']}` | " + " | ".join(cells) + f" | {r['needle_found']}/{r['needle_trials']} |")
    return "\n".join(lines)
