"""benchmarks/flexgen_offload.py: its command lines, record and errors."""

import json
import subprocess
import sys

import pytest
import torch
from flexgen_support import ROOT, fo

from hybridgen.apps.flexgen import cli


def test_benchmark_runs_are_valid_flexgen_command_lines(bench, tmp_path):
    args = bench.parse_args(["--prompt-len", "1024", "--gen-len", "16", "--gpu-budget", "256", "--policy", "post_qkt"])
    assert args.model == "facebook/opt-1.3b" and args.out.name == "flexgen_offload_opt-1.3b_p1024_g16.json"
    parser = cli.build_parser(fo)
    from hybridgen.apps.flexgen.options import check_args

    seen = {}
    for name in bench.VARIANTS:
        flex = parser.parse_args(bench.variant_argv(args, name, str(tmp_path)))
        seen[name] = (flex.percent, flex.cpu_cache_compute, flex.no_hybrid, check_args(flex))
        assert (flex.path, flex.prompt_len, flex.gen_len, flex.model) == ("_DUMMY_", 1024, 16, "facebook/opt-1.3b")
        assert flex.log_file.startswith(str(tmp_path))
    assert seen["flexgen-cpu-cache"][:3] == ([100, 0, 0, 100, 100, 0], False, True)
    assert seen["flexgen-cpu-compute"][:3] == ([100, 0, 0, 100, 100, 0], True, True)
    hybrid = seen["hybrid"]
    assert hybrid[:3] == ([100, 0, 100, 0, 100, 0], False, False)
    assert (hybrid[3].gpu_budget, hybrid[3].policy) == (256, "post_qkt")


@pytest.mark.parametrize("argv", [["--gen-len", "1"], ["--prompt-len", "0"], ["--variants", "nonsense"]])
def test_benchmark_refuses_bad_arguments(bench, argv):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_benchmark_record_from_flexgen_timers(bench, tmp_path):
    """Figures computed as FlexGen reports them (from its generate timer), ratios, JSON on disk."""
    from flexgen.timer import timers

    parser = cli.build_parser(fo)
    args = bench.parse_args(
        ["--prompt-len", "64", "--gen-len", "5", "--gpu-batch-size", "2", "--out", str(tmp_path / "r.json")]
    )
    runs = []
    for name, step in (("flexgen-cpu-cache", 0.5), ("flexgen-cpu-compute", 0.25), ("hybrid", 0.1)):
        timer = timers("generate")
        timer.reset()
        timer.costs.extend([2.0] + [step] * 4)  # what run_flexgen leaves: the prefill, then 4 decode steps
        runs.append({**cli.timings(parser.parse_args(bench.variant_argv(args, name, str(tmp_path)))), "name": name})
    timers("generate").reset()
    assert runs[0]["decode_s"] == pytest.approx(2.0)
    assert runs[0]["decode_tokens_per_s"] == pytest.approx(2 * 4 / 2.0)
    assert runs[2]["total_tokens_per_s"] == pytest.approx(2 * 5 / 2.4)
    record = bench.build_record(
        "python benchmarks/flexgen_offload.py --gen-len 5", {"gpu": "test"}, vars(args) | {"out": "r"}, runs
    )
    assert record["ratios"]["hybrid/flexgen-cpu-cache"]["decode_throughput"] == pytest.approx(5.0)
    assert record["ratios"]["hybrid/flexgen-cpu-compute"]["decode_throughput"] == pytest.approx(2.5)
    assert record["ratios"]["hybrid/flexgen-cpu-cache"]["total_throughput"] == pytest.approx(4.0 / 2.4)
    bench.write_record(record, args.out)
    assert json.loads(args.out.read_text()) == json.loads(json.dumps(record))
    table = bench.format_table(record).splitlines()
    assert len(table) == 4 and table[1].startswith("flexgen-cpu-cache") and table[1].endswith("5.00x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_benchmark_without_a_gpu_fails_clearly(tmp_path):
    r = subprocess.run(
        [sys.executable, "benchmarks/flexgen_offload.py", "--out", str(tmp_path / "x.json")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 1 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()
