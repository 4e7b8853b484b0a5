"""kernels/hybrid_attention.cu executed on the CPU (tests/emulation: every CUDA thread a fiber,
built with AddressSanitizer and UBSan) against float64 references, over randomised cases and a
fixed set that covers every path of the kernel for sure: every dtype, MHA and GQA (groups of 2,
3, 4 and 8 query heads in one block, 12 in two), grouped and per-head shipped values, sinks,
masks with fully masked rows (masked slots holding NaN), -inf host logits, common head dims
(16-byte loads) and odd ones (one element per load), rows off 16-byte alignment, strided
prefix views of a longer cache, split counts from the core (including empty slices), and both
merges (with and without the CPU's partial)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "emulation"))

import build  # noqa: E402
import emu_cases  # noqa: E402
import emu_reference  # noqa: E402
import launchers  # noqa: E402
import runner  # noqa: E402

pytestmark = pytest.mark.emulated

SEEDS = range(48)
# Every path for sure: (dtype, group, head_dim, misaligned) for 16-byte loads (64, 80, 96, 128,
# 256) and single-element ones (odd head_dim, or misaligned rows), with one and several heads per
# lane, head slices across row groups and warps, several passes, two blocks per group.
FIXED = [
    (dtype, g, d, misaligned)
    for dtype in emu_cases.DTYPES
    for g, d, misaligned in [
        (1, 128, False),
        (2, 64, False),
        (4, 128, False),
        (8, 80, False),
        (3, 256, False),
        (8, 256, False),
        (12, 96, False),
        (1, 33, False),
        (4, 100, False),
        (8, 255, False),
        (4, 64, True),
        (1, 1, False),
    ]
]
REL = 1e-5  # inputs are identical and every sum is float32: errors are below 1e-6


def fixed_case(i):
    dtype, g, d, misaligned = FIXED[i]
    return emu_cases.make(
        1000 + i, dtype=dtype, g=g, d=d, b=2 if g < 8 else 1, hkv=2 if g < 8 else 1, m=None, misaligned=misaligned
    )


@pytest.fixture(scope="module")
def results():
    try:
        build.compiler()
    except build.CompilerMissing as e:
        pytest.skip(f"kernel emulation needs a C++ compiler: {e}")
    cases = [emu_cases.make(s) for s in SEEDS] + [fixed_case(i) for i in range(len(FIXED))]
    keys = [("seed", s) for s in SEEDS] + [("fixed", i) for i in range(len(FIXED))]
    return dict(zip(keys, zip(cases, runner.run_jobs([emu_cases.job(c) for c in cases]))))


def assert_close(got, want, what):
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    assert not np.isnan(got).any(), f"{what}: NaN (a slot no block wrote?) at {np.argwhere(np.isnan(got))[:5].tolist()}"
    inf_got, inf_want = np.isneginf(got), np.isneginf(want)
    assert (inf_got == inf_want).all(), f"{what}: -inf at {np.argwhere(inf_got != inf_want)[:5].tolist()}"
    g, w = got[~inf_want], want[~inf_want]
    if g.size:
        # Relative to the largest magnitude of the row: outputs are convex mixes of value rows.
        tol = REL * max(1.0, float(np.abs(w).max()))
        err = np.abs(g - w)
        assert err.max() <= tol, (
            f"{what}: max error {err.max():.3g} > {tol:.3g} at {np.unravel_index(err.argmax(), g.shape)}"
        )


def test_cases_cover_the_corners():
    cases = [emu_cases.make(s) for s in SEEDS]
    assert {c.dtype for c in cases} == set(emu_cases.DTYPES)
    assert any(c.hq == c.hkv for c in cases) and any(c.hq > c.hkv for c in cases)
    assert {2, 4, 8, 12} <= {c.hq // c.hkv for c in cases}
    assert any(c.m and c.grouped for c in cases) and any(c.m and not c.grouped for c in cases)
    assert {64, 80, 96, 128, 256} <= {c.d for c in cases}
    assert any(c.d % 32 for c in cases)
    assert any(c.vector_loads for c in cases) and any(not c.vector_loads and c.d % 8 == 0 for c in cases)
    assert any(c.sinks for c in cases) and any(c.m == 0 for c in cases)
    assert any(c.exact["dev_mask"] is not None and c.exact["dev_mask"].all(axis=1).any() for c in cases)

    def empty(c):
        tps = launchers.split_geometry(c.b, c.hq, c.hkv, c.d, c.n_dev + c.m, c.splits)["tokens_per_split"]
        return (c.splits - 1) * tps >= c.n_dev + c.m

    assert any(empty(c) for c in cases), "no case with an empty slice"
    assert max(c.splits for c in cases) >= 8
    fixed = [fixed_case(i) for i in range(len(FIXED))]
    assert {(c.dtype, c.vector_loads) for c in fixed} == {(t, v) for t in emu_cases.DTYPES for v in (True, False)}


@pytest.mark.parametrize(
    "key", [("seed", s) for s in SEEDS] + [("fixed", i) for i in range(len(FIXED))], ids=lambda k: f"{k[0]}{k[1]}"
)
def test_kernels_match_float64_reference(results, key):
    case, res = results[key]
    assert "error" not in res, f"{case.name()}: {res.get('error')}"
    got, want = res["arrays"], emu_reference.expected(case)
    assert_close(got["part_lse"], want["part_lse"], f"{case.name()} part_lse")
    assert_close(got["part_o"], want["part_o"], f"{case.name()} part_o")
    for tag in ("plain", "hgca"):
        assert_close(got[f"out_{tag}"], want[f"out_{tag}"], f"{case.name()} out ({tag} merge)")
        if tag == "hgca" or case.lse_wanted:
            assert_close(got[f"lse_{tag}"], want[f"lse_{tag}"], f"{case.name()} lse ({tag} merge)")
        else:
            assert np.isnan(got[f"lse_{tag}"]).all(), "out_lse was null, yet written"
