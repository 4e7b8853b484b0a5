"""kernels/hybrid_attention.cu executed on the CPU (tests/emulation: every CUDA thread a fiber,
built with AddressSanitizer and UBSan) against float64 references, over randomised cases: every
dtype, MHA and GQA, grouped and per-head shipped values, sinks, masks with fully masked rows,
-inf host logits, common and odd head dims, split counts from the core's choose_splits
(including empty slices), and both merges (with and without the CPU's partial)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "emulation"))

import build  # noqa: E402
import emu_cases  # noqa: E402
import launchers  # noqa: E402
import emu_reference  # noqa: E402
import runner  # noqa: E402

pytestmark = pytest.mark.emulated

SEEDS = range(48)
REL = 1e-4


@pytest.fixture(scope="module")
def results():
    try:
        build.compiler()
    except build.CompilerMissing as e:
        pytest.skip(f"kernel emulation needs a C++ compiler: {e}")
    cases = [emu_cases.make(s) for s in SEEDS]
    return dict(zip(SEEDS, zip(cases, runner.run_jobs([emu_cases.job(c) for c in cases]))))


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
        assert err.max() <= tol, f"{what}: max error {err.max():.3g} > {tol:.3g} at {np.unravel_index(err.argmax(), g.shape)}"


def test_cases_cover_the_corners():
    cases = [emu_cases.make(s) for s in SEEDS]
    assert {c.dtype for c in cases} == set(emu_cases.DTYPES)
    assert any(c.hq == c.hkv for c in cases) and any(c.hq > c.hkv for c in cases)
    assert any(c.m and c.grouped for c in cases) and any(c.m and not c.grouped for c in cases)
    assert {64, 80, 96, 128, 256} <= {c.d for c in cases}
    assert any(c.d % 32 for c in cases)
    assert any(c.sinks for c in cases) and any(c.m == 0 for c in cases)
    assert any(c.exact["dev_mask"] is not None and c.exact["dev_mask"].all(axis=1).any() for c in cases)
    empty = lambda c: (c.splits - 1) * launchers.tokens_per_split(c.n_dev + c.m, c.splits) >= c.n_dev + c.m  # noqa: E731
    assert any(empty(c) for c in cases), "no case with an empty slice"
    assert max(c.splits for c in cases) >= 8


@pytest.mark.parametrize("seed", SEEDS)
def test_kernels_match_float64_reference(results, seed):
    case, res = results[seed]
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
