"""One request's device tier in one layer: its sink tokens and its recent window.

The plugin keeps its own copy of the rows hybrid attention reads on the device side, and hands
every row that leaves the recent window to the request's slot of the host store: hybrid decode
never reads vLLM's paged cache, whose blocks between the sinks and the window vLLM may then free
(:mod:`hybridgen.vllm.blocks`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..host_store import HostKVStore

__all__ = ["Window"]


class Window:
    """Sinks + recent rows ``[hkv, n, d]`` of one (layer, slot), on the device of the rows
    appended (the CPU on vLLM's CPU platform); older rows in ``store``.

    Args:
        store: the host store; this window's rows are its layer ``layer``, slot ``slot``.
        sinks: leading tokens that never leave the device.
        recent: recent tokens kept on the device (the ``gpu_budget``).
        chunk: while decoding, rows move to the host this many at a time (the window holds
            ``recent`` to ``recent + chunk - 1`` recent rows); a multi-row (prefill) append moves
            every row beyond ``recent`` at once.
    """

    def __init__(self, store: "HostKVStore", layer: int, slot: int, *, sinks: int, recent: int, chunk: int):
        self.store, self.layer, self.slot = store, layer, slot
        self.sinks, self.recent, self.chunk = sinks, recent, max(1, chunk)
        #: Tokens of the request seen so far (device + host).
        self.total = 0
        #: Tokens in the host store.
        self.host = 0
        self._k: list[torch.Tensor] = []  # rows [hkv, m, d], in order: sinks first
        self._v: list[torch.Tensor] = []
        self._n = 0  # device rows

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Records new rows ``[m, hkv, d]`` (vLLM's layout) of the request, then moves the rows
        beyond the recent window to the host store."""
        m = keys.shape[0]
        if m == 0:
            return
        self._k.append(keys.detach().transpose(0, 1).to(self.store.dtype, copy=True).contiguous())
        self._v.append(values.detach().transpose(0, 1).to(self.store.dtype, copy=True).contiguous())
        self._n += m
        self.total += m
        self.store.append_slot(self.layer, self.slot, m)
        sinks_here = self.host_start
        over = self._n - sinks_here - self.recent
        if over > 0 and (m > 1 or over >= self.chunk):
            self._evict(sinks_here, over)

    def _evict(self, sinks_here: int, over: int) -> None:
        k, v = self.rows()
        gone = slice(sinks_here, sinks_here + over)
        self.store.evict_slot(self.layer, self.slot, k[:, gone].cpu().contiguous(), v[:, gone].cpu().contiguous())
        keep = torch.cat([torch.arange(sinks_here), torch.arange(sinks_here + over, self._n)]).to(k.device)
        self._k, self._v = [k[:, keep].contiguous()], [v[:, keep].contiguous()]
        self._n -= over
        self.host += over

    def positions(self) -> torch.Tensor:
        """The token positions of :meth:`rows` (``int64 [n]``, CPU): the sinks, then the recent window."""
        sinks_here = self.host_start
        recent = self._n - sinks_here
        return torch.cat([torch.arange(sinks_here), torch.arange(self.total - recent, self.total)])

    @property
    def host_start(self) -> int:
        """The position of the first host token (host tokens are consecutive from there)."""
        return min(self.sinks, self.total)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The device rows ``[hkv, n, d]`` (sinks, then the recent window), in token order."""
        if len(self._k) > 1:
            self._k, self._v = [torch.cat(self._k, dim=1)], [torch.cat(self._v, dim=1)]
        return self._k[0], self._v[0]

    def __repr__(self) -> str:
        return f"Window(layer={self.layer}, slot={self.slot}, total={self.total}, device={self._n}, host={self.host})"
