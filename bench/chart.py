"""The PNG beside each run in bench/RESULTS.md: throughput, CPU per request, open loop.

matplotlib is a bench-only dependency (the `bench` extra, installed by `make bench`);
without it a run still writes its tables and says the chart is missing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from measure import Level, OpenRun

__all__ = ["write_chart"]


def write_chart(path: Path, levels: Sequence[Level], open_runs: Sequence[OpenRun],
                title: str) -> Path | None:
    """rps per target per level (log scale), CPU µs/request per process at the middle
    level, and the open-loop percentiles per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib missing: no chart (pip install -e '.[bench]')", flush=True)
        return None
    names = list(dict.fromkeys(name for lv in levels for name in lv.by_target))
    fig, axes = plt.subplots(1, 3 if open_runs else 2, figsize=(17 if open_runs else 12, 5.5))
    width = 0.8 / max(1, len(levels))
    positions = range(len(names))
    for index, lv in enumerate(levels):
        values = [lv.by_target[n].wrk.rps if n in lv.by_target else 0 for n in names]
        axes[0].bar([p + index * width for p in positions], values, width,
                    label=f"c={lv.concurrency}")
    axes[0].set_xticks([p + width * (len(levels) - 1) / 2 for p in positions])
    axes[0].set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("requests/s (closed loop, wrk; log scale)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("throughput")
    middle = levels[len(levels) // 2]
    bottom = [0.0] * len(names)
    for component in ("extproc", "envoy", "peer", "emulator", "redis"):
        values = [(middle.by_target[n].cpu_us_per_request(component) or 0)
                  if n in middle.by_target else 0 for n in names]
        if any(values):
            axes[1].bar(list(positions), values, 0.6, bottom=bottom, label=component)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes[1].set_xticks(list(positions))
    axes[1].set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    axes[1].set_ylabel(f"CPU µs per request at c={middle.concurrency}")
    axes[1].legend(fontsize=8)
    axes[1].set_title("CPU per request, per process")
    if open_runs:
        labels = [run.target for run in open_runs]
        for pct, label in ((50, "p50"), (99, "p99"), (99.9, "p99.9")):
            axes[2].plot(labels, [run.result.percentile(pct) for run in open_runs],
                         marker="o", label=label)
        axes[2].set_yscale("log")
        axes[2].set_ylabel("latency ms (log)")
        axes[2].set_title(f"open loop, {open_runs[0].result.target_rps:,.0f} rps")
        axes[2].tick_params(axis="x", rotation=35, labelsize=8)
        axes[2].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
