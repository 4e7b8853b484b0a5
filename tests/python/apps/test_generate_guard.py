"""``python -m hybridgen generate`` proves its hybrid run went through hybrid attention, or fails:
a tiny random Llama with SmolLM2's tokenizer, in process."""

import re

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hybridgen.apps import cli
from hybridgen.data import assets
from hybridgen.hf import attention


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


ARGS = ["--context", "300", "--gpu-budget", "64", "--max-new-tokens", "5", "--policy", "post_qkt", "--k", "32"]


def test_generate_reports_hybrid_steps(tiny_model_dir, capsys):
    assert cli.main(["generate", "--model", tiny_model_dir, *ARGS]) == 0
    out = capsys.readouterr().out
    assert "4 decode steps ran hybrid attention in all 2 layers" in out
    assert "host tier: 0 tokens" not in out


def test_generate_fails_loudly_when_no_step_ran_hybrid(tiny_model_dir, capsys, monkeypatch):
    # Both defences off in the attention function: every step silently runs the model's SDPA.
    monkeypatch.setattr(attention, "_own_layer", lambda module, key: None)
    monkeypatch.setattr(attention, "_decode_without_hybrid_cache", lambda module, state: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--model", tiny_model_dir, *ARGS])
    assert exit_.value.code == 3
    err = capsys.readouterr().err
    assert "hybrid attention did not run" in err and "ran 0 decode steps, expected 4" in err


def test_a_bypass_inside_generate_is_an_error(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(attention, "_own_layer", lambda module, key: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--model", tiny_model_dir, *ARGS])
    assert exit_.value.code == 3
    assert "did not go through its HybridCache" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_says_when_the_hybrid_answer_misses_a_fact_full_attention_found(capsys):
    """The real SmolLM2 with StreamingLLM's window far from the planted fact: full attention names
    it, the window cannot, and the output says so in a line of its own with the strategy that ran."""
    args = ["generate", "--context", "2048", "--gpu-budget", "256", "--policy", "streaming", "--max-new-tokens", "24"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "full answer:" in out and "[names the planted fact]" in out.split("full answer:")[1]
    assert "misses the planted fact" in out.split("hybrid answer:")[1].split("\n")[0]
    assert "MISS: hybrid attention lost the planted fact that full attention found" in out
    assert "selection per step: streaming 100%" in out


def test_prefill_shows_progress_over_the_layers(tiny_model_dir):
    """The prefill bar advances once per decoder layer on the prompt, not on decode steps, and
    leaves no hook behind."""
    from hybridgen.apps.generate import _PrefillProgress

    model = LlamaForCausalLM.from_pretrained(tiny_model_dir).eval()
    progress = _PrefillProgress(model, "test")
    with torch.inference_mode():
        model(torch.randint(3, 100, (1, 12)))
        assert progress.bar.n == progress.bar.total == 2
        model(torch.randint(3, 100, (1, 1)))
    assert progress.bar.n == 2
    progress.close()
    assert all(not layer._forward_hooks for layer in model.model.layers)


@pytest.mark.slow
def test_main_job_names_the_fact_with_the_cpu_bound_branch_forced(capsys, monkeypatch):
    """The README's main job on the real SmolLM2 (4K context) with the scheduler told that the CPU
    is the bottleneck at every step, as on a loaded machine or a 128K context: K drops to K_min and
    the scheduler switches to Pre-QKT (page summaries plus the previous step's selection); the
    answer must still name the planted fact and agree with full attention."""
    from hybridgen.policies.hybrid import FORCE_CPU_BOUND

    monkeypatch.setenv(FORCE_CPU_BOUND, "1")
    assert cli.main(["generate"]) == 0
    out = capsys.readouterr().out
    assert "CPU-bound branch was forced" in out
    shares = dict(re.findall(r"(post_qkt|pre_qkt) (\d+)%", out.split("decode steps |")[1].split("\n")[0]))
    assert int(shares["pre_qkt"]) >= 75, f"the Pre-QKT branch did not run most steps: {shares}"
    assert "[names the planted fact]" in out.split("hybrid answer:")[1].split("\n")[0]
    assert "MISS" not in out
    same, total = map(int, re.search(r"agreement: (\d+)/(\d+)", out).groups())
    assert same >= 0.9 * total, f"only {same}/{total} generated tokens agree with full attention"
    read = int(re.search(r"CPU read (\d+)% of the host keys", out).group(1))
    assert read <= 40, f"Pre-QKT read {read}% of the host keys"
