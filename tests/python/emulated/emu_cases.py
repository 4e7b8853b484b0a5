"""Randomised inputs for the kernels, sampled (not enumerated) from the shapes and corner cases
that matter, each stored in its kernel dtype and kept as the float64 of the stored value.
`make(seed, **fixed)` pins any of the sampled choices, for cases a test needs for sure."""

from __future__ import annotations

from dataclasses import dataclass, field

import launchers
import numpy as np

from hybridgen import _native

DTYPES = ("f16", "bf16", "f32")
# Common ones (16-byte loads), then odd ones the kernel takes (one element per load; 100 is a
# multiple of 4, so 16-byte loads for float32 only).
HEAD_DIMS = (64, 80, 96, 128, 256, 32, 1, 7, 33, 100, 129, 255)
# 1 = MHA; up to 8 query heads share a block (GQA), 12 take two blocks of 6.
GROUPS = (1, 1, 2, 3, 4, 8, 12)
SM_COUNTS = (1, 8, 132, 4096)
MIN_TOKENS = (1, 3, 16, 64)
WORK = 1500  # query heads * device tokens per case: keeps the sanitized emulation quick
VEC = {"f16": 8, "bf16": 8, "f32": 4}  # elements per 16-byte load
NAN = {"f16": np.uint16(0x7E00), "bf16": np.uint16(0x7FC0), "f32": np.float32(np.nan)}


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
    # Elements the worker shifts an array's start by (off 16-byte alignment): dev_k, dev_v, host_v.
    offsets: dict = field(default_factory=dict)
    arrays: dict = field(default_factory=dict)  # what the kernels read and write
    exact: dict = field(default_factory=dict)  # float64 of the stored inputs

    @property
    def vector_loads(self) -> bool:
        """Whether the kernel can use 16-byte loads (else it reads one element at a time)."""
        v = VEC[self.dtype]
        return (
            self.d % v == 0
            and self.dev_batch_stride % v == 0
            and self.dev_head_stride % v == 0
            and not any(self.offsets.values())
        )

    def name(self) -> str:
        kind = "mha" if self.hq == self.hkv else f"gqa{self.hq // self.hkv}"
        host = f"m{self.m}{'g' if self.grouped else 'h'}" if self.m else "m0"
        loads = "vec" if self.vector_loads else "scalar"
        return (
            f"s{self.seed}-{self.dtype}-b{self.b}-{kind}-d{self.d}-n{self.n_dev}-sink{self.sinks}-{host}"
            f"-split{self.splits}-{loads}-sched{self.schedule}"
        )


def make(
    seed: int, *, dtype=None, g=None, d=None, hkv=None, b=None, m=None, grouped=None, misaligned=None, splits=None
) -> Case:
    rng = np.random.default_rng(seed)
    dtype = dtype or DTYPES[seed % 3]
    g = g or int(rng.choice(GROUPS))
    hkv = hkv or int(rng.integers(1, 3))
    b = b or int(rng.integers(1, 4))
    d = d or int(rng.choice(HEAD_DIMS))
    hq = hkv * g
    rows = b * hq
    n_dev = int(rng.integers(0, max(2, WORK // rows)))
    if rng.random() < 0.1:
        n_dev = 0
    sinks = int(rng.integers(0, min(n_dev, 6) + 1))
    if m is None:
        m = int(rng.integers(1, 100)) if rng.random() < 0.7 else 0
    grouped = bool(rng.random() < 0.5) if grouped is None else grouped
    if splits is None:
        if rng.random() < 0.3:  # what the launcher itself would choose
            splits = _native.split_count(b, hq, hkv, n_dev + m, int(rng.choice(SM_COUNTS)))
        else:  # more slices than that, down to one token each (and empty ones past the end)
            splits = _native.choose_splits(b * hkv, n_dev + m, int(rng.choice(SM_COUNTS)), int(rng.choice(MIN_TOKENS)))
    scale = float(np.float32(1 / np.sqrt(d)))
    c = Case(seed, dtype, b, hq, hkv, d, n_dev, sinks, m, grouped, splits, seed % 3, scale)
    if misaligned is None:
        misaligned = rng.random() < 0.2
    vec = VEC[dtype]

    # The device tier is a prefix view of a longer cache, as the model's cache holds it, with
    # heads apart by a stride (rows contiguous). Misaligned: rows start off 16 bytes (the start
    # shifted, or a head stride that is not a whole number of 16-byte units).
    cap = n_dev + int(rng.integers(0, 9))
    pad = int(rng.choice([0, vec]))
    if misaligned:
        if rng.random() < 0.5:
            c.offsets = {"dev_k": 1, "dev_v": 1}
        else:
            pad += 1
        if m and rng.random() < 0.5:
            c.offsets["host_v"] = 1
    c.dev_head_stride = max(cap, 1) * d + pad
    c.dev_batch_stride = hkv * c.dev_head_stride
    c.arrays["q"], c.exact["q"] = store(rng.standard_normal((b, hq, d)), dtype)

    mask = None
    if rng.random() < 0.6 and n_dev:
        mask = rng.random((b, n_dev)) < rng.choice([0.05, 0.3, 0.9])
        if rng.random() < 0.4:
            mask[rng.integers(0, b)] = True  # a sequence with every device token masked
        c.arrays["dev_mask"] = mask.astype(np.uint8)
    c.exact["dev_mask"] = mask

    for name in ("dev_k", "dev_v"):
        raw, exact = store(rng.standard_normal((b, hkv, max(cap, 1), d)), dtype)
        if mask is not None:  # what a masked slot holds must not matter: make it NaN
            raw[:, :, :n_dev][np.broadcast_to(mask[:, None, :], (b, hkv, n_dev))] = NAN[dtype]
            exact[:, :, :n_dev][np.broadcast_to(mask[:, None, :], (b, hkv, n_dev))] = np.nan
        flat = np.full(b * c.dev_batch_stride, NAN[dtype], raw.dtype)  # the gaps between heads: NaN
        for bi in range(b):
            for h in range(hkv):
                at = bi * c.dev_batch_stride + h * c.dev_head_stride
                flat[at : at + raw.shape[2] * d] = raw[bi, h].ravel()
        c.arrays[name], c.exact[name] = flat, exact[:, :, :n_dev]

    if m:
        logits = (rng.standard_normal((b, hq, m)) * 3).astype(np.float32)
        logits[rng.random((b, hq, m)) < 0.1] = -np.inf
        if rng.random() < 0.4:
            logits[rng.integers(0, b), rng.integers(0, hq)] = -np.inf  # a row the CPU dropped entirely
        c.arrays["host_logits"] = logits
        c.exact["host_logits"] = logits.astype(np.float64)
        raw, exact = store(rng.standard_normal((b, hkv if grouped else hq, m, d)), dtype)
        # A value row no head attends may be anything: NaN.
        dropped = np.isneginf(logits).reshape(b, hkv, g, m).all(axis=2) if grouped else np.isneginf(logits)
        raw[dropped], exact[dropped] = NAN[dtype], np.nan
        c.arrays["host_v"], c.exact["host_v"] = raw, exact

    # The CPU's own partial (HGCA merge); some rows had nothing to attend.
    host_lse = (rng.standard_normal(rows) * 3).astype(np.float32)
    host_lse[rng.random(rows) < 0.2] = -np.inf
    host_o = rng.standard_normal((rows, d)).astype(np.float32)
    host_o[np.isneginf(host_lse)] = np.nan  # an empty partial's output may hold anything: the merge ignores it
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
    split = dict(
        q="@q",
        dev_k="@dev_k",
        dev_v="@dev_v",
        dev_batch_stride=c.dev_batch_stride,
        dev_head_stride=c.dev_head_stride,
        dev_mask=ref("dev_mask"),
        n_dev=c.n_dev,
        sinks=c.sinks,
        host_logits=ref("host_logits"),
        host_v=ref("host_v"),
        m=c.m,
        host_grouped=c.grouped,
        hq=c.hq,
        hkv=c.hkv,
        d=c.d,
        scale=c.scale,
        part_o="@part_o",
        part_lse="@part_lse",
        geometry=launchers.split_geometry(c.b, c.hq, c.hkv, c.d, c.n_dev + c.m, c.splits),
        schedule=c.schedule,
        seed=c.seed,
    )
    merge = launchers.merge_geometry(c.b * c.hq, c.d, c.splits)
    plain = dict(
        part_o="@part_o",
        part_lse="@part_lse",
        host_o=None,
        host_lse=None,
        out="@out_plain",
        out_lse="@lse_plain" if c.lse_wanted else None,
        geometry=merge,
        schedule=c.schedule,
        seed=c.seed,
    )
    hgca = dict(
        part_o="@part_o",
        part_lse="@part_lse",
        host_o="@host_o",
        host_lse="@host_lse",
        out="@out_hgca",
        out_lse="@lse_hgca",
        geometry=merge,
        schedule=c.schedule,
        seed=c.seed,
    )
    return {
        "arrays": a,
        "offsets": dict(c.offsets),
        "calls": [
            ("split_attention", {**split, "dtype": c.dtype}),
            ("merge_partials", plain),
            ("merge_partials", hgca),
        ],
        "outputs": ["part_o", "part_lse", "out_plain", "lse_plain", "out_hgca", "lse_hgca"],
    }
