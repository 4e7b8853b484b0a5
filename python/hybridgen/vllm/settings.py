"""The plugin's configuration: a :class:`~hybridgen.config.HybridConfig` from ``HYBRIDGEN_CONFIG``.

``HYBRIDGEN_CONFIG`` holds a JSON object of ``HybridConfig`` fields, e.g.
``{"policy": "all", "gpu_budget": 64, "sinks": 4}``. Bad JSON, an unknown field or a bad value
raises :class:`ConfigError` when vLLM loads the plugin (start-up), never in the middle of serving.
Without the variable the defaults run, and the plugin logs which configuration that is.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Mapping, Optional

from ..config import HybridConfig

__all__ = ["ENV", "SUPPORTED_POLICIES", "ConfigError", "load_config"]

#: The environment variable the configuration comes from.
ENV = "HYBRIDGEN_CONFIG"
#: Policies the vLLM backend serves so far: every host token (exact), or the top ``k`` per head.
SUPPORTED_POLICIES = ("all", "post_qkt")


class ConfigError(ValueError):
    """``HYBRIDGEN_CONFIG`` is not a valid configuration for the vLLM plugin."""


def load_config(environ: Optional[Mapping[str, str]] = None) -> tuple[HybridConfig, str]:
    """``(config, source)``: the configuration from ``environ`` (default ``os.environ``) and a
    line saying where it came from. Raises :class:`ConfigError` with the reason."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV)
    if raw is None or not raw.strip():
        config = HybridConfig(policy="all")
        return config, f"{ENV} not set: defaults with policy 'all' ({_describe(config)})"
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{ENV} is not valid JSON ({e}): {raw!r}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{ENV} must be a JSON object of HybridConfig fields, got {type(values).__name__}: {raw!r}")
    known = {f.name for f in fields(HybridConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{ENV}: unknown field(s) {unknown}; HybridConfig fields are {sorted(known)}")
    values.setdefault("policy", "all")
    try:
        config = HybridConfig(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{ENV}: {e}") from None
    if config.policy not in SUPPORTED_POLICIES:
        raise ConfigError(
            f"{ENV}: policy {config.policy!r} is not served by the vLLM plugin yet; use one of {SUPPORTED_POLICIES}"
        )
    if config.merge != "lse":
        raise ConfigError(f"{ENV}: merge {config.merge!r} is not served by the vLLM plugin yet; use 'lse'")
    return config, f"{ENV}: {_describe(config)}"


def _describe(config: HybridConfig) -> str:
    parts = [f"policy={config.policy}", f"gpu_budget={config.gpu_budget}", f"sinks={config.sinks}"]
    parts.append(f"evict_chunk={config.evict_chunk}")
    if config.policy == "post_qkt":
        parts.append(f"k={config.k}")
    return ", ".join(parts)
