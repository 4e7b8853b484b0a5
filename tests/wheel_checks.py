"""Checks of one built wheel, run by tests/wheels.sh (not collected by pytest).

    python tests/wheel_checks.py static WHEEL ARCH     the files, tags and ELF of the wheel, and
                                                       `auditwheel show` (needs .venv-build)
    python tests/wheel_checks.py native SO ISA         loads the wheel's native module in this
                                                       interpreter (any architecture, e.g. an
                                                       aarch64 Python under qemu) and checks its
                                                       kernels against float64 numpy on every
                                                       instruction set the CPU runs; ISA is the
                                                       one it must choose

`native` needs only numpy (any version from 1.22): no torch, no hybridgen package, so it runs in
a minimal emulated Python.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLICY = "manylinux_2_17"
GLIBC_MAX = (2, 17)
#: What a manylinux wheel may link against from the system (PEP 599's list, the part a Rust
#: extension can use); anything else would have to be bundled into the wheel.
ALLOWED_LIBS = {
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libgcc_s.so.1",
    "ld-linux-x86-64.so.2",
    "ld-linux-aarch64.so.1",
}
MACHINES = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}
MODULE = "hybridgen/_native.abi3.so"


def fail(msg: str) -> None:
    raise SystemExit(f"FAILED: {msg}")


def cargo_version() -> str:
    return re.search(r'(?m)^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text()).group(1)


def static(wheel: Path, arch: str) -> None:
    from elftools.elf.dynamic import DynamicSection
    from elftools.elf.elffile import ELFFile
    from elftools.elf.gnuversions import GNUVerNeedSection

    version = cargo_version()
    tag = f"cp310-abi3-{POLICY}_{arch}"
    if not re.fullmatch(
        rf"hybridgen-{re.escape(version)}-cp310-abi3-(manylinux2014_{arch}\.)?{POLICY}_{arch}\.whl", wheel.name
    ):
        fail(f"{wheel.name}: expected version {version} and tag {tag}")

    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        info = z.read(f"hybridgen-{version}.dist-info/WHEEL").decode()
        meta = z.read(f"hybridgen-{version}.dist-info/METADATA").decode()
        so = z.read(MODULE)
    if "Root-Is-Purelib: false" not in info or f"Tag: cp310-abi3-{POLICY}_{arch}" not in info:
        fail(f"dist-info/WHEEL does not declare {tag}:\n{info}")
    if not re.search(rf"(?m)^Version: {re.escape(version)}$", meta) or "Requires-Python: >=3.10" not in meta:
        fail("METADATA: version or Requires-Python differs from Cargo.toml / pyproject.toml")
    libs = [n for n in names if n.endswith(".so") or ".so." in n]
    if libs != [MODULE]:
        fail(f"expected exactly one native library, {MODULE}; found {libs}")
    if any("__pycache__" in n or n.endswith(".pyc") for n in names):
        fail("compiled bytecode in the wheel")
    sources = ROOT / "python"
    wanted = {
        str(p.relative_to(sources))
        for p in (sources / "hybridgen").rglob("*")
        if p.is_file() and p.suffix in (".py", ".pyi", ".jsonl", ".yaml", ".typed") and "__pycache__" not in p.parts
    }
    missing = sorted(wanted - set(names))
    if missing:
        fail(f"package files missing from the wheel: {missing}")

    import io

    elf = ELFFile(io.BytesIO(so))
    if elf["e_machine"] != MACHINES[arch]:
        fail(f"{MODULE} is {elf['e_machine']}, not {MACHINES[arch]}")
    needed = sorted(
        t.needed
        for s in elf.iter_sections()
        if isinstance(s, DynamicSection)
        for t in s.iter_tags()
        if t.entry.d_tag == "DT_NEEDED"
    )
    if not set(needed) <= ALLOWED_LIBS:
        fail(f"{MODULE} needs libraries outside the manylinux set: {sorted(set(needed) - ALLOWED_LIBS)}")
    dynsym = elf.get_section_by_name(".dynsym")
    init = [s for s in dynsym.iter_symbols() if s.name == "PyInit__native"]
    if not init or init[0]["st_shndx"] == "SHN_UNDEF" or init[0]["st_info"]["bind"] != "STB_GLOBAL":
        fail(f"{MODULE} does not export PyInit__native")
    glibc = set()
    for s in elf.iter_sections():
        if isinstance(s, GNUVerNeedSection):
            for _, auxes in s.iter_versions():
                for aux in auxes:
                    m = re.fullmatch(r"GLIBC_(\d+)\.(\d+)(?:\.\d+)?", aux.name)
                    if m:
                        glibc.add((int(m.group(1)), int(m.group(2))))
    newest = max(glibc, default=(0, 0))
    if newest > GLIBC_MAX:
        fail(f"{MODULE} needs glibc {newest[0]}.{newest[1]}, newer than {POLICY}'s {GLIBC_MAX[0]}.{GLIBC_MAX[1]}")

    # auditwheel's own verdict: its report for the record, its JSON for the decision.
    auditwheel = str(Path(sys.executable).parent / "auditwheel")
    shown = subprocess.run([auditwheel, "-v", "show", str(wheel)], capture_output=True, text=True)
    print(shown.stdout.strip())
    report = subprocess.run([auditwheel, "show", "--json", str(wheel)], capture_output=True, text=True)
    if shown.returncode != 0 or report.returncode != 0:
        fail(f"auditwheel show failed: {shown.stderr.strip()} {report.stderr.strip()}")
    verdict = json.loads(report.stdout)
    if verdict["overall_tag"] != f"{POLICY}_{arch}":
        fail(f'auditwheel: the wheel is consistent with "{verdict["overall_tag"]}", not "{POLICY}_{arch}"')
    if verdict["external_libs"] or verdict["unsupported_isa"] or verdict["pure"]:
        fail(f"auditwheel: external libraries {verdict['external_libs']}, unsupported ISA {verdict['unsupported_isa']}")
    print(
        f"static: {wheel.name}: {elf['e_machine']}, exports PyInit__native, needs {', '.join(needed)}, "
        f"glibc <= {newest[0]}.{newest[1]}, {len(names)} files, {wheel.stat().st_size / 2**20:.2f} MiB; auditwheel: {POLICY}_{arch}"
    )


def native(path: Path, expect_isa: str) -> None:
    import ctypes
    import importlib.util
    import platform

    import numpy as np

    spec = importlib.util.spec_from_file_location("hybridgen._native", path)
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    isas = m.available_isas()
    print(
        f"native: {path.name} loaded by Python {platform.python_version()} on {platform.machine()}: "
        f"version {m.__version__}, isa {m.isa()} of {isas}, {m.num_threads()} threads"
    )
    if m.__version__ != cargo_version():
        fail(f"the native module says version {m.__version__}, Cargo.toml {cargo_version()}")
    if m.isa() != expect_isa or expect_isa not in isas or "scalar" not in isas:
        fail(f"expected the {expect_isa} kernels to be chosen (and scalar available), got {m.isa()} of {isas}")
    p = m.cuda_probe()
    if p["available"] or not p["reason"]:
        fail(f"cuda_probe() on a machine without a GPU: {p}")

    # The core takes DLPack 1.0 tensors; numpy makes them only from 2.1 on, so this producer
    # hands numpy's memory over as a versioned DLPack capsule itself.
    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]

    class Device(ctypes.Structure):
        _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]

    class DType(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]

    class DLTensor(ctypes.Structure):
        _fields_ = [
            ("data", ctypes.c_void_p),
            ("device", Device),
            ("ndim", ctypes.c_int32),
            ("dtype", DType),
            ("shape", ctypes.POINTER(ctypes.c_int64)),
            ("strides", ctypes.POINTER(ctypes.c_int64)),
            ("byte_offset", ctypes.c_uint64),
        ]

    class Managed(ctypes.Structure):
        pass

    deleter_t = ctypes.CFUNCTYPE(None, ctypes.POINTER(Managed))
    Managed._fields_ = [
        ("version", Version),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", deleter_t),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]
    noop = deleter_t(lambda _: None)
    keep = []  # every array and struct handed out stays alive until the process ends
    capsule_new = ctypes.pythonapi.PyCapsule_New
    capsule_new.restype = ctypes.py_object
    capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    codes = {"i": 0, "u": 1, "f": 2, "b": 6}

    class Array:
        def __init__(self, a):
            assert a.flags.c_contiguous  # outputs are written in place
            self.a, self.dtype = a, a.dtype

        def __dlpack_device__(self):
            return (1, 0)  # CPU

        def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None):
            a = self.a
            shape = (ctypes.c_int64 * a.ndim)(*a.shape)
            strides = (ctypes.c_int64 * a.ndim)(*(s // a.itemsize for s in a.strides))
            t = Managed(
                Version(1, 0),
                None,
                noop,
                0,
                DLTensor(
                    a.ctypes.data,
                    Device(1, 0),
                    a.ndim,
                    DType(codes[a.dtype.kind], a.itemsize * 8, 1),
                    shape,
                    strides,
                    0,
                ),
            )
            keep.extend([a, shape, strides, t])
            return capsule_new(ctypes.addressof(t), b"dltensor_versioned", None)

    rng = np.random.default_rng(0)
    checks = 0
    # Attention with its log-sum-exp (GQA, a left-padding mask, lengths off the vector width)
    # against float64, on every instruction set, for each key/value dtype numpy has.
    for dtype, tol in ((np.float32, 2e-5), (np.float16, 2e-3)):
        for b, hq, hkv, n, d, masked in ((2, 8, 2, 77, 64, True), (1, 4, 4, 300, 128, False), (3, 7, 1, 5, 33, True)):
            q = rng.standard_normal((b, hq, d)).astype(np.float32)
            k = rng.standard_normal((b, hkv, n, d)).astype(dtype)
            v = rng.standard_normal((b, hkv, n, d)).astype(dtype)
            mask = np.zeros((b, n), np.uint8)
            if masked:
                mask[0, : n // 3] = 1
            scale = d**-0.5
            g = hq // hkv
            kk = np.repeat(k.astype(np.float64), g, axis=1)
            vv = np.repeat(v.astype(np.float64), g, axis=1)
            logits = np.einsum("bhd,bhnd->bhn", q.astype(np.float64), kk) * scale
            logits[np.broadcast_to(mask[:, None, :] != 0, logits.shape)] = -np.inf
            top = logits.max(-1, keepdims=True)
            w = np.exp(logits - top)
            want_lse = (np.log(w.sum(-1, keepdims=True)) + top)[..., 0]
            want = np.einsum("bhn,bhnd->bhd", w / w.sum(-1, keepdims=True), vv)
            for isa in isas:
                out = np.zeros((b, hq, d), np.float32)
                lse = np.zeros((b, hq), np.float32)
                m.attend(
                    Array(q), Array(k), Array(v), scale, Array(out), Array(lse), Array(mask) if masked else None, isa
                )
                err = np.abs(out - want).max() / np.abs(want).max()
                lse_err = np.abs(lse - want_lse).max()
                if not (err < tol and lse_err < tol * 10):
                    fail(
                        f"attend on {isa}, {np.dtype(dtype).name} [{b},{hq}/{hkv},{n},{d}]: "
                        f"relative error {err:.2e}, lse error {lse_err:.2e}"
                    )
                checks += 1
    # Top-K: the k largest logits of each row, in ascending token order.
    for n, k in ((1000, 37), (64, 64), (5000, 1)):
        x = rng.standard_normal((2, 3, n)).astype(np.float32)
        idx = np.zeros((2, 3, k), np.int64)
        val = np.zeros((2, 3, k), np.float32)
        m.topk(Array(x), k, Array(idx), Array(val))
        want_idx = np.sort(np.argsort(-x, axis=-1, kind="stable")[..., :k], axis=-1)
        if not (np.array_equal(idx, want_idx) and np.array_equal(val, np.take_along_axis(x, want_idx, -1))):
            fail(f"topk k={k} of {n} differs from numpy")
        checks += 1
    print(f"native: {checks} kernel checks passed (attend on {', '.join(isas)} x float32/float16, topk)")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "static":
        static(Path(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "native":
        native(Path(sys.argv[2]), sys.argv[3])
    else:
        raise SystemExit(__doc__)
