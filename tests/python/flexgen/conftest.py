"""Fixtures of the FlexGen drop-in's tests (helpers in flexgen_support.py)."""

import importlib.util

import numpy as np
import pytest
import torch
from flexgen_support import ROOT, TINY, CPUDevice, OptConfig, _NoStream, write_flexgen_weights

import hybridgen.flexgen as hf


@pytest.fixture
def cpu_flexgen(monkeypatch):
    """FlexGen's CPU branches call ``.cuda().half()`` on results; OptLM creates CUDA streams."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    monkeypatch.setattr(torch.cuda, "Stream", _NoStream)
    return CPUDevice("cpu")


@pytest.fixture(autouse=True)
def never_left_patched():
    yield
    if hf.is_patched():
        hf.unpatch()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt_weights")
    write_flexgen_weights(path, OptConfig(**TINY))
    return str(path)


@pytest.fixture
def prompts():
    ids = np.random.default_rng(0).integers(4, TINY["vocab_size"], size=(2, 24)).astype(np.int32)
    ids[1, :5] = 1  # left padding (OPT's pad id)
    return ids


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("flexgen_offload", ROOT / "benchmarks" / "flexgen_offload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
