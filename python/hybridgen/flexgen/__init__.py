"""FlexGen drop-in: FlexGen 0.1.8's OPT decoding with hybridgen's hybrid attention.

One import and one call turn a FlexGen script into a hybrid one::

    import hybridgen.flexgen
    hybridgen.flexgen.patch(gpu_budget=1024, policy="scheduler")   # before FlexGen's generate()
    ...                                                          # the FlexGen script, unchanged
    hybridgen.flexgen.unpatch()                                  # FlexGen's own attention again

Each attention layer keeps the sinks and the most recent tokens on the GPU and every older token
in hybridgen's host store; each decode step the CPU attends over the host tokens and the GPU merges
the result with its own (see :mod:`hybridgen.flexgen.decode`). ``python -m hybridgen.flexgen`` is
FlexGen's ``flex_opt`` command line with the hybrid options added.

FlexGen itself is a dependency (``pip install 'hybridgen[flexgen]'``); this package imports it only
when :func:`patch` is called.
"""

from .compat import FLEXGEN_POLICIES
from .install import SUPPORTED_VERSION, flexgen_version
from .layer_cache import FlexGenLayerCache
from .patch import current_session, is_patched, patch, unpatch
from .session import Session

__all__ = [
    "FLEXGEN_POLICIES",
    "FlexGenLayerCache",
    "SUPPORTED_VERSION",
    "Session",
    "current_session",
    "flexgen_version",
    "is_patched",
    "patch",
    "unpatch",
]
