"""``python -m hybridgen demo``: hybrid attention of one decode step over a long context, checked
against full attention.

A Llama-3-8B-shaped attention layer (32 query heads, 8 KV heads, head_dim 128) decodes one token
over a context of N tokens: the sinks and the most recent ``gpu_budget`` tokens stay in the
"device" tier (torch tensors on the chosen device), the rest go to the host store. Some key
tokens are planted so that the query attends strongly to them (as a retrieval query would);
the demo prints

* the error of both exact merge modes against full attention (they must agree to ~1e-6),
* whether Post-QKT top-K selection finds the planted tokens, the attention mass it keeps and
  the resulting output error,
* wall times of full attention (torch) and the hybrid step on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from tqdm import tqdm

from .. import _native
from ..attention import hybrid_attention
from ..host_store import HostKVStore


def build_parser(sub=None) -> argparse.ArgumentParser:
    p = (
        sub.add_parser(
            "demo",
            help=__doc__.splitlines()[0],
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if sub
        else argparse.ArgumentParser()
    )
    p.add_argument("--context", type=int, default=32768, help="tokens in the context (default 32768)")
    p.add_argument("--gpu-budget", type=int, default=1024, help="recent tokens kept on the device tier")
    p.add_argument("--sinks", type=int, default=4, help="attention-sink tokens kept on the device tier")
    p.add_argument("--top-k", type=int, default=1024, help="host tokens selected per head (Post-QKT)")
    p.add_argument("--planted", type=int, default=16, help="tokens the query is made to attend to")
    p.add_argument("--dtype", choices=_native.DTYPES, default="float16")
    p.add_argument("--device", default="cpu", help="device of the device tier (cpu or cuda)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def _timed(fn, repeats=5):
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    return out, (time.perf_counter() - t0) / repeats


def run(args) -> int:
    hq, hkv, d = 32, 8, 128
    n, budget, sinks = args.context, args.gpu_budget, args.sinks
    if n <= budget + sinks:
        raise SystemExit(f"--context ({n}) must exceed --gpu-budget + --sinks ({budget + sinks})")
    dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(args.seed)
    scale = d**-0.5
    n_host = n - budget - sinks

    # Keys and values of the whole context; the query points at a few planted host tokens.
    keys = torch.randn((1, hkv, n, d), generator=gen).to(dtype)
    values = torch.randn((1, hkv, n, d), generator=gen).to(dtype)
    planted = sinks + torch.randperm(n_host, generator=gen)[: args.planted].sort().values
    q = torch.randn((1, hq, d), generator=gen) * 0.5
    q += 16.0 * keys[0, :, planted].float().mean(dim=1).repeat_interleave(hq // hkv, 0).unsqueeze(0)

    store = HostKVStore(
        1,
        1,
        hkv,
        d,
        dtype,
        sinks=sinks,
        near_capacity_bytes=n_host * hkv * d * keys.element_size(),
        far_capacity_bytes=2 * n_host * hkv * d * keys.element_size(),
        max_host_tokens=n_host,
    )
    store.append(0, n)
    chunk = 8192
    for start in tqdm(range(sinks, sinks + n_host, chunk), desc="placing host KV", unit="chunk"):
        stop = min(start + chunk, sinks + n_host)
        store.evict(0, keys[:, :, start:stop].contiguous(), values[:, :, start:stop].contiguous())
    dev_idx = torch.cat([torch.arange(sinks), torch.arange(n - budget, n)])
    dev_k, dev_v = keys[:, :, dev_idx].to(device), values[:, :, dev_idx].to(device)
    q_dev = q.to(device)

    def full():
        x = torch.matmul(q_dev.view(1, hkv, hq // hkv, d), keys.to(device).float().transpose(-1, -2)) * scale
        p = torch.softmax(x, -1)
        return torch.matmul(p, values.to(device).float()).view(1, hq, d), p.view(1, hq, n)

    (want, probs), t_full = _timed(full)
    step = dict(scale=scale, sinks=sinks)
    lse_out, t_lse = _timed(lambda: hybrid_attention(q_dev, dev_k, dev_v, store, 0, merge="lse", **step))
    cat_out, t_cat = _timed(lambda: hybrid_attention(q_dev, dev_k, dev_v, store, 0, merge="concat", **step))
    k = min(args.top_k, n_host)
    sel_out, t_sel = _timed(lambda: hybrid_attention(q_dev, dev_k, dev_v, store, 0, merge="concat", top_k=k, **step))

    host_logits = store.logits(0, q, scale)
    from ..ops import topk

    chosen, _ = topk(host_logits, k)
    chosen_pos = chosen + sinks  # logical positions
    found = torch.isin(planted, chosen_pos[0]).float().mean().item()
    host_probs = probs[..., sinks : sinks + n_host]
    kept = torch.gather(host_probs, 2, chosen).sum(-1) / host_probs.sum(-1)

    def rel(out):
        return ((out.float() - want).abs().max() / want.abs().max()).item()

    print()
    print(f"hybridgen {_native.__version__} | CPU kernels: {_native.isa()}, {_native.num_threads()} threads")
    print(
        f"context {n} tokens: {sinks} sinks + {budget} recent on {device}, {n_host} on the host "
        f"({store.tier_stats()['far']['used_bytes'] / 2**20:.0f} MiB of values, "
        f"{store.tier_stats()['near']['used_bytes'] / 2**20:.0f} MiB of keys), {args.dtype}, "
        f"{hq} q heads / {hkv} kv heads / d={d}"
    )
    print(f"  full attention (torch, all {n} tokens)          {1e3 * t_full:8.2f} ms   reference")
    print(f"  hybrid exact, LSE merge (HGCA)                  {1e3 * t_lse:8.2f} ms   max rel err {rel(lse_out):.1e}")
    print(f"  hybrid exact, logits+V concat (HybridGen)       {1e3 * t_cat:8.2f} ms   max rel err {rel(cat_out):.1e}")
    print(f"  hybrid Post-QKT top-{k} per head                {1e3 * t_sel:8.2f} ms   max rel err {rel(sel_out):.1e}")
    print(
        f"  top-{k} found {found:.0%} of the {len(planted)} planted tokens and kept "
        f"{kept.mean().item():.1%} (min {kept.min().item():.1%}) of the host attention mass"
    )
    ok = max(rel(lse_out), rel(cat_out)) < 1e-4
    print("exact modes match full attention" if ok else "EXACT MODES DIVERGE FROM FULL ATTENTION")
    return 0 if ok else 1
