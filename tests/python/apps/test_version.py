"""``python -m hybridgen --version``: the version (Cargo.toml's, the only place it is written), the
CPU kernels chosen at run time and whether the CUDA path can run here, and why not."""

import re
from importlib.metadata import version
from pathlib import Path

import hybridgen
from hybridgen import cuda

ROOT = Path(__file__).resolve().parents[3]


def test_the_version_is_cargo_tomls_everywhere():
    cargo = re.search(r'(?m)^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text()).group(1)  # [package]'s
    assert hybridgen.__version__ == cargo
    assert version("hybridgen") == cargo  # the installed metadata (maturin copies Cargo's version)
    assert re.search(r'(?m)^dynamic = \[.*"version"', (ROOT / "pyproject.toml").read_text())


def test_version_reports_the_isa_and_the_cuda_status(cli):
    code, out, _ = cli("--version")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].startswith(f"hybridgen {hybridgen.__version__} (")
    cpu = next(line for line in lines if line.startswith("cpu: "))
    assert cpu.startswith(f"cpu: {hybridgen.isa()} kernels chosen at run time")
    assert all(isa in cpu for isa in hybridgen.available_isas())
    probe = cuda.probe()
    cuda_line = next(line for line in lines if line.startswith("cuda: "))
    if probe["available"]:
        assert cuda_line.startswith("cuda: available")
    else:
        assert cuda_line.startswith("cuda: unavailable") and probe["reason"] in cuda_line
    nvrtc_line = next(line for line in lines if line.startswith("nvrtc: "))
    assert re.match(r"nvrtc: (\d+\.\d+ at \S|not found: \S)", nvrtc_line)
