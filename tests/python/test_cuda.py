"""The CUDA path without a GPU (CI): the kernels compile through NVRTC (the NVRTC of torch's own
CUDA, to a cubin for the device), the probe reports CUDA unavailable without crashing, and
CUDA-only options fail with clear errors. What needs a GPU is in test_cuda_device.py."""

import pytest
import torch
from tiny_models import greedy, prompts, tiny

import hybridgen
from hybridgen import HostKVStore, HybridConfig, _native, cuda
from hybridgen.hf.patch import is_patched
from hybridgen.timing import between, mark, seconds

ENTRIES = ("split_attention_f16", "split_attention_bf16", "split_attention_f32", "merge_partials")
NO_GPU = not torch.cuda.is_available()


# --- without a GPU ----------------------------------------------------------------------------
def test_probe_explains_why_cuda_is_unavailable():
    p = cuda.probe()
    assert set(p) == {"available", "driver", "nvrtc", "devices", "reason"}
    assert p["available"] == (p["reason"] is None)
    if not p["driver"]:
        assert not p["available"] and p["devices"] == 0 and "libcuda" in p["reason"]


@pytest.fixture
def capturing(monkeypatch):
    """As if a CUDA graph were being captured on the current stream."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)


def test_hybrid_steps_refuse_cuda_graph_capture_and_name_the_option(capturing):
    q = torch.zeros(1, 2, 8)
    kv = torch.zeros(1, 1, 4, 8)
    for call in (
        lambda: cuda.attention_partial(q, kv, kv, 1.0),
        lambda: cuda.ship([q], torch.device("cuda", 0)),
        lambda: cuda.refuse_capture("a step"),
    ):
        with pytest.raises(cuda.GraphCaptureError, match="enforce_eager=True"):
            call()


def test_no_capture_no_refusal():
    cuda.refuse_capture("a step")  # no graph is being captured here (no GPU, or not capturing)


def test_an_engine_planned_on_cuda_loads_the_kernels_then(monkeypatch):
    # Planning is where the kernels are compiled or read from the cache, never the first decode
    # step (no GPU here: the loader is replaced by a recorder, the store stays unpinned).
    from hybridgen.engine import engine as engine_module
    from hybridgen.engine.engine import Engine
    from hybridgen.engine.model_info import ModelInfo

    loaded = []
    monkeypatch.setattr(engine_module, "cuda_kernels_here", lambda: True)
    monkeypatch.setattr(cuda, "warmup", lambda device: loaded.append(torch.device(device)) or "sm_90")
    info = ModelInfo(model_type="llama", layers=2, q_heads=4, kv_heads=2, head_dim=8, max_positions=64)
    eng = Engine(HybridConfig(policy="all", gpu_budget=8, pin_host=False), info)
    eng.plan(batch=1, dtype=torch.float32, device="cuda:0", max_tokens=64)
    assert loaded == [torch.device("cuda", 0)]
    eng.plan(batch=1, dtype=torch.float32, device="cuda:0", max_tokens=64)  # planned: nothing again
    assert len(loaded) == 1


def test_warmup_command_says_why_it_cannot_run_without_cuda():
    if cuda.probe()["available"]:
        pytest.skip("CUDA is available here: test_cuda_device.py runs the command")
    from hybridgen.apps.cli import main

    with pytest.raises(SystemExit, match="warmup: the CUDA kernels cannot run here"):
        main(["warmup"])


def test_torch_provides_nvrtc():
    # A CUDA build of torch (the default wheel) brings libnvrtc.so.13: kernels compile anywhere.
    assert cuda.probe()["nvrtc"], "NVRTC should be loadable after importing torch"


@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
def test_kernels_compile_to_ptx_with_nvrtc(arch):
    ptx = _native.compile_kernels(arch)["code"].decode()
    for name in ENTRIES:
        assert f".entry {name}(" in ptx
    assert f".target sm_{arch[-2:]}" in ptx


def test_the_loader_gets_a_cubin_for_the_device_cached_on_disk(tmp_path):
    # A cubin is machine code for sm_90 itself: the driver loads it whatever its CUDA version,
    # whereas PTX from a newer NVRTC is refused (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).
    image = _native.kernel_image(90, str(tmp_path))
    assert image["target"] == "sm_90" and image["code"][:4] == b"\x7fELF"
    cached = list(tmp_path.glob("hybrid_attention-*-sm_90.cubin"))
    assert len(cached) == 1 and cached[0].read_bytes() == image["code"]
    for name in ENTRIES:
        assert name.encode() in image["code"]


def test_kernels_keep_their_state_in_registers_on_sm_90():
    # ptxas' own report: no stack frame (nothing indexed at run time spilled to local memory)
    # and no spills, for every kernel.
    log = _native.compile_kernels("sm_90", ["-Xptxas", "-v"])["log"]
    for name in ENTRIES:
        assert f"Compiling entry function '{name}'" in log, log
    import re

    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert len(frames) >= len(ENTRIES), log
    assert all(f == ("0", "0", "0") for f in frames), log


def test_torchs_nvrtc_wins_over_one_on_the_library_path(tmp_path):
    # A system toolkit's unversioned libnvrtc.so on LD_LIBRARY_PATH must not be picked over the
    # NVRTC of torch's own CUDA (a newer compiler than the driver would make unloadable code).
    import os
    import subprocess
    import sys

    torch_lib = cuda.torch_nvrtc()
    assert torch_lib, "a CUDA build of torch ships libnvrtc"
    (tmp_path / "libnvrtc.so").symlink_to(torch_lib)
    code = "import hybridgen.cuda, hybridgen._native as n; print(n.nvrtc_info()['path'])"
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), HYBRIDGEN_NVRTC="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == torch_lib
    env["HYBRIDGEN_NVRTC"] = str(tmp_path / "libnvrtc.so")  # an explicit choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(tmp_path / "libnvrtc.so")
    env["HYBRIDGEN_NVRTC"] = str(tmp_path / "missing.so")  # a wrong explicit choice is an error, no fallback
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "HYBRIDGEN_NVRTC=" in run.stderr and "missing.so" in run.stderr


def test_kernel_source_is_the_shipped_file():
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "kernels" / "hybrid_attention.cu"
    assert _native.kernel_source() == src.read_text()


def test_bad_architecture_is_rejected():
    for bad in ("90", "sm_", "compute_x0"):
        with pytest.raises(ValueError, match="sm_90"):
            _native.compile_kernels(bad)


def test_cpu_tensors_are_refused_by_the_kernels():
    q = torch.zeros(1, 2, 8, dtype=torch.float16)
    k = torch.zeros(1, 1, 4, 8, dtype=torch.float16)
    po, pl = torch.zeros(2, 1, 8), torch.zeros(2, 1)
    with pytest.raises(ValueError, match="CUDA device"):
        _native.split_attention(q, k, k, None, 0, None, None, 1.0, po, pl, 0)
    with pytest.raises(ValueError, match="CUDA device"):
        _native.merge_partials(po, pl, None, None, torch.zeros(2, 8), None, 0)


@pytest.mark.skipif(not NO_GPU, reason="checks the errors of a machine without CUDA")
def test_cuda_only_options_fail_clearly_without_cuda():
    model = tiny("llama")
    for cfg in (HybridConfig(kernels="cuda"), HybridConfig(pin_host=True)):
        with pytest.raises(cuda.CudaUnavailableError, match="needs CUDA"):
            hybridgen.patch(model, cfg)
        assert not is_patched(model)
    store = HostKVStore(
        1, 1, 1, 8, torch.float16, near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 20, max_host_tokens=16
    )
    with pytest.raises(cuda.CudaUnavailableError):
        store.pin(0)
    assert not store.pinned
    with pytest.raises(cuda.CudaUnavailableError):
        _native.PinnedHostBuffer(4096, 0)
    with pytest.raises(cuda.CudaUnavailableError):
        _native.cuda_device_info(0)


def test_kernel_options_are_validated():
    with pytest.raises(ValueError, match="kernels"):
        HybridConfig(kernels="triton")
    with pytest.raises(TypeError, match="pin_host"):
        HybridConfig(pin_host="yes")
    assert HybridConfig(kernels="torch").use_kernels is False


def test_torch_kernels_option_keeps_cpu_exact():
    model = tiny("llama")
    ids, mask = prompts(1, 40, 0)
    model.set_attn_implementation("eager")
    want, _ = greedy(model, ids, mask, 12)
    hybridgen.patch(
        model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", kernels="torch", pin_host=False)
    )
    got, _ = greedy(model, ids, mask, 12)
    assert torch.equal(got, want)


def test_cpu_timings_are_plain_seconds():
    dev = torch.device("cpu")
    a = mark(dev)
    b = mark(dev)
    assert isinstance(between(a, b), float) and seconds(between(a, b)) >= 0


def test_split_count_fills_the_device():
    assert _native.choose_splits(32, 1 << 17, 132) * 32 >= 2 * 132
    assert _native.choose_splits(32, 100, 132) == 2
