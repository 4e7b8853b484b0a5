"""Multiple-choice accuracy measured through the decode path.

The project's own suite (``data/choices.jsonl``) holds short physical-commonsense, cause/effect
and entailment items. Each line is one JSON object
``{"id", "kind", "context", "choices", "label"}``; the text scored for choice ``i`` is
``" " + choices[i]`` right after ``context``.

Scoring a choice = the log-likelihood of its tokens given the context. Unlike the usual
one-forward-pass scoring, every scored token here is predicted by a decode step: the context
minus its last token is prefilled into a fresh cache, then the last context token and the
choice's tokens are fed one at a time. So with a :class:`~hybridgen.config.HybridConfig` each
prediction runs hybrid attention over a cache whose older tokens sit in the host tier (even a
one-token answer such as ``yes`` is predicted by a decode step), and ``config=None`` scores the
model's own attention with a ``DynamicCache``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..config import HybridConfig
from ..guard import require_hybrid_run
from ..hf.compat import cache_arg

#: Kinds of item in a suite, in reporting order.
KINDS = ("physical", "cause_effect", "entailment")
_KEYS = ("id", "kind", "context", "choices", "label")
#: Entailment items answer with one of these pairs (in this order), so a suite stays uniform.
_ENTAILMENT_CHOICES = (["yes", "no"], ["true", "false"])


def default_path() -> Path:
    """The packaged suite (shipped next to this module)."""
    return Path(__file__).resolve().parent / "data" / "choices.jsonl"


@dataclass(frozen=True)
class ChoiceItem:
    id: str
    kind: str
    context: str
    choices: tuple[str, ...]
    label: int


# --- loading -------------------------------------------------------------------------------------
def _check_text(value, what: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {what} must be a non-empty string, got {value!r}")
    if value != value.strip():
        # The scored text is context + " " + choice: stray whitespace at either side would
        # change the tokens at the boundary.
        raise ValueError(f"{where}: {what} must not start or end with whitespace: {value!r}")
    return value


def _parse_line(line: str, where: str) -> ChoiceItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in _KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {missing}; every item needs {list(_KEYS)}")
    extra = sorted(set(obj) - set(_KEYS))
    if extra:
        raise ValueError(f"{where}: unknown key(s) {extra}; an item has exactly {list(_KEYS)}")
    item_id = _check_text(obj["id"], "id", where)
    kind = obj["kind"]
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}, expected one of {KINDS}")
    context = _check_text(obj["context"], "context", where)
    choices = obj["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"{where}: choices must be a list of at least 2 strings, got {choices!r}")
    for i, choice in enumerate(choices):
        _check_text(choice, f"choice {i}", where)
    if len(set(choices)) != len(choices):
        raise ValueError(f"{where}: choices repeat: {choices!r}")
    if kind == "entailment" and choices not in _ENTAILMENT_CHOICES:
        raise ValueError(f"{where}: entailment choices must be one of {_ENTAILMENT_CHOICES}, got {choices!r}")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: label must be an integer, got {label!r}")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label} out of range for {len(choices)} choices")
    return ChoiceItem(id=item_id, kind=kind, context=context, choices=tuple(choices), label=label)


def _kinds_filter(kinds) -> Optional[set[str]]:
    if kinds is None:
        return None
    wanted = {kinds} if isinstance(kinds, str) else set(kinds)
    unknown = sorted(k for k in wanted if k not in KINDS)
    if unknown:
        raise ValueError(f"unknown kind(s) {unknown}, expected some of {KINDS}")
    if not wanted:
        raise ValueError(f"kinds is empty: give some of {KINDS} or None for all")
    return wanted


def load_suite(path: Union[str, Path, None] = None, kinds: Union[str, Iterable[str], None] = None) -> list[ChoiceItem]:
    """Items of a suite file (default: the packaged one), in file order.

    Every line is validated (blank lines are skipped); a bad one raises ValueError naming the
    file and line. ``kinds`` keeps only items of those kinds (one kind may be given as a string).
    """
    wanted = _kinds_filter(kinds)
    path = default_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no multiple-choice suite at {path}")
    items: list[ChoiceItem] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            item = _parse_line(line, where)
            if item.id in seen:
                raise ValueError(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = lineno
            if wanted is None or item.kind in wanted:
                items.append(item)
    if not items:
        which = "" if wanted is None else f" of kind(s) {sorted(wanted)}"
        raise ValueError(f"{path} holds no items{which}")
    return items


# --- tokens --------------------------------------------------------------------------------------
def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context_ids, continuation_ids)`` whose concatenation is the tokenisation of
    ``context + continuation``.

    Both ``context`` and ``context + continuation`` are tokenised (as the tokenizer does by
    default, so a leading BOS stays on the context); the context part is their longest common
    prefix. Where a tokenizer merges characters across the boundary (the last context token
    absorbs the start of the continuation), the merged token counts as continuation: it is then
    scored too, a slight over-count, but the scored text is exactly what the model would read.
    """
    ctx = _encode(tokenizer, context)
    whole = _encode(tokenizer, context + continuation)
    n = 0
    for a, b in zip(ctx, whole):
        if a != b:
            break
        n += 1
    if n == len(whole):
        raise ValueError(f"continuation {continuation!r} adds no tokens after the context")
    if n == 0:
        raise ValueError(
            f"context {context[:40]!r} shares no first token with context + continuation: nothing to prefill"
        )
    return whole[:n], whole[n:]


# --- results -------------------------------------------------------------------------------------
@dataclass
class ItemScore:
    id: str
    kind: str
    label: int
    #: Summed log-likelihood (nats) of each choice's continuation tokens.
    logliks: tuple[float, ...]
    #: Continuation tokens scored per choice.
    tokens: tuple[int, ...]
    #: Characters of each choice (without the separating space): the length normalisation.
    chars: tuple[int, ...]

    @property
    def pred(self) -> int:
        """The choice of highest total log-likelihood."""
        return max(range(len(self.logliks)), key=lambda i: self.logliks[i])

    @property
    def pred_norm(self) -> int:
        """The choice of highest log-likelihood per character (does not favour short answers)."""
        return max(range(len(self.logliks)), key=lambda i: self.logliks[i] / self.chars[i])

    @property
    def correct(self) -> bool:
        return self.pred == self.label

    @property
    def correct_norm(self) -> bool:
        return self.pred_norm == self.label


@dataclass
class ChoiceResult:
    policy: str
    items: list[ItemScore]

    @property
    def acc(self) -> float:
        return sum(s.correct for s in self.items) / len(self.items)

    @property
    def acc_norm(self) -> float:
        return sum(s.correct_norm for s in self.items) / len(self.items)

    def metrics(self) -> dict[str, dict]:
        """``{"all" | kind: {"n", "acc", "acc_norm"}}`` for the whole run and each kind in it."""
        groups = {"all": self.items}
        for kind in KINDS:
            of_kind = [s for s in self.items if s.kind == kind]
            if of_kind:
                groups[kind] = of_kind
        return {
            name: {
                "n": len(group),
                "acc": sum(s.correct for s in group) / len(group),
                "acc_norm": sum(s.correct_norm for s in group) / len(group),
            }
            for name, group in groups.items()
        }

    def format(self) -> str:
        return "\n".join(
            f"{self.policy:>10} {name:>13}: acc {m['acc']:.3f}  acc_norm {m['acc_norm']:.3f}  (n={m['n']})"
            for name, m in self.metrics().items()
        )


# --- scoring -------------------------------------------------------------------------------------
def _continuation_loglik(model, ids: list[int], n_context: int, make_cache) -> float:
    """Log-likelihood of ``ids[n_context:]``: prefill ``ids[:n_context - 1]``, then one decode
    step per token from the last context token on, so every scored token is a decode step's
    prediction."""
    device = model.device
    seq = torch.tensor([ids], dtype=torch.long, device=device)
    cache = make_cache()
    if n_context > 1:
        model(seq[:, : n_context - 1], **cache_arg(cache), use_cache=True)
    total = 0.0
    for t in range(n_context - 1, len(ids) - 1):
        logits = model(seq[:, t : t + 1], **cache_arg(cache), use_cache=True).logits[0, -1]
        total += torch.log_softmax(logits.float(), -1)[ids[t + 1]].item()
    from ..hf import HybridCache

    if isinstance(cache, HybridCache) and len(ids) - n_context > 0:
        require_hybrid_run(
            cache, what=f"multiple choice with policy {cache.config.policy}", decode_steps=len(ids) - n_context
        )
    return total


def score_items(
    model, tokenizer, items: Sequence[ChoiceItem], config: Optional[HybridConfig] = None, progress: bool = False
) -> ChoiceResult:
    """Scores every choice of every item through the decode path (see the module docstring).

    With ``config`` the model is patched for the run and unpatched afterwards (it must not be
    patched already); ``None`` scores the model's own attention, which needs an unpatched model.
    """
    from transformers import DynamicCache

    from ..hf import HybridCache, is_patched, patch, unpatch

    items = list(items)
    if not items:
        raise ValueError("no items to score")
    for item in items:
        if not isinstance(item, ChoiceItem):
            raise TypeError(f"items must be ChoiceItem (see load_suite), got {type(item).__name__}")
    if config is not None and not isinstance(config, HybridConfig):
        raise TypeError(f"config must be a HybridConfig or None, got {type(config).__name__}")
    if config is None and is_patched(model):
        raise ValueError(
            "config=None scores the model's own attention, but the model is patched: call hybridgen.unpatch(model) first"
        )
    # Tokenise before patching: a tokenizer problem should not leave work half done.
    encoded = [[split_continuation(tokenizer, item.context, " " + c) for c in item.choices] for item in items]

    policy = config.policy if config is not None else "full"
    if config is not None:
        patch(model, config)
    try:
        make_cache = (lambda: HybridCache(model)) if config is not None else DynamicCache
        scores = []
        with torch.inference_mode():
            for item, pairs in tqdm(
                list(zip(items, encoded)), desc=f"choices ({policy})", leave=False, disable=not progress
            ):
                logliks = tuple(_continuation_loglik(model, ctx + cont, len(ctx), make_cache) for ctx, cont in pairs)
                scores.append(
                    ItemScore(
                        id=item.id,
                        kind=item.kind,
                        label=item.label,
                        logliks=logliks,
                        tokens=tuple(len(cont) for _, cont in pairs),
                        chars=tuple(len(c) for c in item.choices),
                    )
                )
    finally:
        if config is not None:
            unpatch(model)
    for s in scores:
        if not all(math.isfinite(x) for x in s.logliks):
            raise FloatingPointError(f"item {s.id}: non-finite log-likelihood {s.logliks}")
    return ChoiceResult(policy=policy, items=scores)
