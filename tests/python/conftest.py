"""Shared fixtures; tests marked ``gpu`` skip cleanly without a CUDA device. Tests of the
integrations (transformers, FlexGen, lm-eval, the notebook) are marked ``integration``: CI runs
them again under the newest and the lowest dependency versions pyproject.toml allows."""

import pytest
import torch

#: Modules that exercise a third-party integration.
INTEGRATION_MODULES = {
    "test_bench", "test_choice", "test_cuda", "test_eval_perplexity", "test_flexgen", "test_generate_guard",
    "test_hf_bad_input", "test_hf_exact", "test_hf_guard", "test_hf_pipeline", "test_lm_eval", "test_notebook",
    "test_policies", "test_smollm2",
}


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in INTEGRATION_MODULES:
            item.add_marker(pytest.mark.integration)
        if skip is not None and "gpu" in item.keywords:
            item.add_marker(skip)


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """``python -m hybridgen ARGV`` in this process: ``(exit code, stdout, stderr)``."""
    from hybridgen.apps import cli

    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=__import__("sys").stderr)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(capsys):
    """Runs ``python -m hybridgen`` commands in process (see :func:`run_cli`)."""
    return lambda *argv: run_cli(argv, capsys)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
