"""hybridgen's attention backend for vLLM: vLLM's own backend, plus hybrid decode.

The mixins here derive a backend from one of vLLM's: prefill and mixed batches take the
stock path unchanged; ``do_kv_cache_update`` (vLLM calls it with every new K/V row, since the
backend sets ``forward_includes_kv_cache_update = False``) also copies the rows into the plugin's
windows and host store; ``forward`` serves the decode rows of requests that have host tokens with
hybrid attention (:meth:`hybridgen.vllm.runtime.Runtime.decode`) and leaves every other row to
the stock kernel (a batch of such decode rows only never calls it).

- :class:`HybridCPUAttentionBackend` (here): from ``CPU_ATTN`` (vLLM's CPU platform honours only
  an override of ``CPU_ATTN``). Tested.
- :class:`hybridgen.vllm.flash.HybridFlashAttentionBackend`: from ``FLASH_ATTN``, registered as
  ``HYBRIDGEN`` on CUDA. **Unverified**: written against vLLM's source, never run on a GPU.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
from vllm.config import VllmConfig, get_layers_from_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention import Attention
from vllm.v1.attention.backend import AttentionType
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from . import blocks
from .blocks import HybridAttentionSpec, unsupported
from .runtime import Runtime, StepPlan, install
from .settings import CONNECTOR, ENV, ConfigError, is_set, load_config

__all__ = [
    "HybridBackendMixin",
    "HybridBuilderMixin",
    "HybridCPUAttentionBackend",
    "HybridImplMixin",
    "runtime_for",
    "unsupported",
]

log = logging.getLogger("vllm.plugins.hybridgen")

# One runtime per vLLM configuration (the builders of every KV cache group share it); the config
# is kept with it so that its id cannot be reused by another one.
_runtimes: dict[int, tuple[VllmConfig, Optional[Runtime]]] = {}


def runtime_for(vllm_config: VllmConfig, kv_cache_spec) -> Optional[Runtime]:
    """The :class:`Runtime` of ``vllm_config``'s model (made on first call), or ``None`` if its
    attention is not one the plugin serves, or the engine runs without hybridgen's connector and
    ``HYBRIDGEN_CONFIG`` is not set (vLLM's own attention then runs everywhere). With
    ``HYBRIDGEN_CONFIG`` set, an engine without the connector is a :class:`ConfigError`."""
    key = id(vllm_config)
    if key in _runtimes:
        return _runtimes[key][1]
    rt = None
    config, source = load_config()
    kv = vllm_config.kv_transfer_config
    connected = kv is not None and kv.kv_connector == CONNECTOR
    why = unsupported(vllm_config, kv_cache_spec)
    if not connected and is_set():
        raise ConfigError(
            f"{ENV} is set, but this vLLM engine runs without hybridgen's KV connector "
            f"({'none' if kv is None else kv.kv_connector!r}), so hybrid decode cannot tell requests apart; pass "
            "kv_transfer_config=hybridgen.vllm.kv_transfer_config() (vLLM's engine arguments get it by themselves "
            f"while {ENV} is set), or unset {ENV}"
        )
    if isinstance(kv_cache_spec, HybridAttentionSpec) and (why or not connected):
        # Cannot happen (the spec is chosen by the same checks); if it did, vLLM's attention
        # would read freed blocks.
        raise ConfigError(f"hybridgen: the KV spec frees blocks, but hybrid decode is off: {why or 'no connector'}")
    if why:
        log.warning("hybridgen: hybrid decode is off, vLLM's own attention runs: %s", why)
    elif not connected:
        log.info(
            "hybridgen: hybrid decode is off (%s not set, no %s configured): vLLM's own attention runs",
            ENV,
            CONNECTOR,
        )
    else:
        layers = list(get_layers_from_vllm_config(vllm_config, Attention))
        rt = install(
            Runtime(
                config,
                layers,
                kv_heads=kv_cache_spec.num_kv_heads,
                head_dim=kv_cache_spec.head_size,
                dtype=kv_cache_spec.dtype,
                max_requests=vllm_config.scheduler_config.max_num_seqs,
                max_tokens=vllm_config.model_config.max_model_len,
                engine_id=kv.engine_id,
                rank=_tp_rank(),
                frees_blocks=isinstance(kv_cache_spec, HybridAttentionSpec),
            )
        )
        tp = vllm_config.parallel_config.tensor_parallel_size
        log.info(
            "hybridgen: hybrid decode in %d attention layers (%d KV heads in this worker%s); %s; %s",
            len(layers),
            kv_cache_spec.num_kv_heads,
            f", tensor-parallel rank {rt.rank} of {tp}" if tp > 1 else "",
            source,
            "KV blocks between the sinks and the recent window are freed once a prompt is computed"
            if rt.frees_blocks
            else "vLLM keeps every KV block",
        )
    _runtimes[key] = (vllm_config, rt)
    return rt


def _tp_rank() -> Optional[int]:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank()
    except Exception:  # no distributed state (e.g. a bare test)
        return None


def _plan(attn_metadata) -> Optional[StepPlan]:
    return getattr(attn_metadata, "hybrid", None)


def _layer_plan(layer_name: str) -> Optional[StepPlan]:
    md = get_forward_context().attn_metadata
    if isinstance(md, list):  # speculative decoding's per-draft list: not served
        return None
    if isinstance(md, dict):
        md = md.get(layer_name)
    return _plan(md)


class HybridBuilderMixin:
    """Builds vLLM's metadata, then attaches the batch's :class:`StepPlan` as ``.hybrid``."""

    def __init__(self, kv_cache_spec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.hybrid_runtime = runtime_for(vllm_config, kv_cache_spec)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False):
        md = super().build(common_prefix_len, common_attn_metadata, fast_build)
        rt = self.hybrid_runtime
        if rt is not None:
            n = common_attn_metadata.num_reqs
            md.hybrid = rt.plan(
                common_attn_metadata.query_start_loc_cpu[: n + 1],
                common_attn_metadata.seq_lens[:n].cpu(),
                common_attn_metadata.slot_mapping.cpu(),
            )
        return md


class HybridImplMixin:
    """vLLM's attention, with hybrid decode for the rows whose requests have host tokens."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.hybrid_off = self._hybrid_off()
        if self.hybrid_off:
            log.warning("hybridgen: a layer takes vLLM's own attention: %s", self.hybrid_off)
        blocks.layer_made(self.hybrid_off)

    def _hybrid_off(self) -> str:
        if getattr(self, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            return f"attention type {self.attn_type}"
        if getattr(self, "kv_sharing_target_layer_name", None) is not None:
            return "KV cache shared with another layer"
        if getattr(self, "alibi_slopes", None) is not None:
            return "ALiBi"
        if getattr(self, "sliding_window", None) not in (None, -1, (-1, -1)):
            return "sliding window"
        if getattr(self, "logits_soft_cap", None) not in (None, 0):
            return "logits soft cap"
        if getattr(self, "sinks", None) is not None:
            return "learned attention sinks"
        if getattr(self, "kv_cache_dtype", "auto") != "auto":
            return f"KV cache dtype {self.kv_cache_dtype}"
        return ""

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        if not self.hybrid_off:
            plan = _layer_plan(layer.layer_name)
            if plan is not None:
                plan.runtime.record(layer.layer_name, plan, key, value)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args: Any, **kwargs: Any):
        plan = None if self.hybrid_off else _plan(attn_metadata)
        rows = plan.runtime.hybrid_rows(layer.layer_name, plan) if plan is not None else []
        if not rows or len(rows) < plan.num_rows:
            if plan is not None:
                plan.runtime.check_stock_rows(plan, rows)
            output = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        if plan is not None:
            plan.runtime.counters["stock_rows"] += plan.num_rows - len(rows)
        decode = [i for i in rows if plan.ends[i] - plan.starts[i] == 1]
        if decode:
            out = plan.runtime.decode(layer.layer_name, plan, decode, query, self.scale)
            idx = torch.tensor([plan.starts[i] for i in decode], device=output.device)
            output.index_copy_(0, idx, out.to(output.device, output.dtype).view(len(decode), *output.shape[1:]))
        for i in rows:
            if plan.ends[i] - plan.starts[i] > 1:  # a streamed prompt's chunk
                out = plan.runtime.prefill(layer.layer_name, plan, i, query, self.scale)
                b, e = plan.starts[i], plan.ends[i]
                output[b:e] = out.to(output.device, output.dtype).view(e - b, *output.shape[1:])
        return output


class HybridBackendMixin:
    """What a hybrid backend class adds to vLLM's: it sees every new K/V row (vLLM calls
    ``do_kv_cache_update`` apart from ``forward``), and its KV spec frees the blocks that hybrid
    decode serves from the host (:mod:`hybridgen.vllm.blocks`)."""

    forward_includes_kv_cache_update = False

    @classmethod
    def customize_spec(cls, spec):
        return blocks.freeing_spec(super().customize_spec(spec))


class HybridCPUAttentionMetadataBuilder(HybridBuilderMixin, CPUAttentionMetadataBuilder):
    """CPU_ATTN's metadata builder, plus the batch's :class:`StepPlan`."""


class HybridCPUAttentionBackendImpl(HybridImplMixin, CPUAttentionBackendImpl):
    """CPU_ATTN's attention, plus hybrid decode."""


class HybridCPUAttentionBackend(HybridBackendMixin, CPUAttentionBackend):
    """``CPU_ATTN`` with hybrid decode; registered as the ``CPU_ATTN`` override on CPU (the name
    stays ``CPU_ATTN``: vLLM's CPU platform and its checks know that one only)."""

    @staticmethod
    def get_impl_cls() -> type:
        return HybridCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type:
        return HybridCPUAttentionMetadataBuilder
