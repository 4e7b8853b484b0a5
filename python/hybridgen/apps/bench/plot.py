"""The figure of a ``python -m hybridgen bench`` record: decode latency of every policy against
context length (left) and the feedback scheduler's K over the decode steps at the longest
context it ran (right)."""

from __future__ import annotations

from pathlib import Path

#: Marker per strategy on the K panel (the scheduler switches between the two).
STRATEGY_STYLE = {
    "post_qkt": ("o", "tab:blue", "Post-QKT (score all host keys, top K)"),
    "pre_qkt": ("^", "tab:orange", "Pre-QKT (K positions, score only those)"),
}
MARKERS = "osD^v<>pPX*h"


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in record["rows"] if r["status"] == "ok"]
    batch = min((r["batch"] for r in record["rows"]), default=1)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1.25, 1]})
    _latency(left, [r for r in rows if r["batch"] == batch], record)
    left.set_title(f"decode latency, batch {batch}", fontsize=10)
    _scheduler_k(right, [r for r in rows if r["batch"] == batch and r["policy"] == "scheduler"])
    m = record["machine"]
    where = m.get("cuda_device") or f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch threads)"
    fig.suptitle(f"{record['model']} ({record['dtype']}) on {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _latency(ax, rows: list[dict], record: dict) -> None:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not rows:
        ax.text(0.5, 0.5, "no configuration ran (all skipped)", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    colors = plt.get_cmap("tab10").colors
    others = [p for p in policies if p != "full"]
    for policy in policies:
        pts = sorted((r["context"], r["ms_per_token"]) for r in rows if r["policy"] == policy)
        xs, ys = zip(*pts)
        if policy == "full":
            style = dict(color="black", linewidth=2.6, marker="s", zorder=5)
        else:
            j = others.index(policy)
            style = dict(
                color=colors[j % len(colors)],
                linewidth=1.4,
                marker=MARKERS[j % len(MARKERS)],
                linestyle="-" if j < len(colors) else "--",
            )
        ax.plot(xs, ys, label=policy, markersize=5, **style)
    skipped = sorted({(r["policy"], r["context"]) for r in record["rows"] if r["status"] == "skipped"})
    if skipped:
        ax.text(
            0.01,
            0.01,
            "skipped (memory): " + ", ".join(f"{p}@{c}" for p, c in skipped),
            transform=ax.transAxes,
            fontsize=7,
            va="bottom",
            color="dimgray",
            wrap=True,
        )
    ax.set_xscale("log", base=2)
    ms = [r["ms_per_token"] for r in rows]
    if max(ms) > 6 * min(ms):  # policies an order of magnitude apart: keep the fast ones readable
        ax.set_yscale("log")
        lo, hi = min(ms) / 1.15, max(ms) * 1.15
        ticks = [m * 10**e for e in range(-1, 6) for m in (1, 2, 3, 5) if lo <= m * 10**e <= hi]
        ax.set_ylim(lo, hi)
        ax.set_yticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    contexts = sorted({r["context"] for r in rows})
    ax.set_xticks(contexts, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in contexts])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode ms / token (median)" + (", log scale" if ax.get_yscale() == "log" else ""))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)


def _scheduler_k(ax, rows: list[dict]) -> None:
    if not rows:
        ax.text(0.5, 0.5, "the scheduler policy did not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    row = max(rows, key=lambda r: r["context"])
    steps = row["k_per_step"]
    warmup = row["warmup_steps"]
    if warmup:
        ax.axvspan(-0.5, warmup - 0.5, color="lightgray", alpha=0.5, label="warm-up (not measured)")
    ax.plot([s for s, _, _ in steps], [k for _, k, _ in steps], color="gray", linewidth=1, zorder=1)
    for strategy in dict.fromkeys(st for _, _, st in steps):
        marker, color, label = STRATEGY_STYLE.get(strategy, ("x", "tab:red", strategy))
        pts = [(s, k) for s, k, st in steps if st == strategy]
        ax.scatter([s for s, _ in pts], [k for _, k in pts], marker=marker, color=color, label=label, zorder=2, s=36)
    ax.set_xlabel("decode step")
    ax.set_ylabel("K (host tokens per head)")
    ax.set_title(
        f"scheduler: K per step at {row['context']} tokens (host {row['host_tokens']} tokens/layer)", fontsize=10
    )
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
