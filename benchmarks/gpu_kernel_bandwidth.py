"""The device partial (split-attention + merge kernels) against the GPU's memory bandwidth.

For a Llama-3.1-8B layer shape (32 query heads, 8 KV heads, head_dim 128, bfloat16) at 32K-128K
device tokens, batch 1 and 4, in one run:

  * ``kernel``: ``hybridgen.cuda.attention_partial`` (what the ``full``/``aog`` baselines and every
    hybrid step run on the device) — GB/s of K + V read;
  * ``copy``: a torch device-to-device copy of the same number of bytes — the bandwidth limit,
    counted as bytes read + written (what the HBM moves);
  * ``torch``: the same attention as torch ops (matmul, softmax, matmul) for comparison.

The kernel's share of the copy's bandwidth is the figure judged (bar: >= 70 %). Every row is
checked against a float64 reference first: a row whose kernel did not run, or ran wrong, fails
the run (exit 1) instead of reporting a speed.

    python benchmarks/gpu_kernel_bandwidth.py --out benchmarks/results/gpu_check
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

BAR = 0.70


def timed_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` on the current stream (CUDA events), after two warm-ups."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def torch_attention(q, k, v, scale):
    b, hq, d = q.shape
    hkv = k.shape[1]
    x = torch.matmul(q.view(b, hkv, hq // hkv, d).float(), k.transpose(-1, -2).float()) * scale
    return torch.matmul(torch.softmax(x, -1), v.float()).view(b, hq, d)


def check(q, k, v, scale, out) -> float:
    """Relative error of ``out`` against float64 (one query row per KV head, to stay cheap)."""
    b, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qs = q.view(b, hkv, g, d)[:, :, :1].double()
    x = torch.matmul(qs, k.double().transpose(-1, -2)) * scale
    want = torch.matmul(torch.softmax(x, -1), v.double())[:, :, 0]
    got = out.view(b, hkv, g, d)[:, :, 0].double()
    return ((got - want).abs().max() / want.abs().max()).item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernel_bandwidth: needs a CUDA GPU", file=sys.stderr)
        return 2
    from tqdm import tqdm

    import hybridgen
    from hybridgen import _native, cuda

    target = _native.load_kernels(torch.cuda.current_device(), cuda.kernel_cache_dir())
    hq, hkv, d, dtype = 32, 8, 128, torch.bfloat16
    scale = d**-0.5
    rows, failures = [], []
    cases = [(n, b) for n in args.contexts for b in args.batch]
    for n, b in tqdm(cases, desc="device partial", unit="shape"):
        gen = torch.Generator(device="cuda").manual_seed(n + b)
        q = torch.randn(b, hq, d, device="cuda", generator=gen).to(dtype)
        k = torch.randn(b, hkv, n, d, device="cuda", generator=gen).to(dtype)
        v = torch.randn(b, hkv, n, d, device="cuda", generator=gen).to(dtype)
        out, _ = cuda.attention_partial(q, k, v, scale)
        err = check(q, k, v, scale, out)
        if not err <= 1e-4:
            failures.append(f"{n} tokens, batch {b}: relative error {err:.2e}")
        nbytes = 2 * k.numel() * k.element_size()
        src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
        dst = torch.empty_like(src)
        ms_kernel = timed_ms(lambda: cuda.attention_partial(q, k, v, scale), args.repeats)
        ms_copy = timed_ms(lambda: dst.copy_(src), args.repeats)
        ms_torch = timed_ms(lambda: torch_attention(q, k, v, scale), max(3, args.repeats // 4))
        kernel_gbs, copy_gbs = nbytes / ms_kernel / 1e6, 2 * nbytes / ms_copy / 1e6
        rows.append(
            dict(
                tokens=n,
                batch=b,
                kv_bytes=nbytes,
                kernel_ms=ms_kernel,
                kernel_gbs=kernel_gbs,
                copy_gbs=copy_gbs,
                share_of_copy=kernel_gbs / copy_gbs,
                torch_ms=ms_torch,
                torch_gbs=nbytes / ms_torch / 1e6,
                speedup_over_torch=ms_torch / ms_kernel,
                rel_error=err,
            )
        )
        del q, k, v, src, dst, out
        torch.cuda.empty_cache()

    print(f"device partial on {torch.cuda.get_device_name()} ({target}), Llama-8B layer shape, bfloat16")
    print(
        f"{'tokens':>7} {'batch':>5} {'kernel GB/s':>12} {'copy GB/s':>10} {'share':>6} {'torch GB/s':>11} {'x torch':>8}"
    )
    for r in rows:
        print(
            f"{r['tokens']:>7} {r['batch']:>5} {r['kernel_gbs']:>12.0f} {r['copy_gbs']:>10.0f} "
            f"{r['share_of_copy']:>6.0%} {r['torch_gbs']:>11.0f} {r['speedup_over_torch']:>8.1f}"
        )
    worst = min(r["share_of_copy"] for r in rows)
    record = dict(
        command=" ".join(["python", "benchmarks/gpu_kernel_bandwidth.py", *(argv or sys.argv[1:])]),
        gpu=torch.cuda.get_device_name(),
        loaded=target,
        torch=torch.__version__,
        hybridgen=hybridgen.__version__ if hasattr(hybridgen, "__version__") else None,
        host=platform.processor() or platform.machine(),
        bar=BAR,
        worst_share=worst,
        meets_bar=worst >= BAR,
        rows=rows,
        failures=failures,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_kernel_bandwidth.json").write_text(json.dumps(record, indent=2))
    print(f"worst share of the copy bandwidth: {worst:.0%} (bar {BAR:.0%}: {'met' if worst >= BAR else 'NOT met'})")
    if failures:
        print("WRONG RESULTS:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
