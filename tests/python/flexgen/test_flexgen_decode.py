"""The replacement's decode attention (hybridgen.flexgen.decode, layer_cache) against FlexGen's own
``_attention_value`` and ``_sparse_attention_value`` in FlexGen's layouts."""

import pytest
import torch
from flexgen.utils import vector_gather
from flexgen_support import TorchTensor, flexgen_attention, heads, left_padded_mask, new_state, pb

from hybridgen import HybridConfig
from hybridgen.flexgen.session import Session


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
    sparse = cpu_flexgen._sparse_attention_value(
        qf, kf, v_all[old:].float(), (v_home, v_buf), mask, b, src_s, 1, n, d, sparsity
    ).view(b, n, d)
    weights = cpu_flexgen._attention_weights(qf, kf, mask, b, src_s, n)  # (b*n, 1, s), FlexGen's softmax
    kept = weights[:, :, :-1].topk(top, dim=2).values.sum(-1) + weights[:, :, -1]
    torch.testing.assert_close(out * kept.view(b, n, 1), sparse, atol=2e-3, rtol=0)
    assert not torch.allclose(out, sparse, atol=1e-2)  # the two do differ by that mass
