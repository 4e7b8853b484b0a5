"""Per step and layer records of what hybrid attention did, and a summary of a run."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Iterable

#: The strategy of a sliding-window layer whose window the device holds (it reads no host token).
WINDOW = "window"


@dataclass
class StepRecord:
    step: int
    layer: int
    #: Host tokens each head attended to, and how they were chosen.
    k: int
    strategy: str
    host_tokens: int
    device_tokens: int
    #: Seconds: the CPU stage; device work of the layer; moving the CPU result to the device.
    t_cpu: float
    t_gpu: float
    t_tx: float
    #: Seconds of the CPU stage that ran while the device worked (pipelining), and bytes shipped.
    t_hidden: float = 0.0
    tx_bytes: int = 0
    #: Whether the CPU stage started from the previous layer's input (approximate query).
    speculative: bool = False
    #: Bytes of this layer's host KV page-locked after the step (0: not pinned).
    pinned_bytes: int = 0
    #: Host key rows the CPU read per KV head to choose and score its tokens (page summary rows
    #: count as key rows: they have the keys' width).
    keys_read: int = 0

    def resolve(self, call_span=None) -> "StepRecord":
        """Turns lazy CUDA-event times into seconds; with ``call_span`` (the whole layer or
        attention call), device time becomes everything but the serial CPU stage and the transfer."""
        from .timing import seconds

        self.t_gpu, self.t_tx = seconds(self.t_gpu), seconds(self.t_tx)
        if call_span is not None:
            self.t_gpu = max(seconds(call_span) - (self.t_cpu - self.t_hidden) - self.t_tx, self.t_gpu)
        return self


class RecentRecords(deque):
    """The most recent records (a ring: the oldest drop out once ``maxlen`` are held); indexes
    and slices like a list."""

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(self)[i]
        return super().__getitem__(i)


#: Per-layer records kept by default: with 32 layers, the last ~3,000 steps (~40 MB). Summaries
#: cover every step ever recorded whatever this is (they are running aggregates).
DEFAULT_MAX_RECORDS = 100_000


class Telemetry:
    """Per step and layer records of a run — the most recent ``max_records`` of them, so memory
    stays bounded however long the run — and running aggregates over all of them, from which
    :meth:`summary` is computed."""

    def __init__(self, records: Iterable[StepRecord] = (), max_records: int = DEFAULT_MAX_RECORDS):
        if isinstance(max_records, bool) or not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be a positive int, got {max_records!r}")
        self.max_records = max_records
        self.records = RecentRecords(maxlen=max_records)
        self.clear()
        for r in records:
            self.add(r)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)
        a = self._totals
        if record.step != self._step:
            self._step, self._steps, self._pinned_last_step = record.step, self._steps + 1, 0
        self._pinned_last_step += record.pinned_bytes
        a["records"] += 1
        if record.strategy != WINDOW:  # a sliding-window layer on the device chooses no K
            a["k"] += record.k
            a["k_records"] += 1
        a["t_cpu"] += record.t_cpu
        a["t_gpu"] += record.t_gpu
        a["t_tx"] += record.t_tx
        a["t_hidden"] += record.t_hidden
        a["tx_bytes"] += record.tx_bytes
        a["keys_read"] += record.keys_read
        a["host_tokens"] += record.host_tokens
        self._strategies[record.strategy] = self._strategies.get(record.strategy, 0) + 1
        if record.strategy != WINDOW and self._k_layer is None:
            self._k_layer = record.layer
        if record.layer == self._k_layer:
            self._k_per_step.append((record.step, record.k, record.strategy))
        self._last = record

    def clear(self) -> None:
        self.records.clear()
        self._totals = dict.fromkeys(
            ("records", "k", "k_records", "t_cpu", "t_gpu", "t_tx", "t_hidden", "tx_bytes", "keys_read", "host_tokens"),
            0,
        )
        self._strategies: dict = {}
        self._k_per_step = RecentRecords(maxlen=self.max_records)
        #: The layer whose K the per-step series follows: the first that is not a sliding-window
        #: layer decoded on the device alone (one K serves every other layer).
        self._k_layer = None
        self._step, self._steps, self._pinned_last_step, self._last = None, 0, 0, None

    def as_dicts(self) -> list[dict]:
        """The recent records as dicts."""
        return [asdict(r) for r in self.records]

    def k_per_step(self) -> list[tuple[int, int, str]]:
        """``(step, k, strategy)`` of every recent step (the first layer's that chooses a K; one K
        serves all such layers)."""
        return list(self._k_per_step)

    def summary(self) -> dict:
        """Figures over every step recorded (not only the recent records)."""
        if self._last is None:
            return {"steps": 0}
        a, steps, last = self._totals, self._steps, self._last
        return {
            "steps": steps,
            "k_mean": a["k"] / max(a["k_records"], 1),
            "k_last": last.k,
            "strategy_share": {s: n / a["records"] for s, n in self._strategies.items()},
            "host_tokens_last": last.host_tokens,
            "device_tokens_last": last.device_tokens,
            "t_cpu_per_step_ms": 1e3 * a["t_cpu"] / steps,
            "t_gpu_per_step_ms": 1e3 * a["t_gpu"] / steps,
            "t_tx_per_step_ms": 1e3 * a["t_tx"] / steps,
            "cpu_hidden_share": a["t_hidden"] / a["t_cpu"] if a["t_cpu"] > 0 else 0.0,
            "tx_bytes_per_step": a["tx_bytes"] / steps,
            # Of every host key, the share the CPU read per step (1.0: Post-QKT over all of them).
            "keys_read_share": a["keys_read"] / a["host_tokens"] if a["host_tokens"] else 0.0,
            "pinned_bytes": self._pinned_last_step,
        }

    def format_summary(self) -> str:
        s = self.summary()
        if not s["steps"]:
            return "no decode steps recorded"
        shares = ", ".join(f"{k} {v:.0%}" for k, v in s["strategy_share"].items())
        return (
            f"{s['steps']} decode steps | K mean {s['k_mean']:.0f}, last {s['k_last']} ({shares}) | "
            f"per step: CPU {s['t_cpu_per_step_ms']:.1f} ms ({s['cpu_hidden_share']:.0%} hidden), "
            f"device {s['t_gpu_per_step_ms']:.1f} ms, transfer {s['t_tx_per_step_ms']:.2f} ms, "
            f"{s['tx_bytes_per_step'] / 1024:.0f} KiB shipped | CPU read {s['keys_read_share']:.0%} of the host keys | "
            f"host tokens {s['host_tokens_last']}, "
            f"device tokens {s['device_tokens_last']} per layer"
            + (f" | {s['pinned_bytes'] / 2**20:.0f} MiB page-locked" if s["pinned_bytes"] else "")
        )
