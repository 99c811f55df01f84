"""Training curves from ``metrics.jsonl`` files: reward, KL and loss against step and against wall time.

    python -m trainer_client.plots --run async=runs/a/metrics.jsonl --run sync=runs/s/metrics.jsonl \
        --out curves.png

Each run is one colour; the thin line is the raw per-step value, the thick one a moving average (the
per-step reward of a small batch is noisy). Wall time is the running sum of the steps' ``wall_seconds``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [
    ("reward_mean", "reward"),
    ("kl", "KL(policy || ref) per token"),
    ("loss", "DPO loss"),
]


def read_metrics(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def moving_average(values: list[float | None], window: int) -> list[float | None]:
    """Trailing mean over the last ``window`` values that are not None."""
    out, recent = [], []
    for v in values:
        if v is not None:
            recent = (recent + [v])[-window:]
        out.append(sum(recent) / len(recent) if recent else None)
    return out


def plot_runs(
    runs: dict[str, list[dict]],
    out: str | Path,
    title: str | None = None,
    window: int = 10,
    heldout: dict[str, list[tuple[int, float]]] | None = None,
) -> Path:
    """Write a 2 x 3 grid (rows: against step, against wall time; columns: reward, KL, loss) to ``out``.

    ``heldout`` optionally adds each run's greedy held-out reward at some steps, e.g. ``{label: [(0, 0.41),
    (300, 0.72)]}``, drawn as markers on the reward panels (step 0 sits at wall time 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(PANELS), figsize=(5 * len(PANELS), 7.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, records) in enumerate(runs.items()):
        color = colors[i % len(colors)]
        steps = [r["step"] for r in records]
        wall, total = [], 0.0
        for r in records:
            total += r.get("wall_seconds") or 0.0
            wall.append(total)
        for col, (key, _) in enumerate(PANELS):
            values = [r.get(key) for r in records]
            smooth = moving_average(values, window)
            for row, xs in enumerate((steps, wall)):
                ax = axes[row][col]
                raw = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
                avg = [(x, v) for x, v in zip(xs, smooth, strict=True) if v is not None]
                if raw:
                    ax.plot(*zip(*raw, strict=True), color=color, alpha=0.25, linewidth=0.8)
                if avg:
                    ax.plot(*zip(*avg, strict=True), color=color, linewidth=2.0, label=label)
        for step, value in (heldout or {}).get(label, []):
            at_wall = wall[step - 1] if 0 < step <= len(wall) else 0.0
            for row, x in enumerate((step, at_wall)):
                axes[row][0].plot([x], [value], marker="D", markersize=8, color=color, markeredgecolor="k")
    if heldout:
        axes[0][0].plot([], [], marker="D", linestyle="", color="gray", markeredgecolor="k",
                        label="held-out reward (greedy)")  # fmt: skip
    for col, (_, name) in enumerate(PANELS):
        for row, xlabel in enumerate(("step (policy version)", "wall time (s)")):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
        axes[0][col].set_title(f"{name} vs step")
        axes[1][col].set_title(f"{name} vs wall time")
    if runs:  # lines: the sampled training reward (at the run's temperature), below the greedy diamonds
        legend = f"lines: sampled training reward,\nthick: {window}-step mean"
        axes[0][0].legend(title=legend, fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=fmt)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS_JSONL")
    parser.add_argument("--out", default="curves.png")
    parser.add_argument("--title")
    parser.add_argument("--window", type=int, default=10, help="moving-average window in steps")
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, _, path = item.rpartition("=")
        runs[label or Path(path).parent.name] = read_metrics(path)
    print(plot_runs(runs, args.out, args.title, args.window))


if __name__ == "__main__":
    main()
