"""The project's multiple-choice suite: the packaged file is valid and balanced, bad lines are
rejected by line, and decode-path scoring (hybrid exact policy and the model's own attention)
equals the log-likelihoods of one plain forward pass over context + continuation."""

import json
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hybridgen import HybridConfig, telemetry
from hybridgen.data import assets
from hybridgen.eval.choice import KINDS, load_suite, score_items, split_continuation


# --- the packaged suite --------------------------------------------------------------------------
def test_packaged_suite_is_valid_and_balanced():
    items = load_suite()
    assert len(items) >= 120
    assert len({it.id for it in items}) == len(items)
    per_kind = Counter(it.kind for it in items)
    assert set(per_kind) == set(KINDS) and min(per_kind.values()) >= 35, per_kind
    for kind in KINDS:
        labels = [it.label for it in items if it.kind == kind]
        assert 0.4 <= labels.count(0) / len(labels) <= 0.6, f"{kind} labels unbalanced"
    for it in items:
        assert it.context.endswith("Answer:"), it.id
        assert 25 <= len(it.context.split()) <= 80, it.id
        assert len(it.choices) == 2
    assert all(it.choices == ("yes", "no") for it in items if it.kind == "entailment")


def test_kinds_filter():
    assert {it.kind for it in load_suite(kinds="entailment")} == {"entailment"}
    both = load_suite(kinds=["physical", "cause_effect"])
    assert {it.kind for it in both} == {"physical", "cause_effect"}
    with pytest.raises(ValueError, match="unknown kind"):
        load_suite(kinds=["physics"])


# --- loader errors -------------------------------------------------------------------------------
GOOD = {"id": "x-1", "kind": "physical", "context": "Question: how?\nAnswer:", "choices": ["a", "b"], "label": 1}


def write(tmp_path, *rows):
    path = tmp_path / "suite.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "change,message",
    [
        ({"label": None}, "missing key"),
        ({"label": 2}, "out of range"),
        ({"label": -1}, "out of range"),
        ({"label": True}, "integer"),
        ({"choices": ["only one"]}, "at least 2"),
        ({"choices": ["a", "a"]}, "repeat"),
        ({"choices": ["a", ""]}, "non-empty"),
        ({"kind": "trivia"}, "unknown kind"),
        ({"context": "Answer: "}, "whitespace"),
        ({"extra": 1}, "unknown key"),
        ({"kind": "entailment", "choices": ["maybe", "no"]}, "entailment choices"),
    ],
)
def test_loader_names_the_bad_line(tmp_path, change, message):
    bad = {**GOOD, **change, "id": "x-2"}
    bad = {k: v for k, v in bad.items() if v is not None}
    path = write(tmp_path, GOOD, bad)
    with pytest.raises(ValueError, match=message) as err:
        load_suite(path)
    assert f"{path}:2" in str(err.value)


def test_loader_rejects_duplicates_bad_json_and_empty_files(tmp_path):
    with pytest.raises(ValueError, match=r":3: duplicate id 'x-1' \(first on line 1\)"):
        load_suite(write(tmp_path, GOOD, {**GOOD, "id": "x-2"}, GOOD))
    with pytest.raises(ValueError, match=":2: not valid JSON"):
        load_suite(write(tmp_path, GOOD, "{not json"))
    with pytest.raises(ValueError, match="no items"):
        load_suite(write(tmp_path, ""))
    with pytest.raises(ValueError, match="no items of kind"):
        load_suite(write(tmp_path, GOOD), kinds="entailment")
    with pytest.raises(FileNotFoundError):
        load_suite(tmp_path / "missing.jsonl")
    assert load_suite(write(tmp_path, GOOD, "", {**GOOD, "id": "x-2"}))[1].id == "x-2"


# --- tokens at the boundary ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(assets.smollm2())


def test_a_token_merged_across_the_boundary_counts_as_continuation(tokenizer):
    ctx, cont = split_continuation(tokenizer, "Hello wor", "ld")
    assert ctx + cont == tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(cont) == " world" and tokenizer.decode(ctx) == "Hello"
    ctx, cont = split_continuation(tokenizer, "Answer:", " yes")
    assert ctx == tokenizer("Answer:")["input_ids"] and tokenizer.decode(cont) == " yes"
    with pytest.raises(ValueError, match="adds no tokens"):
        split_continuation(tokenizer, "Answer:", "")


# --- scoring -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def items():
    suite = load_suite()
    # One item of each kind (multi-token answers and one-token yes/no answers), the one with the
    # shortest answers: each answer token is a decode step, and the test should stay quick.
    return [min((it for it in suite if it.kind == kind), key=lambda it: sum(map(len, it.choices))) for kind in KINDS]


def reference_logliks(model, tokenizer, item):
    """One plain forward pass over context + continuation, log_softmax gathered."""
    out = []
    for choice in item.choices:
        ctx = tokenizer(item.context)["input_ids"]
        whole = tokenizer(item.context + " " + choice)["input_ids"]
        assert whole[: len(ctx)] == ctx, "these items have no merge at the boundary"
        ids = torch.tensor([whole])
        with torch.inference_mode():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
        targets = ids[0, len(ctx) :]
        out.append(logp[len(ctx) - 1 : -1].gather(1, targets[:, None]).sum().item())
    return out


@pytest.mark.parametrize(
    "config", [None, HybridConfig(policy="all", gpu_budget=4, sinks=2)], ids=["full", "hybrid-all"]
)
def test_scores_equal_one_forward_pass(model, tokenizer, items, config):
    result = score_items(model, tokenizer, items, config)
    assert result.policy == ("full" if config is None else "all")
    assert not hasattr(model, "_hybridgen"), "the model is unpatched afterwards"
    for item, score in zip(items, result.items):
        assert score.id == item.id and score.label == item.label
        want = reference_logliks(model, tokenizer, item)
        assert max(abs(g - w) for g, w in zip(score.logliks, want)) < 1e-4, (item.id, score.logliks, want)
        best = max(range(2), key=lambda i: want[i])
        best_norm = max(range(2), key=lambda i: want[i] / len(item.choices[i]))
        assert (score.pred, score.pred_norm) == (best, best_norm)
    metrics = result.metrics()
    assert set(metrics) == {"all", *KINDS} and metrics["all"]["n"] == 3
    assert metrics["all"]["acc"] == result.acc == sum(s.pred == s.label for s in result.items) / 3
    assert metrics["entailment"]["acc_norm"] == float(result.items[2].pred_norm == result.items[2].label)


def test_hybrid_scoring_runs_the_decode_path_over_host_tokens(model, tokenizer, items, monkeypatch):
    records = []
    monkeypatch.setattr(telemetry.Telemetry, "add", lambda self, record: records.append(record))
    result = score_items(model, tokenizer, items, HybridConfig(policy="all", gpu_budget=4, sinks=2))
    # One decode step per scored token (the first one included), each recorded by both layers.
    scored = sum(sum(s.tokens) for s in result.items)
    assert len(records) == 2 * scored
    assert all(r.host_tokens > 0 for r in records), "older context tokens sat in the host tier"
    assert max(r.host_tokens for r in records) > 30


def test_scoring_rejects_bad_input(model, tokenizer, items):
    with pytest.raises(ValueError, match="no items"):
        score_items(model, tokenizer, [], None)
    with pytest.raises(TypeError, match="ChoiceItem"):
        score_items(model, tokenizer, [{"id": "x"}], None)
    with pytest.raises(TypeError, match="HybridConfig"):
        score_items(model, tokenizer, items, {"policy": "all"})
    import hybridgen

    hybridgen.patch(model, HybridConfig(policy="all", gpu_budget=4, sinks=2))
    try:
        with pytest.raises(ValueError, match="unpatch"):
            score_items(model, tokenizer, items, None)
    finally:
        hybridgen.unpatch(model)
