"""Randomised inputs for the kernels, sampled (not enumerated) from the shapes and corner cases
that matter, each stored in its kernel dtype and kept as the float64 of the stored value."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hybridgen import _native

DTYPES = ("f16", "bf16", "f32")
HEAD_DIMS = (64, 80, 96, 128, 256, 1, 7, 33, 100, 129, 255)  # common ones, then odd ones the kernel takes
GROUPS = (1, 1, 2, 4, 7)  # 1 = MHA
SM_COUNTS = (1, 8, 132, 4096)
MIN_TOKENS = (1, 3, 16, 64)
WORK = 1500  # rows * device tokens per case: keeps the sanitized emulation quick


def store(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw array as the kernel reads it, float64 of the stored values)."""
    if dtype == "f32":
        raw = x.astype(np.float32)
        return raw, raw.astype(np.float64)
    if dtype == "f16":
        h = x.astype(np.float16)
        return h.view(np.uint16), h.astype(np.float64)
    u = x.astype(np.float32).view(np.uint32)
    raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return raw, (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@dataclass
class Case:
    seed: int
    dtype: str
    b: int
    hq: int
    hkv: int
    d: int
    n_dev: int
    sinks: int
    m: int
    grouped: bool
    splits: int
    schedule: int
    scale: float
    dev_batch_stride: int = 0
    dev_head_stride: int = 0
    lse_wanted: bool = True
    arrays: dict = field(default_factory=dict)  # what the kernels read and write
    exact: dict = field(default_factory=dict)  # float64 of the stored inputs

    def name(self) -> str:
        kind = "mha" if self.hq == self.hkv else f"gqa{self.hq // self.hkv}"
        host = f"m{self.m}{'g' if self.grouped else 'h'}" if self.m else "m0"
        return (f"s{self.seed}-{self.dtype}-b{self.b}-{kind}-d{self.d}-n{self.n_dev}-sink{self.sinks}-{host}"
                f"-split{self.splits}-sched{self.schedule}")


def make(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    dtype = DTYPES[seed % 3]
    g = int(rng.choice(GROUPS))
    hkv = int(rng.integers(1, 3))
    b = int(rng.integers(1, 4))
    d = int(rng.choice(HEAD_DIMS))
    hq = hkv * g
    rows = b * hq
    n_dev = int(rng.integers(0, max(2, WORK // rows)))
    if rng.random() < 0.1:
        n_dev = 0
    sinks = int(rng.integers(0, min(n_dev, 6) + 1))
    m = int(rng.integers(1, 100)) if rng.random() < 0.7 else 0
    grouped = bool(rng.random() < 0.5)
    splits = _native.choose_splits(rows, n_dev + m, int(rng.choice(SM_COUNTS)), int(rng.choice(MIN_TOKENS)))
    scale = float(np.float32(1 / np.sqrt(d)))
    c = Case(seed, dtype, b, hq, hkv, d, n_dev, sinks, m, grouped, splits, seed % 3, scale)

    # The device tier is a prefix view of a longer cache, as the model's cache holds it.
    cap = n_dev + int(rng.integers(0, 9))
    c.arrays["q"], c.exact["q"] = store(rng.standard_normal((b, hq, d)), dtype)
    for name in ("dev_k", "dev_v"):
        raw, exact = store(rng.standard_normal((b, hkv, max(cap, 1), d)), dtype)
        c.arrays[name], c.exact[name] = raw, exact[:, :, :n_dev]
    c.dev_batch_stride, c.dev_head_stride = hkv * max(cap, 1) * d, max(cap, 1) * d

    mask = None
    if rng.random() < 0.6 and n_dev:
        mask = rng.random((b, n_dev)) < rng.choice([0.05, 0.3, 0.9])
        if rng.random() < 0.4:
            mask[rng.integers(0, b)] = True  # a sequence with every device token masked
        c.arrays["dev_mask"] = mask.astype(np.uint8)
    c.exact["dev_mask"] = mask

    if m:
        logits = (rng.standard_normal((b, hq, m)) * 3).astype(np.float32)
        logits[rng.random((b, hq, m)) < 0.1] = -np.inf
        if rng.random() < 0.4:
            logits[rng.integers(0, b), rng.integers(0, hq)] = -np.inf  # a row the CPU dropped entirely
        c.arrays["host_logits"] = logits
        c.exact["host_logits"] = logits.astype(np.float64)
        raw, exact = store(rng.standard_normal((b, hkv if grouped else hq, m, d)), dtype)
        c.arrays["host_v"], c.exact["host_v"] = raw, exact

    # The CPU's own partial (HGCA merge); some rows had nothing to attend.
    host_lse = (rng.standard_normal(rows) * 3).astype(np.float32)
    host_lse[rng.random(rows) < 0.2] = -np.inf
    host_o = rng.standard_normal((rows, d)).astype(np.float32)
    host_o[np.isneginf(host_lse)] = 0
    c.arrays["host_o"], c.arrays["host_lse"] = host_o, host_lse
    c.exact["host_o"], c.exact["host_lse"] = host_o.astype(np.float64), host_lse.astype(np.float64)

    # Outputs start as NaN: a slot no block writes shows up.
    c.arrays["part_o"] = np.full((rows, splits, d), np.nan, np.float32)
    c.arrays["part_lse"] = np.full((rows, splits), np.nan, np.float32)
    for tag in ("plain", "hgca"):
        c.arrays[f"out_{tag}"] = np.full((rows, d), np.nan, np.float32)
        c.arrays[f"lse_{tag}"] = np.full((rows,), np.nan, np.float32)
    c.lse_wanted = bool(rng.random() < 0.8)  # out_lse is optional (null) for the plain merge
    return c


def job(c: Case) -> dict:
    """The launches of one hybrid attention step, as src/gpu/device.rs issues them."""
    a = c.arrays
    ref = lambda k: f"@{k}" if k in a else None  # noqa: E731
    split = dict(q="@q", dev_k="@dev_k", dev_v="@dev_v", dev_batch_stride=c.dev_batch_stride,
                 dev_head_stride=c.dev_head_stride, dev_mask=ref("dev_mask"), n_dev=c.n_dev, sinks=c.sinks,
                 host_logits=ref("host_logits"), host_v=ref("host_v"), m=c.m, host_grouped=c.grouped, hq=c.hq,
                 hkv=c.hkv, d=c.d, scale=c.scale, splits=c.splits, part_o="@part_o", part_lse="@part_lse",
                 schedule=c.schedule, seed=c.seed)
    plain = dict(part_o="@part_o", part_lse="@part_lse", host_o=None, host_lse=None, out="@out_plain",
                 out_lse="@lse_plain" if c.lse_wanted else None, schedule=c.schedule, seed=c.seed)
    hgca = dict(part_o="@part_o", part_lse="@part_lse", host_o="@host_o", host_lse="@host_lse", out="@out_hgca",
                out_lse="@lse_hgca", schedule=c.schedule, seed=c.seed)
    return {"arrays": a, "calls": [("split_attention", {**split, "dtype": c.dtype}),
                                   ("merge_partials", plain), ("merge_partials", hgca)],
            "outputs": ["part_o", "part_lse", "out_plain", "lse_plain", "out_hgca", "lse_hgca"]}
