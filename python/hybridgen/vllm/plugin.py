"""The ``vllm.general_plugins`` entry point: registers hybridgen's attention backend and connector.

vLLM calls :func:`register` in every process it starts (possibly more than once): it validates
``HYBRIDGEN_CONFIG`` (a bad one stops start-up with the reason), then registers

- on vLLM's CPU platform: :class:`~hybridgen.vllm.backend.HybridCPUAttentionBackend` as the
  override of ``CPU_ATTN`` (the only backend that platform selects);
- on CUDA (**unverified**, no GPU has run it): :class:`~hybridgen.vllm.flash.HybridFlashAttentionBackend`
  under its own name ``HYBRIDGEN``;
- the ``HybridgenConnector`` KV connector (request ids and finished requests; see
  :mod:`hybridgen.vllm.connector`).
"""

from __future__ import annotations

import logging

from .settings import load_config

__all__ = ["CONNECTOR", "register"]

log = logging.getLogger("vllm.plugins.hybridgen")

CPU_BACKEND = "hybridgen.vllm.backend.HybridCPUAttentionBackend"
CUDA_BACKEND = "hybridgen.vllm.flash.HybridFlashAttentionBackend"
CONNECTOR = "HybridgenConnector"


def register() -> None:
    """Registers the backend for the current platform and the connector (idempotent)."""
    _, source = load_config()  # raises ConfigError at start-up, not mid-request
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if current_platform.is_cpu():
        register_backend(AttentionBackendEnum.CPU_ATTN, CPU_BACKEND)
        where = "CPU_ATTN override"
    elif current_platform.is_cuda():
        # Unverified branch: selected with vLLM's attention backend option "HYBRIDGEN".
        if "HYBRIDGEN" not in AttentionBackendEnum.__members__:
            register_backend("HYBRIDGEN", CUDA_BACKEND)
        where = "backend HYBRIDGEN (CUDA, unverified)"
    else:
        log.warning("hybridgen: platform %s is not served; vLLM's own attention runs", type(current_platform).__name__)
        return
    _register_connector()
    log.info("hybridgen: registered the %s; %s", where, source)


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR, "hybridgen.vllm.connector", "HybridgenConnector")
