"""Every supported decoder family through the same patch: a tiny random model of each (no
network), exact mode (``all``, both merges) against the model's own eager attention over a
generation that moves most tokens to the host, batch 2 with left padding; the selective policies
run on each; sliding-window layers served from the device when their window fits it, masked
exactly on the host when it does not; and the refusals name their reason."""

import types

import pytest
import torch
import transformers
from tiny_models import FAMILY_MODELS, family_model, greedy, prompts, run_patched

import hybridgen
import hybridgen.hf
from hybridgen import HybridConfig
from hybridgen.hf.models import FAMILIES, layer_windows
from hybridgen.hf.speculation import speculative_query

STEPS = 40


@pytest.fixture(scope="module")
def eager_runs():
    """Per family: the model and its eager greedy run (batch 2, 7 tokens of left padding)."""
    runs = {}
    ids, mask = prompts(2, 48, 7)
    for name in FAMILY_MODELS:
        model = family_model(name)
        model.set_attn_implementation("eager")
        runs[name] = (model, *greedy(model, ids, mask, STEPS))
    return ids, mask, runs


def test_every_supported_family_has_a_tiny_model():
    served = {family_model(name).config.model_type for name in FAMILY_MODELS}
    assert served == set(FAMILIES)


@pytest.mark.parametrize("merge", ["lse", "concat"])
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_exact_mode_matches_eager(eager_runs, name, merge):
    ids, mask, runs = eager_runs
    model, want_seq, want_logits = runs[name]
    config = HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", merge=merge)
    got_seq, got_logits, cache = run_patched(model, ids, mask, STEPS, config)
    assert torch.equal(got_seq, want_seq), "greedy tokens differ"
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    # The context really was on the host, and the hybrid path ran in every layer of every step.
    assert cache.store.host_len(0) == 48 + STEPS - 1 - cache.layers[0].device_tokens()
    assert cache.policy_calls() == [STEPS - 1] * model.config.num_hidden_layers
    assert all(r.strategy == "all" and r.host_tokens > 0 for r in cache.telemetry.records)


@pytest.mark.parametrize("policy", ["post_qkt", "pre_qkt", "scheduler", "quest", "h2o", "streaming", "infinigen"])
@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_selective_policies_run_on_every_family(eager_runs, name, policy):
    ids, mask, runs = eager_runs
    model, want_seq, _ = runs[name]
    config = HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy=policy, k=8, k_min=4, k_max=16)
    seq, logits, cache = run_patched(model, ids, mask, STEPS, config)
    assert seq.shape == want_seq.shape and torch.isfinite(logits).all()
    assert cache.policy_calls() == [STEPS - 1] * model.config.num_hidden_layers
    assert cache.host_tokens(0) > 0


def test_speculative_query_is_the_layers_own_query_from_its_input():
    """The estimate made from a layer's *own* input is exactly its query, in every family
    (q/k norms per head or whole, fused projections, rotary)."""
    captured = {}

    def capture(module, query, key, value, attention_mask, **kwargs):
        captured.setdefault(module.layer_idx, query[:, :, -1].clone())
        return transformers.integrations.sdpa_attention.sdpa_attention_forward(
            module, query, key, value, attention_mask, **kwargs
        )

    transformers.AttentionInterface.register("capture_query", capture)
    ids, _ = prompts(1, 12, 0)
    for name in FAMILY_MODELS:
        model = family_model(name)
        if model.config.model_type == "opt":
            continue  # OPT pre-scales q: covered by the speculation tests
        inputs, captured = {}, {}
        layer = model.model.layers[1]
        layer.register_forward_pre_hook(
            lambda m, a, kw: inputs.update(h=(a[0] if a else kw["hidden_states"]), pe=kw["position_embeddings"]),
            with_kwargs=True,
        )
        model.set_attn_implementation("capture_query")
        with torch.no_grad():
            model(ids)
            h, (cos, sin) = inputs["h"][:, -1:], inputs["pe"]
            est = speculative_query(layer, h, (cos[:, -1:], sin[:, -1:]))
        torch.testing.assert_close(est, captured[1], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("name", ["mistral_window", "gemma3_text", "qwen2_window"])
def test_a_window_that_fits_the_device_never_reads_the_host(eager_runs, name):
    ids, mask, runs = eager_runs
    model, want_seq, want_logits = runs[name]
    windows = layer_windows(model)
    assert 24 in windows
    # 24-token windows inside a 32-token device tier: those layers decode on the device alone.
    config = HybridConfig(gpu_budget=32, sinks=2, evict_chunk=4, policy="all")
    got_seq, got_logits, cache = run_patched(model, ids, mask, STEPS, config)
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    for layer, window in enumerate(windows):
        records = [r for r in cache.telemetry.records if r.layer == layer]
        assert len(records) == STEPS - 1
        if window is None:
            assert all(r.strategy == "all" for r in records)
            assert any(r.host_tokens > 0 and r.k > 0 for r in records), "the full layer read its host tokens"
        else:
            assert all(r.strategy == "window" and r.k == 0 and r.keys_read == 0 for r in records)
            assert records[-1].host_tokens > 0, "tokens left the window for the host, unread"
    # The K series and mean follow the layers that choose a K, not the window layers' zeros.
    if None in windows:
        full_layer = windows.index(None)
        series = [k for _, k, _ in cache.telemetry.k_per_step()]
        assert series == [r.k for r in cache.telemetry.records if r.layer == full_layer]
        assert cache.telemetry.summary()["k_mean"] > 0


def test_a_window_longer_than_the_device_is_served_from_the_host_masked():
    """Window 24, device 2 sinks + 8: the evicted part of the window comes from the host, and the
    host tokens older than the window are masked out (else the output would differ from eager)."""
    model = family_model("mistral_window")
    ids, mask = prompts(2, 48, 7)
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, STEPS)
    config = HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all")
    got_seq, got_logits, cache = run_patched(model, ids, mask, STEPS, config)
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-4
    assert all(r.strategy == "all" and r.k > 0 for r in cache.telemetry.records)
    # The same model without its window attends to everything: a different answer.
    model.config.sliding_window = None
    _, full_logits = greedy(model, ids, mask, STEPS)
    assert (full_logits - want_logits).abs().max().item() > 1e-3


def _fake(config):
    return types.SimpleNamespace(config=config, generate=lambda: None, set_attn_implementation=lambda _: None)


@pytest.mark.parametrize(
    "config,fragment",
    [
        (transformers.Gemma2Config(num_hidden_layers=2), "soft-capping (attn_logit_softcapping=50.0)"),
        (transformers.Qwen3NextConfig(num_hidden_layers=4), "'linear_attention' are not supported"),
        (transformers.DeepseekV3Config(num_hidden_layers=2), "multi-head latent attention"),
        (transformers.T5Config(num_layers=1), "encoder-decoder"),
        (transformers.MllamaTextConfig(num_hidden_layers=4), "cross-attention"),
        (transformers.MambaConfig(num_hidden_layers=1), "unsupported model type 'mamba'"),
    ],
)
def test_supports_names_the_reason(config, fragment):
    reasons = hybridgen.supports(_fake(config))
    assert any(fragment in r for r in reasons), reasons


def test_patch_refuses_soft_capping_and_leaves_the_model_unchanged():
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(
        transformers.Gemma2Config(
            vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, intermediate_size=64,
        )
    )  # fmt: skip
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match="attn_logit_softcapping=50.0"):
        hybridgen.patch(model, HybridConfig())
    assert not hybridgen.hf.is_patched(model) and model.config._attn_implementation == before
