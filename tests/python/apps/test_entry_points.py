"""The README's main job and the benchmark script run end to end (small settings)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_demo_checks_exact_modes_against_full_attention():
    r = run("-m", "hybridgen", "demo", "--context", "6000", "--gpu-budget", "500", "--top-k", "256")
    assert r.returncode == 0, r.stderr
    assert "exact modes match full attention" in r.stdout
    assert "found 100% of the 16 planted tokens" in r.stdout


def test_demo_rejects_a_context_that_fits_the_device(cli):
    code, _, err = cli("demo", "--context", "100", "--gpu-budget", "500")
    assert code != 0 and "must exceed" in err


@pytest.mark.slow
def test_bandwidth_benchmark_writes_its_record(tmp_path):
    out = tmp_path / "bw.json"
    r = run("benchmarks/logits_bandwidth.py", "--gib", "0.01", "--repeats", "1", "--topk", "16", "--out", str(out))
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["command"].startswith("python benchmarks/logits_bandwidth.py")
    assert record["results"] and record["machine"]["cpu"]["model"]
    # The page size the scans ran on is part of the machine: THP mode, and MiB on huge pages.
    assert record["machine"]["transparent_hugepage"] in (None, "always", "madvise", "never")
    assert all("anon_huge_pages_mib" in row for row in record["results"])
    for row in record["results"]:
        assert row["read_k_gbps"] > 0 and row["read_kv_gbps"] > 0
        assert row["max_abs_err_vs_f64"] < 1e-3
        # Every instruction set the CPU runs was forced and measured.
        assert set(row["isas"]) == set(record["machine"]["isas"])
        for figures in row["isas"].values():
            assert figures["logits_gbps"] > 0 and figures["lse_all_gbps_of_kv"] > 0
    assert out.with_suffix(".png").stat().st_size > 0
