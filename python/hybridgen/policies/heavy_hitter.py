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

Scoring the prompt is quadratic, so :meth:`HeavyHitterPolicy.prefill` only does the causal half:
a block of queries ``[lo, hi)`` meets only the keys before its last query, the block's length is
chosen so that its logits stay within :data:`PROMPT_BLOCK_BYTES` (longer blocks while the key
prefix is short), and each block's softmax is summed over the group and the block's queries at
once (padding queries weighted 0). The scores are those of the full masked softmax up to float32
rounding (summation order, and the scale applied to the queries rather than to the logits),
whatever the block size. Keyformer draws its noise for the entries the blocks compute, from the
same seeded generator: the distribution and a run's reproducibility do not depend on the blocks,
but which draw a given (query, key) entry gets does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..telemetry import StepRecord
from ..timing import timed
from .base import Policy, fetch_rows, grouped_logits, softmax_rows, weighted_values, with_chosen

#: Keyformer's temperature schedule length (decode steps from τ = 1 to τ = 2).
TAU_STEPS = 256
#: Bytes of float32 logits per block of prompt queries (``[b, hq, block, prefix]``), by device
#: type (any other: ``"cuda"``'s). The CPU's are small, so the softmax and the sum re-read them
#: from cache: 4-8 MiB were fastest, 32 MiB and more 2-4x slower (one thread, 4K-16K tokens,
#: ``benchmarks/prompt_scoring.py --budget-mb``); a GPU's are larger, for fewer kernel launches
#: (not measured yet).
PROMPT_BLOCK_BYTES = {"cpu": 8 << 20, "cuda": 128 << 20}


def prompt_blocks(nq: int, before: int, row_bytes: int, budget: int):
    """Query blocks ``(lo, hi)`` covering ``nq`` prompt queries that follow ``before`` cached tokens,
    each as long as its logits ``[block, before + hi]`` of ``row_bytes`` per entry allow within
    ``budget`` bytes (at least one query per block; the first block is the longest)."""
    cap = max(budget // row_bytes, 1)  # entries c · (base + c)
    lo = 0
    while lo < nq:
        base = before + lo
        c = max((math.isqrt(base * base + 4 * cap) - base) // 2, 1)  # the largest c with c · (base + c) ≤ cap
        hi = min(lo + c, nq)
        yield lo, hi
        lo = hi


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

    def prompt_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits whose softmax a block of prompt queries adds to the scores (``x [b, hkv, rows,
        keys]``, may be changed in place): H2O's own."""
        return x

    def prefill(self, tier, query, key, value, keep, scale) -> None:
        """Accumulates the score every prompt query gives every token (causal blocks of queries)."""
        b, hq, nq, _ = query.shape
        hkv, n, device = key.shape[1], key.shape[2], key.device
        before = n - nq  # query i sits at position before + i
        st = self._grow(tier, device, key.dtype)
        keys_t = key.float().transpose(-1, -2)  # [b, hkv, d, n], converted once
        inc = torch.zeros((b, hkv, 1, n), device=device)
        pad_keys = weights = None
        if keep is not None:
            keep = keep[:, :n].to(device)
            if not bool(keep.all()):
                # Padding keys get a finite floor, not -inf: exp() gives them exactly 0 next to any
                # real key, and a padding query that sees only padding keeps a finite softmax row
                # (no NaN), which its weight 0 then drops: a padding query hands out no score.
                pad_keys = ~keep[:, None, None, :]
                weights = keep[:, before:].float()  # [b, nq]
        budget = PROMPT_BLOCK_BYTES.get(device.type, PROMPT_BLOCK_BYTES["cuda"])
        blocks = list(prompt_blocks(nq, before, 4 * b * hq, budget))
        # The causal triangle of a block: its query i does not see its own keys j > i.
        c = blocks[0][1] if blocks else 0
        future = torch.ones((c, c), dtype=torch.bool, device=device).triu_(1)
        for lo, hi in blocks:
            m = before + hi  # the block's queries see keys [0, m)
            w = None if weights is None else weights[:, lo:hi]
            inc[..., :m] += self._prompt_block(query[:, :, lo:hi], keys_t[..., :m], scale, future, pad_keys, w)
        st.acc[..., :n] += inc.squeeze(2)

    def _prompt_block(self, query, keys_t, scale, future, pad_keys, weights) -> torch.Tensor:
        """The scores ``[b, hkv, 1, m]`` that the block's queries ``[b, hq, c, d]`` give the keys
        ``keys_t [b, hkv, d, m]`` they see (their own c keys last); ``weights [b, c]``: 0 for padding."""
        b, hq, c, d = query.shape
        hkv, m = keys_t.shape[1], keys_t.shape[-1]
        g = hq // hkv
        qb = (query.float() * scale).reshape(b, hkv, g * c, d)  # rows: (group member, query)
        x = torch.matmul(qb, keys_t)  # [b, hkv, g·c, m]
        x.view(b, hkv, g, c, m)[..., m - c :].masked_fill_(future[:c, :c], float("-inf"))
        if pad_keys is not None:
            x.masked_fill_(pad_keys[..., :m], torch.finfo(x.dtype).min)
        p = torch.softmax(self.prompt_logits(x), dim=-1)
        if weights is None:
            return p.sum(dim=2, keepdim=True)
        w = weights[:, None, None, :].expand(b, 1, g, c).reshape(b, 1, 1, g * c)
        return torch.matmul(w, p)  # [b, 1, 1, g·c] @ [b, hkv, g·c, m]

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

    def _minus_gumbel(self, like: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``-ζ`` for fresh noise ζ ~ Gumbel(0, 1) shaped ``like`` (one draw of the seeded generator
        per entry, in memory order), and the current temperature τ."""
        if self.generator is None or self.generator.device != like.device:
            self.generator = torch.Generator(device=like.device).manual_seed(0)  # reproducible runs
        u = torch.empty_like(like).uniform_(0.0, 1.0, generator=self.generator).clamp_(1e-20, 1.0)
        return u.log_().neg_().log_(), 1.0 + min(self.steps, TAU_STEPS) / TAU_STEPS  # ζ = -log(-log(u))

    def score(self, x, p):
        minus_zeta, tau = self._minus_gumbel(x)
        return super().score(x, softmax_rows((x - minus_zeta) / tau))  # softmax((x + ζ) / τ)

    def prompt_logits(self, x):
        """``(x + ζ) / τ`` in place, one draw per (query head, query, visible key) entry of the
        block. Which draw an entry gets depends on the block schedule; the noise's distribution
        and a run's reproducibility (same shapes and budget, same scores) do not."""
        minus_zeta, tau = self._minus_gumbel(x)
        x.sub_(minus_zeta)
        return x if tau == 1.0 else x.div_(tau)
