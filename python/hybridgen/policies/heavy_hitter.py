"""Score-based KV eviction baselines: ``h2o`` and ``keyformer``.

Both keep, per layer and KV head, a fixed budget on the device: the sinks, the ``gpu_budget``
most recent tokens and ``k`` "key" tokens chosen by an accumulated score. Every token's score
is the attention it has received so far (from every prompt query at prefill, then from every
decode query); when tokens leave the recent window they compete with the current key tokens and
the lowest-scoring ones are dropped for good (they are still written to the host store, but no
policy step ever reads them again).

- H2O (Zhang et al., 2023): the score is the accumulated softmax probability.
- Keyformer (Adnan et al., 2024): the score is accumulated from a Gumbel-regularised softmax
  ``softmax((x + ζ) / τ)``, ζ ~ Gumbel(0, 1), with the temperature τ rising linearly from 1 to 2
  over the first :data:`TAU_STEPS` decode steps — the noise keeps early high-scoring tokens from
  locking in the budget. The attention output itself uses the ordinary softmax.

With GQA the query heads of a group share their KV head's tokens, so scores are summed over the
group (one token set per KV head, as the shared value rows require).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..telemetry import StepRecord
from ..timing import timed
from .base import Policy, fetch_rows, grouped_logits, softmax_rows, weighted_values, with_chosen

#: Keyformer's temperature schedule length (decode steps from τ = 1 to τ = 2).
TAU_STEPS = 256
#: Queries per block when scoring the prompt (bounds the ``[b, hq, block, n]`` logits).
PROMPT_BLOCK = 256


@dataclass
class _HeavyHitters:
    acc: torch.Tensor  # [b, hkv, total] accumulated score of every logical position
    heavy: torch.Tensor  # [b, hkv, m] host indices of the key tokens, ascending (int64)
    keys: torch.Tensor  # [b, hkv, m, d] their rows on the device
    values: torch.Tensor
    host_seen: int = 0  # host tokens already considered


class HeavyHitterPolicy(Policy):
    names = ("h2o",)
    keeps = "sinks + `gpu_budget` recent + `k` heavy-hitter tokens per KV head on the device; the rest dropped"
    runs = "device"
    bus = "nothing (evicted tokens only leave)"

    needs_prompt_queries = True

    # --- scores ------------------------------------------------------------------------------
    def score(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """Score increments ``[b, hkv, n]`` from logits ``x`` and probabilities ``p`` ``[b, hkv, g, (q,) n]``."""
        return p.sum(dim=tuple(range(2, p.dim() - 1)))

    def _grow(self, tier, device, dtype) -> _HeavyHitters:
        """The layer's state with ``acc`` covering every logical position so far."""
        st = tier.policy_state
        b, hkv, d = tier.store.batch, self.info.kv_heads, self.info.head_dim
        if st is None:
            empty = torch.empty((b, hkv, 0, d), dtype=dtype, device=device)
            st = _HeavyHitters(
                torch.zeros((b, hkv, 0), device=device),
                torch.empty((b, hkv, 0), dtype=torch.long),
                empty,
                empty.clone(),
            )
            tier.policy_state = st
        if st.acc.shape[-1] < tier.total:
            pad = torch.zeros((b, hkv, tier.total - st.acc.shape[-1]), device=st.acc.device)
            st.acc = torch.cat([st.acc, pad], dim=-1)
        return st

    def prefill(self, tier, query, key, value, keep, scale) -> None:
        """Accumulates the score every prompt query gives every token (blocks of queries)."""
        b, hq, nq, d = query.shape
        hkv, n = key.shape[1], key.shape[2]
        st = self._grow(tier, key.device, key.dtype)
        inc = torch.zeros((b, hkv, n), device=key.device)
        for lo in range(0, nq, PROMPT_BLOCK):
            hi = min(lo + PROMPT_BLOCK, nq)
            qb = query[:, :, lo:hi].float().reshape(b, hkv, hq // hkv, hi - lo, d)
            x = torch.matmul(qb, key.float().unsqueeze(2).transpose(-1, -2)) * scale  # [b, hkv, g, c, n]
            own = torch.arange(lo, hi, device=key.device) + (n - nq)  # query i of the block sits at n - nq + i
            ignore = torch.arange(n, device=key.device) > own.unsqueeze(1)  # causal, [c, n]
            if keep is not None:
                # Padding is never attended to, and a padding query hands out no score.
                keep = keep.to(key.device)
                ignore = ignore | ~keep[:, None, :] | ~keep[:, own, None]  # [b, c, n]
            x = x.masked_fill(ignore.view(-1, 1, 1, hi - lo, n), float("-inf"))
            inc += self.score(x, softmax_rows(x))
        st.acc[..., :n] += inc

    # --- decode ------------------------------------------------------------------------------
    def _admit(self, tier, st: _HeavyHitters, n_host: int, device) -> None:
        """New host tokens compete with the key tokens; the ``k`` best stay, the rest are dropped."""
        if n_host == st.host_seen:
            return
        b, hkv = st.acc.shape[:2]
        s = tier.sinks_on_device
        new = torch.arange(st.host_seen, n_host).expand(b, hkv, -1)
        cand = torch.cat([st.heavy, new], dim=-1)
        if cand.shape[-1] > self.config.k:
            scores = st.acc.cpu().gather(2, cand + s)
            best = scores.topk(self.config.k, dim=-1).indices
            cand = cand.gather(2, best).sort(dim=-1).values
        st.heavy, st.host_seen = cand, n_host
        st.keys, st.values = fetch_rows(tier.store, tier.layer_idx, cand, device)

    def decode(self, tier, q, keep, scale, step):
        n_host = tier.host_tokens
        st = self._grow(tier, q.device, tier.keys.dtype)
        _, t_tx = timed(lambda: self._admit(tier, st, n_host, q.device), q.device)

        def attend():
            keys, values, pos, ignore = with_chosen(tier, st.heavy, st.keys, st.values, keep)
            x = grouped_logits(q, keys, scale, ignore)
            p = softmax_rows(x)
            st.acc.scatter_add_(2, pos.to(st.acc.device), self.score(x, p))
            return weighted_values(p, values)

        out, t_dev = timed(attend, q.device)
        return out, StepRecord(
            step=step,
            layer=tier.layer_idx,
            k=st.heavy.shape[-1],
            strategy=self.name,
            host_tokens=n_host,
            device_tokens=tier.keys.shape[-2],
            t_cpu=0.0,
            t_gpu=t_dev,
            t_tx=t_tx,
        )


class KeyformerPolicy(HeavyHitterPolicy):
    names = ("keyformer",)
    keeps = "sinks + `gpu_budget` recent + `k` key tokens per KV head (Gumbel-regularised score) on the device; the rest dropped"

    def __init__(self, config, info, worker=None):
        super().__init__(config, info, worker)
        self.steps = 0  # decode steps so far (drives the temperature)
        self.generator: Optional[torch.Generator] = None

    def observe(self, t_gpu, t_cpu, t_tx) -> None:
        self.steps += 1

    def score(self, x, p):
        if self.generator is None or self.generator.device != x.device:
            self.generator = torch.Generator(device=x.device).manual_seed(0)  # reproducible runs
        tau = 1.0 + min(self.steps, TAU_STEPS) / TAU_STEPS
        u = torch.rand(x.shape, generator=self.generator, device=x.device).clamp_(1e-20, 1.0)
        gumbel = -torch.log(-torch.log(u))
        noisy = softmax_rows((x + gumbel) / tau)
        return super().score(x, noisy)
