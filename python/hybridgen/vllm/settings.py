"""The plugin's configuration: a :class:`~hybridgen.config.HybridConfig` from ``HYBRIDGEN_CONFIG``.

``HYBRIDGEN_CONFIG`` holds a JSON object of ``HybridConfig`` fields, e.g.
``{"policy": "all", "gpu_budget": 64, "sinks": 4}``. Bad JSON, an unknown field or a bad value
raises :class:`ConfigError` when vLLM loads the plugin (start-up), never in the middle of serving.
With the variable set, the plugin also makes its KV connector vLLM's default (see
:mod:`hybridgen.vllm.plugin`): hybrid decode runs without further arguments. Without it, hybrid
decode runs (with the defaults below) only where vLLM is given the connector explicitly, and the
plugin logs which configuration runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import fields
from typing import Mapping, Optional

from ..config import HybridConfig

__all__ = [
    "CONNECTOR",
    "ENV",
    "SUPPORTED_POLICIES",
    "ConfigError",
    "is_set",
    "load_config",
    "slot_pages",
    "supported_predictors",
]

#: The environment variable the configuration comes from.
ENV = "HYBRIDGEN_CONFIG"
#: The name of the plugin's KV connector in vLLM's registry (:mod:`hybridgen.vllm.connector`).
CONNECTOR = "HybridgenConnector"
#: Policies the vLLM backend serves: every host token (exact), the top ``k`` per head after
#: scoring all (Post-QKT), ``k`` tokens chosen before scoring (Pre-QKT), and the feedback
#: scheduler switching between the two from the backend's measured step times.
SUPPORTED_POLICIES = ("all", "post_qkt", "pre_qkt", "scheduler")


def slot_pages() -> bool:
    """Whether this build's CPU stage over request slots (``HostKVStore.cpu_stage_slots``) takes
    a page selection (``pages``): page-summary Pre-QKT needs it."""
    from .. import _native

    return "pages=" in (getattr(_native.HostKVStore.cpu_stage_slots, "__text_signature__", None) or "")


def supported_predictors() -> tuple[str, ...]:
    """Pre-QKT predictors the vLLM backend serves with this build of hybridgen's core."""
    return ("pages", "positional") if slot_pages() else ("positional",)


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
    if config.policy in ("pre_qkt", "scheduler") and config.predictor not in supported_predictors():
        raise ConfigError(
            f"{ENV}: policy {config.policy!r} with predictor {config.predictor!r} is not served by the vLLM plugin "
            "with this build of hybridgen (its CPU stage over request slots, HostKVStore.cpu_stage_slots, takes no "
            'page selection); add "predictor": "positional"'
        )
    if config.speculative:
        raise ConfigError(
            f"{ENV}: speculative=true is not served by the vLLM plugin (vLLM's layers give no query estimate of "
            "the next layer); leave it false"
        )
    return config, f"{ENV}: {_describe(config)}"


def is_set(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether ``HYBRIDGEN_CONFIG`` is set (to something other than blanks): the user asks for
    hybrid decode, so a vLLM configuration that cannot run it is an error, not a fallback."""
    environ = os.environ if environ is None else environ
    return bool(environ.get(ENV, "").strip())


def _describe(config: HybridConfig) -> str:
    parts = [f"policy={config.policy}", f"gpu_budget={config.gpu_budget}", f"sinks={config.sinks}"]
    parts.append(f"evict_chunk={config.evict_chunk}")
    if config.policy in ("post_qkt", "pre_qkt"):
        parts.append(f"k={config.k}")
    if config.policy == "scheduler":
        parts.append(f"k_min={config.k_min}, k_max={config.k_max}")
    if config.policy in ("pre_qkt", "scheduler"):
        parts.append(f"predictor={config.predictor}")
    if config.pipeline:
        parts.append("pipeline")
    return ", ".join(parts)
