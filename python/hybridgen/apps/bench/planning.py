"""Memory planning: which policies' caches fit in the memory left, before anything is allocated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from ...config import HybridConfig

#: Share of the free memory a sweep plans to use (the rest absorbs estimate error and other work).
MEMORY_HEADROOM = 0.85
GIB = 1024**3


def free_memory(device: torch.device, cap_gib: Optional[float]) -> dict:
    """Bytes free now: ``host`` (MemAvailable) and, on CUDA, ``device``; capped by ``cap_gib``."""
    host = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                host = int(line.split()[1]) * 1024
    except OSError:
        pass
    if host is None:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    pools = {"host": host}
    if device.type == "cuda":
        pools["device"] = torch.cuda.mem_get_info(device)[0]
    if cap_gib is not None:
        pools = {k: min(v, int(cap_gib * GIB)) for k, v in pools.items()}
    return pools


def footprint(policy: str, n: int, batch: int, info, dtype_bytes: int, cfg: HybridConfig) -> dict:
    """Estimated bytes a policy's cache holds at context ``n``: ``device`` and ``host``."""
    token = info.layers * batch * info.kv_heads * info.head_dim * 2 * dtype_bytes  # K and V, every layer
    layer_kv = token * n // info.layers
    resident = (cfg.sinks + cfg.gpu_budget + cfg.evict_chunk + 1) * token
    if policy == "full":
        return {"device": 2 * token * n, "host": 0}  # the device tier grows by doubling
    if policy == "aoc":
        return {"device": 0, "host": token * n}
    if policy == "aog":
        return {"device": layer_kv, "host": token * n}  # one layer's KV streamed at a time
    device = resident + layer_kv  # placing the prompt holds one layer's KV on the device at a time
    if policy in ("h2o", "keyformer"):
        device += cfg.k * token + info.layers * batch * info.kv_heads * n * 4  # key tokens + scores
    elif policy == "infinigen":
        device += int(0.3 * token * n / 2)  # partial keys (30 % of the channels)
    return {"device": device, "host": token * n}


def plan(policies, n, batch, info, dtype_bytes, cfg, pools: dict) -> tuple[dict, dict]:
    """Which policies fit, in order: ``(estimates, reasons)`` — ``reasons[p]`` is why ``p`` is
    skipped. Without a separate device pool (CPU), device and host bytes share host RAM."""
    left = {k: int(v * MEMORY_HEADROOM) for k, v in pools.items()}
    estimates, reasons = {}, {}
    for p in policies:
        need = footprint(p, n, batch, info, dtype_bytes, cfg)
        estimates[p] = need
        want = {"host": need["host"]} if "device" in left else {"host": need["host"] + need["device"]}
        if "device" in left:
            want["device"] = need["device"]
        short = [k for k, v in want.items() if v > left[k]]
        if short:
            reasons[p] = "; ".join(f"needs ~{_size(want[k])} of {k} memory, {_size(left[k])} left" for k in short)
            continue
        for k, v in want.items():
            left[k] -= v
    return estimates, reasons


def _size(n: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
