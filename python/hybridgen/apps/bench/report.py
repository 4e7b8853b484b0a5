"""The benchmark's record: bars (the scheduler against aog and the best selective baseline),
the largest batch x context per policy, the machine, and a table per context."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from .models import model_label
from .planning import GIB

#: The selective baselines hybridgen's scheduler is held against at equal token budget.
SELECTIVE = ("streaming", "h2o", "keyformer", "infinigen")


def bars(rows: list[dict]) -> list[dict]:
    """Per context and batch size: the scheduler's speed-up over ``aog`` and over the fastest
    selective baseline that ran (ratios of ms/token; > 1 means the scheduler is faster)."""
    out = []
    for key in sorted({(r["context"], r["batch"]) for r in rows}):
        ok = {r["policy"]: r for r in rows if (r["context"], r["batch"]) == key and r["status"] == "ok"}
        if "scheduler" not in ok:
            continue
        ms = ok["scheduler"]["ms_per_token"]
        entry = {"context": key[0], "batch": key[1], "scheduler_ms": ms, "scheduler_k_last": ok["scheduler"]["k_last"]}
        if "aog" in ok:
            entry["speedup_vs_aog"] = ok["aog"]["ms_per_token"] / ms
        selective = [p for p in SELECTIVE if p in ok]
        if selective:
            best = min(selective, key=lambda p: ok[p]["ms_per_token"])
            entry.update(best_selective=best, speedup_vs_best_selective=ok[best]["ms_per_token"] / ms)
        out.append(entry)
    return out


def largest_fit(rows: list[dict]) -> dict:
    """Per policy, the largest batch × context it ran without running out of memory."""
    best: dict = {}
    for r in rows:
        if r["status"] == "ok" and r["batch"] * r["context"] > best.get(r["policy"], {}).get("tokens", 0):
            best[r["policy"]] = {"batch": r["batch"], "context": r["context"], "tokens": r["batch"] * r["context"]}
    return best


def machine_info(device: torch.device) -> dict:
    import transformers

    import hybridgen

    from ... import _native

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "native_threads": _native.num_threads(),
        "isa": _native.isa(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hybridgen": hybridgen.__version__,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return info


def default_out(model: str) -> Path:
    return Path("benchmarks") / "results" / f"bench_{model_label(model)}.json"


def format_rows(rows: list[dict]) -> str:
    """A small table of one context's rows."""
    lines = []
    for r in rows:
        head = f"{r['context']:>6} × {r['batch']:<2} {r['policy']:<10}"
        if r["status"] != "ok":
            lines.append(f"{head} skipped: {r['reason']}")
            continue
        ratio = f"{r['ratio_to_full']:5.2f}x full" if r.get("ratio_to_full") else "          "
        lines.append(
            f"{head} {r['ms_per_token']:8.1f} ms/token {r['tokens_per_s']:7.1f} tok/s  {ratio}  "
            f"K {r['k_last']!s:>5}  host/device tokens {r['host_tokens']}/{r['device_tokens']}  "
            f"cpu/device/tx {r['cpu_share']:.0%}/{r['device_share']:.0%}/{r['transfer_share']:.0%}"
        )
    return "\n".join(lines)
