"""vLLM with the plugin, in process, on a tiny random Llama: hybrid decode runs, its greedy tokens
equal vLLM's without plugins, and host slots follow the requests' lifecycle."""

import json
import os

import pytest
from vllm_runs import ENGINE_ARGS, generate, impl_classes, prompts, start_stock_run

#: Small device tier (4 sinks + 16 recent tokens) and small eviction chunks: every prompt below
#: leaves most of its tokens in the host store.
CONFIG = {"policy": "all", "gpu_budget": 16, "sinks": 4, "evict_chunk": 4}
LENGTHS = [37, 150, 290, 600]  # the longest prefills in three chunks while the others decode
MAX_TOKENS = 24
LAYERS = 2


@pytest.fixture(scope="module")
def run(tiny_model, engine_env, tmp_path_factory):
    """One engine with the plugin for the module, and the reference run's tokens (vLLM without
    plugins, in a subprocess started first so that the two start up side by side)."""
    token_prompts = prompts(LENGTHS)
    out = tmp_path_factory.mktemp("stock") / "tokens.json"
    stock = start_stock_run(tiny_model, token_prompts, MAX_TOKENS, out)
    os.environ["HYBRIDGEN_CONFIG"] = json.dumps(CONFIG)
    try:
        from vllm import LLM

        import hybridgen.vllm

        llm = LLM(str(tiny_model), kv_transfer_config=hybridgen.vllm.kv_transfer_config(), **ENGINE_ARGS)
        log, _ = stock.communicate(timeout=600)
        assert stock.returncode == 0, f"the reference run failed:\n{log[-4000:]}"
        yield llm, token_prompts, json.loads(out.read_text())
    finally:
        os.environ.pop("HYBRIDGEN_CONFIG", None)
        if stock.poll() is None:
            stock.kill()


def stats():
    import hybridgen.vllm

    return hybridgen.vllm.stats()


def test_the_hybrid_backend_runs_and_the_reference_does_not(run):
    llm, _, reference = run
    assert impl_classes(llm) == {"HybridCPUAttentionBackendImpl"}
    assert reference["impls"] == ["CPUAttentionBackendImpl"]


def test_greedy_tokens_equal_vllm_without_plugins(run):
    llm, token_prompts, reference = run
    before = stats()
    tokens = generate(llm, token_prompts, MAX_TOKENS)
    after = stats()
    # The hybrid path served every decode step of every request in every layer (the first
    # generated token comes from the prefill): a run where it never ran, or ran less, fails here.
    rows = after["hybrid_rows"] - before["hybrid_rows"]
    assert rows == len(LENGTHS) * (MAX_TOKENS - 1) * LAYERS, after
    assert after["host_tokens_read"] - before["host_tokens_read"] > rows * 16, after
    assert after["untracked"] == before["untracked"]
    assert tokens == reference["tokens"]


def test_a_prefix_cache_hit_takes_the_stock_path(run):
    # The same prompts again: vLLM's prefix cache supplies their first full blocks, whose K/V the
    # plugin never saw for these requests, so they run vLLM's own attention (still exact).
    llm, token_prompts, reference = run
    before = stats()
    tokens = generate(llm, token_prompts[2:], MAX_TOKENS)
    after = stats()
    assert after["untracked"] - before["untracked"] == 2
    assert after["hybrid_rows"] == before["hybrid_rows"]
    assert tokens == reference["tokens"][2:]
    assert after["active_requests"] == {}


def test_slots_are_released_when_requests_finish(run):
    llm, _, _ = run
    before = stats()
    generate(llm, prompts([100, 200], seed=1), 4)
    after = stats()
    assert after["slots_added"] - before["slots_added"] == 2
    assert after["slots_released"] - before["slots_released"] == 2
    assert after["active_requests"] == {} and after["active_slots"] == []


def test_slots_are_released_when_a_request_is_aborted(run):
    from vllm import SamplingParams

    llm, _, _ = run
    engine = llm.llm_engine
    before = stats()
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    engine.add_request("abort-me", {"prompt_token_ids": prompts([150], seed=2)[0]}, params)
    for _ in range(4):  # the prefill, then decode steps with host tokens
        engine.step()
    running = stats()
    assert len(running["active_slots"]) == 1
    assert running["hybrid_rows"] > before["hybrid_rows"]
    engine.abort_request(["abort-me"])
    while engine.has_unfinished_requests():
        engine.step()
    after = stats()
    assert after["slots_released"] - before["slots_released"] == 1
    assert after["active_requests"] == {} and after["active_slots"] == []
