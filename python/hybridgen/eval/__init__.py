"""Accuracy evaluation of hybrid attention against full attention."""

from .perplexity import PerplexityResult, decode_perplexity

__all__ = ["PerplexityResult", "decode_perplexity"]
