"""Perplexity through the decode path: the exact policy reproduces full attention's perplexity,
selection changes it, and bad arguments are rejected."""

import pytest
import torch

from hybridgen import HybridConfig
from hybridgen.eval import decode_perplexity
from test_hf_exact import tiny


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


def test_cli_reports_every_policy(tmp_path):
    import json
    import subprocess
    import sys

    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    model = tiny("llama")
    model.save_pretrained(tmp_path / "m")
    vocab = {f"w{i}": i for i in range(96)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(" ".join(f"w{(i * 7) % 96}" for i in range(400)))
    out = tmp_path / "ppl.json"
    r = subprocess.run([sys.executable, "-m", "hybridgen", "eval", "perplexity", "--model", str(tmp_path / "m"),
                        "--text", str(tmp_path / "t.txt"), "--context", "96", "--score", "16", "--windows", "2",
                        "--gpu-budget", "8", "--k", "16", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["policy"]: row for row in json.loads(out.read_text())["results"]}
    assert set(rows) == {"full", "all", "post_qkt", "pre_qkt", "streaming"}
    assert abs(rows["all"]["delta_vs_full"]) < 1e-4, "exact policy matches full attention"
    assert "perplexity over 2 × 16 tokens" in r.stdout
