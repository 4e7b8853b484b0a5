"""**Unverified** (written against vLLM's source; no GPU has run it): hybridgen's backend on CUDA,
``FLASH_ATTN`` with hybrid decode, registered under its own name ``HYBRIDGEN`` (select it with
vLLM's attention backend option).

The same mixins as the CPU backend (:mod:`hybridgen.vllm.backend`): windows stay on the GPU, the
CPU stage reads the host store, the merge runs on the GPU. Known gaps: CUDA graphs capture neither
the Python bookkeeping of ``do_kv_cache_update`` nor the per-row decode (run with
``enforce_eager=True``); the plan reads ``seq_lens`` and ``slot_mapping`` back to the host each
step (a synchronisation).
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from .backend import HybridBackendMixin, HybridBuilderMixin, HybridImplMixin

__all__ = ["HybridFlashAttentionBackend"]


class HybridFlashAttentionMetadataBuilder(HybridBuilderMixin, FlashAttentionMetadataBuilder):
    """FLASH_ATTN's metadata builder, plus the batch's plan (unverified)."""


class HybridFlashAttentionImpl(HybridImplMixin, FlashAttentionImpl):
    """FLASH_ATTN's attention, plus hybrid decode (unverified)."""


class HybridFlashAttentionBackend(HybridBackendMixin, FlashAttentionBackend):
    """FLASH_ATTN with hybrid decode, named ``HYBRIDGEN`` (unverified)."""

    @staticmethod
    def get_name() -> str:
        return "HYBRIDGEN"

    @staticmethod
    def get_impl_cls() -> type:
        return HybridFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type:
        return HybridFlashAttentionMetadataBuilder
