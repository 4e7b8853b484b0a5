"""Runs a batch of jobs (worker.py) against a kernel source in a sanitized child process."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import build

HERE = Path(__file__).resolve().parent


class SanitizerFailure(RuntimeError):
    """The child process died: AddressSanitizer or UBSan found a fault (its report is here)."""


def run_jobs(jobs: list, source=build.KERNEL_SOURCE, timeout: float = 600) -> list:
    lib = build.build(source)
    env = dict(os.environ)
    env["LD_PRELOAD"] = build.sanitizer_preload()
    # Python's own allocations are not ours to judge; a fault in the library is fatal.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    with tempfile.TemporaryDirectory(prefix="hybridgen-emu-") as tmp:
        jobs_path, out_path = Path(tmp, "jobs.pkl"), Path(tmp, "out.pkl")
        with open(jobs_path, "wb") as f:
            pickle.dump(jobs, f)
        res = subprocess.run([sys.executable, str(HERE / "worker.py"), str(lib), str(jobs_path), str(out_path)],
                             env=env, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0 or not out_path.exists():
            raise SanitizerFailure(f"emulation worker exited with {res.returncode}:\n{res.stderr[-6000:]}")
        with open(out_path, "rb") as f:
            return pickle.load(f)
