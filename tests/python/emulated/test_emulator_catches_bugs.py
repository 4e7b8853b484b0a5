"""The emulation is only worth something if it fails on broken kernels: each test here plants
one bug in a copy of kernels/hybrid_attention.cu and requires the emulated run to fail, by a
wrong result, the emulator's divergence or barrier error, or a sanitizer report."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "emulation"))

import build  # noqa: E402
import emu_cases  # noqa: E402
import emu_reference  # noqa: E402
import runner  # noqa: E402

pytestmark = pytest.mark.emulated

SOURCE = build.KERNEL_SOURCE.read_text()

MUTANTS = {
    # Query head s of KV head kvh's group is taken as s * hkv + kvh (heads interleaved across KV
    # heads) instead of kvh * g + s: each query head meets another KV head's rows.
    "gqa_head_mapping": ("return kvh * g + s;", "return s * hkv + kvh;"),
    # Warps read each other's softmax states from shared memory without waiting for them.
    "missing_syncthreads": ("        __syncthreads();  // every warp's state is in shared memory\n", "\n"),
    # Half of the warp skips the dot products' shuffles.
    "divergent_shuffle": (
        "for (int j = 0; j < GL; ++j) x[u][j] += __shfl_xor_sync(FULL_MASK, x[u][j], o);",
        "for (int j = 0; j < GL; ++j) if ((threadIdx.x & 31) < 16) x[u][j] += __shfl_xor_sync(FULL_MASK, x[u][j], o);",
    ),
    # A merge thread past head_dim writes one float beyond its row (and the buffer's end).
    "merge_out_of_bounds": (
        "if (col < d) out[(long long)row * d + col] = t / total;",
        "if (col <= d) out[(long long)row * d + col] = t / total;",
    ),
}


def gqa_case(seed, d=80, schedule=None):
    # GQA with two KV heads, device tokens and shipped ones: every mutant has something to break.
    for s in range(seed, seed + 10000):
        c = emu_cases.make(s)
        if c.hkv == 2 and c.hq >= 4 and c.n_dev >= 40 and c.m and c.d % 32:
            return c
    raise AssertionError("no suitable case")


def failed(c, res) -> str:
    if "error" in res:
        return res["error"]
    want = emu_reference.expected(c)
    for k in ("part_o", "out_hgca"):
        got = np.asarray(res["arrays"][k], np.float64)
        if np.isnan(got).any() or not np.allclose(got, want[k], rtol=1e-4, atol=1e-4):
            return f"wrong {k}"
    return ""


@pytest.fixture(scope="module")
def mutant_dir(tmp_path_factory):
    try:
        build.compiler()
    except build.CompilerMissing as e:
        pytest.skip(f"kernel emulation needs a C++ compiler: {e}")
    return tmp_path_factory.mktemp("mutants")


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_planted_bug_is_caught(name, mutant_dir):
    old, new = MUTANTS[name]
    assert SOURCE.count(old) == 1, f"the kernel no longer contains {old!r}: update this mutant"
    path = mutant_dir / f"{name}.cu"
    path.write_text(SOURCE.replace(old, new))
    cases = [gqa_case(100 + i) for i in range(3)]
    for i, c in enumerate(cases):
        c.schedule = i  # forward, reverse, shuffled: a race must show under each
    jobs = [emu_cases.job(c) for c in cases]
    try:
        results = runner.run_jobs(jobs, source=path)
    except runner.SanitizerFailure as e:
        assert "AddressSanitizer" in str(e) or "runtime error" in str(e), str(e)
        return
    for c, res in zip(cases, results):
        assert failed(c, res), f"{name} not caught on {c.name()}"
    if name == "divergent_shuffle":
        assert all("divergent __shfl_xor_sync" in r.get("error", "") for r in results), results[0].get("error")


def test_unmutated_source_passes_the_same_checks(mutant_dir):
    cases = [gqa_case(100 + i) for i in range(3)]
    for i, c in enumerate(cases):
        c.schedule = i
    results = runner.run_jobs([emu_cases.job(c) for c in cases])
    assert [failed(c, r) for c, r in zip(cases, results)] == ["", "", ""]
