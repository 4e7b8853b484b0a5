"""Every policy on one harness: perplexity on long texts and needle retrieval at one context and
one token budget, in one table (the evidence behind the README's accuracy claims)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

from .common import policy_config
from .kmin import mean_nll
from .needle import DEPTHS, needle_trials, retrieval


def compare_policies(model, tokenizer, policies: Sequence[str], texts: dict, *, context: int, score: int,
                     gpu_budget: int, k: int, sinks: int = 4, k_min: Optional[int] = None,
                     depths: Sequence[float] = DEPTHS, progress: bool = False) -> dict:
    """``texts``: name -> list of ``[1, context]`` windows. Returns ``{"rows": [...], "needle": [...]}``;
    each row has the perplexity per text, its change against ``full`` and the needle retrieval."""
    if "full" not in policies:
        policies = ["full", *policies]

    def config(policy, n=context):
        return policy_config(policy, gpu_budget=gpu_budget, k=k, sinks=sinks, context=n, k_min=k_min)

    rows, needles = [], []
    for policy in policies:
        row = {"policy": policy}
        for name, wins in texts.items():
            row[f"ppl_{name}"] = math.exp(mean_nll(model, wins, context - score, config(policy), progress))
        trials = needle_trials(model, tokenizer, policy, [context], lambda n: config(policy, n), depths=depths,
                              progress=progress)
        row["needle"] = retrieval(trials)
        row["needle_found"] = sum(t.found for t in trials)
        row["needle_trials"] = len(trials)
        needles += trials
        rows.append(row)
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
