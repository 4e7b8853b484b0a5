"""lm-eval-harness model ``hybridgen``: a Hugging Face causal LM patched with hybrid attention.

``--model hybridgen --model_args pretrained=DIR,policy=scheduler,gpu_budget=512,...`` takes every
argument of lm-eval's ``hf`` model plus every :class:`~hybridgen.config.HybridConfig` field.

Scoring goes through the decode path. lm-eval's ``hf`` model scores a continuation with one
forward pass over context + continuation, which never runs a decode step, so the attention under
test would never be used. Here each request prefills its context but the last token with the
model's own attention into a fresh :class:`~hybridgen.HybridCache` (which places the KV: sinks
and recent tokens on the device, the rest on the host), then feeds the last context token and
every continuation token but the last one at a time: each scored token is predicted by a hybrid
decode step. Requests are scored one at a time (batch size 1): every request needs its own cache.

``generate_until`` is lm-eval's own: it calls the patched ``model.generate``, which decodes
through a fresh HybridCache per call (batch size 1, so no padding).
"""

from __future__ import annotations

import inspect
import logging
import typing
from dataclasses import fields
from typing import Optional

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from ..config import HybridConfig
from ..guard import require_hybrid_run
from ..hf import HybridCache, patch
from ..hf.compat import cache_arg

log = logging.getLogger(__name__)

#: model_args that configure hybrid attention (the rest go to lm-eval's ``hf`` model).
HYBRID_ARGS = tuple(f.name for f in fields(HybridConfig))
#: model_args lm-eval's ``hf`` model accepts by name.
HF_ARGS = tuple(
    name
    for name, p in inspect.signature(HFLM.__init__).parameters.items()
    if name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
)
assert not set(HYBRID_ARGS) & set(HF_ARGS), "a HybridConfig field shadows an lm-eval hf argument"


def hybrid_config(args: dict) -> HybridConfig:
    """A HybridConfig from model_args values (strings from a command line are converted to the
    field's type; HybridConfig itself checks the values, policy names included)."""
    hints = typing.get_type_hints(HybridConfig)
    return HybridConfig(**{name: _convert(name, value, hints[name]) for name, value in args.items()})


def _convert(name: str, value, hint):
    """``value`` as the type ``hint`` of field ``name`` (int, bool, str or Optional[int])."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    optional = type(None) in typing.get_args(hint)
    if optional and text.lower() == "none":
        return None
    base = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
    if base is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"model_args {name} must be true or false, got {value!r}")
    if base is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"model_args {name} must be an integer, got {value!r}") from None
    return text


def split_model_args(kwargs: dict) -> tuple[dict, dict]:
    """``(hybrid, hf)`` model_args; ValueError for a key neither accepts."""
    unknown = sorted(k for k in kwargs if k not in HYBRID_ARGS and k not in HF_ARGS)
    if unknown:
        raise ValueError(
            f"unknown model_args for hybridgen: {', '.join(unknown)}. Accepted: hybrid attention "
            f"({', '.join(HYBRID_ARGS)}) and lm-eval hf ({', '.join(HF_ARGS)})"
        )
    hybrid = {k: v for k, v in kwargs.items() if k in HYBRID_ARGS}
    hf = {k: v for k, v in kwargs.items() if k in HF_ARGS}
    return hybrid, hf


@register_model("hybridgen")
class HybridLM(HFLM):
    """lm-eval's ``hf`` model with hybrid attention; loglikelihoods through decode steps.

    Args:
        pretrained: model directory or hub id (default: the packaged SmolLM2-135M-Instruct,
            :func:`hybridgen.data.assets.smollm2`).
        device: default ``cuda`` when available, else ``cpu``.
        dtype: default ``float32``.
        batch_size: must be 1 (each request decodes through its own cache).
        **kwargs: :class:`~hybridgen.config.HybridConfig` fields (``policy``, ``gpu_budget``,
            ``sinks``, ``k``, ``k_min``, ``merge``, ...) and lm-eval ``hf`` model arguments.
    """

    def __init__(self, pretrained=None, device: Optional[str] = None, dtype="float32", batch_size=1, **kwargs):
        hybrid, hf = split_model_args(kwargs)
        # Checked before the model loads: a bad policy fails in a second, not after loading.
        config = hybrid_config(hybrid)
        if str(batch_size) != "1":
            raise ValueError(
                f"hybridgen scores one request at a time (each decodes through its own cache): "
                f"use batch_size=1, got {batch_size!r}"
            )
        if pretrained is None:
            from ..data.assets import smollm2

            pretrained = str(smollm2())
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        super().__init__(pretrained=pretrained, device=device, dtype=dtype, batch_size=1, **hf)
        if self.backend != "causal":
            raise ValueError("hybridgen evaluates decoder-only (causal) models only")
        self.hybrid_config = config
        patch(self._model, config)
        #: The cache of the last scored request (its telemetry shows what the decode steps did).
        self.last_cache = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """``(log-prob, is_greedy)`` of every ``(key, context_tokens, continuation_tokens)``."""
        results = []
        for key, context, continuation in tqdm(
            requests, disable=disable_tqdm or self.rank != 0, desc="Scoring through hybrid decode steps"
        ):
            answer = self.score(context, continuation)
            results.append(answer)
            if key is not None:  # None: a window of loglikelihood_rolling, cached per document
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Log-probability of ``continuation`` after ``context`` (token ids), and whether greedy
        decoding would have produced it; every continuation token is predicted by a decode step.

        Too long an input loses context tokens from the left (as lm-eval's ``hf`` model does).
        """
        if not context or not continuation:
            raise ValueError("context and continuation must each have at least one token")
        if len(continuation) > self.max_length:
            raise ValueError(f"continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
        context = context[-(self.max_length + 1 - len(continuation)) :]
        model, device = self._model, self.device
        dtype = self.softmax_dtype or torch.float32
        cache = self.last_cache = HybridCache(model)
        total, greedy = 0.0, True
        with torch.inference_mode():
            if len(context) > 1:
                prefix = torch.tensor([context[:-1]], dtype=torch.long, device=device)
                model(prefix, **cache_arg(cache), use_cache=True)
                feed = context[-1]  # the first decode step predicts the first continuation token
            else:
                # A one-token context has nothing to prefill: the model's own attention over that
                # token predicts the first continuation token.
                feed = None
                logits = model(torch.tensor([context], device=device), **cache_arg(cache), use_cache=True).logits
            for target in continuation:
                if feed is not None:
                    step = torch.tensor([[feed]], dtype=torch.long, device=device)
                    logits = model(step, **cache_arg(cache), use_cache=True).logits
                logprobs = torch.log_softmax(logits[0, -1].to(dtype), dim=-1)
                total += float(logprobs[target])
                greedy = greedy and int(logprobs.argmax()) == target
                feed = target
        # Every scored token came from a one-token step (a one-token context is one too).
        require_hybrid_run(
            cache,
            what=f"lm-eval scoring with policy {self.hybrid_config.policy}",
            decode_steps=len(continuation),
            context_tokens=len(context) - 1,
        )
        return total, greedy

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        info["hybridgen"] = self.hybrid_config.to_dict()
        return info
