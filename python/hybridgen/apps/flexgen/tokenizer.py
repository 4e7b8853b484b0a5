"""The tokenizer FlexGen's ``run_flexgen`` uses, made replaceable.

``run_flexgen`` always loads ``facebook/opt-30b``'s tokenizer from the Hugging Face hub. The
wrapper lets the user name another one (a local directory works offline), and for ``_DUMMY_``
weights — all ones, timing only, the output is never decoded — offers a stand-in that turns text
into token ids without any download.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace
from typing import Optional

from .options import STAND_IN

__all__ = ["StandInTokenizer", "use_tokenizer"]


class StandInTokenizer:
    """UTF-8 bytes as token ids (offset past OPT's special ids), left-padded or cut to
    ``max_length`` — exactly the prompt lengths a timing run asks for."""

    pad_token_id = 1
    bos_token_id = 2
    offset = 4

    def __call__(self, texts, padding=None, max_length=None, **_):
        rows = []
        for text in [texts] if isinstance(texts, str) else texts:
            ids = [self.bos_token_id] + [self.offset + byte for byte in text.encode("utf-8")]
            if max_length is not None:
                ids = ids[-max_length:]
                if padding == "max_length":
                    ids = [self.pad_token_id] * (max_length - len(ids)) + ids
            rows.append(ids)
        return SimpleNamespace(input_ids=rows)

    def batch_decode(self, *_, **__):
        raise RuntimeError(f"the {STAND_IN} tokenizer cannot decode: it only serves _DUMMY_ weights")


class _Loader:
    """Stands in for ``transformers.AutoTokenizer`` inside ``flex_opt``."""

    def __init__(self, original, name: str):
        self.original, self.name = original, name

    def from_pretrained(self, _requested, **kwargs):
        if self.name == STAND_IN:
            return StandInTokenizer()
        return self.original.from_pretrained(self.name, **kwargs)


@contextmanager
def use_tokenizer(flex_opt, name: Optional[str]):
    """Within the block, ``flex_opt.run_flexgen`` loads tokenizer ``name`` (``None``: FlexGen's own)."""
    if name is None:
        yield
        return
    original = flex_opt.AutoTokenizer
    flex_opt.AutoTokenizer = _Loader(original, name)
    try:
        yield
    finally:
        flex_opt.AutoTokenizer = original
