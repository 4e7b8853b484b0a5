"""The CUDA path. Without a GPU (CI): the kernels compile through NVRTC, the probe reports CUDA
unavailable without crashing, and CUDA-only options fail with clear errors. With a GPU
(``pytest -m gpu``): every kernel against a torch reference, exact mode against the model's own
attention on CUDA, pinned registration, and a long run without leaks."""

import gc
import resource

import pytest
import torch

import hybridgen
from hybridgen import HybridConfig, HostKVStore, _native, cuda
from hybridgen.hf.patch import is_patched
from hybridgen.timing import between, mark, seconds

from tiny_models import greedy, prompts, tiny
from hybridgen.hf.compat import cache_arg

ENTRIES = ("split_attention_f16", "split_attention_bf16", "split_attention_f32", "merge_partials")
NO_GPU = not torch.cuda.is_available()


# --- without a GPU ----------------------------------------------------------------------------
def test_probe_explains_why_cuda_is_unavailable():
    p = cuda.probe()
    assert set(p) == {"available", "driver", "nvrtc", "devices", "reason"}
    assert p["available"] == (p["reason"] is None)
    if not p["driver"]:
        assert not p["available"] and p["devices"] == 0 and "libcuda" in p["reason"]


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
    store = HostKVStore(1, 1, 1, 8, torch.float16, near_capacity_bytes=1 << 20, far_capacity_bytes=1 << 20, max_host_tokens=16)
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
    hybridgen.patch(model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", kernels="torch", pin_host=False))
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


# --- with a GPU -------------------------------------------------------------------------------
def reference(q, dev_k, dev_v, scale, dev_mask=None, sinks=0, host_logits=None, host_v=None):
    """Softmax over the union in token order (device sinks | host | device recent), float64."""
    b, hq, d = q.shape
    hkv, n = dev_k.shape[1], dev_k.shape[2]
    g = hq // hkv
    k = dev_k.double().repeat_interleave(g, 1)
    v = dev_v.double().repeat_interleave(g, 1)
    x = torch.einsum("bhd,bhnd->bhn", q.double(), k) * scale
    if dev_mask is not None:
        x = x.masked_fill(dev_mask[:, None, :], float("-inf"))
    if host_logits is not None:
        hv = host_v.double()
        if hv.shape[1] == hkv:
            hv = hv.repeat_interleave(g, 1)
        x = torch.cat([x[..., :sinks], host_logits.double(), x[..., sinks:]], -1)
        v = torch.cat([v[:, :, :sinks], hv, v[:, :, sinks:]], 2)
    lse = torch.logsumexp(x, -1)
    p = torch.exp(x - lse[..., None]).nan_to_num(0.0)
    return torch.einsum("bhn,bhnd->bhd", p, v), lse


def _inputs(dtype, b=2, hq=8, hkv=2, n=300, d=128, m=90, grouped=True, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(dtype)  # noqa: E731
    # Device tier as a prefix view of a larger buffer, as the cache holds it.
    buf_k, buf_v = r(b, hkv, n + 37, d), r(b, hkv, n + 37, d)
    mask = torch.rand(b, n, generator=gen, device="cuda") < 0.1
    mask[:, :2] = False
    host_logits = torch.randn(b, hq, m, generator=gen, device="cuda") * 3
    host_logits[0, 0, :5] = float("-inf")
    host_v = r(b, hkv if grouped else hq, m, d)
    return r(b, hq, d), buf_k[:, :, :n], buf_v[:, :, :n], mask, host_logits, host_v


def _tol(dtype):
    return {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("d", [64, 128, 80])
def test_device_partial_kernel_matches_torch(dtype, d):
    q, k, v, mask, _, _ = _inputs(dtype, d=d)
    scale = d**-0.5
    out, lse = cuda.attention_partial(q, k, v, scale, mask)
    want_o, want_lse = reference(q, k, v, scale, mask)
    assert (out.double() - want_o).abs().max().item() <= _tol(dtype)
    assert (lse.double() - want_lse).abs().max().item() <= _tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grouped", [True, False])
def test_token_concatenator_matches_torch(dtype, grouped):
    q, k, v, mask, logits, hv = _inputs(dtype, grouped=grouped)
    scale, sinks = 128**-0.5, 4
    out, _ = cuda.attention_partial(q, k, v, scale, mask, sinks=sinks, host_logits=logits, host_values=hv)
    want, _ = reference(q, k, v, scale, mask, sinks, logits, hv)
    assert (out.double() - want).abs().max().item() <= _tol(dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lse_merge_matches_full_softmax(dtype):
    q, k, v, mask, logits, hv = _inputs(dtype, grouped=True)
    scale = 128**-0.5
    # The CPU's partial over the host tokens, computed independently in float64.
    b, hq, m = logits.shape
    g = hq // k.shape[1]
    host_lse = torch.logsumexp(logits.double(), -1)
    host_o = torch.einsum("bhn,bhnd->bhd", torch.softmax(logits.double(), -1), hv.double().repeat_interleave(g, 1))
    out, lse = cuda.attention_partial(q, k, v, scale, mask, host_out=host_o.float(), host_lse=host_lse.float())
    want, want_lse = reference(q, k, v, scale, mask, 0, logits, hv)
    assert (out.double() - want).abs().max().item() <= _tol(dtype)
    assert (lse.double() - want_lse).abs().max().item() <= _tol(dtype)


@pytest.mark.gpu
def test_fully_masked_rows_give_zeros_and_batch_one_works():
    q, k, v, mask, _, _ = _inputs(torch.float16, b=1, hq=4, hkv=4, n=17)
    mask[:] = True
    out, lse = cuda.attention_partial(q, k, v, 1.0, mask)
    assert torch.all(out == 0) and torch.all(torch.isinf(lse))


@pytest.mark.gpu
def test_kernels_reject_mismatched_inputs():
    q, k, v, mask, logits, hv = _inputs(torch.float16)
    with pytest.raises(TypeError, match="dtype"):
        cuda.attention_partial(q.float(), k, v.float(), 1.0)  # keys f16, values f32
    with pytest.raises(ValueError, match="heads"):
        cuda.attention_partial(q[:, :3].contiguous(), k, v, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "opt"])
@pytest.mark.parametrize("merge", ["lse", "concat"])
def test_exact_mode_on_cuda_matches_eager(model_type, merge):
    model = tiny(model_type).cuda()
    ids, mask = (t.cuda() for t in prompts(2, 48, 7))
    model.set_attn_implementation("eager")
    want_seq, want_logits = greedy(model, ids, mask, 48)
    hybridgen.patch(model, HybridConfig(gpu_budget=8, sinks=2, evict_chunk=4, policy="all", merge=merge, kernels="cuda"))
    got_seq, got_logits = greedy(model, ids, mask, 48)
    cache = model._hybridgen.last_cache
    assert torch.equal(got_seq, want_seq)
    assert (got_logits - want_logits).abs().max().item() <= 1e-3
    assert cache.store.pinned
    assert sum(r.host_tokens for r in cache.telemetry.records) > 0


@pytest.mark.gpu
def test_exact_mode_on_cuda_smollm2():
    from hybridgen.eval.common import load_model

    model, tok = load_model(None, device="cuda")  # bfloat16 on CUDA
    text = "The capital of the Republic of Wobble is Quaxton. " * 40 + "What is the capital of Wobble?"
    ids = tok(text, return_tensors="pt").input_ids.cuda()
    want = model.generate(ids, max_new_tokens=16, do_sample=False)
    hybridgen.patch(model, HybridConfig(gpu_budget=128, sinks=4, policy="all", kernels="cuda"))
    got = model.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_pinned_buffers_round_trip():
    buf = _native.PinnedHostBuffer(1 << 20, 0)
    assert buf.registered and buf.nbytes >= 1 << 20
    host = torch.from_dlpack(buf.view("float32", 1000)).view(1000)
    host.copy_(torch.arange(1000.0))
    dev = host.to("cuda", non_blocking=True)
    back = torch.empty_like(host)
    back.copy_(dev * 2, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(back, torch.arange(1000.0) * 2)

    store = HostKVStore(2, 1, 2, 64, torch.float16, near_capacity_bytes=1 << 24, far_capacity_bytes=1 << 24, max_host_tokens=256)
    store.append(0, 100)
    keys = torch.randn(1, 2, 100, 64).half()
    store.evict(0, keys, keys * 2)
    store.pin(0)
    assert store.pinned
    got = cuda.copy_to_device(store.view(0, "values", 0, 100), torch.device("cuda"))
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), keys * 2)
    store.unpin()
    assert not store.pinned


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.gpu
@pytest.mark.slow
def test_ten_thousand_steps_do_not_leak():
    model = tiny("llama").cuda().half()
    model.config.max_position_embeddings = 12000
    hybridgen.patch(model, HybridConfig(gpu_budget=64, sinks=4, evict_chunk=32, policy="scheduler", k_min=16,
                                        k_max=256, max_context=12000, kernels="cuda"))
    cache = hybridgen.HybridCache(model)
    ids = torch.randint(3, 96, (1, 32), device="cuda")
    with torch.no_grad():
        out = model(ids, **cache_arg(cache), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        marks = {}
        for step in range(10_000):
            out = model(token, **cache_arg(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            if step in (1_000, 9_999):
                torch.cuda.synchronize()
                gc.collect()
                marks[step] = (torch.cuda.memory_allocated(), _rss_mib())
    cache.settle()
    # Nothing lost or duplicated: every token is on the device or the host, exactly once.
    for layer in cache.layers:
        assert layer.device_tokens() + cache.store.host_len(layer.layer_idx) == layer.total == 32 + 10_000
    # Device memory does not grow with steps (the device tier is bounded; old rows are freed).
    assert marks[9_999][0] <= marks[1_000][0] * 1.05 + (1 << 20)
    # Host growth is the store's committed rows only (pinned reservation committed up front).
    assert marks[9_999][1] - marks[1_000][1] < 256
