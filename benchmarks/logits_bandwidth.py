"""The CPU stage against the machine's read bandwidth, on every instruction set this CPU runs.

Scans a key set larger than the last-level cache (default 1.5 GiB of K, as much V, per dtype)
with GQA group 4, head_dim 128, and reports for each instruction set the CPU can run (forced
with ``isa=``), batch 1 and batch 8:
  * logits ``q·Kᵀ`` in GB/s of K, as a share of a plain streaming read of the very same key
    bytes (the ceiling the kernel is judged against) and of the same read with prefetching;
  * the fused partial attention over all host tokens (logits → softmax → value aggregation →
    LSE: ``cpu_stage(merge="lse")``) in GB/s of K + V, as a share of reading K and V;
  * top-K selection and gather (``cpu_stage(merge="concat", top_k=K)`` less the logits pass
    that feeds them), next to that logits pass;
  * Pre-QKT by page summaries at k = n / ``--page-fraction`` (``cpu_stage(merge="lse",
    pages=...)``: page bounds from the min/max summaries, top pages, exact logits and partial
    attention over their tokens; per KV head, and per query head as Quest does), next to the
    logits pass over every key (what Post-QKT must read) and with the share of keys each read;
plus torch's CPU ``matmul(q, Kᵀ)`` on the same keys, and the logits and partial attention at
1 thread up to all threads (each count in a child process with ``HYBRIDGEN_THREADS``).

Each round times everything in turn, so drifting load on a shared machine hits all alike;
medians of ``--repeats`` rounds. The record (``benchmarks/results/cpu_<model>.json`` and
``.png``) names the CPU model, so every machine measured keeps its own file.

    .venv/bin/python benchmarks/logits_bandwidth.py      # a few minutes on 2 cores
    .venv/bin/python benchmarks/logits_bandwidth.py --table   # the README's table, every machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import hybridgen
from hybridgen import _native
from hybridgen.attention import page_count

RESULTS = Path(__file__).parent / "results"
BATCHES = (1, 8)


# --- the machine --------------------------------------------------------------------------------


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            fields.setdefault(k.strip(), v.strip())
    return fields


# AMD families/models to Zen generations (cpuid; VMs often report only "AMD EPYC" as the name).
_AMD_ZEN = [
    (0x17, range(0x00, 0x30), "Zen / Zen+"),
    (0x17, range(0x30, 0x100), "Zen 2"),
    (0x19, range(0x00, 0x10), "Zen 3"),
    (0x19, range(0x10, 0x20), "Zen 4"),
    (0x19, range(0x20, 0x60), "Zen 3"),
    (0x19, range(0x60, 0x80), "Zen 4"),
    (0x19, range(0xA0, 0xB0), "Zen 4"),
    (0x1A, range(0x00, 0x100), "Zen 5"),
]
_ARM_PARTS = {
    "0xd40": "Neoverse V1",
    "0xd4f": "Neoverse V2",
    "0xd0c": "Neoverse N1",
    "0xd49": "Neoverse N2",
    "0xd84": "Neoverse V3",
}


def cpu_model() -> dict:
    """CPU model name, vendor, family/model and (where known) the microarchitecture."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    vendor = info.get("vendor_id") or info.get("CPU implementer", "")
    uarch = None
    try:
        family, model = int(info.get("cpu family", "")), int(info.get("model", ""))
    except ValueError:
        family = model = None
    if vendor == "AuthenticAMD" and family is not None:
        uarch = next((z for f, ms, z in _AMD_ZEN if f == family and model in ms), None)
    part = info.get("CPU part")
    if part:
        uarch = _ARM_PARTS.get(part.lower(), f"Arm part {part}")
        if name == platform.machine():
            name = uarch
    label = name if uarch is None or uarch in name else f"{name} ({uarch})"
    return {
        "model": label,
        "model_name": name,
        "vendor": vendor,
        "family": family,
        "model_number": model,
        "microarchitecture": uarch,
        "arch": platform.machine(),
        "cores": os.cpu_count(),
    }


def thp_mode() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``)."""
    try:
        return re.search(r"\[(\w+)\]", Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()).group(1)
    except (OSError, AttributeError):
        return None


def anon_huge_mib() -> float | None:
    """MiB of this process's memory on transparent huge pages (the store's strips where the
    kernel's THP mode is ``always``; the store itself keeps 4 KiB pages, see the README)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    m = re.search(r"AnonHugePages:\s+(\d+) kB", text)
    return int(m.group(1)) / 1024 if m else None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


# --- timing -------------------------------------------------------------------------------------


def interleaved(fns: dict, repeats: int, desc: str) -> dict:
    """Median wall time of each of ``fns`` over ``repeats`` rounds, run in turn each round so
    that drifting machine load hits them all alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def fill_store(dtype: torch.dtype, batch: int, tokens: int, kv_heads: int, head_dim: int) -> hybridgen.HostKVStore:
    token_bytes = batch * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    store = hybridgen.HostKVStore(
        1,
        batch,
        kv_heads,
        head_dim,
        dtype,
        near_capacity_bytes=tokens * token_bytes,
        far_capacity_bytes=tokens * token_bytes,
        max_host_tokens=tokens,
    )
    store.append(0, tokens)
    chunk = max(1, 65536 // batch)
    gen = torch.Generator().manual_seed(0)
    for start in tqdm(range(0, tokens, chunk), desc=f"filling {dtype} b{batch}", leave=False):
        m = min(chunk, tokens - start)
        k = torch.randn((batch, kv_heads, m, head_dim), generator=gen).to(dtype)
        v = torch.randn((batch, kv_heads, m, head_dim), generator=gen).to(dtype)
        store.evict(0, k, v)
    return store


def flat_bytes(store, kind: str, tokens: int) -> torch.Tensor:
    """The store's keys or values as one flat byte tensor (a whole number of pages per strip
    keeps the strips back to back)."""
    t = store.view(0, kind, 0, tokens)
    assert t.is_contiguous(), "strips are not back to back: choose tokens as a multiple of 64"
    return t.reshape(-1).view(torch.uint8)


def bench_case(dtype, batch, tokens, kv_heads, group, head_dim, repeats, topk_k, isas, with_torch, page_fraction=16):
    """Every figure of one (dtype, batch) on every instruction set in ``isas``."""
    store = fill_store(dtype, batch, tokens, kv_heads, head_dim)
    q_heads = kv_heads * group
    gen = torch.Generator().manual_seed(1)
    q = torch.randn((batch, q_heads, head_dim), generator=gen)
    scale = head_dim**-0.5
    keys_b, values_b = flat_bytes(store, "keys", tokens), flat_bytes(store, "values", tokens)
    huge_mib = anon_huge_mib()
    k_bytes, v_bytes = keys_b.numel(), values_b.numel()

    # Outputs allocated once: the stage writes into them, as the decode engine's plans do.
    logits_out = torch.empty((batch, q_heads, tokens))
    out, lse = torch.empty((batch, q_heads, head_dim)), torch.empty((batch, q_heads))
    sel_logits = torch.empty((batch, q_heads, topk_k))
    sel_idx = torch.empty((batch, q_heads, topk_k), dtype=torch.int64)
    sel_values = torch.empty((batch, q_heads, topk_k, head_dim), dtype=dtype)
    top_idx = torch.empty((batch, q_heads, topk_k), dtype=torch.int64)
    top_val = torch.empty((batch, q_heads, topk_k))
    pages = page_count(tokens // page_fraction)

    fns = {
        "read_k": lambda: _native.stream_read(keys_b),
        "read_v": lambda: _native.stream_read(values_b),
        "read_k_prefetch": lambda: _native.stream_read(keys_b, prefetch=True),
    }
    for isa in isas:
        fns[f"logits/{isa}"] = lambda isa=isa: store.logits(0, q, scale, out=logits_out, isa=isa)
        fns[f"lse_all/{isa}"] = lambda isa=isa: store.cpu_stage(0, q, scale, "lse", out=out, lse_out=lse, isa_name=isa)
        fns[f"concat_topk/{isa}"] = lambda isa=isa: store.cpu_stage(
            0,
            q,
            scale,
            "concat",
            top_k=topk_k,
            logits_out=sel_logits,
            indices_out=sel_idx,
            values_out=sel_values,
            isa_name=isa,
        )
        for name, per_head in (("pages", False), ("quest", True)):
            fns[f"{name}/{isa}"] = lambda isa=isa, per_head=per_head: store.cpu_stage(
                0, q, scale, "lse", out=out, lse_out=lse, isa_name=isa, pages=pages, per_query_head=per_head
            )
    fns["topk"] = lambda: _native.topk(logits_out, topk_k, top_idx, top_val)
    fns["gather"] = lambda: store._native.gather_values(0, top_idx, sel_values)
    if with_torch:
        keys = store.view(0, "keys", 0, tokens)[0]
        qg = q[0].view(kv_heads, group, head_dim).to(dtype)
        fns["torch_matmul"] = lambda: torch.matmul(qg, keys.transpose(1, 2))
        fns["torch_bmm"] = lambda: torch.bmm(qg, keys.transpose(1, 2))
    t = interleaved(fns, repeats, f"{str(dtype)[6:]} batch {batch}")

    # Accuracy of the default instruction set against float64 on a slice of tokens.
    n_chk = min(tokens, 4096)
    kf = store.view(0, "keys", 0, n_chk).double()  # [b, hkv, n, d]
    ref = torch.einsum("bkgd,bknd->bkgn", q.double().view(batch, kv_heads, group, head_dim), kf) * scale
    store.logits(0, q, scale, out=logits_out)
    err = (logits_out[:, :, :n_chk].double() - ref.reshape(batch, q_heads, n_chk)).abs().max().item()

    read_k = k_bytes / t["read_k"] / 1e9
    read_kv = (k_bytes + v_bytes) / (t["read_k"] + t["read_v"]) / 1e9
    r = {
        "dtype": str(dtype).replace("torch.", ""),
        "batch": batch,
        "tokens": tokens,
        "k_bytes": k_bytes,
        "v_bytes": v_bytes,
        "read_k_gbps": read_k,
        "read_k_prefetch_gbps": k_bytes / t["read_k_prefetch"] / 1e9,
        "read_kv_gbps": read_kv,
        "max_abs_err_vs_f64": err,
        "anon_huge_pages_mib": huge_mib,
        "topk_k": topk_k,
        "topk_s": t["topk"],
        "page_fraction": page_fraction,
        "pages": pages,
        # Key rows read per KV head, as a share of all: the summaries (2 rows a page), then the
        # chosen pages' tokens (once per KV head; Quest: once per query head of the group).
        "pages_keys_read_share": (2 * -(-tokens // _native.PAGE_TOKENS) + pages * _native.PAGE_TOKENS) / tokens,
        "quest_keys_read_share": (2 * -(-tokens // _native.PAGE_TOKENS) + group * pages * _native.PAGE_TOKENS) / tokens,
        "gather_s": t["gather"],
        "isas": {},
    }
    for isa in isas:
        tl, ta, tc = t[f"logits/{isa}"], t[f"lse_all/{isa}"], t[f"concat_topk/{isa}"]
        r["isas"][isa] = {
            "logits_s": tl,
            "logits_gbps": k_bytes / tl / 1e9,
            "logits_share_of_read": k_bytes / tl / 1e9 / read_k,
            "lse_all_s": ta,
            "lse_all_gbps_of_kv": (k_bytes + v_bytes) / ta / 1e9,
            "lse_all_share_of_kv_read": (k_bytes + v_bytes) / ta / 1e9 / read_kv,
            "concat_topk_s": tc,
            # What selection and gather add to the logits pass that feeds them, relative to it.
            "select_gather_over_logits": (tc - tl) / tl,
            # The whole page-summary stage (choice, logits, partial attention) against the
            # logits pass over every key alone.
            "pages_s": t[f"pages/{isa}"],
            "pages_over_logits": t[f"pages/{isa}"] / tl,
            "quest_s": t[f"quest/{isa}"],
            "quest_over_logits": t[f"quest/{isa}"] / tl,
        }
    if with_torch:
        t_torch = min(t["torch_matmul"], t["torch_bmm"])
        r["torch_matmul_s"] = t["torch_matmul"]
        r["torch_bmm_s"] = t["torch_bmm"]
        r["torch_best_gbps"] = k_bytes / t_torch / 1e9
    del store
    return r


# --- threads ------------------------------------------------------------------------------------


def thread_probe(args) -> dict:
    """Batch 1, float16 and bfloat16, this process's thread count: read, logits and partial
    attention on the default instruction set (what a child process of the thread sweep runs)."""
    out = {"threads": hybridgen.num_threads(), "isa": hybridgen.isa(), "results": []}
    for dtype in (torch.float16, torch.bfloat16):
        tokens = tokens_for(args, dtype, 1)
        r = bench_case(
            dtype,
            1,
            tokens,
            args.kv_heads,
            args.group,
            args.head_dim,
            args.repeats,
            args.topk,
            [hybridgen.isa()],
            with_torch=False,
        )
        i = r["isas"][hybridgen.isa()]
        out["results"].append(
            {
                "dtype": r["dtype"],
                "read_k_gbps": r["read_k_gbps"],
                "read_kv_gbps": r["read_kv_gbps"],
                "logits_gbps": i["logits_gbps"],
                "logits_share_of_read": i["logits_share_of_read"],
                "lse_all_gbps_of_kv": i["lse_all_gbps_of_kv"],
                "lse_all_share_of_kv_read": i["lse_all_share_of_kv_read"],
            }
        )
    return out


def thread_sweep(args, counts) -> list:
    rows = []
    for n in counts:
        env = dict(os.environ, HYBRIDGEN_THREADS=str(n), RAYON_NUM_THREADS=str(n))
        cmd = [
            sys.executable,
            __file__,
            "--thread-probe",
            "--gib",
            str(args.gib),
            "--kv-heads",
            str(args.kv_heads),
            "--group",
            str(args.group),
            "--head-dim",
            str(args.head_dim),
            "--repeats",
            str(args.repeats),
            "--topk",
            str(args.topk),
        ]
        done = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"  {n} thread(s): "
            + "; ".join(
                f"{x['dtype']} read {x['read_k_gbps']:.1f} GB/s, logits {x['logits_gbps']:.1f} GB/s "
                f"({100 * x['logits_share_of_read']:.0f} %), partial {x['lse_all_gbps_of_kv']:.1f} GB/s of K+V "
                f"({100 * x['lse_all_share_of_kv_read']:.0f} %)"
                for x in rows[-1]["results"]
            ),
            flush=True,
        )
    return rows


def tokens_for(args, dtype, batch: int) -> int:
    # A whole number of pages per strip keeps the strips back to back (one flat buffer).
    per_seq = int(args.gib * 2**30) // (batch * args.kv_heads * args.head_dim * (torch.finfo(dtype).bits // 8))
    return per_seq // 64 * 64


# --- report -------------------------------------------------------------------------------------


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["results"]]
    isas = [i for i in record["machine"]["isas"] if i != "scalar"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['dtype']}\nb{r['batch']}" for r in rows]
    width = 0.8 / (len(isas) + 1)
    for ax, (key, read_key, title) in zip(
        axes,
        [
            ("logits_gbps", "read_k_gbps", "logits: GB/s of K"),
            ("lse_all_gbps_of_kv", "read_kv_gbps", "partial attention (all tokens): GB/s of K+V"),
        ],
    ):
        series = {"streaming read": [r[read_key] for r in rows]}
        for isa in isas:
            series[isa] = [r["isas"][isa][key] for r in rows]
        for i, (name, vals) in enumerate(series.items()):
            bars = ax.bar([x + (i - len(series) / 2 + 0.5) * width for x in range(len(rows))], vals, width, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(rows)), labels)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="lower right")
    m = record["machine"]
    fig.suptitle(
        f"{m['cpu']['model']}, {m['threads']} threads, GQA {record['shape']['group']}, "
        f"d={record['shape']['head_dim']}, {rows[0]['k_bytes'] / 2**30:.1f} GiB of K",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(paths) -> str:
    """The README's table: one block of rows per machine measured (every ``cpu_*.json``). A
    record may carry a second run of the same command (``"repeat"``): cells then show both."""
    lines = [
        "| machine | keys, batch | plain read | logits: GB/s of K (share of the read) | "
        "partial attention, all tokens: GB/s of K+V (share of reading K+V) | top-K + gather: time as a share of the logits pass | "
        "Pre-QKT by page summaries, k = n/16, whole stage: time as a share of the logits pass (keys read) |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        rec = json.loads(Path(path).read_text())
        runs = [rec] + ([rec["repeat"]] if "repeat" in rec else [])
        m = rec["machine"]
        loads = " / ".join(f"{r['machine']['load_average_before']:.1f}" for r in runs)
        name = f"{m['cpu']['model']}, {m['threads']} threads, load {loads} (`{Path(path).name}`)"
        for j, r in enumerate(rec["results"]):
            rs = [run["results"][j] for run in runs]
            isas = [i for i in r["isas"] if i != "scalar"]
            both = lambda f: " / ".join(f(x) for x in rs)
            cell = lambda key, share: "<br>".join(
                f"{i} " + both(lambda x: f"{x['isas'][i][key]:.1f} ({100 * x['isas'][i][share]:.0f} %)") for i in isas
            )
            sel = "<br>".join(
                f"{i} " + both(lambda x: f"{100 * x['isas'][i]['select_gather_over_logits']:.0f} %") for i in isas
            )
            paged = (
                "<br>".join(
                    f"{i} "
                    + both(lambda x: f"{100 * x['isas'][i]['pages_over_logits']:.0f} %")
                    + f" ({100 * r['pages_keys_read_share']:.0f} %)"
                    for i in isas
                )
                if "pages_over_logits" in r["isas"][isas[0]]
                else "not measured"
            )
            lines.append(
                f"| {name} | {r['dtype']}, {r['batch']} | {both(lambda x: format(x['read_k_gbps'], '.1f'))} GB/s | "
                f"{cell('logits_gbps', 'logits_share_of_read')} | "
                f"{cell('lse_all_gbps_of_kv', 'lse_all_share_of_kv_read')} | {sel} | {paged} |"
            )
            name = ""
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.5, help="size of K (and of V) per dtype and batch (GiB)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--topk", type=int, default=2048)
    p.add_argument("--page-fraction", type=int, default=16, help="page-summary Pre-QKT keeps n / this many tokens")
    p.add_argument("--isas", default=None, help="comma-separated; default: every one this CPU runs")
    p.add_argument(
        "--threads",
        default=None,
        help="comma-separated thread counts for the sweep (default: 1 and all cores; 'none' skips)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/cpu_<model>.json")
    p.add_argument(
        "--table",
        action="store_true",
        help="print the README's markdown table from every benchmarks/results/cpu_*.json and exit",
    )
    p.add_argument("--thread-probe", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.table:
        print(table(sorted(RESULTS.glob("cpu_*.json"))))
        return
    torch.set_num_threads(hybridgen.num_threads())
    if args.thread_probe:
        print(json.dumps(thread_probe(args)))
        return

    cpu = cpu_model()
    isas = args.isas.split(",") if args.isas else list(hybridgen.available_isas())
    load_before = os.getloadavg()
    print(f"{cpu['model']} | {hybridgen.num_threads()} threads | isas {isas} | load {load_before[0]:.2f}", flush=True)
    results = []
    for dtype in (torch.float16, torch.bfloat16):
        for batch in BATCHES:
            tokens = tokens_for(args, dtype, batch)
            r = bench_case(
                dtype,
                batch,
                tokens,
                args.kv_heads,
                args.group,
                args.head_dim,
                args.repeats,
                args.topk,
                isas,
                with_torch=batch == 1,
                page_fraction=args.page_fraction,
            )
            results.append(r)
            print(
                f"{r['dtype']:>8} b{batch}: read {r['read_k_gbps']:.1f} GB/s (prefetching "
                f"{r['read_k_prefetch_gbps']:.1f}), K+V {r['read_kv_gbps']:.1f} GB/s"
                + (f" | torch {r['torch_best_gbps']:.1f} GB/s" if "torch_best_gbps" in r else "")
                + f" | top-{args.topk} {1e3 * r['topk_s']:.1f} ms, gather {1e3 * r['gather_s']:.2f} ms"
                + f" | on huge pages: {r['anon_huge_pages_mib']} MiB",
                flush=True,
            )
            for isa, i in r["isas"].items():
                print(
                    f"    {isa:>7}: logits {i['logits_gbps']:5.1f} GB/s ({100 * i['logits_share_of_read']:3.0f} %) | "
                    f"partial {i['lse_all_gbps_of_kv']:5.1f} GB/s of K+V ({100 * i['lse_all_share_of_kv_read']:3.0f} %) | "
                    f"top-k + gather {100 * i['select_gather_over_logits']:.0f} % of the logits time | "
                    f"page-summary Pre-QKT (k = n/{r['page_fraction']}) {100 * i['pages_over_logits']:.0f} % of it "
                    f"reading {100 * r['pages_keys_read_share']:.0f} % of the keys, Quest "
                    f"{100 * i['quest_over_logits']:.0f} % ({100 * r['quest_keys_read_share']:.0f} %)",
                    flush=True,
                )
    counts = []
    if args.threads != "none":
        counts = [int(c) for c in args.threads.split(",")] if args.threads else sorted({1, os.cpu_count() or 1})
    sweep = thread_sweep(args, counts) if counts else []
    load_after = os.getloadavg()
    command = "python benchmarks/logits_bandwidth.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("out", "thread_probe", "table") and v is not None
    )
    record = {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": {
            "cpu": cpu,
            "threads": hybridgen.num_threads(),
            "isa": hybridgen.isa(),
            "isas": isas,
            "torch": torch.__version__,
            "hybridgen": getattr(_native, "__version__", None),
            "transparent_hugepage": thp_mode(),
            "load_average_before": load_before[0],
            "load_average_after": load_after[0],
        },
        "shape": {"kv_heads": args.kv_heads, "group": args.group, "head_dim": args.head_dim},
        "results": results,
        "threads": sweep,
    }
    out = args.out or RESULTS / f"cpu_{slug(cpu['model'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    plot(record, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
