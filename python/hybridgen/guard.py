"""Proof that a run went through hybrid attention, for everything that reports on one.

A patched model can run its own attention without anyone noticing: a cache passed under a name
the model ignores, a cache swapped for another, a layer the attention function could not find.
Its output is then full attention's, and a comparison with full attention is a comparison of a
path with itself. :func:`require_hybrid_run` checks what the cache itself counted (decode steps
its policy ran, tokens on the host) and raises :class:`HybridPathError` when the run is not what
its report would claim. ``python -m hybridgen generate``, ``bench`` and ``eval`` all call it.
"""

from __future__ import annotations

from typing import Optional

__all__ = ["HybridPathError", "require_hybrid_run"]


class HybridPathError(RuntimeError):
    """A step that should have run hybrid attention did not."""


def require_hybrid_run(
    cache,
    *,
    what: str,
    decode_steps: Optional[int] = None,
    context_tokens: Optional[int] = None,
    policy: Optional[str] = None,
) -> None:
    """Raises :class:`HybridPathError` unless ``cache`` (a :class:`~hybridgen.HybridCache`, or
    ``None`` when the run made none) ran its policy as expected.

    Args:
        what: names the run in the message (e.g. ``"generate with policy scheduler"``).
        decode_steps: decode steps the run made; each must have gone through the policy in every
            layer. ``None``: at least one.
        context_tokens: tokens in the context; when they exceed what the policy keeps on the
            device, the host tier must hold the rest.
        policy: the policy the run reports on; the cache must have served that one.
    """
    if cache is None:
        raise HybridPathError(f"{what}: no HybridCache served the run (the model ran its own attention)")
    if policy is not None and cache.config.policy != policy:
        raise HybridPathError(f"{what}: the cache ran policy {cache.config.policy!r}, not {policy!r}")
    ran = cache.decode_steps
    if ran == 0 or (decode_steps is not None and ran != decode_steps):
        wanted = "at least one" if decode_steps is None else str(decode_steps)
        raise HybridPathError(
            f"{what}: the HybridCache's policy {cache.config.policy!r} ran {ran} decode steps, expected {wanted}: "
            "the model's own attention served the others (was the cache passed under another keyword, or replaced?)"
        )
    per_layer = cache.policy_calls()
    if any(n != ran for n in per_layer):
        raise HybridPathError(
            f"{what}: decode steps per layer differ ({per_layer}); every layer must run the policy each step"
        )
    placement = cache.placement
    if context_tokens is not None and placement.recent is not None:
        on_device = placement.sinks + placement.recent + placement.evict_chunk
        host = cache.host_tokens(0)
        if context_tokens > on_device and host == 0:
            raise HybridPathError(
                f"{what}: the context has {context_tokens} tokens, more than the {on_device} the device tier keeps, "
                "but the host tier is empty"
            )
