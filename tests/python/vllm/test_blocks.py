"""Freeing a request's paged-cache blocks between its sinks and its recent window
(:mod:`hybridgen.vllm.blocks`), in process on the tiny Llama: more requests run at once than the
pool holds at full length, the freed blocks are really not read (every freed block is filled
with NaN as it is freed, and zeroed again when vLLM hands it to a request: the tokens still
equal vLLM's without plugins on the same pool), preempted requests keep their blocks, and a
prompt longer than the whole pool streams into the host slot.

(A freed block is zeroed when reused because vLLM's CPU kernel reads the unwritten rows of a
request's last block with weight 0: stale finite rows are harmless there, NaN rows are not.)"""

import json
import math
import os

import pytest
from vllm_runs import CONFIG, ENGINE_ARGS, finish, generate, prompts, run_env, start_run

#: vLLM's CPU blocks hold 128 tokens; this pool holds 11 of them (one more is vLLM's null block).
BLOCKS = 12
BLOCK = 128
#: Four prompts of five blocks each at full length: a pool of 11 holds two of them at once.
LONG = [600, 590, 580, 570]
LONG_TOKENS = 40
#: Many short prompts that grow past their first block on a smaller pool: vLLM preempts some.
SHORT = [120] * 6
SHORT_TOKENS = 200
SHORT_BLOCKS = 5


def _engine_args(blocks: int) -> dict:
    # A pool must hold one request of the longest length the engine takes.
    return {"num_gpu_blocks_override": blocks, "max_model_len": (blocks - 1) * BLOCK}


@pytest.fixture(scope="module")
def stock(tiny_model, tmp_path_factory):
    """vLLM without plugins on both workloads, each on its own small pool (subprocesses started
    first, so that they start up beside the engine under test)."""
    out = tmp_path_factory.mktemp("stock-blocks")
    runs = {
        "long": start_run(
            tiny_model, prompts(LONG, seed=3), LONG_TOKENS, out / "long.json", run_env(), _engine_args(BLOCKS)
        ),
        "short": start_run(
            tiny_model,
            prompts(SHORT, seed=4),
            SHORT_TOKENS,
            out / "short.json",
            run_env(),
            _engine_args(SHORT_BLOCKS),
        ),
    }
    results = {}

    def wait(name):
        if name not in results:
            results[name] = finish(runs[name], out / f"{name}.json", 900, f"the stock run {name!r}")
        return results[name]

    yield wait
    for proc in runs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _attention_caches(llm):
    from vllm.model_executor.layers.attention import Attention

    ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
    caches = []
    for layer in ctx.values():
        if isinstance(layer, Attention):
            kv = layer.kv_cache
            caches.extend(kv if isinstance(kv, list) else [kv])
    assert caches
    return caches


def _run(model, blocks: int, token_prompts, max_tokens: int, monkeypatch):
    """An engine with the plugin on a pool of ``blocks`` blocks whose freed blocks are filled
    with NaN as they are freed; returns its tokens, the plugin's stats and the block counters."""
    from vllm import LLM

    import hybridgen.vllm
    from hybridgen.vllm import blocks as hb

    monkeypatch.setenv("HYBRIDGEN_CONFIG", json.dumps(CONFIG))
    llm = LLM(os.fspath(model), **{**ENGINE_ARGS, **_engine_args(blocks)})
    caches = _attention_caches(llm)
    remove = hb.HybridAttentionManager.remove_skipped_blocks
    poisoned = set()

    def poisoning(self, request_id, processed, num_prompt_tokens=None):
        before = list(self.req_to_blocks.get(request_id, []))
        remove(self, request_id, processed, num_prompt_tokens)
        after = self.req_to_blocks.get(request_id, [])
        freed = [b.block_id for b, a in zip(before, after) if a is self._null_block and b is not a]
        for kv in caches:
            kv[freed] = math.nan
        poisoned.update(freed)

    monkeypatch.setattr(hb.HybridAttentionManager, "remove_skipped_blocks", poisoning)
    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    get_new_blocks = pool.get_new_blocks

    def unpoisoning(num_blocks, *args, **kwargs):
        new = get_new_blocks(num_blocks, *args, **kwargs)
        ids = [b.block_id for b in new]
        for kv in caches:
            kv[ids] = 0.0
        return new

    monkeypatch.setattr(pool, "get_new_blocks", unpoisoning)
    counters = dict(hb.counters)
    stats = hybridgen.vllm.stats()
    tokens = generate(llm, token_prompts, max_tokens)
    after = hybridgen.vllm.stats()
    delta = {k: hb.counters[k] - counters[k] for k in counters}
    del llm
    return tokens, stats, after, delta, poisoned


@pytest.fixture(scope="module")
def model_path(tiny_model, engine_env):
    return tiny_model


def test_more_requests_run_at_once_than_the_pool_holds_and_freed_blocks_are_not_read(model_path, stock, monkeypatch):
    tokens, before, after, freed, poisoned = _run(model_path, BLOCKS, prompts(LONG, seed=3), LONG_TOKENS, monkeypatch)
    # Each request's middle blocks went back to the pool (and were poisoned there).
    per_request = [max(0, (n - CONFIG["gpu_budget"] - CONFIG["evict_chunk"]) // BLOCK - 1) for n in LONG]
    assert freed["blocks_freed"] >= sum(per_request), freed
    assert len(poisoned) >= 2
    # At full length a request needs 5 blocks: a pool of 11 holds two; all four decoded together.
    full = -(-(max(LONG) + LONG_TOKENS) // BLOCK)
    assert (BLOCKS - 1) // full == 2
    assert after["peak_batch_requests"] == len(LONG), after
    rows = after["hybrid_rows"] - before["hybrid_rows"]
    assert rows == len(LONG) * (LONG_TOKENS - 1) * 2, after
    assert tokens == stock("long")["tokens"]


def test_preempted_requests_keep_their_blocks_and_stay_exact(model_path, stock, monkeypatch):
    tokens, before, after, freed, _ = _run(model_path, SHORT_BLOCKS, prompts(SHORT, seed=4), SHORT_TOKENS, monkeypatch)
    # The pool of 4 blocks cannot grow six requests past their first block: vLLM preempted some,
    # and the resumed ones were held (their recomputation reads every block).
    assert freed["requests_held"] >= 1, freed
    assert freed["blocks_freed"] >= 1, freed
    assert after["hybrid_rows"] > before["hybrid_rows"]
    assert tokens == stock("short")["tokens"]


def test_freeable_blocks():
    from hybridgen.vllm.blocks import freeable_blocks

    def free(processed, prompt=100, sinks=4, window=20, size=16):
        return freeable_blocks(sinks=sinks, window=window, block_size=size, processed=processed, prompt=prompt)

    assert free(99) == (0, 0)  # the prompt is not computed yet
    assert free(100, prompt=None) == (0, 0)
    assert free(100) == (1, 5)  # blocks 1..4: tokens 16..79 < 100 - 20
    assert free(100, sinks=16) == (1, 5) and free(100, sinks=17) == (2, 5)
    assert free(100, sinks=0) == (0, 5)
    assert free(40, prompt=40) == (1, 1)  # nothing wholly between the sinks and the window
    assert free(1000, prompt=40) == (1, (1000 - 20) // 16)


#: A prompt longer than the whole pool of STREAM_BLOCKS (7 usable blocks, 896 tokens), beside a
#: short one: the long one streams (its prefill frees blocks as it goes, its later chunks are
#: served by hybrid attention), the short one prefills on vLLM's path.
STREAM = [1400, 300]
STREAM_BLOCKS = 8
STREAM_TOKENS = 16
STREAM_ARGS = {"num_gpu_blocks_override": STREAM_BLOCKS, "max_model_len": 2048}


@pytest.fixture(scope="module")
def stock_stream(tiny_model, tmp_path_factory):
    """vLLM without plugins on the streaming workload, on a pool that holds it (vLLM's default)."""
    out = tmp_path_factory.mktemp("stock-stream") / "tokens.json"
    proc = start_run(tiny_model, prompts(STREAM, seed=5), STREAM_TOKENS, out, run_env(), {"max_model_len": 2048})
    yield lambda: finish(proc, out, 900, "the stock streaming run")
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


def test_a_prompt_longer_than_the_pool_streams_into_the_host_slot(model_path, stock_stream, monkeypatch):
    from vllm import LLM
    from vllm_runs import generate as gen

    import hybridgen.vllm
    from hybridgen.vllm import blocks as hb

    monkeypatch.setenv("HYBRIDGEN_CONFIG", json.dumps(CONFIG))
    # Without the plugin vLLM refuses this engine at start-up: its pool cannot hold one request
    # of max_model_len. A streamed request holds at most 5 blocks.
    llm = LLM(os.fspath(model_path), **{**ENGINE_ARGS, **STREAM_ARGS})
    counters, before = dict(hb.counters), hybridgen.vllm.stats()
    tokens = gen(llm, prompts(STREAM, seed=5), STREAM_TOKENS)
    after = hybridgen.vllm.stats()
    del llm
    streamed = hb.counters["streamed_blocks_freed"] - counters["streamed_blocks_freed"]
    assert streamed >= (STREAM[0] - 256 - 20) // BLOCK - 1, hb.counters
    # Every chunk after the blocks were freed ran hybrid: at least the last 1400 - 512 prompt
    # tokens, in both layers.
    assert after["prefill_rows"] - before["prefill_rows"] >= (STREAM[0] - 512) * 2, after
    assert after["hybrid_rows"] - before["hybrid_rows"] == len(STREAM) * (STREAM_TOKENS - 1) * 2, after
    assert tokens == stock_stream()["tokens"]


def test_causal_partial_matches_float64():
    import torch

    from hybridgen.vllm.runtime import causal_partial

    g = torch.Generator().manual_seed(0)
    n, hq, hkv, m, d = 5, 4, 2, 7, 8
    q, k, v = (
        torch.randn(n, hq, d, generator=g),
        torch.randn(hkv, m, d, generator=g),
        torch.randn(hkv, m, d, generator=g),
    )
    masked = torch.rand(n, m, generator=g) < 0.5
    masked[0] = True  # a query that sees no key
    out, lse = causal_partial(q, k, v, 0.3, masked)
    kk, vv = k.double().repeat_interleave(2, 0), v.double().repeat_interleave(2, 0)  # [hq, m, d]
    for i in range(n):
        for h in range(hq):
            x = (kk[h] @ q[i, h].double()) * 0.3
            x[masked[i]] = float("-inf")
            if masked[i].all():
                assert lse[i, h] == float("-inf") and out[i, h].abs().max() == 0
                continue
            assert abs(lse[i, h].item() - torch.logsumexp(x, 0).item()) < 1e-5
            assert torch.allclose(out[i, h].double(), torch.softmax(x, 0) @ vv[h], atol=1e-5)
