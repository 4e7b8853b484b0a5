"""hybridgen for vLLM: a general plugin whose attention backend serves decode with hybrid attention.

Install ``hybridgen[vllm]`` next to vLLM; vLLM loads the plugin by itself (entry point
``vllm.general_plugins``: :func:`hybridgen.vllm.plugin.register`). Then set
``HYBRIDGEN_CONFIG='{"policy": "all", "gpu_budget": 1024, "sinks": 4}'`` (fields of
:class:`hybridgen.HybridConfig`; :mod:`hybridgen.vllm.settings`) and run vLLM as usual::

    llm = vllm.LLM(model)          # or: vllm serve MODEL / python -m hybridgen.vllm serve MODEL

While ``HYBRIDGEN_CONFIG`` is set the plugin's KV connector is vLLM's default; without it, pass
``kv_transfer_config=hybridgen.vllm.kv_transfer_config()`` to run the defaults. Each request keeps
its sinks and its ``gpu_budget`` most recent tokens per layer in the backend's windows, and every
older token in a slot of hybridgen's host store; decode steps of requests with host tokens attend
to both, merged by log-sum-exp, over the host tokens the policy selects (``all``, ``post_qkt``,
``pre_qkt``, ``scheduler``). :func:`stats` counts what ran (``HYBRIDGEN_VLLM_STATS=DIR`` writes
the counters of vLLM's engine processes to files). See ``README.md`` in this folder.

Importing this package does not import vLLM (the backend and connector modules do).
Modules: ``settings`` (configuration), ``window`` (one request's device rows in one layer),
``runtime`` (slots, windows, hybrid decode; no vLLM import), ``backend`` (the vLLM backend, CPU),
``flash`` (the CUDA backend, unverified), ``blocks`` (the KV spec and manager that free a
request's blocks between its sinks and its window), ``connector`` (request ids, finished requests),
``plugin`` (the entry point, the default connector), ``serve`` (``python -m hybridgen.vllm serve``).
"""

from __future__ import annotations

from .runtime import stats
from .settings import ConfigError, load_config

__all__ = ["ConfigError", "kv_transfer_config", "load_config", "stats"]


def kv_transfer_config() -> dict:
    """vLLM's ``kv_transfer_config`` that enables the plugin's connector (request lifecycle)."""
    return {
        "kv_connector": "HybridgenConnector",
        "kv_role": "kv_both",
        "kv_connector_module_path": "hybridgen.vllm.connector",
    }
