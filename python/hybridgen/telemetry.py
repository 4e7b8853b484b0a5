"""Per step and layer records of what hybrid attention did, and a summary of a run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import mean


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

    def resolve(self, call_span=None) -> "StepRecord":
        """Turns lazy CUDA-event times into seconds; with ``call_span`` (the whole layer or
        attention call), device time becomes everything but the serial CPU stage and the transfer."""
        from .timing import seconds

        self.t_gpu, self.t_tx = seconds(self.t_gpu), seconds(self.t_tx)
        if call_span is not None:
            self.t_gpu = max(seconds(call_span) - (self.t_cpu - self.t_hidden) - self.t_tx, self.t_gpu)
        return self


@dataclass
class Telemetry:
    records: list[StepRecord] = field(default_factory=list)

    def add(self, record: StepRecord) -> None:
        self.records.append(record)

    def clear(self) -> None:
        self.records.clear()

    def as_dicts(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def k_per_step(self) -> list[tuple[int, int, str]]:
        """``(step, k, strategy)`` of every step (layer 0's; one K serves all layers)."""
        return [(r.step, r.k, r.strategy) for r in self.records if r.layer == 0]

    def summary(self) -> dict:
        if not self.records:
            return {"steps": 0}
        steps = sorted({r.step for r in self.records})
        t_cpu = sum(r.t_cpu for r in self.records)
        hidden = sum(r.t_hidden for r in self.records)
        strategies = {}
        for r in self.records:
            strategies[r.strategy] = strategies.get(r.strategy, 0) + 1
        last = self.records[-1]
        last_step = [r for r in self.records if r.step == last.step]
        return {
            "steps": len(steps),
            "k_mean": mean(r.k for r in self.records),
            "k_last": last.k,
            "strategy_share": {s: n / len(self.records) for s, n in strategies.items()},
            "host_tokens_last": last.host_tokens,
            "device_tokens_last": last.device_tokens,
            "t_cpu_per_step_ms": 1e3 * t_cpu / len(steps),
            "t_gpu_per_step_ms": 1e3 * sum(r.t_gpu for r in self.records) / len(steps),
            "t_tx_per_step_ms": 1e3 * sum(r.t_tx for r in self.records) / len(steps),
            "cpu_hidden_share": hidden / t_cpu if t_cpu > 0 else 0.0,
            "tx_bytes_per_step": sum(r.tx_bytes for r in self.records) / len(steps),
            "pinned_bytes": sum(r.pinned_bytes for r in last_step),
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
            f"{s['tx_bytes_per_step'] / 1024:.0f} KiB shipped | host tokens {s['host_tokens_last']}, "
            f"device tokens {s['device_tokens_last']} per layer"
            + (f" | {s['pinned_bytes'] / 2**20:.0f} MiB page-locked" if s["pinned_bytes"] else "")
        )
