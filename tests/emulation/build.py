"""Compiles a kernel source (kernels/hybrid_attention.cu, or a mutated copy of it) with the
emulation runtime into a shared library, cached by the hash of every input and flag."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KERNEL_SOURCE = REPO / "kernels" / "hybrid_attention.cu"
RUNTIME = [HERE / "runtime.cpp", HERE / "kernels_abi.cpp"]
HEADERS = [HERE / "runtime.h", HERE / "cuda_emulation.h"]
# -O1 keeps the sanitizers fast enough; -fno-sanitize-recover makes any undefined behaviour fatal.
SANITIZE = ["-O1", "-g", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]


class CompilerMissing(RuntimeError):
    pass


def compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise CompilerMissing("no C++ compiler (g++, c++ or clang++) on PATH and CXX unset")
    return cxx


def cache_dir() -> Path:
    root = (
        os.environ.get("HYBRIDGEN_EMULATION_CACHE")
        or Path(tempfile.gettempdir()) / f"hybridgen-emulation-{os.getuid()}"
    )
    Path(root).mkdir(parents=True, exist_ok=True)
    return Path(root)


def build(source: str | Path = KERNEL_SOURCE, flags: list[str] = SANITIZE) -> Path:
    """The shared library for `source`, built unless an identical build is cached."""
    cxx = compiler()
    source = Path(source).resolve()
    h = hashlib.sha256()
    for f in [source, *RUNTIME, *HEADERS]:
        h.update(f.read_bytes())
    h.update(" ".join([cxx, *flags]).encode())
    out = cache_dir() / f"kernels-{h.hexdigest()[:20]}.so"
    if out.exists():
        return out
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    # -Wno-unknown-pragmas: the kernel's `#pragma unroll` means nothing to a C++ compiler.
    cmd = [
        cxx,
        "-std=c++17",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wno-unused-function",
        "-Wno-unknown-pragmas",
        *flags,
        f'-DHYBRIDGEN_KERNEL_SOURCE="{source}"',
        f"-I{HERE}",
        *map(str, RUNTIME),
        "-o",
        str(tmp),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"emulation build failed:\n{' '.join(cmd)}\n{res.stderr}")
    os.replace(tmp, out)
    return out


def sanitizer_preload(cxx: str | None = None) -> str:
    """The ASan runtime, which must be loaded before anything else in the process that loads a
    sanitized library (Python is not built with it)."""
    res = subprocess.run([cxx or compiler(), "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
    path = res.stdout.strip()
    if not os.path.isabs(path) or not os.path.exists(path):
        raise CompilerMissing(f"the compiler has no AddressSanitizer runtime ({path!r})")
    return path
