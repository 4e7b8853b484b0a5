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


def run_jobs(jobs: list, source=build.KERNEL_SOURCE, timeout: float = 600, workers: int | None = None) -> list:
    """Results of `jobs` in order, run by up to `workers` processes (default: one per CPU, at
    most 4), each given every `workers`-th job; `timeout` is per process."""
    lib = build.build(source)
    env = dict(os.environ)
    env["LD_PRELOAD"] = build.sanitizer_preload()
    # Python's own allocations are not ours to judge; a fault in the library is fatal.
    env["ASAN_OPTIONS"] = "detect_leaks=0:abort_on_error=0:halt_on_error=1"
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"
    workers = max(1, min(workers or min(os.cpu_count() or 1, 4), len(jobs)))
    with tempfile.TemporaryDirectory(prefix="hybridgen-emu-") as tmp:
        procs = []
        for w in range(workers):
            jobs_path, out_path = Path(tmp, f"jobs{w}.pkl"), Path(tmp, f"out{w}.pkl")
            with open(jobs_path, "wb") as f:
                pickle.dump(jobs[w::workers], f)
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "worker.py"), str(lib), str(jobs_path), str(out_path)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append((proc, out_path))
        results = [None] * len(jobs)
        failure = None
        for w, (proc, out_path) in enumerate(procs):
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                _, err = proc.communicate()
                failure = failure or f"emulation worker {w} ran past {timeout} s:\n{err[-6000:]}"
                continue
            if proc.returncode != 0 or not out_path.exists():
                failure = failure or f"emulation worker exited with {proc.returncode}:\n{err[-6000:]}"
                continue
            with open(out_path, "rb") as f:
                results[w::workers] = pickle.load(f)
        if failure:
            raise SanitizerFailure(failure)
        return results
