"""vLLM with the plugin, in process, on a tiny random Llama: hybrid decode runs, its greedy tokens
equal vLLM's without plugins, and host slots follow the requests' lifecycle. The engine is made
with no argument of the plugin's: ``HYBRIDGEN_CONFIG`` is all it takes."""

import json
import os

import pytest
from vllm_runs import CONFIG, ENGINE_ARGS, LAYERS, LENGTHS, MAX_TOKENS, generate, impl_classes, prompts


@pytest.fixture(scope="module")
def run(tiny_model, engine_env, reference):
    """One engine with the plugin for the module, and the reference run's tokens (vLLM without
    plugins, in a subprocess started first so that the two start up side by side)."""
    reference_tokens = reference  # started now; waited for below
    os.environ["HYBRIDGEN_CONFIG"] = json.dumps(CONFIG)
    try:
        from vllm import LLM

        llm = LLM(str(tiny_model), **ENGINE_ARGS)
        yield llm, prompts(LENGTHS), reference_tokens()
        del llm
    finally:
        os.environ.pop("HYBRIDGEN_CONFIG", None)


def stats():
    import hybridgen.vllm

    return hybridgen.vllm.stats()


def test_the_hybrid_backend_runs_and_the_reference_does_not(run):
    llm, _, reference = run
    assert impl_classes(llm) == {"HybridCPUAttentionBackendImpl"}
    assert reference["impls"] == ["CPUAttentionBackendImpl"]
    # No kv_transfer_config was passed: with HYBRIDGEN_CONFIG set, the plugin's connector is the default.
    assert llm.llm_engine.vllm_config.kv_transfer_config.kv_connector == "HybridgenConnector"


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
    assert after["rows_by_strategy"]["all"] - before["rows_by_strategy"]["all"] == rows
    assert tokens == reference["tokens"]
    # Telemetry per request: every one of them read host tokens.
    done = after["finished_requests"][-len(LENGTHS) :]
    assert sorted(r["tokens"] for r in done) == sorted(n + MAX_TOKENS - 1 for n in LENGTHS)
    assert all(r["host_tokens"] > 0 and r["hybrid_rows"] == (MAX_TOKENS - 1) * LAYERS for r in done)


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
