"""Runs emulated launches in a process of its own, started by runner.py with the sanitizer
runtime preloaded: `python worker.py LIB JOBS OUT` (pickles). A job is a list of calls to
launchers.py; "@name" arguments are arrays of the job, placed 64-byte aligned or, per
"offsets", that many elements past it. A sanitizer finding ends this process
(and the test reading its exit status); an emulator error fails only its job."""

import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import launchers  # noqa: E402
from emulator import EmulationError, Emulator  # noqa: E402


def placed(a, offset: int = 0):
    """A copy of `a` starting `offset` elements past a 64-byte boundary: where an array starts
    decides which loads the kernel may use, and unpickling alone decides nothing."""
    if a is None:
        return None
    raw = np.empty(a.nbytes + 64 + offset * a.itemsize, np.uint8)
    start = (-raw.ctypes.data) % 64 + offset * a.itemsize
    out = raw[start : start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


def run(emu, job):
    offsets = job.get("offsets", {})
    arrays = {k: placed(v, offsets.get(k, 0)) for k, v in job["arrays"].items()}
    for fn, kwargs in job["calls"]:
        resolved = {k: arrays[v[1:]] if isinstance(v, str) and v.startswith("@") else v for k, v in kwargs.items()}
        try:
            getattr(launchers, fn)(emu, **resolved)
        except EmulationError as e:
            return {"error": str(e)}
    return {"arrays": {k: arrays[k] for k in job["outputs"]}}


def main(lib, jobs_path, out_path):
    emu = Emulator(lib)
    with open(jobs_path, "rb") as f:
        jobs = pickle.load(f)
    results = [run(emu, job) for job in jobs]
    with open(out_path, "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
