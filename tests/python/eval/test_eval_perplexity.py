"""Perplexity through the decode path: the exact policy reproduces full attention's perplexity,
selection changes it, and bad arguments are rejected."""

import pytest
import torch
from tiny_models import tiny, tiny_model_dir

from hybridgen import HybridConfig
from hybridgen.eval import decode_perplexity


def text(n=120):
    return torch.randint(3, 96, (1, n), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("model_type", ["llama", "opt"])
def test_exact_policy_reproduces_full_perplexity(model_type):
    model = tiny(model_type)
    ids = text()
    full = decode_perplexity(model, ids, prefix=60)
    # Reference: one forward pass over the whole text.
    with torch.inference_mode():
        logp = torch.log_softmax(model(ids).logits[0, 59:-1].float(), -1)
    want = -logp.gather(1, ids[0, 60:].unsqueeze(1)).mean().item()
    assert abs(full.nll - want) < 1e-4
    exact = decode_perplexity(model, ids, prefix=60, config=HybridConfig(gpu_budget=8, sinks=2, policy="all"))
    assert exact.tokens == full.tokens == 60
    assert abs(exact.perplexity - full.perplexity) <= 1e-4 * full.perplexity


def test_a_small_window_changes_perplexity():
    model = tiny("llama")
    ids = text()
    full = decode_perplexity(model, ids, prefix=60)
    window = decode_perplexity(model, ids, prefix=60, config=HybridConfig(gpu_budget=4, sinks=1, policy="streaming"))
    assert window.policy == "streaming" and abs(window.nll - full.nll) > 1e-4


def test_rejects_bad_arguments():
    model = tiny("llama")
    with pytest.raises(ValueError, match="prefix"):
        decode_perplexity(model, text(10), prefix=10)
    with pytest.raises(ValueError, match=r"\[1, n\]"):
        decode_perplexity(model, text(10)[0], prefix=3)


def test_cli_reports_every_policy_per_context(tmp_path, cli):
    import json

    from hybridgen.config import POLICIES

    model = tiny_model_dir(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(f"w{(i * 7) % 96}" for i in range(400)))
    out = tmp_path / "ppl.json"
    code, stdout, err = cli(
        "eval",
        "perplexity",
        "--model",
        model,
        "--text",
        tmp_path / "t.txt",
        "--contexts",
        64,
        96,
        "--score",
        16,
        "--windows",
        2,
        "--gpu-budget",
        8,
        "--k",
        16,
        "--policies",
        *POLICIES,
        "--out",
        out,
    )
    assert code == 0, err[-3000:]
    record = json.loads(out.read_text())
    assert record["command"].startswith("python -m hybridgen eval perplexity")
    rows = record["results"]
    assert {(r["context"], r["policy"]) for r in rows} == {(n, p) for n in (64, 96) for p in POLICIES}
    for row in rows:
        if row["policy"] in ("full", "all", "aog", "aoc"):
            assert abs(row["delta_vs_full"]) < 1e-4, f"{row['policy']} is exact"
    assert "| t.txt |" not in stdout and "`streaming`" in out.with_suffix(".md").read_text()


def test_cli_rejects_unknown_policy_and_missing_text(tmp_path, cli):
    code, _, err = cli("eval", "perplexity", "--policies", "h3o")
    assert code != 0 and "invalid choice: 'h3o'" in err
    model = tiny_model_dir(tmp_path / "m")
    code, _, err = cli("eval", "perplexity", "--model", model, "--text", tmp_path / "nope.txt", "--contexts", "96")
    assert code != 0 and "no such file" in err
