"""transformers integration: HybridCache, the ``"hybridgen"`` attention function, and patch()."""

from . import attention as _attention
from .cache import HybridCache, HybridLayer
from .models import SUPPORTED_MODEL_TYPES, describe, supports
from .patch import is_patched, patch, unpatch

__all__ = [
    "HybridCache",
    "HybridLayer",
    "SUPPORTED_MODEL_TYPES",
    "describe",
    "is_patched",
    "patch",
    "supports",
    "unpatch",
]

# Importing hybridgen.hf makes attn_implementation="hybridgen" available to from_pretrained.
_attention.register()
