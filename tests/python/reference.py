"""Independent torch references (float64) for the CPU attention operations."""

import torch


def expand_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """``[b, hkv, n, d]`` -> ``[b, hkv*group, n, d]`` (each KV head serves ``group`` q heads)."""
    return x.repeat_interleave(group, dim=1)


def logits(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``q [b, hq, d]``, ``keys [b, hkv, n, d]`` -> ``[b, hq, n]`` in float64."""
    group = q.shape[1] // keys.shape[1]
    return torch.einsum("bhd,bhnd->bhn", q.double(), expand_kv(keys.double(), group)) * scale


def attention(x: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over logits ``x [b, hq, n]`` applied to ``values [b, hq, n, d]``; with lse."""
    x = x.double()
    p = torch.softmax(x, dim=-1)
    return torch.einsum("bhn,bhnd->bhd", p, values.double()), torch.logsumexp(x, dim=-1)


def make_store(hybridgen, b, hkv, d, n, dtype, gen, **kw):
    """A one-layer store holding ``n`` random host tokens; returns it with the stored K and V."""
    store = hybridgen.HostKVStore(
        1,
        b,
        hkv,
        d,
        dtype,
        near_capacity_bytes=kw.pop("near", 1 << 26),
        far_capacity_bytes=kw.pop("far", 1 << 27),
        **kw,
    )
    keys = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((b, hkv, n, d), generator=gen).to(dtype)
    store.append(0, n)
    store.evict(0, keys, values)
    return store, keys, values
