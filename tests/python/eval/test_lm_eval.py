"""The ``hybridgen`` lm-eval model and the packaged ``hybridgen_choice`` tasks.

A tiny random Llama with SmolLM2's tokenizer keeps every run fast; its log-likelihoods are
checked against one plain forward pass of the unpatched model over context + continuation.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hybridgen.config import POLICIES  # noqa: E402
from hybridgen.eval.harness import HybridLM  # noqa: E402

TASKS = ("hybridgen_choice_physical", "hybridgen_choice_cause_effect", "hybridgen_choice_entailment")
#: (context, continuation) pairs long enough that tokens reach the host tier with the small
#: budget below; the empty context is scored after lm-eval's prefix token (a one-token context).
PAIRS = [
    (
        "The old lighthouse keeper climbed the narrow stairs every evening to light the lamp, and on"
        " stormy nights he stayed awake until dawn",
        " watching the ships pass safely by the rocks.",
    ),
    (
        "Question: If you leave an ice cube on a warm kitchen table for an hour, what happens to it?\nAnswer:",
        " It melts into a small puddle of water.",
    ),
    ("", " Rain fell."),
]
HYBRID_ARGS = dict(gpu_budget=4, sinks=2, evict_chunk=2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model's matrices are too small to share among threads: on a busy machine a
    # second thread makes each decode step many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hybridgen.data.assets import smollm2

    tokenizer = AutoTokenizer.from_pretrained(smollm2())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """``(context, continuation) -> (log-prob, is_greedy)`` from one forward pass of the
    unpatched model, with lm-eval's tokenization of a pair (the whole text encoded, then split
    after the context's tokens; an empty context is the prefix token)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def score(context: str, continuation: str) -> tuple[float, bool]:
        if context:
            ctx = tokenizer(context)["input_ids"]
            cont = tokenizer(context + continuation)["input_ids"][len(ctx) :]
        else:
            ctx, cont = [tokenizer.bos_token_id], tokenizer(continuation)["input_ids"]
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)[len(ctx) - 1 : -1]
        target = torch.tensor(cont)
        picked = logprobs.gather(1, target[:, None]).squeeze(1)
        return float(picked.sum()), bool((logprobs.argmax(-1) == target).all())

    return score


def _requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


@pytest.mark.parametrize("policy", ["all", "full"])
def test_loglikelihood_through_decode_steps_equals_one_forward_pass(tiny_model_dir, reference, policy):
    if policy not in POLICIES:
        pytest.skip(f"policy {policy!r} is not available")
    lm = HybridLM(pretrained=str(tiny_model_dir), policy=policy, **HYBRID_ARGS)
    assert lm.device.type in ("cpu", "cuda") and lm._model.dtype == torch.float32
    for (context, continuation), (logprob, greedy) in zip(PAIRS, lm.loglikelihood(_requests(PAIRS))):
        expected, expected_greedy = reference(context, continuation)
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy

    # The decode path ran: one step per continuation token of the last request, and for the
    # exact hybrid policy the CPU attended over host tokens.
    context, continuation = PAIRS[0]
    lm.loglikelihood(_requests([PAIRS[0]]))
    records = lm.last_cache.telemetry.records
    n_cont = len(lm.tok_encode(context + continuation)) - len(lm.tok_encode(context))
    assert len({r.step for r in records}) == n_cont
    if policy == "all":
        assert max(r.host_tokens for r in records) > 0


def test_an_approximate_policy_changes_the_scores(tiny_model_dir, reference):
    # Streaming drops every host token: if scoring bypassed the hybrid attention the scores
    # would still equal full attention.
    lm = HybridLM(pretrained=str(tiny_model_dir), policy="streaming", **HYBRID_ARGS)
    ((logprob, _),) = lm.loglikelihood(_requests(PAIRS[:1]))
    assert abs(logprob - reference(*PAIRS[0])[0]) > 1e-3


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(policy="all", colour="blue"), "unknown model_args for hybridgen: colour.*gpu_budget"),
        (dict(policy="no_such_policy"), "unknown policy 'no_such_policy'"),
        (dict(gpu_budget="many"), "gpu_budget must be an integer"),
        (dict(pipeline="maybe"), "pipeline must be true or false"),
        (dict(batch_size=8), "batch_size=1"),
    ],
)
def test_bad_model_args_fail_before_loading(args, match):
    with pytest.raises(ValueError, match=match):
        HybridLM(pretrained="/nonexistent/model", **args)


def test_model_args_strings_are_converted():
    from hybridgen.eval.harness import hybrid_config

    config = hybrid_config({"gpu_budget": "16", "pipeline": "true", "max_context": "none", "policy": "all"})
    assert (config.gpu_budget, config.pipeline, config.max_context, config.policy) == (16, True, None, "all")


def test_packaged_tasks_load_their_kind_from_the_packaged_suite(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    from hybridgen.eval.__main__ import TASKS_DIR
    from hybridgen.eval.choice import load_suite

    monkeypatch.chdir(tmp_path)  # the data file is found wherever lm-eval runs
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(TASKS) | {"hybridgen_choice"} <= set(manager.all_tasks)
    loaded = manager.load([TASKS[1]])["tasks"][TASKS[1]]
    docs = list(loaded.test_docs())
    expected = load_suite(kinds="cause_effect")
    assert [d["id"] for d in docs] == [item.id for item in expected]
    doc, item = docs[0], expected[0]
    assert loaded.doc_to_text(doc) == item.context
    assert loaded.doc_to_choice(doc) == list(item.choices)
    assert loaded.doc_to_target(doc) == item.label


@pytest.mark.slow
def test_cli_runs_the_packaged_suite(tiny_model_dir, reference, tmp_path, monkeypatch, capsys):
    # `python -m hybridgen.eval ...` in this process (a subprocess would import lm-eval again).
    from hybridgen.eval.__main__ import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() replaces it for lm-eval's parser
    monkeypatch.chdir(tmp_path)  # the packaged tasks and data are found from anywhere
    out = tmp_path / "out"
    main(
        [
            "--model",
            "hybridgen",
            "--model_args",
            f"pretrained={tiny_model_dir},policy=all,gpu_budget=4,sinks=2",
            "--tasks",
            "hybridgen_choice",
            "--limit",
            "3",
            "--output_path",
            str(out),
            "--log_samples",
        ]
    )
    printed = capsys.readouterr().out

    (results_file,) = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())["results"]
    for task in TASKS + ("hybridgen_choice",):
        assert 0.0 <= results[task]["acc,none"] <= 1.0
    for task in TASKS:
        assert results[task]["sample_len"] == 3
        assert f" - {task}" in printed  # a row of the printed table

    # Every scored choice equals the unpatched model's one-pass log-likelihood.
    (samples_file,) = out.rglob(f"samples_{TASKS[0]}_*.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 3
    for sample in samples:
        for args, resp in zip(sample["arguments"].values(), sample["filtered_resps"]):
            expected, _ = reference(args["arg_0"], args["arg_1"])
            assert float(resp[0]) == pytest.approx(expected, abs=1e-4)


def test_cli_adds_the_packaged_tasks_after_the_users(tmp_path):
    from argparse import Namespace

    from hybridgen.eval.__main__ import TASKS_DIR, include_paths

    assert include_paths(Namespace(include_path=None)) == [str(TASKS_DIR)]
    assert include_paths(Namespace(include_path="mine")) == ["mine", str(TASKS_DIR)]
    config = tmp_path / "run.yaml"
    config.write_text("include_path: from_config\n")
    assert include_paths(Namespace(include_path=None, config=str(config))) == ["from_config", str(TASKS_DIR)]
