"""HybridConfig: budgets, selection policy, merge mode, scheduling and memory placement."""

from __future__ import annotations

import operator
from dataclasses import asdict, dataclass
from typing import Optional

from . import _native

#: hybridgen's own policies, then the baselines (see :mod:`hybridgen.policies`).
POLICIES = (
    "all",
    "post_qkt",
    "pre_qkt",
    "scheduler",
    "quest",
    "full",
    "aog",
    "aoc",
    "h2o",
    "keyformer",
    "streaming",
    "infinigen",
)
MERGES = _native.MERGES
#: How Pre-QKT chooses its host tokens ahead of the logits: by the page summaries of the keys
#: (Quest's upper bound, one choice per GQA group) or by position (earliest, strided, most recent).
PREDICTORS = ("pages", "positional")
#: Where the device half runs on a CUDA device: the project's kernels, torch ops, or kernels if usable.
KERNELS = ("auto", "cuda", "torch")


@dataclass
class HybridConfig:
    """How hybrid attention splits and serves the KV cache.

    Attributes:
        gpu_budget: most recent tokens kept on the model's device per layer (besides the sinks).
        sinks: leading tokens that never leave the device (attention sinks).
        evict_chunk: during decoding, overflow tokens move to the host this many at a time (the
            device tier holds ``gpu_budget`` to ``gpu_budget + evict_chunk`` recent tokens).
        policy: which host tokens the CPU attends to each step:
            ``"all"`` every host token (exact: equals full attention);
            ``"post_qkt"`` logits over all host tokens, then the top ``k`` per head;
            ``"pre_qkt"`` ``k`` tokens chosen ahead of the logits by ``predictor``, logits only
            over those;
            ``"scheduler"`` the feedback scheduler adapts K in ``[k_min, k_max]`` and switches
            between Post- and Pre-QKT from measured step times;
            ``"quest"`` Pre-QKT by page summaries with every query head choosing its own pages
            (Quest, arXiv 2406.10774, at the same budget; reads up to a GQA group's worth more keys);
            baselines, through the same cache plumbing: ``"full"`` (all KV on the device),
            ``"aog"`` (all KV in host memory, streamed to the device each step), ``"aoc"`` (all
            KV and attention on the CPU), ``"h2o"`` / ``"keyformer"`` (``k`` heavy-hitter tokens
            + the recent window, the rest dropped), ``"streaming"`` (the sinks plus a window of
            ``gpu_budget`` recent tokens, StreamingLLM), ``"infinigen"`` (``k`` host tokens per
            KV head chosen by next-layer speculation on partial keys, fetched to the device).
            :func:`hybridgen.policies.table` says what each keeps and moves.
        k: host tokens per head for the fixed ``post_qkt`` / ``pre_qkt`` policies, and the
            heavy-hitter / fetch budget of ``h2o``, ``keyformer`` and ``infinigen``.
        k_min, k_max: the scheduler's range (``k_min`` comes from accuracy profiling).
        predictor: how ``pre_qkt`` (and the scheduler's Pre-QKT) choose their tokens:
            ``"pages"`` the pages of ``P = _native.PAGE_TOKENS`` host tokens whose key summaries
            (element-wise min and max, kept by the store) bound the logit highest, one choice per
            KV head (max over the GQA group), covering ``max(2k, n_host / 8)`` tokens; their exact
            logits, and the ``k`` best of them per head: the CPU reads ``2/P`` of the keys to
            choose and a quarter in all (while ``k <= n_host / 16``);
            ``"positional"`` the earliest eighth, the most recent half and a stride between.
        merge: ``"lse"`` (the CPU returns a partial output and its log-sum-exp; HGCA) or
            ``"concat"`` (the CPU ships selected logits and value rows; HybridGen).
        pipeline: run each layer's CPU stage on a worker thread, overlapped with device work.
        speculative: with ``pipeline``, start layer i+1's CPU stage from layer i's input
            (approximate query); otherwise it starts from the true query (exact).
        max_context: tokens per sequence the host store reserves room for (address space;
            memory is committed as tokens arrive). ``None``: the model's maximum positions.
        near_capacity_bytes, far_capacity_bytes: host tier budgets (``None``: room for
            ``max_context`` tokens of every layer in each).
        near_node, far_node: NUMA nodes of the key and value tiers (``None``: local node).
        kernels: on a CUDA device, ``"auto"`` runs the device half with hybridgen's CUDA kernels
            where they apply (f16/bf16/f32, head_dim <= 256) and torch ops otherwise; ``"cuda"``
            requires the kernels (an error on a machine without CUDA); ``"torch"`` never uses them.
        pin_host: register the host store as page-locked memory so transfers from it are
            asynchronous (commits the store's reserved room: size ``max_context`` to need).
            ``None``: pin when the model is on a CUDA device; ``True`` on a machine without CUDA
            is an error.
    """

    gpu_budget: int = 1024
    sinks: int = 4
    evict_chunk: int = 32
    policy: str = "scheduler"
    k: int = 256
    k_min: int = 64
    k_max: int = 2048
    predictor: str = "pages"
    merge: str = "lse"
    pipeline: bool = False
    speculative: bool = False
    max_context: Optional[int] = None
    near_capacity_bytes: Optional[int] = None
    far_capacity_bytes: Optional[int] = None
    near_node: Optional[int] = None
    far_node: Optional[int] = None
    kernels: str = "auto"
    pin_host: Optional[bool] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "HybridConfig":
        """Checks every field (type first, naming the field, then range); integer fields accept
        anything with ``__index__`` (numpy integers) and are stored as ``int``; ``bool`` is not an
        integer here. Returns ``self``."""

        def integer(name, minimum, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not hasattr(type(v), "__index__"):
                raise TypeError(f"{name} must be an int{' or None' if optional else ''}, got {type(v).__name__} {v!r}")
            v = operator.index(v)
            setattr(self, name, v)
            if v < minimum:
                raise ValueError(f"{name} must be >= {minimum}, got {v}")

        def choice(name, options):
            v = getattr(self, name)
            if not isinstance(v, str):
                raise TypeError(f"{name} must be a str (one of {options}), got {type(v).__name__} {v!r}")
            if v not in options:
                raise ValueError(f"unknown {name} {v!r}: expected one of {options}")

        def flag(name, optional=False):
            v = getattr(self, name)
            if not (isinstance(v, bool) or (optional and v is None)):
                allowed = "True, False or None" if optional else "True or False"
                raise TypeError(f"{name} must be {allowed}, got {type(v).__name__} {v!r}")

        for name in ("gpu_budget", "evict_chunk", "k", "k_min", "k_max"):
            integer(name, 1)
        integer("sinks", 0)
        for name in ("max_context", "near_capacity_bytes", "far_capacity_bytes"):
            integer(name, 1, optional=True)
        for name in ("near_node", "far_node"):
            integer(name, 0, optional=True)
        choice("policy", POLICIES)
        choice("merge", MERGES)
        choice("predictor", PREDICTORS)
        choice("kernels", KERNELS)
        flag("pipeline")
        flag("speculative")
        flag("pin_host", optional=True)
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) must not exceed k_max ({self.k_max})")
        if self.speculative and not self.pipeline:
            raise ValueError("speculative=True needs pipeline=True")
        return self

    @property
    def use_kernels(self) -> Optional[bool]:
        """The ``kernels`` argument of :mod:`hybridgen.attention`'s functions."""
        return {"auto": None, "cuda": True, "torch": False}[self.kernels]

    def require_cuda_options(self, device) -> None:
        """Raises a clear error if a CUDA-only option is set but the model or machine has no CUDA."""
        import torch

        device = torch.device(device)
        for name, needs in (("kernels='cuda'", self.kernels == "cuda"), ("pin_host=True", self.pin_host is True)):
            if needs:
                from .cuda import require

                require(f"HybridConfig({name})", device)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_profile(cls, path, **fields) -> "HybridConfig":
        """A configuration whose ``k_min`` comes from a K_min profile saved by
        ``python -m hybridgen profile-kmin`` (other fields as given; ``k_max`` is raised to
        ``k_min`` if it would be smaller)."""
        import json
        from pathlib import Path

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no K_min profile at {path}: run `python -m hybridgen profile-kmin` first")
        try:
            k_min = json.loads(path.read_text())["k_min"]
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a K_min profile (expected JSON with 'k_min'): {e}") from None
        fields.setdefault("policy", "scheduler")
        fields["k_min"] = k_min
        fields["k_max"] = max(fields.get("k_max", cls.k_max), k_min)
        return cls(**fields)
