"""CPU logit calculator vs the machine's read bandwidth and torch's CPU matmul.

Scans a key set larger than the last-level cache (default 1.5 GiB per dtype) with GQA group 4,
head_dim 128, on all cores, and reports GB/s of K read for:
  * hybridgen's logit kernel (runtime-dispatched SIMD),
  * a plain streaming read of the very same key bytes (the bandwidth ceiling the kernel is
    judged against), and the same read with software prefetching (a tuned, higher ceiling),
  * torch ``matmul(q, Kᵀ)`` on the same keys (same dtype),
plus top-K and partial-attention (softmax + value aggregation, LSE) throughput.

    .venv/bin/python benchmarks/logits_bandwidth.py   # writes benchmarks/results/logits_bandwidth.{json,png}
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hybridgen

RESULTS = Path(__file__).parent / "results"


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fill_store(dtype: torch.dtype, tokens: int, kv_heads: int, head_dim: int) -> hybridgen.HostKVStore:
    token_bytes = kv_heads * head_dim * torch.finfo(dtype).bits // 8
    store = hybridgen.HostKVStore(
        1, 1, kv_heads, head_dim, dtype,
        near_capacity_bytes=tokens * token_bytes,
        far_capacity_bytes=tokens * token_bytes,
        max_host_tokens=tokens,
    )
    store.append(0, tokens)
    chunk = 65536
    gen = torch.Generator().manual_seed(0)
    for start in tqdm(range(0, tokens, chunk), desc=f"filling {dtype}", leave=False):
        m = min(chunk, tokens - start)
        k = torch.randn((1, kv_heads, m, head_dim), generator=gen).to(dtype)
        store.evict(0, k, k)
    return store


def interleaved(fns: dict, repeats: int) -> dict:
    """Median wall time of each of ``fns`` over ``repeats`` rounds, run in turn each round so
    that drifting machine load hits them all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in tqdm(range(repeats), desc="timing", leave=False):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def bench_dtype(dtype, tokens, kv_heads, group, head_dim, repeats, topk_k):
    store = fill_store(dtype, tokens, kv_heads, head_dim)
    q_heads = kv_heads * group
    q = torch.randn(1, q_heads, head_dim)
    scale = head_dim**-0.5
    out = torch.empty(1, q_heads, tokens)

    # The very same key bytes for the streaming read and for torch (zero-copy view).
    keys = store.view(0, "keys", 0, tokens)[0]  # [kv_heads, tokens, d], contiguous
    assert keys.is_contiguous()
    raw = keys.view(torch.uint8).reshape(-1)
    k_bytes = raw.numel()
    qg = q[0].view(kv_heads, group, head_dim).to(dtype)
    own = keys.clone()  # torch also gets keys in memory it allocated itself
    t = interleaved(
        {
            "stream_read": lambda: hybridgen._native.stream_read(raw),
            "stream_read_prefetch": lambda: hybridgen._native.stream_read(raw, prefetch=True),
            "kernel": lambda: store.logits(0, q, scale, out=out),
            "torch_matmul": lambda: torch.matmul(qg, keys.transpose(1, 2)),
            "torch_bmm": lambda: torch.bmm(qg, keys.transpose(1, 2)),
            "torch_matmul_own_copy": lambda: torch.matmul(qg, own.transpose(1, 2)),
        },
        repeats,
    )
    del own
    t_torch = min(t["torch_matmul"], t["torch_bmm"], t["torch_matmul_own_copy"])
    ref = torch.matmul(q[0].view(kv_heads, group, head_dim), keys[:, :4096].float().transpose(1, 2))
    err = (out[0, :, :4096] - ref.reshape(q_heads, -1) * scale).abs().max().item()

    k_idx, _ = hybridgen.topk(out, topk_k)
    picked = torch.gather(out, 2, k_idx)
    t2 = interleaved(
        {
            "topk": lambda: hybridgen.topk(out, topk_k),
            "partial_all": lambda: store.partial_attention(0, out),
            "partial_topk": lambda: store.partial_attention(0, picked, k_idx),
        },
        max(3, repeats // 2),
    )
    bw = k_bytes / t["stream_read"] / 1e9
    bw_tuned = k_bytes / t["stream_read_prefetch"] / 1e9
    return {
        "dtype": str(dtype).replace("torch.", ""),
        "tokens": tokens,
        "k_bytes": k_bytes,
        "read_bandwidth_gbps": bw,
        "prefetching_read_bandwidth_gbps": bw_tuned,
        "kernel_s": t["kernel"],
        "kernel_gbps": k_bytes / t["kernel"] / 1e9,
        "share_of_bandwidth": k_bytes / t["kernel"] / 1e9 / bw,
        "share_of_prefetching_bandwidth": k_bytes / t["kernel"] / 1e9 / bw_tuned,
        "torch_matmul_s": t["torch_matmul"],
        "torch_bmm_s": t["torch_bmm"],
        "torch_matmul_own_copy_s": t["torch_matmul_own_copy"],
        "torch_best_gbps": k_bytes / t_torch / 1e9,
        "speedup_vs_torch": t_torch / t["kernel"],
        "max_abs_err_vs_f32_reference": err,
        "topk_k": topk_k,
        "topk_s": t2["topk"],
        "topk_logits_per_s": q_heads * tokens / t2["topk"],
        "partial_all_s": t2["partial_all"],
        "partial_all_gbps_of_v": k_bytes / t2["partial_all"] / 1e9,
        "partial_topk_s": t2["partial_topk"],
    }


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["results"]
    labels = [r["dtype"] for r in rows]
    series = {
        "plain streaming read": [r["read_bandwidth_gbps"] for r in rows],
        "prefetching streaming read": [r["prefetching_read_bandwidth_gbps"] for r in rows],
        "hybridgen logits": [r["kernel_gbps"] for r in rows],
        "torch matmul (best)": [r["torch_best_gbps"] for r in rows],
    }
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.2
    for i, (name, vals) in enumerate(series.items()):
        bars = ax.bar([x + (i - 1.5) * width for x in range(len(labels))], vals, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("GB/s of K read")
    m = record["machine"]
    ax.set_title(
        f"q·Kᵀ over {rows[0]['k_bytes'] / 2**30:.1f} GiB of keys, GQA {record['shape']['group']}, "
        f"d={record['shape']['head_dim']}, {m['threads']} threads ({m['isa']})",
        fontsize=9,
    )
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.5, help="size of the key set per dtype (GiB)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--out", type=Path, default=RESULTS / "logits_bandwidth.json")
    args = p.parse_args()

    torch.set_num_threads(hybridgen.num_threads())
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        # A whole number of pages per head keeps the key strips back to back (one flat buffer).
        tokens = int(args.gib * 2**30) // (args.kv_heads * args.head_dim * 2) // 64 * 64
        r = bench_dtype(dtype, tokens, args.kv_heads, args.group, args.head_dim, args.repeats, args.topk)
        results.append(r)
        print(
            f"{r['dtype']:>8}: read bw {r['read_bandwidth_gbps']:.1f} GB/s plain, "
            f"{r['prefetching_read_bandwidth_gbps']:.1f} prefetching | kernel {r['kernel_gbps']:.1f} GB/s "
            f"({100 * r['share_of_bandwidth']:.0f}% / {100 * r['share_of_prefetching_bandwidth']:.0f}%) | torch {r['torch_best_gbps']:.1f} GB/s -> "
            f"{r['speedup_vs_torch']:.2f}x | top-{args.topk} {r['topk_logits_per_s'] / 1e6:.0f} M logits/s | "
            f"partial attn all {r['partial_all_gbps_of_v']:.1f} GB/s of V, top-k {1e3 * r['partial_topk_s']:.2f} ms | "
            f"max err {r['max_abs_err_vs_f32_reference']:.1e}",
            flush=True,
        )
    record = {
        "command": "python benchmarks/logits_bandwidth.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"
        ),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": hybridgen.num_threads(),
            "isa": hybridgen.isa(),
            "torch": torch.__version__,
        },
        "shape": {"kv_heads": args.kv_heads, "group": args.group, "head_dim": args.head_dim},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
