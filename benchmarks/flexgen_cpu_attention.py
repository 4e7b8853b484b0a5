"""FlexGen's own CPU attention against hybridgen's CPU partial attention, on the same tokens.

FlexGen (0.1.8) computes decode attention on the CPU when its KV cache lives there
(``cpu_cache_compute``): ``TorchDevice.mha_gen`` takes the cache, laid out ``(s, b*n_head, d)``
float16, writes the new token into it, permutes K to ``(b*n_head, d, s)`` and V to
``(b*n_head, s, d)`` (``reshape`` copies them), widens q, K and V with ``.float()``, then
``bmm`` → mask (``torch.where(mask, w, -1e4)``) → ``softmax`` → ``bmm``
(``_attention_weights`` / ``_attention_value``). Those torch operations are reproduced here
exactly as FlexGen writes them (FlexGen itself is not imported; its last step,
``.cuda().half()``, moves the result to the GPU and is left out: this measures the CPU).

hybridgen runs the fused CPU stage over the same keys and values in its host store
(``cpu_stage(merge="lse")``: logits → softmax → value aggregation → log-sum-exp, each key and
value row read once), on every SIMD instruction set this CPU has. Shape: OPT-13B's attention
(40 heads × 128), batch 1 by default, 4K / 16K / 32K tokens, all in one run; the two outputs
are compared.

    .venv/bin/python benchmarks/flexgen_cpu_attention.py   # writes benchmarks/results/flexgen_cpu_attention.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import hybridgen

sys.path.insert(0, str(Path(__file__).parent))
from logits_bandwidth import cpu_model, interleaved  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def flexgen_cpu_attention(q, k_cache, v_cache, k_new, v_new, mask, b, src_s, n_head, head_dim):
    """``TorchDevice.mha_gen``'s dense, uncompressed path with the cache on the CPU, from the
    cache slice on: ``q (b*n_head, 1, d)`` pre-scaled, caches ``(s, b*n_head, d)`` float16,
    ``mask (b, src_s)`` bool. Returns ``(b, n_head, 1, d)`` float32."""
    tgt_s = 1
    # shape: (s, b * n_head, head_dim)
    k = k_cache[:src_s]
    v = v_cache[:src_s]
    k[src_s - 1 : src_s] = k_new
    v[src_s - 1 : src_s] = v_new
    # shape: (b * n_head, head_dim, s)
    k = k.permute(1, 2, 0).reshape(b * n_head, head_dim, src_s)
    # shape: (b * n_head, s, head_dim)
    v = v.permute(1, 0, 2).reshape(b * n_head, src_s, head_dim)
    q = q.float().cpu()
    k, v = k.float(), v.float()
    # _attention_weights
    attn_weights = torch.bmm(q, k)
    mask = mask.view(b, 1, 1, src_s)
    attn_weights = attn_weights.view(b, n_head, 1, src_s)
    attn_weights = torch.where(mask, attn_weights, -1e4)
    attn_weights = attn_weights.view(b * n_head, 1, src_s)
    attn_weights = F.softmax(attn_weights, dim=2)
    # _attention_value
    return torch.bmm(attn_weights, v).view(b, n_head, tgt_s, head_dim)


def bench(tokens: int, batch: int, n_head: int, head_dim: int, repeats: int, isas: list) -> dict:
    gen = torch.Generator().manual_seed(tokens)
    rows = batch * n_head
    # FlexGen's cache: (s, b * n_head, head_dim) float16, the last row for the new token.
    k_cache = torch.randn((tokens, rows, head_dim), generator=gen).half()
    v_cache = torch.randn((tokens, rows, head_dim), generator=gen).half()
    k_new, v_new = k_cache[-1:].clone(), v_cache[-1:].clone()
    scaling = head_dim**-0.5
    q = (torch.randn((rows, 1, head_dim), generator=gen) * scaling).half()  # FlexGen pre-scales q
    mask = torch.ones((batch, tokens), dtype=torch.bool)

    # The same tokens in hybridgen's host store: [b, n_head, s, d].
    store = hybridgen.HostKVStore(
        1,
        batch,
        n_head,
        head_dim,
        torch.float16,
        near_capacity_bytes=2 * k_cache.numel(),
        far_capacity_bytes=2 * v_cache.numel(),
        max_host_tokens=tokens,
    )
    store.append(0, tokens)
    store.evict(
        0,
        k_cache.view(tokens, batch, n_head, head_dim).permute(1, 2, 0, 3).contiguous(),
        v_cache.view(tokens, batch, n_head, head_dim).permute(1, 2, 0, 3).contiguous(),
    )
    q_h = q.float().view(batch, n_head, head_dim)
    out, lse = torch.empty((batch, n_head, head_dim)), torch.empty((batch, n_head))

    fns = {
        "flexgen": lambda: flexgen_cpu_attention(
            q, k_cache, v_cache, k_new, v_new, mask, batch, tokens, n_head, head_dim
        )
    }
    for isa in isas:
        fns[f"hybridgen/{isa}"] = lambda isa=isa: store.cpu_stage(
            0, q_h, 1.0, "lse", out=out, lse_out=lse, isa_name=isa
        )
    t = interleaved(fns, repeats, f"{tokens} tokens")

    want = flexgen_cpu_attention(q, k_cache, v_cache, k_new, v_new, mask, batch, tokens, n_head, head_dim)
    store.cpu_stage(0, q_h, 1.0, "lse", out=out, lse_out=lse)
    err = (out - want.view(batch, n_head, head_dim)).abs().max().item()
    kv_bytes = 2 * k_cache.numel() * 2
    r = {
        "tokens": tokens,
        "batch": batch,
        "kv_bytes": kv_bytes,
        "flexgen_ms": 1e3 * t["flexgen"],
        "flexgen_gbps_of_kv": kv_bytes / t["flexgen"] / 1e9,
        "max_abs_diff": err,
        "hybridgen": {},
    }
    for isa in isas:
        s = t[f"hybridgen/{isa}"]
        r["hybridgen"][isa] = {"ms": 1e3 * s, "gbps_of_kv": kv_bytes / s / 1e9, "speedup": t["flexgen"] / s}
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="4096,16384,32768")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=40, help="OPT-13B: 40")
    p.add_argument("--head-dim", type=int, default=128, help="OPT-13B: 128")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--isas", default=None, help="comma-separated; default: every SIMD one this CPU runs")
    p.add_argument("--out", type=Path, default=RESULTS / "flexgen_cpu_attention.json")
    args = p.parse_args()
    torch.set_num_threads(hybridgen.num_threads())
    isas = args.isas.split(",") if args.isas else [i for i in hybridgen.available_isas() if i != "scalar"]
    cpu = cpu_model()
    load_before = os.getloadavg()[0]
    print(
        f"{cpu['model']} | {hybridgen.num_threads()} threads (torch {torch.get_num_threads()}) | "
        f"OPT-13B shape {args.heads} x {args.head_dim}, batch {args.batch} | load {load_before:.2f}",
        flush=True,
    )
    rows = []
    for n in tqdm([int(x) for x in args.tokens.split(",")], desc="contexts"):
        r = bench(n, args.batch, args.heads, args.head_dim, args.repeats, isas)
        rows.append(r)
        tqdm.write(
            f"{n:>6} tokens: FlexGen {r['flexgen_ms']:7.2f} ms ({r['flexgen_gbps_of_kv']:.1f} GB/s of K+V) | "
            + " | ".join(
                f"hybridgen {isa} {h['ms']:6.2f} ms ({h['gbps_of_kv']:.1f} GB/s, {h['speedup']:.1f}x)"
                for isa, h in r["hybridgen"].items()
            )
            + f" | max |diff| {r['max_abs_diff']:.1e}"
        )
    record = {
        "command": "python benchmarks/flexgen_cpu_attention.py "
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out" and v is not None),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu": cpu,
            "threads": hybridgen.num_threads(),
            "torch_threads": torch.get_num_threads(),
            "isa": hybridgen.isa(),
            "torch": torch.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0],
        },
        "shape": {"heads": args.heads, "head_dim": args.head_dim, "batch": args.batch, "dtype": "float16"},
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
