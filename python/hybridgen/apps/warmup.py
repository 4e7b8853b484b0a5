"""Compile and load the CUDA kernels ahead of time, into the on-disk kernel cache.

Every process that plans a hybrid engine on a GPU loads the kernels then; the first one on a
machine compiles them with NVRTC (seconds of CPU) and writes them to the cache directory
(``$HYBRIDGEN_DATA/kernels``), which every later process reads. Run this once per machine (or
in a container image's build) so that no serving process ever compiles: point
``HYBRIDGEN_DATA`` of the processes at the same directory.
"""

from __future__ import annotations

import argparse
import time

__all__ = ["build_parser", "run"]


def build_parser(sub) -> argparse.ArgumentParser:
    """Adds ``warmup`` to the subcommands ``sub`` of ``python -m hybridgen``."""
    doc = __doc__
    p = sub.add_parser(
        "warmup", help=doc.splitlines()[0], description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, nargs="*", default=None, help="CUDA device indices (default: every one)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import torch

    from .. import cuda

    p = cuda.probe()
    if not p["available"]:
        raise SystemExit(f"python -m hybridgen warmup: the CUDA kernels cannot run here: {p['reason']}")
    devices = args.devices if args.devices else list(range(p["devices"]))
    print(f"kernel cache: {cuda.kernel_cache_dir()}")
    for index in devices:
        t0 = time.perf_counter()
        target = cuda.warmup(torch.device("cuda", index))
        print(f"cuda:{index}: {target} loaded in {time.perf_counter() - t0:.1f} s")
    return 0
