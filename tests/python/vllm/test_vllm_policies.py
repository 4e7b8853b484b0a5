"""The other policies in vLLM, in process: the feedback scheduler fed from the backend's own step
times (switching from Post-QKT to Pre-QKT when the CPU is the bottleneck), and Pre-QKT (by
position; by page summaries where the core selects pages per slot) with a budget below the host
tokens. Counters per strategy show which ran."""

import gc
import json
import os

import pytest
from vllm_runs import CONFIG, ENGINE_ARGS, LAYERS, LENGTHS, MAX_TOKENS, generate, prompts

#: K covers every host token (max_model_len is 1024), so both strategies are exact; the CPU side
#: is forced to look like the bottleneck, so the scheduler switches to Pre-QKT after 3 steps.
SCHEDULER = {**CONFIG, "policy": "scheduler", "k_min": 1024, "k_max": 1024, "predictor": "positional"}
#: Pre-QKT with 8 host tokens per row: by position (earliest, strided, most recent), or the best 8
#: of the tokens of the pages whose key summaries bound the logit highest.
PRE_QKT = {**CONFIG, "policy": "pre_qkt", "k": 8}


def engine(model, config, **env):
    os.environ.update(HYBRIDGEN_CONFIG=json.dumps(config), **env)
    try:
        from vllm import LLM

        return LLM(str(model), **ENGINE_ARGS)
    finally:
        for name in ("HYBRIDGEN_CONFIG", *env):
            os.environ.pop(name, None)


def stats():
    import hybridgen.vllm

    return hybridgen.vllm.stats()


def close(llm):
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def test_the_scheduler_switches_to_pre_qkt_and_stays_exact_when_k_covers(tiny_model, engine_env, reference):
    llm = engine(tiny_model, SCHEDULER, HYBRIDGEN_FORCE_CPU_BOUND="1")
    try:
        before = stats()
        tokens = generate(llm, prompts(LENGTHS), MAX_TOKENS)
        after = stats()
    finally:
        close(llm)
    rows = after["hybrid_rows"] - before["hybrid_rows"]
    assert rows == len(LENGTHS) * (MAX_TOKENS - 1) * LAYERS, after
    by = {k: after["rows_by_strategy"][k] - before["rows_by_strategy"][k] for k in after["rows_by_strategy"]}
    assert by["post_qkt"] > 0 and by["pre_qkt"] > 0 and by["all"] == 0 and sum(by.values()) == rows, by
    assert after["observed_steps"] > before["observed_steps"] and after["strategy"] == "pre_qkt"
    assert tokens == reference()["tokens"]


@pytest.mark.parametrize("predictor", ["positional", "pages"])
def test_pre_qkt_attends_to_k_host_tokens_per_row(tiny_model, engine_env, predictor):
    from hybridgen.vllm.settings import slot_pages

    if predictor == "pages" and not slot_pages():
        pytest.skip("this build's HostKVStore.cpu_stage_slots takes no page selection")
    llm = engine(tiny_model, {**PRE_QKT, "predictor": predictor})
    try:
        before = stats()
        generate(llm, prompts([300, 500], seed=3), 8)
        after = stats()
    finally:
        close(llm)
    rows = after["hybrid_rows"] - before["hybrid_rows"]
    assert (
        rows == 2 * 7 * LAYERS and after["rows_by_strategy"]["pre_qkt"] - before["rows_by_strategy"]["pre_qkt"] == rows
    )
    assert after["host_tokens_read"] - before["host_tokens_read"] == rows * 8
    scored = after["host_keys_scored"] - before["host_keys_scored"]
    if predictor == "positional":
        assert scored == rows * 8
    else:  # the chosen pages' tokens and the summaries: more than k, far less than every host token
        assert rows * 8 < scored < rows * 200
