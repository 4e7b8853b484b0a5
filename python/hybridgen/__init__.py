"""hybridgen: CPU-GPU hybrid attention for long-context LLM decoding.

Recent KV stays on the device, older KV lives in NUMA-placed host memory
(:class:`HostKVStore`), the CPU computes attention logits (or a partial attention with its
log-sum-exp) over its tokens, and the device merges them with its own.
"""

from . import _native
from ._native import CapacityError, available_isas, isa, num_threads
from .config import HybridConfig
from .engine import Engine
from .host_store import HostKVStore, Tier
from .ops import merge_partials, topk


def __getattr__(name):
    # The transformers integration is imported on first use: the core needs only torch.
    if name in ("patch", "unpatch", "HybridCache", "supports"):
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'hybridgen' has no attribute {name!r}")


# Cargo.toml's version, compiled into the core; the wheel's metadata carries the same one.
__version__ = _native.__version__

__all__ = [
    "CapacityError",
    "Engine",
    "HostKVStore",
    "HybridCache",
    "HybridConfig",
    "Tier",
    "available_isas",
    "isa",
    "merge_partials",
    "num_threads",
    "patch",
    "supports",
    "topk",
    "unpatch",
]
