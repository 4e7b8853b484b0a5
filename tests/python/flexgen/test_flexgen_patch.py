"""The patched ``SelfAttention`` through FlexGen's cache protocol and whole ``OptLM.generate`` runs
on the CPU against FlexGen's own; patch/unpatch restoring FlexGen exactly; errors for a missing or
wrong FlexGen and for settings hybrid attention cannot serve (hybridgen.flexgen.patch, install, compat)."""

import importlib.metadata
import importlib.util
import subprocess
import sys

import numpy as np
import pytest
import torch
from flexgen_support import (
    ROOT,
    TINY,
    AttentionRun,
    ExecutionEnv,
    OptConfig,
    Task,
    TorchTensor,
    ValueHolder,
    decode_scenario,
    flex_policy,
    fo,
    generate,
    pb,
    run_attention,
)

import hybridgen.flexgen as hf
from hybridgen import HybridConfig
from hybridgen.apps.flexgen import cli
from hybridgen.flexgen import compat

# --- the patched SelfAttention vs FlexGen's, through FlexGen's cache protocol -----------------------


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("sinks,gpu_budget,evict_chunk", [(0, 4, 3), (3, 6, 2)])
def test_patched_self_attention_matches_flexgen_over_decode_steps(
    cpu_flexgen, rng, merge, sinks, gpu_budget, evict_chunk
):
    """The whole patched ``mha_gen`` (projections, hybrid attention, output projection, residual,
    returned k/v) through FlexGen's load/forward/store protocol equals FlexGen's own over 14
    decode steps, while tokens move to the host in chunks."""
    b, h, n_head, prompt_len, gen_len = 2, 64, 4, 19, 15
    cfg, weights, prompt, steps, masks = decode_scenario(rng, b, h, n_head, prompt_len, gen_len, [0, 4])

    ref_run, ref = run_attention(cpu_flexgen, weights, flex_policy(), cfg, prompt, steps, masks, gen_len)
    hf.patch(policy="all", merge=merge, sinks=sinks, gpu_budget=gpu_budget, evict_chunk=evict_chunk)
    run, got = run_attention(cpu_flexgen, weights, flex_policy(), cfg, prompt, steps, masks, gen_len)
    session = hf.current_session()
    hf.unpatch()

    for i, (a, e) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a, e, atol=2e-3, rtol=0, msg=lambda m: f"step {i}: {m}")
    hosts = [r.host_tokens for r in session.telemetry.records]
    assert hosts[0] == prompt_len - sinks - gpu_budget and hosts[-1] > hosts[0]  # evicted while decoding
    assert len(set(hosts)) > 2  # in several chunks
    state = run.home.val[0]
    assert state.total == prompt_len + gen_len - 1  # every attended token is committed (FlexGen skips the last)
    assert state.n_dev - state.sinks_on_device - gpu_budget < evict_chunk
    assert session.step == gen_len - 1
    # Sinks + host store + recent tokens hold exactly FlexGen's cache, in token order.
    s, total = state.sinks_on_device, state.total - 1  # FlexGen never stores the last token
    for kind, dev in zip(("k", "v"), state.device_kv()):
        host = state.store.read(0, 0, state.host_len)[0 if kind == "k" else 1]
        logical = torch.cat([dev[:, :, :s], host, dev[:, :, s:]], dim=2)[:, :, :total]
        flexgen_home = ref_run.home.val[0 if kind == "k" else 1].data[:total]
        assert torch.equal(logical, flexgen_home.view(total, b, n_head, -1).permute(1, 2, 0, 3)), kind


def test_replacements_fall_back_to_flexgen_for_caches_they_did_not_make(cpu_flexgen, rng):
    """A layer whose cache was made before patch() keeps running FlexGen's own code."""
    b, h, n_head, prompt_len, gen_len = 2, 32, 2, 9, 5
    cfg, weights, prompt, steps, masks = decode_scenario(rng, b, h, n_head, prompt_len, gen_len, [0, 2])
    _, ref = run_attention(cpu_flexgen, weights, flex_policy(), cfg, prompt, steps, masks, gen_len)

    run = AttentionRun(cpu_flexgen, weights, flex_policy(), cfg, prompt_len, gen_len)  # FlexGen's cache
    session = hf.patch(policy="all", gpu_budget=2)
    outs = [run.step(0, prompt, masks[0])] + [run.step(i, x, masks[i]) for i, x in enumerate(steps, start=1)]
    for a, e in zip(outs, ref):
        torch.testing.assert_close(a, e, atol=0, rtol=0)
    assert isinstance(run.home.val[0], TorchTensor) and not session.telemetry.records


@pytest.mark.parametrize(
    "options",
    [
        dict(policy="all"),
        dict(policy="all", merge="concat"),
        dict(policy="post_qkt", k=1000),
        dict(policy="pre_qkt", k=1000),
    ],
    ids=["all-lse", "all-concat", "post_qkt-k-covers-all", "pre_qkt-k-covers-all"],
)
def test_generate_gives_flexgen_tokens_with_exact_attention(cpu_flexgen, tiny_weights, prompts, options):
    """``OptLM.generate`` patched, with most of each layer's cache on the host, produces FlexGen's
    own greedy tokens whenever every host token is attended to."""
    ref = generate(cpu_flexgen, tiny_weights, prompts, 12)
    session = hf.patch(gpu_budget=4, sinks=2, evict_chunk=2, **options)
    got = generate(cpu_flexgen, tiny_weights, prompts, 12)
    np.testing.assert_array_equal(got, ref)
    assert len(set(ref[0, 24:].tolist())) > 3  # decoding does not collapse into one token
    records = session.telemetry.records
    assert len(records) == 11 * TINY["num_hidden_layers"] and session.step == 11
    assert records[-1].host_tokens == 24 + 10 - 2 - 4  # prompt + 10 stored tokens - sinks - recent (no chunk pending)
    assert all(r.k == r.host_tokens for r in records)


def test_generate_with_a_small_k_changes_tokens(cpu_flexgen, tiny_weights, prompts):
    """Selective policies do change the result (so the exact test above can fail)."""
    ref = generate(cpu_flexgen, tiny_weights, prompts, 12)
    hf.patch(gpu_budget=4, sinks=2, evict_chunk=2, policy="pre_qkt", k=2)
    got = generate(cpu_flexgen, tiny_weights, prompts, 12)
    assert (got[:, 24:] != ref[:, 24:]).any()


def test_scheduler_adapts_k_once_per_step_for_every_layer(cpu_flexgen, tiny_weights, prompts):
    session = hf.patch(gpu_budget=4, sinks=2, evict_chunk=2, policy="scheduler", k_min=2, k_max=16)
    generate(cpu_flexgen, tiny_weights, prompts, 12)
    records = session.telemetry.records
    per_step = {}
    for r in records:
        per_step.setdefault(r.step, set()).add((r.strategy, r.k))
    assert sorted(per_step) == list(range(11))
    assert all(len(v) == 1 for v in per_step.values())  # one K and strategy for all layers of a step
    assert all(2 <= r.k <= 16 and r.strategy in ("post_qkt", "pre_qkt") for r in records)
    assert session.scheduler.steps == 11  # every finished step fed the scheduler once


def test_generate_twice_and_with_several_gpu_batches(cpu_flexgen, tiny_weights):
    """FlexGen's warm-up pattern (a 1-token generate, then the real one) and num_gpu_batches > 1:
    one state per layer and GPU batch, each freed by FlexGen's delete_cache."""
    ids = np.random.default_rng(1).integers(4, TINY["vocab_size"], size=(4, 20)).astype(np.int32)
    ref = generate(cpu_flexgen, tiny_weights, ids, 9, gpu_batch_size=2, num_gpu_batches=2)
    session = hf.patch(gpu_budget=3, sinks=1, evict_chunk=2, policy="all")
    env = ExecutionEnv(gpu=cpu_flexgen, cpu=cpu_flexgen, disk=None, mixed=None)
    model = fo.OptLM(OptConfig(**TINY), env, tiny_weights, flex_policy(gpu_batch_size=2, num_gpu_batches=2))
    model.generate(ids[:, :8], max_new_tokens=1)
    got = model.generate(ids, max_new_tokens=9)
    np.testing.assert_array_equal(got, ref)
    last = [r for r in session.telemetry.records if r.step == session.step - 1]
    assert sorted(r.layer for r in last) == [0, 0, 1, 1]  # two layers x two GPU batches
    assert {r.host_tokens for r in last} == {20 + 7 - 1 - 3 - 1}  # prompt + 7 stored - sink - recent - 1 pending
    assert all(holder.val is None for row in model.cache_home for holder in row)  # deleted


def test_dummy_weights_run_through_the_hybrid_path(cpu_flexgen, prompts):
    """``--path _DUMMY_`` (all-ones weights, NaN activations: timing runs) must not break the
    native CPU stage."""
    hf.patch(gpu_budget=4, sinks=2, evict_chunk=2, policy="scheduler", k_min=2, k_max=8)
    out = generate(cpu_flexgen, "_DUMMY_", prompts, 6)
    assert out.shape == (2, 30)


# --- patch / unpatch ----------------------------------------------------------------------------------
def _patched_attributes():
    from hybridgen.flexgen.patch import PATCHED

    return [(getattr({"flex_opt": fo, "pytorch_backend": pb}[m], c), a) for m, c, a in PATCHED]


def test_unpatch_restores_flexgen_exactly():
    before = {(cls, name): vars(cls)[name] for cls, name in _patched_attributes()}
    assert {(c.__name__, n) for c, n in before} == {
        ("TorchDevice", "mha_gen"),
        ("SelfAttention", "init_cache_one_gpu_batch"),
        ("SelfAttention", "load_cache"),
        ("SelfAttention", "store_cache"),
    }
    session = hf.patch(policy="post_qkt", k=8)
    assert hf.is_patched() and hf.current_session() is session
    for (cls, name), original in before.items():
        assert vars(cls)[name] is not original
        assert vars(cls)[name].__wrapped__ is original
    hf.unpatch()
    assert not hf.is_patched() and hf.current_session() is None
    for (cls, name), original in before.items():
        assert vars(cls)[name] is original
    hf.patch(HybridConfig(policy="all"))  # and again
    hf.unpatch()
    for (cls, name), original in before.items():
        assert vars(cls)[name] is original


def test_patch_twice_or_unpatch_unpatched_is_an_error():
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch()
    hf.patch()
    original = vars(pb.TorchDevice)["mha_gen"]
    with pytest.raises(RuntimeError, match="already patched"):
        hf.patch(policy="all")
    assert vars(pb.TorchDevice)["mha_gen"] is original  # the failed call changed nothing


@pytest.mark.slow
def test_importing_the_drop_in_does_not_import_flexgen():
    code = "import sys, hybridgen.flexgen; print(sorted(m for m in sys.modules if m.split('.')[0] == 'flexgen'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


# --- bad input ------------------------------------------------------------------------------------------
def test_missing_flexgen_is_an_import_error_with_the_install_command(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "flexgen":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(ImportError, match=r"FlexGen is not installed: pip install 'hybridgen\[flexgen\]'"):
        hf.patch()
    assert not hf.is_patched()
    assert cli.main(["--help"]) == 1


def test_other_flexgen_versions_are_refused(monkeypatch):
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.1.7" if name == "flexgen" else real(name))
    with pytest.raises(
        ImportError, match=r"FlexGen 0\.1\.8.*FlexGen 0\.1\.7 is installed: pip install flexgen==0\.1\.8"
    ):
        hf.patch()
    assert not hf.is_patched()


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(policy="h2o"), ValueError, "not available in FlexGen"),
        (dict(policy="infinigen"), ValueError, "not available in FlexGen"),
        (dict(policy="nonsense"), ValueError, "unknown policy"),
        (dict(pipeline=True, speculative=True), ValueError, "speculative"),
        (dict(max_context=4096), ValueError, "max_context"),
        (dict(gpu_budget=0), ValueError, "gpu_budget"),
        (dict(k_min=64, k_max=8), ValueError, "k_min"),
        (dict(merge="sum"), ValueError, "merge"),
        (dict(budget=12), TypeError, "budget"),
    ],
)
def test_bad_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        hf.patch(**kwargs)
    assert not hf.is_patched()


def test_config_and_options_together_are_refused():
    with pytest.raises(TypeError, match="not both"):
        hf.patch(HybridConfig(policy="all"), gpu_budget=8)
    with pytest.raises(TypeError, match="HybridConfig"):
        hf.patch({"policy": "all"})


@pytest.mark.parametrize(
    "policy,match",
    [
        (dict(cache_gpu_percent=50, cache_cpu_percent=0), "on disk"),
        (dict(cache_gpu_percent=0, cache_cpu_percent=50), "on disk"),
        (dict(attn_sparsity=0.5), "post_qkt"),
        (dict(compress_cache=True), "compress-cache"),
        (dict(cpu_cache_compute=True, cache_gpu_percent=0, cache_cpu_percent=100), "cpu-cache-compute"),
        (dict(cache_gpu_percent=0, cache_cpu_percent=100), "give one of them"),
    ],
)
def test_flexgen_settings_hybrid_attention_cannot_serve(cpu_flexgen, tiny_weights, prompts, policy, match):
    """Refused when generate() makes its caches, before any work."""
    hf.patch(gpu_budget=16)
    with pytest.raises(ValueError, match=match):
        generate(cpu_flexgen, tiny_weights, prompts, 4, **policy)


def test_cache_percents_set_the_token_split_when_no_budget_is_given(cpu_flexgen, tiny_weights, prompts):
    """FlexGen's ``--percent`` cache split keeps working: the same share of tokens stays on the GPU."""
    session = hf.patch(policy="all", sinks=2, evict_chunk=2)
    env = ExecutionEnv(gpu=cpu_flexgen, cpu=cpu_flexgen, disk=None, mixed=None)
    model = fo.OptLM(OptConfig(**TINY), env, tiny_weights, flex_policy(cache_gpu_percent=25, cache_cpu_percent=75))
    model.set_task(
        Task(inputs=prompts, prompt_len=24, gen_len=12, cut_gen_len=None, do_sample=False, temperature=1.0, stop=None)
    )
    home = ValueHolder()
    model.layers[1].init_cache_one_gpu_batch(home)
    state = home.val[0]
    placement = state.tier.placement
    assert (placement.sinks, placement.recent) == (2, (24 + 12 - 1) * 25 // 100 - 2)
    assert compat.placement(session.config, compat.FlexSettings(0, 100), cache_len=35, budget_given=False) == (2, 1)
