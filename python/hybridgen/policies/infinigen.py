"""``infinigen``-like baseline: speculate which host tokens the next layer needs, fetch only those.

InfiniGen (Lee et al., OSDI 2024) keeps a *partial* key cache on the device — a few channels of
every key — and, while layer i-1 runs, estimates layer i's attention from layer i-1's input
projected with a few columns of layer i's query weights. The tokens with the highest estimated
scores are fetched from host memory; the device attends over them, the sinks and the recent
window.

Here: at prefill, each layer picks, per KV head, the :data:`PARTIAL_RATIO` share of key channels
with the largest ``mean|q_c| · mean|k_c|`` over the prompt (InfiniGen skews the weights offline
so few channels carry the scores; this picks them from the data instead). The partial keys of
host tokens are mirrored on the device as tokens arrive. At decode, layer i's query is estimated
from layer i-1's input (the same stand-in as hybridgen's speculative pipeline; layer 0 uses its
true query), scored against the partial keys (the maximum over the GQA group), and the top ``k``
host tokens per KV head are fetched — keys and values — for exact attention over them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..telemetry import StepRecord
from ..timing import timed
from .base import Policy, fetch_rows, grouped_logits, softmax_rows, weighted_values, with_chosen

#: Share of each head's channels kept in the partial key cache (InfiniGen's default partial ratio).
PARTIAL_RATIO = 0.3


@dataclass
class _PartialKeys:
    channels: torch.Tensor  # [hkv, r] key channels kept in the partial cache
    partial: torch.Tensor  # [b, hkv, n_host, r] partial keys of the host tokens, on the device


class InfiniGenPolicy(Policy):
    names = ("infinigen",)
    keeps = "sinks + `gpu_budget` recent tokens and a partial (30 % of channels) copy of every host key on the device; full KV in host memory"
    runs = "device, over the `k` host tokens per KV head fetched after speculating with the partial keys"
    bus = "`k` key and value rows per KV head to the device, every step and layer"

    needs_prompt_queries = True

    def __init__(self, config, info, worker=None):
        super().__init__(config, info, worker)
        #: Layer index -> query estimated from the previous layer's input (this step).
        self.estimates: dict[int, torch.Tensor] = {}

    def prefill(self, tier, query, key, value, keep, scale) -> None:
        b, hq, nq, d = query.shape
        hkv = key.shape[1]
        r = max(1, round(PARTIAL_RATIO * d))
        q_mag = query.float().abs().mean(dim=2).view(b, hkv, hq // hkv, d).sum(dim=2)  # [b, hkv, d]
        k_mag = key.float().abs().mean(dim=2)  # [b, hkv, d]
        importance = (q_mag * k_mag).sum(dim=0)  # [hkv, d]
        channels = importance.topk(r, dim=-1).indices.sort(dim=-1).values
        empty = key.new_empty((b, hkv, 0, r))
        tier.policy_state = _PartialKeys(channels, empty)

    @property
    def uses_query_estimate(self) -> bool:
        return True

    def speculate(self, tier, q_estimate, keep, scale) -> None:
        self.estimates[tier.layer_idx] = q_estimate

    def _mirror(self, tier, st: _PartialKeys, n_host: int, device) -> None:
        """Appends the partial keys of host tokens that arrived since the last step."""
        seen = st.partial.shape[2]
        if n_host == seen:
            return
        new = tier.store.view(tier.layer_idx, "keys", seen, n_host)  # [b, hkv, m, d]
        idx = st.channels.to(new.device)[None, :, None, :].expand(new.shape[0], -1, new.shape[2], -1)
        st.partial = torch.cat([st.partial, new.gather(3, idx).to(device, st.partial.dtype)], dim=2)

    def _choose(self, st: _PartialKeys, q_est, host_ignore) -> torch.Tensor:
        """Host indices ``[b, hkv, k]`` (ascending) with the highest estimated scores."""
        b, hq, d = q_est.shape
        hkv, r = st.channels.shape
        ch = st.channels.to(q_est.device)
        qg = q_est.float().view(b, hkv, hq // hkv, d)
        q_part = qg.gather(3, ch[None, :, None, :].expand(b, -1, hq // hkv, -1))  # [b, hkv, g, r]
        est = torch.matmul(q_part, st.partial.float().transpose(-1, -2)).amax(dim=2)  # [b, hkv, n]
        if host_ignore is not None:
            est = est.masked_fill(host_ignore.unsqueeze(1), float("-inf"))
        k = min(self.config.k, est.shape[-1])
        return est.topk(k, dim=-1).indices.sort(dim=-1).values

    def decode(self, tier, q, keep, scale, step):
        store, idx = tier.store, tier.layer_idx
        dev_k = tier.keys
        n_host = tier.host_tokens
        st = tier.policy_state
        q_est: Optional[torch.Tensor] = self.estimates.pop(idx, None)
        b, hkv = dev_k.shape[0], dev_k.shape[1]
        _, host_ignore = tier.masks(keep)

        def fetch():
            if n_host == 0 or st is None:
                empty = dev_k[:, :, :0]
                return torch.empty((b, hkv, 0), dtype=torch.long), empty, empty
            self._mirror(tier, st, n_host, q.device)
            chosen = self._choose(st, q if q_est is None else q_est, host_ignore).cpu()
            return (chosen, *fetch_rows(store, idx, chosen, q.device))

        (chosen, hk, hv), t_tx = timed(fetch, q.device)

        def attend():
            keys, values, _, ignore = with_chosen(tier, chosen, hk, hv, keep)
            return weighted_values(softmax_rows(grouped_logits(q, keys, scale, ignore)), values)

        out, t_dev = timed(attend, q.device)
        return out, StepRecord(
            step=step,
            layer=idx,
            k=chosen.shape[-1],
            strategy="infinigen",
            host_tokens=n_host,
            device_tokens=dev_k.shape[-2],
            t_cpu=0.0,
            t_gpu=t_dev,
            t_tx=t_tx,
            tx_bytes=(hk.numel() + hv.numel()) * hk.element_size(),
            speculative=q_est is not None,
            keys_read=chosen.shape[-1],
        )
