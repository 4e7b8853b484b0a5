"""Tests of the vLLM plugin (marked ``vllm``). They need vLLM, which lives in its own virtualenv
(``bash tests/vllm.sh``); without it every test here is skipped, so the main suite stays green."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _missing_vllm():
    """Why vLLM cannot run here, or ``None``. (This folder is named ``vllm`` too: without vLLM
    installed, ``import vllm`` would find it as a namespace package, so look for the real one.)"""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError) as e:
        return f"vLLM is not importable here ({e})"
    if spec is None or spec.origin in (None, "namespace"):
        return "vLLM is not installed here"
    try:
        import vllm  # noqa: F401
    except Exception as e:  # vLLM failing on an unsupported machine
        return f"vLLM does not import here ({type(e).__name__}: {e})"
    return None


_MISSING = _missing_vllm()
if _MISSING:
    _MISSING += "; bash tests/vllm.sh runs these tests in .venv-vllm"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in item.path.parents:
            item.add_marker(pytest.mark.vllm)
            if _MISSING:
                item.add_marker(pytest.mark.skip(reason=_MISSING))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """The tiny Llama-shaped model (random weights, real tokenizer), written once per session."""
    from tiny_llama import make_model

    return make_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def reference(tiny_model, tmp_path_factory):
    """vLLM without plugins on ``vllm_runs.prompts()`` (``MAX_TOKENS`` greedy tokens each), in a
    subprocess started on first use: a function that waits for its result (``tokens``,
    ``impls``), so that a test can start its own engine meanwhile."""
    from vllm_runs import MAX_TOKENS, finish, prompts, start_stock_run

    out = tmp_path_factory.mktemp("stock") / "tokens.json"
    proc = start_stock_run(tiny_model, prompts(), MAX_TOKENS, out)
    result = {}

    def wait():
        if not result:
            result.update(finish(proc, out, 600, "the reference run (vLLM without plugins)"))
        return result

    yield wait
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def engine_env():
    """The in-process engine's environment for one module (restored after it)."""
    from vllm_runs import ENV

    saved = {k: os.environ.get(k) for k in ENV}
    os.environ.update(ENV)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
