"""The FlexGen drop-in (``hybridgen.flexgen``) against FlexGen 0.1.8 itself.

On the CPU: the replacement's attention against FlexGen's own ``_attention_value`` and
``_sparse_attention_value`` in FlexGen's layouts; a patched ``SelfAttention`` against the unpatched
one through FlexGen's cache protocol (init / load / forward / store) over decode steps that evict
tokens to the host; whole ``OptLM.generate`` runs (random OPT weights in FlexGen's format) giving
FlexGen's tokens; patch/unpatch restoring FlexGen exactly; errors for a missing or wrong FlexGen
and for settings hybrid attention cannot serve; the command-line wrapper and the benchmark's
parsing and record. FlexGen's CPU paths end in ``.cuda()`` and its ``OptLM`` creates CUDA streams,
so the CPU tests stub those two (``cpu_flexgen``). On a GPU: ``OptLM`` end to end against
FlexGen's own offloading, the command line and the benchmark with OPT-1.3B-shaped dummy weights.
"""

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

fo = pytest.importorskip("flexgen.flex_opt")  # first: it fixes FlexGen's circular import

import torch.nn.functional as F  # noqa: E402
from flexgen import pytorch_backend as pb  # noqa: E402
from flexgen.compression import CompressionConfig  # noqa: E402
from flexgen.opt_config import OptConfig  # noqa: E402
from flexgen.utils import ExecutionEnv, Task, ValueHolder, vector_gather  # noqa: E402

import hybridgen.flexgen as hf  # noqa: E402
from hybridgen import HybridConfig  # noqa: E402
from hybridgen.flexgen import cli, compat, tokenizer  # noqa: E402
from hybridgen.flexgen.session import Session  # noqa: E402
from hybridgen.flexgen.layer_cache import FlexGenLayerCache  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TorchTensor = pb.TorchTensor


# --- FlexGen on the CPU ---------------------------------------------------------------------------
class CPUDevice(pb.TorchDevice):
    """FlexGen's TorchDevice on the CPU without pinned memory or CUDA synchronisation (both need a GPU)."""

    def allocate(self, shape, dtype, pin_memory=None, name=None):
        return super().allocate(shape, dtype, pin_memory=False, name=name)

    def synchronize(self):
        pass


class _NoStream:
    def __init__(self, *args, **kwargs):
        pass


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


def flex_policy(**overrides):
    fields = dict(
        gpu_batch_size=2, num_gpu_batches=1, w_gpu_percent=100, w_cpu_percent=0, cache_gpu_percent=100,
        cache_cpu_percent=0, act_gpu_percent=100, act_cpu_percent=0, overlap=False, sep_layer=True,
        pin_weight=False, cpu_cache_compute=False, attn_sparsity=1.0, compress_weight=False,
        comp_weight_config=CompressionConfig(4, 64, 0, False), compress_cache=False,
        comp_cache_config=CompressionConfig(4, 64, 2, False),
    )
    fields.update(overrides)
    return fo.Policy(**fields)


def left_padded_mask(b, s, pads):
    """FlexGen's attention mask: bool ``(b, s)``, True = attend, ``pads[i]`` leading pad tokens."""
    mask = torch.ones(b, s, dtype=torch.bool)
    for i, p in enumerate(pads):
        mask[i, :p] = False
    return mask


def flexgen_attention(device, q, k_all, v_all, mask, n_head):
    """FlexGen's own dense decode attention (``_attention_value``) in float32, from FlexGen's cache
    layout ``(s, b*n_head, d)`` and a pre-scaled ``q [b, n_head, d]``; returns ``[b, n_head, d]``."""
    s, bn, d = k_all.shape
    b = bn // n_head
    value = device._attention_value(
        q.reshape(bn, 1, d).float(), k_all.permute(1, 2, 0).float(), v_all.permute(1, 0, 2).float(),
        mask, b, s, 1, n_head, d,
    )
    return value.view(b, n_head, d)


def heads(x, b, n):
    """``(s, b*n, d)`` -> ``[b, n, d]`` for one token (s == 1 squeezed)."""
    return x.view(x.shape[0], b, n, -1).permute(1, 2, 0, 3).squeeze(2)


def new_state(session, *, b, n, d, max_tokens, sinks, gpu_budget):
    return FlexGenLayerCache(session, 0, batch=b, n_head=n, head_dim=d, max_tokens=max_tokens, sinks=sinks,
                             gpu_budget=gpu_budget)


# --- the replacement's attention vs FlexGen's functions -------------------------------------------
@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("sinks,gpu_budget", [(0, 3), (2, 5), (4, 40)])
def test_exact_attention_equals_flexgen_attention_value(cpu_flexgen, rng, merge, sinks, gpu_budget):
    """Policy ``all`` over a cache split between device and host, with left padding, equals
    FlexGen's ``_attention_value`` over the whole cache."""
    b, n, d, prompt = 3, 4, 16, 29
    session = Session(HybridConfig(policy="all", merge=merge, sinks=sinks, gpu_budget=gpu_budget))
    state = new_state(session, b=b, n=n, d=d, max_tokens=prompt + 8, sinks=sinks, gpu_budget=gpu_budget)
    k_all = torch.randn(prompt + 1, b * n, d, generator=rng).half()
    v_all = torch.randn(prompt + 1, b * n, d, generator=rng).half()
    state.place_prompt(k_all[:prompt], v_all[:prompt])
    assert state.host_len == max(0, prompt - sinks - gpu_budget)
    q = (torch.randn(b, n, d, generator=rng) * d**-0.5).half()  # FlexGen's q is pre-scaled
    mask = left_padded_mask(b, prompt + 1, [0, 5, 11])

    from hybridgen.flexgen.decode import attend

    out, record = attend(state, q, heads(k_all[prompt:], b, n), heads(v_all[prompt:], b, n), mask)
    ref = flexgen_attention(cpu_flexgen, q, k_all, v_all, mask, n)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=0)
    assert record.host_tokens == state.host_len and record.strategy == "all"
    assert record.device_tokens == state.n_dev  # the device tier, the token being decoded committed


@pytest.mark.parametrize("policy", ["full", "aog", "aoc"])
def test_exact_baselines_run_in_flexgen_through_the_engine(cpu_flexgen, rng, policy):
    """The engine's exact baselines serve FlexGen's cache too, each with its own placement
    (full: every token on the device; aog/aoc: every token in the host store)."""
    b, n, d, prompt = 2, 4, 16, 21
    session = Session(HybridConfig(policy=policy, sinks=2, gpu_budget=5))
    state = new_state(session, b=b, n=n, d=d, max_tokens=prompt + 4, sinks=2, gpu_budget=5)
    k_all = torch.randn(prompt + 1, b * n, d, generator=rng).half()
    v_all = torch.randn(prompt + 1, b * n, d, generator=rng).half()
    state.place_prompt(k_all[:prompt], v_all[:prompt])
    assert state.host_len == (0 if policy == "full" else prompt)
    q = (torch.randn(b, n, d, generator=rng) * d**-0.5).half()
    mask = left_padded_mask(b, prompt + 1, [0, 6])

    from hybridgen.flexgen.decode import attend

    out, record = attend(state, q, heads(k_all[prompt:], b, n), heads(v_all[prompt:], b, n), mask)
    torch.testing.assert_close(out, flexgen_attention(cpu_flexgen, q, k_all, v_all, mask, n), atol=2e-3, rtol=0)
    assert record.host_tokens == (0 if policy == "full" else prompt) and record.layer == 0


def _vector_gather_copy(dst, dst_indices, src, src_indices):
    """``general_copy`` for the CPU case FlexGen's sparse path needs: its own version tests
    ``if src_indices:`` on a tensor of indices, which raises; this gathers with FlexGen's
    ``vector_gather`` instead."""
    out = dst.data[dst_indices] if dst_indices else dst.data
    out.copy_(vector_gather(src.data, src_indices) if torch.is_tensor(src_indices) else src.data[src_indices])


@pytest.mark.parametrize("sparsity", [0.1, 0.3, 0.75])
@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_post_qkt_selects_what_flexgen_sparse_attention_selects(cpu_flexgen, monkeypatch, rng, sparsity, merge):
    """With no sinks and every old token on the host, Post-QKT with ``k = int(sparsity*(s-1))``
    picks FlexGen's ``--attn-sparsity`` tokens (top-k by weight among the old tokens, plus the new
    one). FlexGen then weighs them by the *full* softmax, hybridgen renormalises over the picked
    tokens: FlexGen's output is hybridgen's times the probability mass the picked tokens hold."""
    monkeypatch.setattr(pb, "general_copy", _vector_gather_copy)
    b, n, d, old = 2, 4, 16, 37
    src_s = old + 1
    top = int(sparsity * (src_s - 1))
    session = Session(HybridConfig(policy="post_qkt", k=top, sinks=0, gpu_budget=4, merge=merge))
    state = new_state(session, b=b, n=n, d=d, max_tokens=src_s + 1, sinks=0, gpu_budget=4)
    k_all = torch.randn(src_s, b * n, d, generator=rng).half()
    v_all = torch.randn(src_s, b * n, d, generator=rng).half()
    state.place_prompt(k_all[:old], v_all[:old])
    state.evict(state.n_dev)  # every old token on the host, only the new one on the device
    assert state.host_len == old
    q = (torch.randn(b, n, d, generator=rng) * 2 * d**-0.5).half()
    mask = torch.ones(b, src_s, dtype=torch.bool)

    from hybridgen.flexgen.decode import attend

    out, record = attend(state, q, heads(k_all[old:], b, n), heads(v_all[old:], b, n), mask)
    assert record.k == top

    # FlexGen's sparse path as its CPU branch runs it: k in a float32 workspace, v gathered from
    # the float16 home into a float32 buffer.
    qf, kf = q.reshape(b * n, 1, d).float(), k_all.permute(1, 2, 0).float()
    v_home = TorchTensor.create_from_torch(v_all.clone(), cpu_flexgen)
    v_buf = TorchTensor.create_from_torch(torch.zeros(src_s, b * n, d), cpu_flexgen)
    sparse = cpu_flexgen._sparse_attention_value(qf, kf, v_all[old:].float(), (v_home, v_buf), mask, b, src_s, 1, n, d,
                                                 sparsity).view(b, n, d)
    weights = cpu_flexgen._attention_weights(qf, kf, mask, b, src_s, n)  # (b*n, 1, s), FlexGen's softmax
    kept = weights[:, :, :-1].topk(top, dim=2).values.sum(-1) + weights[:, :, -1]
    torch.testing.assert_close(out * kept.view(b, n, 1), sparse, atol=2e-3, rtol=0)
    assert not torch.allclose(out, sparse, atol=1e-2)  # the two do differ by that mass


# --- the patched SelfAttention vs FlexGen's, through FlexGen's cache protocol -----------------------
class AttentionRun:
    """One FlexGen ``SelfAttention`` driven step by step the way ``OptLM.generate`` drives it."""

    def __init__(self, device, weights, policy, cfg, prompt_len, gen_len):
        env = ExecutionEnv(gpu=device, cpu=device, disk=None, mixed=None)
        self.device, self.weights = device, weights
        self.layer = fo.SelfAttention(cfg, env, policy, 0)
        self.layer.set_task(Task(inputs=None, prompt_len=prompt_len, gen_len=gen_len, cut_gen_len=None,
                                 do_sample=False, temperature=1.0, stop=None))
        self.home, self.read, self.write = ValueHolder(), ValueHolder(), ValueHolder()
        self.layer.init_cache_one_gpu_batch(self.home)

    def step(self, i, hidden, mask):
        self.layer.load_cache(self.home, self.read, i)
        w = ValueHolder()
        w.store(tuple((TorchTensor.create_from_torch(t, self.device), False) for t in self.weights))
        h, m = ValueHolder(), ValueHolder()
        h.store(TorchTensor.create_from_torch(hidden.clone(), self.device))
        m.store(TorchTensor.create_from_torch(mask.clone(), self.device))
        self.layer.forward(h, self.read, w, m, self.write, i, 0)
        self.layer.store_cache(self.home, self.write, i)
        return h.val.data


def attention_weights(h, gen):
    """Random OPT attention weights in FlexGen's order (w_q, b_q, ..., w_ln, b_ln), float16."""
    r = lambda *shape, s=1.0: (torch.randn(*shape, generator=gen) * s).half()  # noqa: E731
    return (r(h, h, s=h**-0.5 * 2), r(h, s=0.1), r(h, h, s=h**-0.5 * 2), r(h, s=0.1), r(h, h, s=h**-0.5), r(h, s=0.1),
            r(h, h, s=h**-0.5), r(h, s=0.1), (1 + 0.1 * torch.randn(h, generator=gen)).half(), r(h, s=0.1))


def decode_scenario(rng, b, h, n_head, prompt_len, gen_len, pads):
    """One attention layer's config and weights, a prompt, the decode inputs and their masks."""
    cfg = OptConfig(name="opt-test", num_hidden_layers=1, input_dim=h, hidden_size=h, n_head=n_head)
    weights = attention_weights(h, rng)
    prompt = torch.randn(b, prompt_len, h, generator=rng).half()
    steps = [torch.randn(b, 1, h, generator=rng).half() for _ in range(gen_len - 1)]
    masks = [left_padded_mask(b, prompt_len + i, pads) for i in range(gen_len)]
    return cfg, weights, prompt, steps, masks


def run_attention(device, weights, policy, cfg, prompt, steps, masks, gen_len):
    run = AttentionRun(device, weights, policy, cfg, prompt.shape[1], gen_len)
    outs = [run.step(0, prompt, masks[0])]
    for i, x in enumerate(steps, start=1):
        outs.append(run.step(i, x, masks[i]))
    return run, outs


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("sinks,gpu_budget,evict_chunk", [(0, 4, 3), (3, 6, 2)])
def test_patched_self_attention_matches_flexgen_over_decode_steps(cpu_flexgen, rng, merge, sinks, gpu_budget, evict_chunk):
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


# --- whole OptLM.generate runs on the CPU -----------------------------------------------------------
TINY = dict(name="opt-tiny", num_hidden_layers=2, max_seq_len=128, hidden_size=64, n_head=4, input_dim=64,
            ffn_embed_dim=256, vocab_size=256)


def write_flexgen_weights(path, cfg, seed=0):
    """A random OPT (transformers' OPTForCausalLM) saved in FlexGen's numpy format (the conversion
    FlexGen's own download_opt_weights does). Weights are drawn wider than OPT's initialisation so
    that greedy decoding does not collapse into one repeated token."""
    from transformers import OPTConfig, OPTForCausalLM

    hf_cfg = OPTConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.input_dim, num_hidden_layers=cfg.num_hidden_layers,
                       ffn_dim=cfg.ffn_embed_dim, num_attention_heads=cfg.n_head, word_embed_proj_dim=cfg.input_dim,
                       max_position_embeddings=cfg.max_seq_len, pad_token_id=cfg.pad_token_id)
    model = OPTForCausalLM(hf_cfg)
    gen = torch.Generator().manual_seed(seed)
    out = Path(path) / f"{cfg.name}-np"
    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            value = torch.randn(p.shape, generator=gen) * (0.3 if p.dim() > 1 else 0.1)
            if "layer_norm.weight" in name:
                value += 1.0
            name = name.replace("decoder.final_layer_norm", "decoder.layer_norm")
            np.save(out / name, value.half().numpy(), allow_pickle=False)
            os.replace(out / f"{name}.npy", out / name)  # FlexGen's file names have no suffix


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("opt_weights")
    write_flexgen_weights(path, OptConfig(**TINY))
    return str(path)


def generate(device, path, prompts, gen_len, **policy):
    env = ExecutionEnv(gpu=device, cpu=device, disk=None, mixed=None)
    model = fo.OptLM(OptConfig(**TINY), env, path, flex_policy(**policy))
    return model.generate(prompts, max_new_tokens=gen_len)


@pytest.fixture
def prompts():
    ids = np.random.default_rng(0).integers(4, TINY["vocab_size"], size=(2, 24)).astype(np.int32)
    ids[1, :5] = 1  # left padding (OPT's pad id)
    return ids


@pytest.mark.parametrize("options", [dict(policy="all"), dict(policy="all", merge="concat"),
                                     dict(policy="post_qkt", k=1000), dict(policy="pre_qkt", k=1000)],
                         ids=["all-lse", "all-concat", "post_qkt-k-covers-all", "pre_qkt-k-covers-all"])
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
    assert {(c.__name__, n) for c, n in before} == {("TorchDevice", "mha_gen"), ("SelfAttention", "init_cache_one_gpu_batch"),
                                                    ("SelfAttention", "load_cache"), ("SelfAttention", "store_cache")}
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
    with pytest.raises(ImportError, match=r"FlexGen 0\.1\.8.*FlexGen 0\.1\.7 is installed: pip install flexgen==0\.1\.8"):
        hf.patch()
    assert not hf.is_patched()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(policy="h2o"), ValueError, "not available in FlexGen"),
    (dict(policy="infinigen"), ValueError, "not available in FlexGen"),
    (dict(policy="nonsense"), ValueError, "unknown policy"),
    (dict(pipeline=True, speculative=True), ValueError, "speculative"),
    (dict(max_context=4096), ValueError, "max_context"),
    (dict(gpu_budget=0), ValueError, "gpu_budget"),
    (dict(k_min=64, k_max=8), ValueError, "k_min"),
    (dict(merge="sum"), ValueError, "merge"),
    (dict(budget=12), TypeError, "budget"),
])
def test_bad_options_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        hf.patch(**kwargs)
    assert not hf.is_patched()


def test_config_and_options_together_are_refused():
    with pytest.raises(TypeError, match="not both"):
        hf.patch(HybridConfig(policy="all"), gpu_budget=8)
    with pytest.raises(TypeError, match="HybridConfig"):
        hf.patch({"policy": "all"})


@pytest.mark.parametrize("policy,match", [
    (dict(cache_gpu_percent=50, cache_cpu_percent=0), "on disk"),
    (dict(cache_gpu_percent=0, cache_cpu_percent=50), "on disk"),
    (dict(attn_sparsity=0.5), "post_qkt"),
    (dict(compress_cache=True), "compress-cache"),
    (dict(cpu_cache_compute=True, cache_gpu_percent=0, cache_cpu_percent=100), "cpu-cache-compute"),
    (dict(cache_gpu_percent=0, cache_cpu_percent=100), "give one of them"),
])
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
    model.set_task(Task(inputs=prompts, prompt_len=24, gen_len=12, cut_gen_len=None, do_sample=False, temperature=1.0, stop=None))
    home = ValueHolder()
    model.layers[1].init_cache_one_gpu_batch(home)
    state = home.val[0]
    placement = state.tier.placement
    assert (placement.sinks, placement.recent) == (2, (24 + 12 - 1) * 25 // 100 - 2)
    assert compat.placement(session.config, compat.FlexSettings(0, 100), cache_len=35, budget_given=False) == (2, 1)


# --- the command line -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_help_works_without_a_gpu():
    r = subprocess.run([sys.executable, "-m", "hybridgen.flexgen", "--help"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
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


@pytest.mark.parametrize("argv,match", [
    (["--attn-sparsity", "0.5"], "attn-sparsity"),
    (["--compress-cache"], "compress-cache"),
    (["--cpu-cache-compute", "--percent", "100", "0", "0", "100", "100", "0"], "cpu-cache-compute"),
    (["--percent", "100", "0", "50", "0", "100", "0"], "on disk"),
    (["--percent", "100", "0", "100"], "six numbers"),
    (["--policy", "h2o"], "invalid choice"),
    (["--k-min", "100", "--k-max", "10"], "k_min"),
    (["--sinks", "-1"], "sinks"),
    (["--tokenizer", "stand-in", "--path", "~/opt_weights"], "only serves --path _DUMMY_"),
])
def test_cli_refuses_bad_options(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_parses_flexgen_and_hybrid_options_together():
    from hybridgen.flexgen.options import check_args, hybrid_options

    parser = cli.build_parser(fo)
    args = parser.parse_args(["--model", "facebook/opt-1.3b", "--path", "_DUMMY_", "--prompt-len", "512", "--gen-len", "8",
                              "--gpu-batch-size", "2", "--policy", "post_qkt", "--k", "64", "--gpu-budget", "128"])
    assert (args.model, args.prompt_len, args.percent, args.overlap) == ("facebook/opt-1.3b", 512, [100, 0, 100, 0, 100, 0], True)
    config = check_args(args)
    assert (config.policy, config.k, config.gpu_budget, config.sinks) == ("post_qkt", 64, 128, 4)
    # FlexGen's offloading mode without a budget: the budget comes from the percents
    args = parser.parse_args(["--percent", "100", "0", "10", "90", "100", "0", "--prompt-len", "100", "--gen-len", "21"])
    assert "gpu_budget" not in hybrid_options(args)
    assert compat.placement(check_args(args), compat.FlexSettings.from_args(args), cache_len=120, budget_given=False) == (4, 8)
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


# --- the benchmark's parsing and record -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("flexgen_offload", ROOT / "benchmarks" / "flexgen_offload.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_are_valid_flexgen_command_lines(bench, tmp_path):
    args = bench.parse_args(["--prompt-len", "1024", "--gen-len", "16", "--gpu-budget", "256", "--policy", "post_qkt"])
    assert args.model == "facebook/opt-1.3b" and args.out.name == "flexgen_offload_opt-1.3b_p1024_g16.json"
    parser = cli.build_parser(fo)
    from hybridgen.flexgen.options import check_args

    seen = {}
    for name in bench.VARIANTS:
        flex = parser.parse_args(bench.variant_argv(args, name, str(tmp_path)))
        seen[name] = (flex.percent, flex.cpu_cache_compute, flex.no_hybrid, check_args(flex))
        assert (flex.path, flex.prompt_len, flex.gen_len, flex.model) == ("_DUMMY_", 1024, 16, "facebook/opt-1.3b")
        assert flex.log_file.startswith(str(tmp_path))
    assert seen["flexgen-cpu-cache"][:3] == ([100, 0, 0, 100, 100, 0], False, True)
    assert seen["flexgen-cpu-compute"][:3] == ([100, 0, 0, 100, 100, 0], True, True)
    hybrid = seen["hybrid"]
    assert hybrid[:3] == ([100, 0, 100, 0, 100, 0], False, False)
    assert (hybrid[3].gpu_budget, hybrid[3].policy) == (256, "post_qkt")


@pytest.mark.parametrize("argv", [["--gen-len", "1"], ["--prompt-len", "0"], ["--variants", "nonsense"]])
def test_benchmark_refuses_bad_arguments(bench, argv):
    with pytest.raises(SystemExit) as e:
        bench.parse_args(argv)
    assert e.value.code == 2


def test_benchmark_record_from_flexgen_timers(bench, tmp_path):
    """Figures computed as FlexGen reports them (from its generate timer), ratios, JSON on disk."""
    from flexgen.timer import timers

    parser = cli.build_parser(fo)
    args = bench.parse_args(["--prompt-len", "64", "--gen-len", "5", "--gpu-batch-size", "2", "--out", str(tmp_path / "r.json")])
    runs = []
    for name, step in (("flexgen-cpu-cache", 0.5), ("flexgen-cpu-compute", 0.25), ("hybrid", 0.1)):
        timer = timers("generate")
        timer.reset()
        timer.costs.extend([2.0] + [step] * 4)  # what run_flexgen leaves: the prefill, then 4 decode steps
        runs.append({**cli.timings(parser.parse_args(bench.variant_argv(args, name, str(tmp_path)))), "name": name})
    timers("generate").reset()
    assert runs[0]["decode_s"] == pytest.approx(2.0)
    assert runs[0]["decode_tokens_per_s"] == pytest.approx(2 * 4 / 2.0)
    assert runs[2]["total_tokens_per_s"] == pytest.approx(2 * 5 / 2.4)
    record = bench.build_record("python benchmarks/flexgen_offload.py --gen-len 5", {"gpu": "test"}, vars(args) | {"out": "r"}, runs)
    assert record["ratios"]["hybrid/flexgen-cpu-cache"]["decode_throughput"] == pytest.approx(5.0)
    assert record["ratios"]["hybrid/flexgen-cpu-compute"]["decode_throughput"] == pytest.approx(2.5)
    assert record["ratios"]["hybrid/flexgen-cpu-cache"]["total_throughput"] == pytest.approx(4.0 / 2.4)
    bench.write_record(record, args.out)
    assert json.loads(args.out.read_text()) == json.loads(json.dumps(record))
    table = bench.format_table(record).splitlines()
    assert len(table) == 4 and table[1].startswith("flexgen-cpu-cache") and table[1].endswith("5.00x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_benchmark_without_a_gpu_fails_clearly(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/flexgen_offload.py", "--out", str(tmp_path / "x.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "needs a CUDA GPU" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()


# --- on a GPU -----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("flex", [dict(overlap=False), dict(overlap=True), dict(overlap=True, compress_weight=True)],
                         ids=["normal-loop", "overlap-loop", "compressed-weights"])
def test_gpu_generate_matches_flexgen_and_its_offloading(tiny_weights, prompts, tmp_path, flex):
    """On CUDA: FlexGen with the cache on the GPU, FlexGen with the cache offloaded to CPU memory
    (its own offloading) and hybrid attention (exact policy, most tokens on the host) give the same
    greedy tokens, in FlexGen's plain and overlapped loops and with its 4-bit weights."""
    env = ExecutionEnv.create(str(tmp_path / "offload"))
    try:
        def run(**policy):
            model = fo.OptLM(OptConfig(**TINY), env, tiny_weights, flex_policy(pin_weight=True, **flex, **policy))
            return model.generate(prompts, max_new_tokens=12)

        ref = run()
        offloaded = run(cache_gpu_percent=0, cache_cpu_percent=100)
        session = hf.patch(gpu_budget=4, sinks=2, evict_chunk=2, policy="all")
        hybrid = run()
        hf.unpatch()
    finally:
        env.close_copy_threads()
    np.testing.assert_array_equal(offloaded, ref)
    np.testing.assert_array_equal(hybrid, ref)
    assert session.telemetry.records[-1].host_tokens > 0


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_flex_opt_end_to_end_with_opt_1_3b_dummy_weights(tmp_path):
    """``python -m hybridgen.flexgen`` on OPT-1.3B-shaped ``_DUMMY_`` weights, hybrid and FlexGen's
    own offloading, as the benchmark runs them."""
    common = ["--model", "facebook/opt-1.3b", "--path", "_DUMMY_", "--prompt-len", "512", "--gen-len", "8",
              "--gpu-batch-size", "2", "--offload-dir", str(tmp_path / "offload"), "--log-file", str(tmp_path / "log")]
    for extra, expect in ((["--gpu-budget", "128", "--policy", "scheduler", "--k-min", "16", "--k-max", "256"],
                           "hybrid attention: 7 decode steps"),
                          (["--no-hybrid", "--percent", "100", "0", "0", "100", "100", "0"], "TorchDevice: cuda:0")):
        r = subprocess.run([sys.executable, "-m", "hybridgen.flexgen", *common, *extra], capture_output=True, text=True,
                           cwd=ROOT, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert expect in r.stdout


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_benchmark_writes_its_record(bench, tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(["--prompt-len", "256", "--gen-len", "4", "--gpu-batch-size", "2", "--gpu-budget", "64",
                       "--offload-dir", str(tmp_path / "offload"), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["runs"]] == list(bench.VARIANTS)
    assert set(record["ratios"]) == {"hybrid/flexgen-cpu-cache", "hybrid/flexgen-cpu-compute"}
    assert all(math.isfinite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0 for r in record["runs"])
    assert record["machine"]["cuda_device"] and record["runs"][-1]["hybrid"]["steps"] == 3
