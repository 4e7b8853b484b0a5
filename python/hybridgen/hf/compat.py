"""The transformers releases hybridgen supports, and the one place that knows how each of them
names the cache argument.

transformers 5.24 renamed ``generate()``/``forward()``'s ``past_key_values`` to ``cache`` (the old
name still works, with a FutureWarning; given both, the model keeps ``cache`` and silently drops
the other). Every call hybridgen makes, and every hook that reads a call's cache, goes through
:func:`cache_kwarg` / :func:`get_cache` / :func:`set_cache`, so one release or the other is served
by the same code.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Optional

#: The releases hybridgen is tested with: pyproject's ``hf`` extra says the same (a test checks),
#: and CI runs the integration tests at the lower bound and at the newest release allowed.
TRANSFORMERS_RANGE = ">=5.23,<6"

#: Every name a model call may carry its cache under, newest first.
CACHE_NAMES = ("cache", "past_key_values")


def transformers_version() -> Optional[str]:
    """The installed transformers version, or ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transformers")
    except PackageNotFoundError:
        return None


def version_problem() -> Optional[str]:
    """Why the installed transformers cannot serve hybridgen (``None``: it can)."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    found = transformers_version()
    if found is None:
        return f"transformers is not installed (hybridgen needs transformers{TRANSFORMERS_RANGE}: pip install 'hybridgen[hf]')"
    if Version(found) not in SpecifierSet(TRANSFORMERS_RANGE, prereleases=True):
        return (
            f"transformers {found} is outside the range hybridgen supports "
            f"(transformers{TRANSFORMERS_RANGE}): pip install 'transformers{TRANSFORMERS_RANGE}'"
        )
    return None


@functools.lru_cache(maxsize=None)
def cache_kwarg() -> str:
    """The keyword ``generate()`` and ``forward()`` take the cache under in this release (read
    off the signature generation hands the cache to the model through)."""
    from transformers import GenerationMixin

    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_arg(cache) -> dict:
    """``{name: cache}`` for a model call: ``model(ids, **cache_arg(cache))``."""
    return {cache_kwarg(): cache}


def get_cache(kwargs: dict) -> Any:
    """The cache a call's keyword arguments carry, under whichever name (the model keeps
    ``cache`` when both are given)."""
    for name in CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def set_cache(kwargs: dict, cache) -> None:
    """Gives the call ``cache`` under this release's name, and under that name only."""
    for name in CACHE_NAMES:
        kwargs.pop(name, None)
    kwargs[cache_kwarg()] = cache


def output_cache(output) -> Any:
    """The cache a model output returns (``output.cache`` or ``output.past_key_values``)."""
    for name in CACHE_NAMES:
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
