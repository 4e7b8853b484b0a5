"""``patch()`` / ``unpatch()``: FlexGen's decode attention replaced by hybrid attention, and back.

Four attributes change (each saved as the exact object found in the class ``__dict__``, and put
back by :func:`unpatch`):

* ``SelfAttention.init_cache_one_gpu_batch`` — the layer's cache home holds a one-element tuple
  with a :class:`~hybridgen.flexgen.layer_cache.FlexGenLayerCache` instead of FlexGen's ``(k_cache, v_cache)``
  (a tuple, so FlexGen's own ``delete_cache`` still frees it by calling ``delete()`` on each item);
* ``SelfAttention.load_cache`` — hands the state to the layer instead of copying the cache;
* ``SelfAttention.store_cache`` — places the prompt / commits the decoded token into the state;
* ``TorchDevice.mha_gen`` — runs :func:`~hybridgen.flexgen.decode.hybrid_mha_gen` when its
  ``k_cache`` is a state, FlexGen's own code otherwise.

Each replacement falls back to FlexGen's original for caches it did not make, so a model whose
cache was created before ``patch()`` keeps working.
"""

from __future__ import annotations

import functools
from typing import Optional

from ..config import HybridConfig
from .compat import FlexSettings, placement
from .install import require_flexgen
from .layer_cache import FlexGenLayerCache
from .session import Session

__all__ = ["patch", "unpatch", "is_patched", "current_session"]

#: (FlexGen module, class, attribute) of everything patch() replaces.
PATCHED = (
    ("pytorch_backend", "TorchDevice", "mha_gen"),
    ("flex_opt", "SelfAttention", "init_cache_one_gpu_batch"),
    ("flex_opt", "SelfAttention", "load_cache"),
    ("flex_opt", "SelfAttention", "store_cache"),
)

# The active patch: its session and the original class attributes, keyed by (class, name).
_session: Optional[Session] = None
_saved: dict = {}


def is_patched() -> bool:
    return _session is not None


def current_session() -> Optional[Session]:
    """The :class:`~hybridgen.flexgen.session.Session` of the active patch (``None`` if unpatched)."""
    return _session


def patch(config: Optional[HybridConfig] = None, **options) -> Session:
    """Makes FlexGen (0.1.8) decode OPT with hybrid attention.

    Pass a :class:`~hybridgen.HybridConfig` or its fields as keywords (``gpu_budget``, ``sinks``,
    ``policy`` in ``all``/``post_qkt``/``pre_qkt``/``scheduler``, ``k``, ``k_min``, ``k_max``,
    ``merge``, ``evict_chunk``, host tier capacities and NUMA nodes). Every ``OptLM.generate``
    that starts after the call uses it (FlexGen makes each layer's cache when ``generate`` starts).
    FlexGen's own policy options keep working, except those that contradict a token split
    (ValueError when ``generate`` starts; see :mod:`hybridgen.flexgen.compat`): without a
    ``gpu_budget`` keyword, cache percents that move cache off the GPU set the split; a
    ``HybridConfig`` counts as an explicit budget. Host tier capacities are for all layers and GPU
    batches together (one host store serves them all). Returns the :class:`~hybridgen.flexgen.session.Session` (telemetry, scheduler).

    Raises ImportError when FlexGen is missing or not 0.1.8, ValueError/TypeError for bad options,
    RuntimeError when already patched.
    """
    global _session
    flex_opt, backend = require_flexgen()
    if config is not None and options:
        raise TypeError("pass a HybridConfig or keyword options, not both")
    budget_given = config is not None or "gpu_budget" in options
    session = Session(HybridConfig(**options) if config is None else config, budget_given=budget_given)
    if _session is not None:
        raise RuntimeError("FlexGen is already patched with hybridgen: call hybridgen.flexgen.unpatch() first")

    from .decode import hybrid_mha_gen

    modules = {"flex_opt": flex_opt, "pytorch_backend": backend}
    classes = {name: getattr(modules[mod], name) for mod, name, _ in PATCHED}
    originals = {(cls, attr): vars(classes[cls])[attr] for _, cls, attr in PATCHED}
    replacements = _replacements(session, originals, hybrid_mha_gen)
    for (cls, attr), fn in replacements.items():
        setattr(classes[cls], attr, fn)
    _saved.update({(classes[cls], attr): obj for (cls, attr), obj in originals.items()})
    _session = session
    return session


def unpatch() -> None:
    """Restores FlexGen's own attributes (the very objects :func:`patch` found)."""
    global _session
    if _session is None:
        raise ValueError("FlexGen is not patched with hybridgen")
    for (cls, attr), obj in _saved.items():
        setattr(cls, attr, obj)
    _saved.clear()
    _session.finish_step()
    _session = None


def _is_state(home) -> bool:
    return isinstance(home, tuple) and len(home) == 1 and isinstance(home[0], FlexGenLayerCache)


def _replacements(session: Session, originals: dict, hybrid_mha_gen) -> dict:
    init_cache = originals["SelfAttention", "init_cache_one_gpu_batch"]
    load_cache = originals["SelfAttention", "load_cache"]
    store_cache = originals["SelfAttention", "store_cache"]
    mha_gen = originals["TorchDevice", "mha_gen"]
    cfg = session.config

    @functools.wraps(init_cache)
    def init_cache_one_gpu_batch(self, cache_home):
        policy, task, config = self.policy, self.task, self.config
        cache_len = task.prompt_len + task.gen_len - 1  # what FlexGen allocates per sequence
        sinks, gpu_budget = placement(
            cfg, FlexSettings.from_policy(policy), cache_len=cache_len, budget_given=session.budget_given
        )
        session.finish_step()  # a new generate(): its first step is a new step even at the same length
        cache = FlexGenLayerCache(
            session,
            self.layer_id,
            batch=policy.gpu_batch_size,
            n_head=config.n_head,
            head_dim=config.input_dim // config.n_head,
            max_tokens=task.prompt_len + task.gen_len,
            sinks=sinks,
            gpu_budget=gpu_budget,
            layers=config.num_hidden_layers,
            gpu_batches=policy.num_gpu_batches,
            device=getattr(self.compute, "dev", None),
        )
        cache_home.store((cache,))

    @functools.wraps(load_cache)
    def load_cache_(self, cache_home, cache_read_buf, i):
        if not _is_state(cache_home.val):
            return load_cache(self, cache_home, cache_read_buf, i)
        if i == 0:  # prefill: no cache to read
            return
        state = cache_home.val[0]
        cache_read_buf.store(((state, False), (state, False)))  # (k_cache, donate), (v_cache, donate)

    @functools.wraps(store_cache)
    def store_cache_(self, cache_home, cache_write_buf, i):
        if not _is_state(cache_home.val):
            return store_cache(self, cache_home, cache_write_buf, i)
        k_new, v_new = cache_write_buf.pop()
        if i == 0:
            cache_home.val[0].place_prompt(k_new.data, v_new.data)
        # A decode step's token was committed when its attention ran (hybrid_mha_gen).

    @functools.wraps(mha_gen)
    def mha_gen_(self, inputs, attention_mask, *rest):
        # FlexGen passes, after the mask: 10 weights, n_head, k_cache, v_cache, donate, and three
        # sparsity / compression options (positionally, flex_opt.SelfAttention.forward).
        *weights, n_head, k_cache, _, donate = rest[:14]
        if isinstance(k_cache, FlexGenLayerCache):
            return hybrid_mha_gen(self, inputs, attention_mask, *weights, n_head, k_cache, donate)
        return mha_gen(self, inputs, attention_mask, *rest)

    return {
        ("SelfAttention", "init_cache_one_gpu_batch"): init_cache_one_gpu_batch,
        ("SelfAttention", "load_cache"): load_cache_,
        ("SelfAttention", "store_cache"): store_cache_,
        ("TorchDevice", "mha_gen"): mha_gen_,
    }
