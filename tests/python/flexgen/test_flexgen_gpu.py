"""On a GPU: ``OptLM`` end to end against FlexGen's own offloading, the command line and the
benchmark with OPT-1.3B-shaped dummy weights."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from flexgen_support import ROOT, TINY, ExecutionEnv, OptConfig, flex_policy, fo

import hybridgen.flexgen as hf


# --- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize(
    "flex",
    [dict(overlap=False), dict(overlap=True), dict(overlap=True, compress_weight=True)],
    ids=["normal-loop", "overlap-loop", "compressed-weights"],
)
def test_gpu_generate_matches_flexgen_and_its_offloading(tiny_weights, prompts, tmp_path, flex):
    """On CUDA: FlexGen with the cache on the GPU, FlexGen with the cache offloaded to CPU memory
    (its own offloading) and hybrid attention (exact policy, most tokens on the host) give the same
    greedy tokens, in FlexGen's plain and overlapped loops and with its 4-bit weights."""
    env = ExecutionEnv.create(str(tmp_path / "offload"))
    try:

        def run(**policy):
            model = fo.OptLM(OptConfig(**TINY), env, tiny_weights, flex_policy(pin_weight=True, **flex, **policy))
            return model.generate(prompts, max_new_tokens=12)

        ref = run()
        offloaded = run(cache_gpu_percent=0, cache_cpu_percent=100)
        session = hf.patch(gpu_budget=4, sinks=2, evict_chunk=2, policy="all")
        hybrid = run()
        hf.unpatch()
    finally:
        env.close_copy_threads()
    np.testing.assert_array_equal(offloaded, ref)
    np.testing.assert_array_equal(hybrid, ref)
    assert session.telemetry.records[-1].host_tokens > 0


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_flex_opt_end_to_end_with_opt_1_3b_dummy_weights(tmp_path):
    """``python -m hybridgen.flexgen`` on OPT-1.3B-shaped ``_DUMMY_`` weights, hybrid and FlexGen's
    own offloading, as the benchmark runs them."""
    common = [
        "--model",
        "facebook/opt-1.3b",
        "--path",
        "_DUMMY_",
        "--prompt-len",
        "512",
        "--gen-len",
        "8",
        "--gpu-batch-size",
        "2",
        "--offload-dir",
        str(tmp_path / "offload"),
        "--log-file",
        str(tmp_path / "log"),
    ]
    for extra, expect in (
        (
            ["--gpu-budget", "128", "--policy", "scheduler", "--k-min", "16", "--k-max", "256"],
            "hybrid attention: 7 decode steps",
        ),
        (["--no-hybrid", "--percent", "100", "0", "0", "100", "100", "0"], "TorchDevice: cuda:0"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "hybridgen.flexgen", *common, *extra],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=900,
        )
        assert r.returncode == 0, r.stderr[-3000:]
        assert expect in r.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_benchmark_writes_its_record(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert (
        bench.main(
            [
                "--prompt-len",
                "256",
                "--gen-len",
                "4",
                "--gpu-batch-size",
                "2",
                "--gpu-budget",
                "64",
                "--offload-dir",
                str(tmp_path / "offload"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["runs"]] == list(bench.VARIANTS)
    assert set(record["ratios"]) == {"hybrid/flexgen-cpu-cache", "hybrid/flexgen-cpu-compute"}
    assert all(math.isfinite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0 for r in record["runs"])
    assert record["machine"]["cuda_device"] and record["runs"][-1]["hybrid"]["steps"] == 3
