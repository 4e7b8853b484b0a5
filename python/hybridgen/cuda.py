"""The CUDA path of hybrid attention: the native kernels on torch tensors, transfers on a side
stream, and page-locked staging memory.

Page-locked memory: the host store registers its own (NUMA-placed) buffers with the driver
(``HostKVStore.pin``); small per-step buffers (selected value rows, evicted tokens) come from
torch's pinned allocator, which never reuses a block before the copy reading it has finished.

Everything here is used only when the model runs on a CUDA device; :func:`probe` says whether
that can work on this machine without touching a GPU (the driver and NVRTC are loaded lazily by
the native core). Kernels are compiled by NVRTC and cached under the data directory
(``$HYBRIDGEN_DATA/kernels``): :func:`warmup` does it when an engine is planned (or ahead of
time, ``python -m hybridgen warmup``), so the first decode step never waits for the compiler.

CUDA graphs: a hybrid step is not capture-safe (the CPU stage's results, split counts and
shapes are decided on the host every step, and transfers wait on events), so every entry point
here refuses to run while the current stream is capturing (:class:`GraphCaptureError`), naming
the option that turns capture off, instead of recording a graph that would replay stale values.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from . import _native
from .timing import between, mark

__all__ = [
    "CudaUnavailableError",
    "GraphCaptureError",
    "refuse_capture",
    "warmup",
    "probe",
    "require",
    "attention_partial",
    "combine",
    "ship",
    "to_host",
    "copy_to_device",
    "side_stream",
    "KERNEL_DTYPES",
]

CudaUnavailableError = _native.CudaUnavailableError
#: dtypes the kernels take (keys, values, query).
KERNEL_DTYPES = tuple(getattr(torch, name) for name in _native.DTYPES)
MAX_HEAD_DIM = _native.MAX_HEAD_DIM


@functools.lru_cache(maxsize=None)
def torch_nvrtc() -> Optional[str]:
    """The NVRTC library of torch's own CUDA (``nvidia/cu13/lib/libnvrtc.so.13`` from the
    ``nvidia-cuda-nvrtc`` wheel), if installed. The core compiles with it before anything on the
    library path: it is the compiler torch was built against, so never newer than what torch's
    users run, whereas a system toolkit's unversioned ``libnvrtc.so`` may be."""
    major = (torch.version.cuda or "").split(".")[0]
    try:
        import nvidia
    except ImportError:
        return None
    from pathlib import Path

    for root in getattr(nvidia, "__path__", []):
        for lib in sorted(Path(root).glob(f"*/lib/libnvrtc.so.{major or '*'}")):
            return str(lib)
    return None


def _prefer_torch_nvrtc() -> None:
    path = torch_nvrtc()
    if path is not None:
        _native.prefer_nvrtc(path)


_prefer_torch_nvrtc()


def probe() -> dict:
    """``{"available", "driver", "nvrtc", "devices", "reason"}``; never raises."""
    return _native.cuda_probe()


def require(what: str, device: Optional[torch.device] = None, *, compiler: bool = True) -> None:
    """Raises :class:`CudaUnavailableError` (saying why) unless ``what`` can run on CUDA here.
    ``compiler=False``: ``what`` needs the driver and a device only (page-locking, streams), not
    NVRTC, which only the kernels need."""
    p = probe()
    usable = p["available"] or (not compiler and p["driver"] and p["devices"] > 0)
    if not usable:
        raise CudaUnavailableError(f"{what} needs CUDA, which is unavailable: {p['reason']}")
    if device is not None and device.type != "cuda":
        raise ValueError(f"{what} needs the model on a CUDA device, but it is on {device}")


class GraphCaptureError(RuntimeError):
    """A hybrid step was called while a CUDA graph was being captured."""


def refuse_capture(what: str) -> None:
    """Raises :class:`GraphCaptureError` if the current CUDA stream is capturing a graph."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        raise GraphCaptureError(
            f"{what} ran while a CUDA graph was being captured: hybrid attention decides on the host every step "
            "(which host tokens, how many, the split count) and waits on transfer events, so a captured graph "
            "would replay the first step's choices. Turn capture off: vLLM enforce_eager=True (--enforce-eager); "
            "torch.compile without mode='reduce-overhead'/'max-autotune'; no torch.cuda.graph around generate()"
        )


def warmup(device) -> str:
    """Compiles (or reads from the on-disk cache) and loads the kernels on ``device`` now; returns
    the target loaded (``"sm_XY"``, or ``"compute_XY"`` PTX for a GPU newer than NVRTC)."""
    device = torch.device(device)
    require("the hybrid attention kernels", device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _native.load_kernels(index, kernel_cache_dir())


@functools.lru_cache(maxsize=None)
def kernel_cache_dir() -> str:
    from .data.assets import data_dir

    return str(data_dir() / "kernels")


@functools.lru_cache(maxsize=None)
def _device_info(index: int) -> dict:
    return _native.cuda_device_info(index, kernel_cache_dir())


def usable(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether the kernels serve this query and device tier."""
    return (
        q.is_cuda
        and keys.is_cuda
        and keys.dtype in KERNEL_DTYPES
        and q.shape[-1] <= MAX_HEAD_DIM
        and keys.stride(-1) == 1
        and (keys.shape[2] <= 1 or keys.stride(2) == keys.shape[3])
    )


def attention_partial(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale: float,
    mask: Optional[torch.Tensor] = None,
    *,
    sinks: int = 0,
    host_logits: Optional[torch.Tensor] = None,
    host_values: Optional[torch.Tensor] = None,
    host_out: Optional[torch.Tensor] = None,
    host_lse: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q [b, hq, d]`` over the device tier ``keys``/``values [b, hkv, n, d]``
    (``mask`` bool ``[b, n]``, True = ignore) and, optionally, shipped host tokens (concat:
    ``host_logits`` float32 ``[b, hq, m]`` placed after the first ``sinks`` device tokens, with
    ``host_values [b, hq or hkv, m, d]``) or the CPU's partial (LSE: ``host_out [b, hq, d]``,
    ``host_lse [b, hq]``). Returns float32 ``(out [b, hq, d], lse [b, hq])``."""
    refuse_capture("hybrid attention's device part")
    b, hq, d = q.shape
    dev = q.device
    info = _device_info(dev.index if dev.index is not None else torch.cuda.current_device())
    keys, values = _rows_contiguous(keys), _rows_contiguous(values)
    if values.stride()[:2] != keys.stride()[:2]:  # the kernel takes one pair of strides for both
        keys, values = keys.contiguous(), values.contiguous()
    m = 0 if host_logits is None else host_logits.shape[-1]
    rows = b * hq
    splits = _native.split_count(b, hq, keys.shape[1], keys.shape[2] + m, info["sm_count"])
    part_o = torch.empty((rows, splits, d), dtype=torch.float32, device=dev)
    part_lse = torch.empty((rows, splits), dtype=torch.float32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    cache = kernel_cache_dir()
    mask_u8 = None if mask is None else mask.to(torch.uint8).contiguous()
    if host_logits is not None:
        host_logits = host_logits.float().contiguous()
        host_values = host_values.to(keys.dtype).contiguous()
    _native.split_attention(
        q.to(keys.dtype).contiguous(),
        keys,
        values,
        mask_u8,
        sinks,
        host_logits,
        host_values,
        float(scale),
        part_o,
        part_lse,
        stream,
        cache,
    )
    out = torch.empty((rows, d), dtype=torch.float32, device=dev)
    lse = torch.empty((rows,), dtype=torch.float32, device=dev)
    if host_out is not None:
        host_out = host_out.float().reshape(rows, d).contiguous()
        host_lse = host_lse.float().reshape(rows).contiguous()
    _native.merge_partials(part_o, part_lse, host_out, host_lse, out, lse, stream, cache)
    return out.view(b, hq, d), lse.view(b, hq)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    n, d = t.shape[2], t.shape[3]
    ok = (d <= 1 or t.stride(3) == 1) and (n <= 1 or t.stride(2) == d)
    return t if ok else t.contiguous()


def combine(q, dev_k, dev_v, host, *, scale: float, sinks: int, dev_mask=None) -> torch.Tensor:
    """The device half of a hybrid step (:func:`hybridgen.attention.device_combine`) in one
    split-attention launch and one merge launch."""
    if host.merge == "lse":
        return attention_partial(q, dev_k, dev_v, scale, dev_mask, host_out=host.out, host_lse=host.lse)[0]
    return attention_partial(
        q, dev_k, dev_v, scale, dev_mask, sinks=sinks, host_logits=host.logits, host_values=host.values
    )[0]


@functools.lru_cache(maxsize=None)
def side_stream(index: int) -> "torch.cuda.Stream":
    """The stream host-to-device transfers and evictions run on, one per device."""
    return torch.cuda.Stream(device=index)


def ship(tensors: list, device: torch.device):
    """Copies CPU ``tensors`` (ideally page-locked) to ``device`` on the side stream and makes
    the current stream wait for them (an event, not a host synchronisation). Returns the device
    tensors and the transfer's span on the device timeline. A pageable source is staged through
    page-locked memory first: a copy from pageable memory is not asynchronous (the driver copies
    it through its own staging buffer while the CPU waits)."""
    refuse_capture("the host-to-device transfer of hybrid attention")
    index = device.index if device.index is not None else torch.cuda.current_device()
    # The sources are host memory the CPU has finished writing: the copies need not wait for any
    # queued device work (waiting would serialise them behind it and lose the overlap).
    side, main = side_stream(index), torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        start = mark(device)
        moved = [None if t is None else copy_to_device(_page_locked(t), device) for t in tensors]
        end = mark(device)
    main.wait_stream(side)
    for t in moved:
        if t is not None:
            t.record_stream(main)  # allocated on the side stream, used on the main one
    return moved, between(start, end)


def to_host(*tensors):
    """``(host tensors, event)``: CUDA ``tensors`` copied to page-locked host memory on the current
    stream (right behind the work that produced them, ahead of anything queued after), and an
    event recorded after the copies. A CPU thread waits on the event (``event.synchronize()``)
    before reading them, so it waits for the producer only, never for the device work queued
    later, and no copy runs on the legacy default stream. CPU tensors and ``None`` pass through."""
    cuda_tensors = [t for t in tensors if t is not None and t.is_cuda]
    if not cuda_tensors:
        return list(tensors), None
    refuse_capture("the device-to-host copy of hybrid attention")
    stream = torch.cuda.current_stream(cuda_tensors[0].device)
    out = []
    for t in tensors:
        if t is None or not t.is_cuda:
            out.append(t)
            continue
        h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        h.copy_(t.detach(), non_blocking=True)
        out.append(h)
    ready = torch.cuda.Event()
    ready.record(stream)
    return out, ready


def _page_locked(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is page-locked (torch's pinned allocator, or the host store's registered
    buffers) or not on the CPU, else a page-locked copy (torch keeps its block until the copies
    queued from it have finished)."""
    if t.device.type != "cpu" or t.is_pinned():
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)


def copy_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``, copied asynchronously on the current stream. A strided view of the
    host store (``[b, h, n, d]`` whose ``(b, h)`` strips are contiguous but far apart) goes strip
    by strip straight from the page-locked store, instead of through a pageable contiguous copy
    that torch would make first."""
    if t.is_contiguous() or t.dim() != 4 or not (t.shape[2] <= 1 or t[0, 0].is_contiguous()):
        return t.to(device, non_blocking=True)
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    for i in range(t.shape[0]):
        for h in range(t.shape[1]):
            out[i, h].copy_(t[i, h], non_blocking=True)
    return out
