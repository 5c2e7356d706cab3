"""python -m nash_fast.plot OUTPUT_DIR: PNG curves of a run's metrics.jsonl (loss, log-ratios, reward
accuracy and margin, learning rate, gradient norm, tokens/s) into OUTPUT_DIR/plots/: each metric raw
(faint) and smoothed (exponential moving average), skipped steps marked in red.

matplotlib (a core dependency) is imported only here, so the trainer starts without it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

# (file name, title, metric keys drawn on it)
PANELS = (
    ("loss", "training loss", ("loss",)),
    ("logratios", "log-ratios log pi - log pi_ref", ("chosen_logratio", "rejected_logratio", "logratio")),
    ("reward_accuracy", "reward accuracy", ("reward_accuracy",)),
    ("reward_margin", "reward margin", ("reward_margin",)),
    ("lr", "learning rate", ("lr",)),
    ("grad_norm", "gradient norm (before clipping)", ("grad_norm",)),
    ("tokens_per_s", "throughput (tokens/s)", ("tokens_per_s",)),
)


class MatplotlibMissing(RuntimeError):
    pass


def read_metrics(path: str | Path) -> list[dict]:
    """Lines of a metrics.jsonl (a torn last line from a killed run is ignored)."""
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def smooth(values, weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, average = [], 0.0
    for n, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def plot_metrics(output_dir: str | Path) -> list[Path]:
    """Write OUTPUT_DIR/plots/<metric>.png for every metric present; returns the paths."""
    output_dir = Path(output_dir)
    metrics_file = output_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist (is {output_dir} a nash_fast.train output directory?)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MatplotlibMissing(
            "matplotlib is not installed, so no plots were written; pip install matplotlib (or 'nash-fast[plot]') "
            f"and run: python -m nash_fast.plot {output_dir}"
        ) from None
    rows = read_metrics(metrics_file)
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, keys in PANELS:
        series = {}
        for key in keys:
            points = [(r["step"], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                series[key] = points
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points)
            line, = axes.plot(steps, values, alpha=0.35, linewidth=0.8)
            axes.plot(steps, smooth(values), color=line.get_color(), label=key)
        skipped = [r["step"] for r in rows if r.get("skipped")]
        for step in skipped:
            axes.axvline(step, color="red", alpha=0.3, linewidth=0.8)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.legend(title="red: skipped steps" if skipped else None, fontsize="small")
        figure.tight_layout()
        path = plots / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print("usage: python -m nash_fast.plot OUTPUT_DIR   (writes OUTPUT_DIR/plots/*.png from metrics.jsonl)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        paths = plot_metrics(args[0])
    except (MatplotlibMissing, FileNotFoundError) as error:
        print(f"[nash_fast.plot] {error}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
