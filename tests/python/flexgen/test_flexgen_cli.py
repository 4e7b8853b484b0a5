"""``python -m hybridgen.flexgen`` (hybridgen.apps.flexgen.cli, options, tokenizer)."""

import os
import subprocess
import sys

import pytest
import torch
from flexgen_support import ROOT, fo

from hybridgen.apps.flexgen import cli, tokenizer
from hybridgen.flexgen import compat


# --- the command line -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_help_works_without_a_gpu():
    r = subprocess.run(
        [sys.executable, "-m", "hybridgen.flexgen", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert r.returncode == 0, r.stderr
    for option in ("--percent", "--cpu-cache-compute", "--gpu-budget", "--policy", "--k-min", "--merge", "--tokenizer"):
        assert option in r.stdout
    assert r.stdout.startswith("usage: python -m hybridgen.flexgen")


def test_contradictory_options_exit_2_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--percent", "100", "0", "0", "100", "100", "0", "--gpu-budget", "64"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "error: --percent puts 100% of the KV cache in CPU memory" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--attn-sparsity", "0.5"], "attn-sparsity"),
        (["--compress-cache"], "compress-cache"),
        (["--cpu-cache-compute", "--percent", "100", "0", "0", "100", "100", "0"], "cpu-cache-compute"),
        (["--percent", "100", "0", "50", "0", "100", "0"], "on disk"),
        (["--percent", "100", "0", "100"], "six numbers"),
        (["--policy", "h2o"], "invalid choice"),
        (["--k-min", "100", "--k-max", "10"], "k_min"),
        (["--sinks", "-1"], "sinks"),
        (["--tokenizer", "stand-in", "--path", "~/opt_weights"], "only serves --path _DUMMY_"),
    ],
)
def test_cli_refuses_bad_options(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_parses_flexgen_and_hybrid_options_together():
    from hybridgen.apps.flexgen.options import check_args, hybrid_options

    parser = cli.build_parser(fo)
    args = parser.parse_args(
        [
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
            "--policy",
            "post_qkt",
            "--k",
            "64",
            "--gpu-budget",
            "128",
        ]
    )
    assert (args.model, args.prompt_len, args.percent, args.overlap) == (
        "facebook/opt-1.3b",
        512,
        [100, 0, 100, 0, 100, 0],
        True,
    )
    config = check_args(args)
    assert (config.policy, config.k, config.gpu_budget, config.sinks) == ("post_qkt", 64, 128, 4)
    # FlexGen's offloading mode without a budget: the budget comes from the percents
    args = parser.parse_args(
        ["--percent", "100", "0", "10", "90", "100", "0", "--prompt-len", "100", "--gen-len", "21"]
    )
    assert "gpu_budget" not in hybrid_options(args)
    assert compat.placement(
        check_args(args), compat.FlexSettings.from_args(args), cache_len=120, budget_given=False
    ) == (4, 8)
    # and FlexGen alone
    args = parser.parse_args(["--no-hybrid", "--attn-sparsity", "0.5"])
    assert check_args(args) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cli_without_a_gpu_says_so(capsys):
    assert cli.main(["--path", "_DUMMY_", "--model", "facebook/opt-125m"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_stand_in_tokenizer_replaces_flexgens_hub_download_only_inside_the_block():
    original = fo.AutoTokenizer
    with tokenizer.use_tokenizer(fo, "stand-in"):
        tok = fo.AutoTokenizer.from_pretrained("facebook/opt-30b", padding_side="left")
        inputs = fo.get_test_inputs(40, 3, tok)  # FlexGen's own prompt builder
        short = fo.get_test_inputs(5, 1, tok)
    assert fo.AutoTokenizer is original
    assert len(inputs) == 3 and all(len(row) == 40 for row in inputs)
    row = inputs[0]
    text = "Paris is the capital city of".encode()
    assert row[: 40 - len(text) - 1] == [1] * (40 - len(text) - 1)  # left padding with OPT's pad id
    assert row[-len(text) - 1 :] == [2] + [4 + c for c in text]
    assert short[0] == [4 + c for c in text[-5:]]
    with tokenizer.use_tokenizer(fo, None):
        assert fo.AutoTokenizer is original
    with pytest.raises(RuntimeError, match="cannot decode"):
        tok.batch_decode([[1, 2]])
