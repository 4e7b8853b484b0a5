"""K_min profiling: the fewest host tokens per head (Post-QKT top-K) whose perplexity stays within
a tolerance of full attention — the inflection point below which accuracy falls off.

The sweep keeps a share of the host tokens (1/64 … 1/2 by default) and measures perplexity
through the decode path on sliding windows of a long text. ``K_min`` is the smallest K from
which every larger K in the sweep stays within the tolerance. The profile is saved as JSON;
:meth:`hybridgen.HybridConfig.from_profile` loads it as the scheduler's lower bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.assets import data_dir
from .common import policy_config
from .perplexity import decode_perplexity
from .replay import record_prefill

#: Shares of the host tokens the sweep keeps.
SHARES = (1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


@dataclass
class KminProfile:
    model: str
    k_min: int
    tolerance: float  # relative perplexity increase allowed, e.g. 0.01
    context: int
    gpu_budget: int
    sinks: int
    full_perplexity: float
    #: One point per K: {"k", "share", "perplexity", "delta"}.
    curve: list = field(default_factory=list)
    command: str = ""

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def default_profile_path(model_name: str) -> Path:
    """Where ``profile-kmin`` saves a model's profile unless told otherwise."""
    return data_dir() / "profiles" / f"{Path(model_name).name}.json"


def windows(ids: torch.Tensor, context: int, count: int) -> list[torch.Tensor]:
    """``count`` consecutive ``[1, context]`` windows of ``ids [1, n]``."""
    if ids.shape[1] < context * count:
        raise ValueError(f"the text has {ids.shape[1]} tokens, fewer than {count} windows of {context}")
    return [ids[:, i * context : (i + 1) * context] for i in range(count)]


def mean_nll(model, wins: Sequence[torch.Tensor], prefix: int, config, progress: bool, recorded=None) -> float:
    """Mean NLL over windows; ``recorded``: their prefixes' recorded prefills (one per window)."""
    recorded = recorded or [None] * len(wins)
    return sum(
        decode_perplexity(model, w, prefix, config, progress=progress, recorded=r).nll for w, r in zip(wins, recorded)
    ) / len(wins)


def record_windows(model, wins: Sequence[torch.Tensor], prefix: int) -> list:
    """Each window's prefix prefilled once, for every policy to replay."""
    return [record_prefill(model, w[:, :prefix]) for w in wins]


def choose_k_min(curve: Sequence[dict], tolerance: float) -> int:
    """The smallest K from which every larger K of the sweep stays within ``tolerance``; the
    largest K if even that one does not (the profile then says so through its curve)."""
    points = sorted(curve, key=lambda p: p["k"])
    k_min = points[-1]["k"]
    for point in reversed(points):
        if point["delta"] > tolerance:
            break
        k_min = point["k"]
    return k_min


def profile_kmin(
    model,
    wins: Sequence[torch.Tensor],
    *,
    score: int,
    gpu_budget: int,
    sinks: int = 4,
    shares: Sequence[float] = SHARES,
    tolerance: float = 0.01,
    model_name: str = "",
    progress: bool = False,
) -> KminProfile:
    """Sweeps K over ``shares`` of the host tokens and returns the profile (see the module doc)."""
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1), got {tolerance}")
    if not shares or any(not 0 < s <= 1 for s in shares):
        raise ValueError(f"shares must be fractions in (0, 1], got {list(shares)}")
    context = wins[0].shape[1]
    prefix = context - score
    host = context - gpu_budget - sinks  # host tokens at the last scored position
    recorded = record_windows(model, wins, prefix)
    full = math.exp(mean_nll(model, wins, prefix, None, progress, recorded))
    curve = []
    for share in sorted(set(shares)):
        k = max(1, round(share * host))
        config = policy_config("post_qkt", gpu_budget=gpu_budget, k=k, sinks=sinks, context=context)
        ppl = math.exp(mean_nll(model, wins, prefix, config, progress, recorded))
        curve.append({"k": k, "share": share, "perplexity": ppl, "delta": ppl / full - 1})
    return KminProfile(
        model=model_name,
        k_min=choose_k_min(curve, tolerance),
        tolerance=tolerance,
        context=context,
        gpu_budget=gpu_budget,
        sinks=sinks,
        full_perplexity=full,
        curve=curve,
    )
