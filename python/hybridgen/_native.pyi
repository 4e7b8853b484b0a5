"""Type stubs of the native core (``hybridgen._native``). Checked against the module by tests."""

from typing import Any, Optional

import numpy as np

__version__: str

#: Largest head_dim the CUDA kernels take.
MAX_HEAD_DIM: int
#: Storage dtypes of the host store, by name.
DTYPES: tuple[str, ...]
#: Merge modes of the CPU stage: "concat" (selected logits + value rows) and "lse" (HGCA).
MERGES: tuple[str, ...]
#: Selection strategies the scheduler chooses between.
STRATEGIES: tuple[str, ...]
#: Names of the values of ``HostKVStore.token_map`` (index = value).
TIERS: tuple[str, ...]
#: Host tokens per page of the key summaries (Pre-QKT by page summaries).
PAGE_TOKENS: int

class CapacityError(RuntimeError):
    """A memory tier of the host KV store has no room for the request; nothing was changed."""

class CudaUnavailableError(RuntimeError):
    """CUDA cannot be used here (no driver, no device, or no NVRTC); the message says which."""

def _raise_internal_error() -> None: ...
def cuda_probe() -> dict[str, Any]: ...
def kernel_source() -> str: ...
def compile_kernels(arch: str, options: Optional[list[str]] = None) -> dict[str, Any]: ...
def kernel_image(cc: int, cache_dir: Optional[str] = None) -> dict[str, Any]: ...
def prefer_nvrtc(path: str) -> None: ...
def nvrtc_info() -> dict[str, Any]: ...
def cuda_device_info(device: int, cache_dir: Optional[str] = None) -> dict[str, Any]: ...
def load_kernels(device: int, cache_dir: Optional[str] = None) -> str: ...
def split_attention(
    q: Any,
    dev_k: Any,
    dev_v: Any,
    dev_mask: Optional[Any],
    sinks: int,
    host_logits: Optional[Any],
    host_v: Optional[Any],
    scale: float,
    part_o: Any,
    part_lse: Any,
    stream: int,
    cache_dir: Optional[str] = None,
) -> None: ...
def merge_partials(
    part_o: Any,
    part_lse: Any,
    host_o: Optional[Any],
    host_lse: Optional[Any],
    out: Any,
    out_lse: Optional[Any],
    stream: int,
    cache_dir: Optional[str] = None,
) -> None: ...
def choose_splits(rows: int, tokens: int, sm_count: int, min_tokens: int = 64) -> int: ...
def split_count(batch: int, q_heads: int, kv_heads: int, tokens: int, sm_count: int) -> int: ...
def launch_geometry(
    kind: str,
    batch: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    tokens: int,
    splits: Optional[int] = None,
    *,
    sm_count: Optional[int] = None,
) -> dict[str, Any]: ...

class PinnedHostBuffer:
    def __init__(
        self, nbytes: int, device: int, *, node: Optional[int] = None, cache_dir: Optional[str] = None
    ) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def registered(self) -> bool: ...
    def view(self, dtype: str, count: int, offset: int = 0) -> Any: ...

def merge_into(out: Any, lse: Any, out_b: Any, lse_b: Any) -> None: ...
def topk(logits: Any, k: int, out_indices: Any, out_values: Any) -> None: ...
def stream_read(buffer: Any, prefetch: bool = False) -> int: ...
def attend(
    q: Any,
    keys: Any,
    values: Any,
    scale: float,
    out: Any,
    lse: Any,
    mask: Optional[Any] = None,
    isa_name: Optional[str] = None,
) -> None: ...
def isa() -> str: ...
def available_isas() -> list[str]: ...
def num_threads() -> int: ...

class HostKVStore:
    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        dtype: str,
        *,
        near_capacity_bytes: int,
        far_capacity_bytes: int,
        sinks: int = 0,
        near_node: Optional[int] = None,
        far_node: Optional[int] = None,
        max_host_tokens: Optional[int] = None,
    ) -> None: ...
    @property
    def layers(self) -> int: ...
    @property
    def batch(self) -> int: ...
    @property
    def kv_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> str: ...
    @property
    def sinks(self) -> int: ...
    @property
    def max_host_tokens(self) -> int: ...
    @property
    def token_bytes(self) -> int: ...
    def total_len(self, layer: int) -> int: ...
    def host_len(self, layer: int) -> int: ...
    def far_key_len(self, layer: int) -> int: ...
    def evictable(self, layer: int) -> int: ...
    def append(self, layer: int, n: int) -> None: ...
    def evict(self, layer: int, keys: Any, values: Any) -> None: ...
    def spill_keys(self, layer: int, m: int) -> None: ...
    def pin(self, device: int, cache_dir: Optional[str] = None) -> None: ...
    def unpin(self) -> None: ...
    @property
    def pinned(self) -> bool: ...
    @property
    def pinned_bytes(self) -> int: ...
    @property
    def pin_error(self) -> Optional[str]: ...
    def layer_pinned_bytes(self, layer: int) -> int: ...
    def reset(self) -> None: ...
    @property
    def active_slots(self) -> list[int]: ...
    def add_slot(self) -> int: ...
    def release_slot(self, slot: int) -> None: ...
    def reset_slot(self, slot: int) -> None: ...
    def slot_total_len(self, layer: int, slot: int) -> int: ...
    def slot_host_len(self, layer: int, slot: int) -> int: ...
    def slot_far_key_len(self, layer: int, slot: int) -> int: ...
    def slot_evictable(self, layer: int, slot: int) -> int: ...
    def append_slot(self, layer: int, slot: int, n: int) -> None: ...
    def evict_slot(self, layer: int, slot: int, keys: Any, values: Any) -> None: ...
    def spill_slot_keys(self, layer: int, slot: int, m: int) -> None: ...
    def read_slot(self, layer: int, slot: int, start: int, keys_out: Any, values_out: Any) -> None: ...
    def slot_token_map(self, layer: int, slot: int) -> np.ndarray: ...
    def cpu_stage_slots(
        self,
        layer: int,
        slots: Any,
        q: Any,
        scale: float,
        merge: str,
        top_k: Optional[int] = None,
        positions: Optional[Any] = None,
        host_mask: Optional[Any] = None,
        isa_name: Optional[str] = None,
        pages: Optional[Any] = None,
    ) -> dict[str, Any]:
        """The CPU stage over a ragged batch: row ``i`` is ``q[i]`` over the host tokens of slot
        ``slots[i]`` only, in one call (store read-locked once, GIL released, rows in parallel).

        ``slots`` int64 ``[r]`` (slots in use; repeats allowed); ``q`` float32 ``[r, hq, d]``;
        ``positions`` int64 ``[m]`` (every row) or ``[r, m]`` (per row); ``pages`` int64 ``[r]``
        (Pre-QKT by page summaries: row ``i`` keeps ``pages[i]`` pages per KV head of its slot's
        summaries, then ``top_k``; not with ``positions``); ``host_mask`` bool or
        uint8 ``[r, w]``, ``w`` >= every row's host length (a row uses its first ``host_len``
        columns). Returns ``{"merge", "tokens" (list [r]), "host_len" (list [r]), "width" (K),
        "out", "lse", "logits", "indices", "values"}``, tensors as DLPack capsules or None: lse:
        ``out`` float32 ``[r, hq, d]``, ``lse`` float32 ``[r, hq]``; concat: ``logits`` float32
        ``[r, hq, K]``, ``indices`` int64 ``[r, hq, K]``, ``values`` store dtype ``[r, hq, K, d]``,
        padded past each row's ``tokens`` with ``-inf``, ``-1`` and zeros.
        """
        ...
    def read(self, layer: int, start: int, keys_out: Any, values_out: Any) -> None: ...
    def read_summaries(self, layer: int, maxima_out: Any, minima_out: Any) -> None: ...
    def view(self, layer: int, kind_name: str, start: int, stop: int) -> Any: ...
    def token_map(self, layer: int) -> np.ndarray: ...
    def tier_stats(self) -> dict[str, dict[str, Any]]: ...
    def node_of(self, layer: int, kind_name: str, index: int) -> Optional[int]: ...
    def logits(
        self,
        layer: int,
        q: Any,
        scale: float,
        out: Any,
        indices: Optional[Any] = None,
        isa_name: Optional[str] = None,
    ) -> None: ...
    def gather_values(self, layer: int, indices: Any, out: Any) -> None: ...
    def partial_attention(
        self,
        layer: int,
        logits: Any,
        out: Any,
        lse: Any,
        indices: Optional[Any] = None,
        isa_name: Optional[str] = None,
    ) -> None: ...
    def cpu_stage(
        self,
        layer: int,
        q: Any,
        scale: float,
        merge: str,
        top_k: Optional[int] = None,
        positions: Optional[Any] = None,
        host_mask: Optional[Any] = None,
        logits_out: Optional[Any] = None,
        values_out: Optional[Any] = None,
        indices_out: Optional[Any] = None,
        out: Optional[Any] = None,
        lse_out: Optional[Any] = None,
        isa_name: Optional[str] = None,
        pages: Optional[int] = None,
        per_query_head: bool = False,
        page_extra: Optional[Any] = None,
        kv_indices_out: Optional[Any] = None,
    ) -> dict[str, Any]:
        """The CPU stage of one decode step over the host tokens of ``layer``, in one call (the
        store read-locked once, the GIL released throughout).

        ``q`` float32 ``[b, hq, d]`` (CPU, contiguous; ``hq`` a multiple of ``kv_heads``);
        ``merge`` "lse" or "concat"; ``top_k`` keeps that many tokens per query head (Post-QKT;
        ``None`` or ``>= m`` keeps all, 0 keeps none); ``positions`` int64 ``[m]`` host token
        indices to score (Pre-QKT; ``None`` scores all ``n`` host tokens); ``host_mask`` bool or
        uint8 ``[b, n]``, nonzero = ignore (logit ``-inf``). Top-K: the largest logits per query
        head, NaN lowest, ties to the earlier scored token, listed in scored order. ``pages``
        (Pre-QKT by page summaries; neither ``top_k`` nor ``positions`` with it): per KV head
        (``per_query_head``: per query head) the ``pages`` pages of ``PAGE_TOKENS`` host tokens
        with the highest upper bound on a logit, then every token of those: ``k = pages ·
        PAGE_TOKENS`` (a partial last page padded with ``-inf`` logits) plus ``page_extra``
        (int64 ``[b, kv_heads, e]``, per KV head, repeats weigh nothing), then ``top_k`` of those
        if given; all ``n`` host tokens when ``pages`` covers every page. ``kv_indices_out``
        (int64 ``[b, kv_heads, k]``, top-k selections only): per KV head the ``k`` scored tokens
        whose largest logit over the GQA group is highest, ascending.

        Outputs (each optional): a contiguous tensor of exactly the result's shape, or a 1-D
        buffer with room for it (the result fills its start, row-major), in the dtype below:
        lse: ``out`` float32 ``[b, hq, d]``, ``lse_out`` float32 ``[b, hq]``; concat:
        ``logits_out`` float32 ``[b, hq, k]``, ``values_out`` store dtype ``[b, hq, k, d]``;
        either: ``indices_out`` int64 ``[b, hq, k]``. Outputs the merge never writes are a
        ValueError.

        Returns ``{"merge", "tokens" (k), "host_len" (n), "grouped", "out", "lse", "logits",
        "indices", "values"}``. A tensor entry is the caller's output itself when it had the exact
        shape, else a DLPack capsule of the exact shape (``torch.from_dlpack``), or None where
        not produced. lse: ``out``, ``lse`` (no tokens or all masked: zeros and ``-inf``), and
        ``indices`` if ``indices_out`` was given and tokens were picked by index. concat:
        ``logits``; with an index selection (``top_k < m`` or ``positions``) also ``indices``
        and the gathered ``values`` ``[b, hq, k, d]``; otherwise (every host token, in order)
        ``grouped`` is True, ``indices`` None and ``values`` a zero-copy read-only view of the
        store ``[b, kv_heads, n, d]`` shared by each GQA group (``values_out`` unused).
        """
        ...

class Scheduler:
    def __init__(
        self,
        k_min: int,
        k_max: int,
        *,
        grow: float = 1.25,
        shrink: float = 0.8,
        slack: float = 0.5,
        patience: int = 8,
        confirm: int = 3,
    ) -> None: ...
    def observe(self, t_gpu: float, t_cpu: float, t_tx: float) -> tuple[int, str]: ...
    @property
    def k(self) -> int: ...
    @property
    def strategy(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def k_min(self) -> int: ...
    @property
    def k_max(self) -> int: ...
