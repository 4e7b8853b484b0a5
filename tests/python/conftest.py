"""Shared fixtures; tests marked ``gpu`` skip cleanly without a CUDA device. Tests of the
integrations (transformers, FlexGen, lm-eval, the notebook) are marked ``integration``: CI runs
them again under the newest and the lowest dependency versions pyproject.toml allows."""

import sys

import pytest
import torch

#: Test folders (mirroring hybridgen's packages) and top-level modules that exercise a
#: third-party integration.
INTEGRATION_DIRS = {"apps", "eval", "flexgen", "hf", "policies"}
INTEGRATION_MODULES = {"test_cuda.py", "test_cuda_device.py", "test_notebook.py", "test_smollm2.py"}


def pytest_collection_modifyitems(config, items):
    skip = None if torch.cuda.is_available() else pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        path = item.path
        if path.parent.name in INTEGRATION_DIRS or path.name in INTEGRATION_MODULES:
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
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def cli(capsys):
    """Runs ``python -m hybridgen`` commands in process (see :func:`run_cli`)."""
    return lambda *argv: run_cli(argv, capsys)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
