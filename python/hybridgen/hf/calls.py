"""What the attention function needs to know about the model call in progress (transformers
does not hand it the cache): the active HybridCache and the patched call's state.

Context variables, so concurrent calls in threads or tasks never see each other's cache.
"""

from __future__ import annotations

import warnings
import weakref
from contextvars import ContextVar, Token
from typing import Optional

#: The HybridCache whose layer was updated last: the attention function reads it right after the
#: update of the same layer. Held weakly, so it never keeps a cache (and its host memory) alive;
#: a patched model's call restores it when it ends.
ACTIVE_CACHE: ContextVar[Optional[weakref.ref]] = ContextVar("hybridgen_active_cache", default=None)

#: ``(patch state, name of a non-hybrid cache type or None)`` of the patched model call in
#: progress: tells the attention function whether a decode step without a HybridCache is the
#: user's choice (they passed another cache) or a bypass (an error).
CURRENT_CALL: ContextVar[Optional[tuple]] = ContextVar("hybridgen_current_call", default=None)


def activate(cache) -> Token:
    """Makes ``cache`` the active one; returns the token that restores the previous one."""
    return ACTIVE_CACHE.set(None if cache is None else weakref.ref(cache))


def deactivate(token: Token) -> None:
    ACTIVE_CACHE.reset(token)


def active_cache():
    ref = ACTIVE_CACHE.get()
    return None if ref is None else ref()


def warn_foreign_cache(state, foreign: str) -> None:
    """Once per patch: a cache the user chose bypasses hybrid attention (their choice, but said)."""
    if not state.warned_foreign:
        state.warned_foreign = True
        warnings.warn(
            f"this patched model was called with a {foreign}, not a HybridCache: its own attention serves "
            "those decode steps, not hybridgen's (pass no cache, or a HybridCache, to use hybrid attention)",
            stacklevel=3,
        )
