"""float64 references for the kernels, from the stored (rounded) inputs of a case: the softmax
partial of every slice of the virtual sequence (device sinks | host tokens | device recent),
and the merges of those partials with and without the CPU's partial."""

from __future__ import annotations

import launchers
import numpy as np


def sequence(c):
    """Per row (b * hq): logits [rows, total] and values [rows, total, d] in token order."""
    ex = c.exact
    g = c.hq // c.hkv
    k = np.repeat(ex["dev_k"], g, axis=1)  # [b, hq, n_dev, d]
    v = np.repeat(ex["dev_v"], g, axis=1)
    q = ex["q"]
    # The kernel rounds the scale to float32 and multiplies the float32 dot by it.
    x = np.einsum("bhd,bhnd->bhn", q, k) * np.float64(np.float32(c.scale))
    if ex["dev_mask"] is not None:
        x = np.where(ex["dev_mask"][:, None, :], -np.inf, x)
    if c.m:
        hv = ex["host_v"] if not c.grouped else np.repeat(ex["host_v"], g, axis=1)
        s = c.sinks
        x = np.concatenate([x[..., :s], ex["host_logits"], x[..., s:]], -1)
        v = np.concatenate([v[:, :, :s], hv, v[:, :, s:]], 2)
    rows = c.b * c.hq
    return x.reshape(rows, -1), v.reshape(rows, x.shape[-1], c.d)


def partial(x, v):
    """Softmax partial (o, lse) of one row's tokens; (0, -inf) when none is attended. A token
    not attended contributes nothing, whatever its value row holds (NaN included)."""
    live = np.isfinite(x)
    if not live.any():
        return np.zeros(v.shape[-1]), -np.inf
    mx = x[live].max()
    w = np.where(live, np.exp(np.where(live, x - mx, 0)), 0)
    return w @ np.where(live[:, None], v, 0) / w.sum(), mx + np.log(w.sum())


def merge(parts):
    """Combines (o, lse) partials exactly; zeros and -inf when all are empty."""
    lses = np.array([l for _, l in parts])
    if not np.isfinite(lses).any():
        return np.zeros_like(parts[0][0]), -np.inf
    mx = lses[np.isfinite(lses)].max()
    w = np.where(np.isfinite(lses), np.exp(np.where(np.isfinite(lses), lses - mx, 0)), 0)
    o = sum(wi * oi for wi, (oi, li) in zip(w, parts) if np.isfinite(li))  # an empty part's output is ignored
    return o / w.sum(), mx + np.log(w.sum())


def expected(c):
    """{"part_o", "part_lse", "out_plain", "lse_plain", "out_hgca", "lse_hgca"} in float64."""
    x, v = sequence(c)
    rows, total = x.shape
    tps = launchers.split_geometry(c.b, c.hq, c.hkv, c.d, total, c.splits)["tokens_per_split"]
    part_o = np.zeros((rows, c.splits, c.d))
    part_lse = np.full((rows, c.splits), -np.inf)
    out = {k: [] for k in ("out_plain", "lse_plain", "out_hgca", "lse_hgca")}
    for r in range(rows):
        parts = []
        for s in range(c.splits):
            lo, hi = s * tps, min(total, (s + 1) * tps)
            o, l = partial(x[r, lo:hi], v[r, lo:hi]) if lo < hi else (np.zeros(c.d), -np.inf)
            part_o[r, s], part_lse[r, s] = o, l
            parts.append((o, l))
        for tag, extra in (("plain", []), ("hgca", [(c.exact["host_o"][r], c.exact["host_lse"][r])])):
            o, l = merge(parts + extra)
            out[f"out_{tag}"].append(o)
            out[f"lse_{tag}"].append(l)
    res = {k: np.array(val) for k, val in out.items()}
    res["part_o"], res["part_lse"] = part_o, part_lse
    return res
