"""What every accuracy evaluation shares: the texts, the model, and one token-budget rule.

Same token budget for every policy: each keeps the sinks plus ``gpu_budget`` recent tokens on
the device and may use ``k`` more tokens. The selective policies (``post_qkt``, ``pre_qkt``,
``h2o``, ``keyformer``, ``infinigen``) spend those ``k`` on tokens they choose; ``streaming``
spends them on a longer window (``gpu_budget + k``); the exact policies attend to everything;
``scheduler`` adapts K from ``k_min`` (the profiled K_min) upward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..config import HybridConfig

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


def policy_config(
    policy: str, *, gpu_budget: int, k: int, sinks: int = 4, context: int, k_min: Optional[int] = None
) -> HybridConfig:
    """The configuration of ``policy`` under the shared token budget."""
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
        **{"gpu_budget": gpu_budget, "sinks": sinks, "policy": policy, "k": k, "max_context": context + 64, **extra}
    )


def load_model(path: Optional[str], device: Optional[str] = None):
    """``(model, tokenizer)`` in float32 on the CPU (bfloat16 on CUDA); SmolLM2-135M by default."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data.assets import smollm2

    path = path or str(smollm2())
    if not Path(path).exists():
        raise FileNotFoundError(f"--model {path}: no such model directory")
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
