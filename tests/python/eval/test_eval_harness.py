"""The accuracy harness around the policies: token budgets, K_min profiling and its profile file,
the needle harness and the one-table comparison (tiny random models; the numbers that matter are
recorded under benchmarks/results)."""

import json

import pytest
import torch
from tiny_models import tiny, tiny_model_dir

from hybridgen import HybridConfig
from hybridgen.eval import common, compare, kmin, needle


def test_policy_config_gives_every_policy_the_same_token_budget():
    window = common.policy_config("streaming", gpu_budget=512, k=256, context=4096)
    post = common.policy_config("post_qkt", gpu_budget=512, k=256, context=4096)
    h2o = common.policy_config("h2o", gpu_budget=512, k=256, context=4096)
    assert window.gpu_budget == post.gpu_budget + post.k == h2o.gpu_budget + h2o.k == 768
    sched = common.policy_config("scheduler", gpu_budget=512, k=256, context=4096, k_min=96)
    assert sched.k_min == 96 and sched.k_max >= 96
    with pytest.raises(ValueError, match="must be smaller than the context"):
        common.policy_config("post_qkt", gpu_budget=4096, k=8, context=4096)
    with pytest.raises(ValueError, match="unknown policy"):
        common.policy_config("h3o", gpu_budget=8, k=8, context=64)


def test_load_text_errors():
    with pytest.raises(FileNotFoundError, match="not one of"):
        common.load_text("shakespeare")


def test_choose_k_min_is_the_inflection_point():
    curve = [
        {"k": 8, "delta": 0.2},
        {"k": 16, "delta": 0.004},
        {"k": 32, "delta": 0.02},
        {"k": 64, "delta": 0.008},
        {"k": 128, "delta": 0.001},
    ]
    assert kmin.choose_k_min(curve, 0.01) == 64, "16 is within tolerance but 32 is not: not yet safe"
    assert kmin.choose_k_min(curve, 0.05) == 16
    assert kmin.choose_k_min([{"k": 8, "delta": 0.5}], 0.01) == 8


def test_profile_kmin_end_to_end_and_loaded_by_hybrid_config(tmp_path, cli):
    model = tiny_model_dir(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(f"w{(i * 13) % 96}" for i in range(300)))
    out = tmp_path / "profile.json"
    code, stdout, err = cli(
        "profile-kmin",
        "--model",
        model,
        "--text",
        tmp_path / "t.txt",
        "--context",
        96,
        "--score",
        16,
        "--windows",
        2,
        "--gpu-budget",
        8,
        "--tolerance",
        0.05,
        "--out",
        out,
    )
    assert code == 0, err[-3000:]
    profile = json.loads(out.read_text())
    ks = [p["k"] for p in profile["curve"]]
    assert ks == sorted(ks) and len(ks) >= 4 and profile["k_min"] in ks
    assert profile["k_min"] == kmin.choose_k_min(profile["curve"], 0.05)
    assert profile["command"].startswith("python -m hybridgen profile-kmin")
    assert f"K_min = {profile['k_min']}" in stdout
    config = HybridConfig.from_profile(out, gpu_budget=8)
    assert config.policy == "scheduler" and config.k_min == profile["k_min"] and config.k_max >= config.k_min
    with pytest.raises(FileNotFoundError, match="profile-kmin"):
        HybridConfig.from_profile(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a K_min profile"):
        HybridConfig.from_profile(tmp_path / "bad.json")


class _Tokenizer:
    """Just enough of a chat tokenizer for the haystack builder (words ↔ ids)."""

    eos_token_id = 0

    def __init__(self):
        self.words = ["<eos>"]

    def _ids(self, text):
        ids = []
        for w in text.split(" "):
            if w not in self.words:
                self.words.append(w)
            ids.append(self.words.index(w) % 96)
        return ids

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        ids = self._ids(text)
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        return "user: " + messages[0]["content"] + " assistant:"

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(self.words[int(i)] if int(i) < len(self.words) else "?" for i in ids)


def test_needle_trials_exact_policy_answers_like_generate(monkeypatch):
    monkeypatch.setattr(needle.haystack, "essays", lambda: [("e", " ".join(f"word{i % 50}." for i in range(400)))])
    model, tok = tiny("llama"), _Tokenizer()
    depths = (0.0, 0.5, 1.0)
    trials = needle.needle_trials(
        model,
        tok,
        {"full": lambda n: None, "all": lambda n: HybridConfig(policy="all", gpu_budget=8, sinks=2)},
        [120],
        depths=depths,
        max_new_tokens=6,
    )
    full = [t for t in trials if t.policy == "full"]
    exact = [t for t in trials if t.policy == "all"]
    assert [t.answer for t in full] == [t.answer for t in exact]
    assert [t.depth for t in full] == list(depths) and needle.retrieval(full) == sum(t.found for t in full) / 3
    # Independent reference: the model's own generate() on the same haystack.
    hay = needle.haystack.build(tok, 120, 0.5)
    out = model.generate(hay.input_ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    want = tok.decode(out[0, hay.input_ids.shape[1] :].tolist()).strip()
    assert want.startswith(full[1].answer) and full[1].answer


# Not the scheduler: it follows measured step times, so two runs differ anyway.
@pytest.mark.parametrize("policy", ["h2o", "keyformer", "infinigen", "post_qkt", "aoc"])
def test_replayed_prefill_equals_a_real_one(policy):
    from hybridgen.eval.perplexity import decode_perplexity
    from hybridgen.eval.replay import record_prefill

    model = tiny("qwen2")
    ids = torch.randint(3, 96, (1, 90), generator=torch.Generator().manual_seed(5))
    config = HybridConfig(policy=policy, gpu_budget=8, sinks=2, k=6, k_min=4, k_max=16)
    real = decode_perplexity(model, ids, 60, config)
    replayed = decode_perplexity(model, ids, 60, config, recorded=record_prefill(model, ids[:, :60]))
    assert abs(real.nll - replayed.nll) < 1e-5
    full = decode_perplexity(model, ids, 60, None, recorded=record_prefill(model, ids[:, :60]))
    assert abs(full.nll - decode_perplexity(model, ids, 60, None).nll) < 1e-5


def test_compare_reports_every_policy_against_full(monkeypatch):
    monkeypatch.setattr(needle.haystack, "essays", lambda: [("e", " ".join(f"word{i % 50}." for i in range(400)))])
    model, tok = tiny("llama"), _Tokenizer()
    ids = torch.randint(3, 96, (1, 200), generator=torch.Generator().manual_seed(0))
    texts = {"random": kmin.windows(ids, 96, 2)}
    result = compare.compare_policies(
        model, tok, ["all", "streaming", "h2o"], texts, context=96, score=16, gpu_budget=8, k=8, depths=(0.5,)
    )
    rows = {r["policy"]: r for r in result["rows"]}
    assert set(rows) == {"full", "all", "streaming", "h2o"}
    assert rows["full"]["delta_random"] == 0 and abs(rows["all"]["delta_random"]) < 1e-4
    assert abs(rows["streaming"]["delta_random"]) > 1e-4
    table = compare.markdown_table(result["rows"], ["random"])
    assert table.count("\n") == 1 + len(rows) and "`h2o`" in table


def test_choice_cli_scores_the_packaged_suite_per_policy(tmp_path, cli):
    model = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "choice.json"
    code, _, err = cli("eval", "choice", "--model", model, "--limit", 4, "--policies", "all", "streaming", "--out", out)
    assert code == 0, err[-3000:]
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {"full", "all", "streaming"}
    assert all(m["all"]["n"] == 4 for m in metrics.values())
    assert metrics["all"]["all"]["acc"] == metrics["full"]["all"]["acc"], "the exact policy chooses like full attention"
    # The record says what ran (no "None" strings) and a table sits next to it even for a small run.
    record = json.loads(out.read_text())
    assert record["model"] == str(model) and record["hybridgen"] and record["transformers"]
    assert record["args"]["limit"] == 4 and "version" not in record["args"]
    assert "None" not in json.dumps(record)
    table = out.with_suffix(".md").read_text()
    assert "`all`" in table and "`streaming`" in table and "`full`" in table and "(n 4)" in table


def test_cli_rejects_contexts_beyond_the_model_and_missing_profiles(tmp_path, cli):
    model = tiny_model_dir(tmp_path / "m")  # 512 positions
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 96}" for i in range(3000)))
    for extra, message in (
        (["--contexts", "1024"], "exceeds the model's 512 positions"),
        (["--contexts", "96", "--profile", str(tmp_path / "none.json")], "no K_min profile"),
    ):
        code, _, err = cli(
            "eval",
            "perplexity",
            "--model",
            model,
            "--text",
            tmp_path / "t.txt",
            "--gpu-budget",
            "8",
            "--windows",
            "1",
            "--score",
            "8",
            *extra,
        )
        assert code == 2 and message in err and "Traceback" not in err
