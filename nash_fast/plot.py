"""python -m nash_fast.plot OUTPUT_DIR: PNG curves of a run's metrics.jsonl (loss, log-ratios, reward
accuracy and margin, learning rate, gradient norm, tokens/s) into OUTPUT_DIR/plots/.

Every axis is labelled with its quantity and unit (x: optimizer step). A measured metric is drawn raw (faint)
and smoothed (bias-corrected exponential moving average, TensorBoard's), both named in the legend. A schedule
(the learning rate) is drawn as it was applied, never smoothed: smoothing would move its peak. Skipped steps
are marked in red.

matplotlib (a core dependency) is imported only here, so the trainer starts without it.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from nash_fast.cli import RunFailed, run_cli

SMOOTHING = 0.9  # EMA weight of smooth()


@dataclass(frozen=True)
class Panel:
    name: str  # file name (without .png)
    title: str
    ylabel: str  # quantity (unit)
    keys: tuple[str, ...]  # metrics drawn on it
    schedule: bool = False  # a value the run sets (drawn as is), not a measurement (drawn raw + smoothed)


PANELS = (
    Panel("loss", "training loss (mean over pairs or responses)", "loss (nats; nats² for squared losses)", ("loss",)),
    Panel("logratios", "log-ratios log pi - log pi_ref", "log-ratio (nats)",
          ("chosen_logratio", "rejected_logratio", "logratio")),
    Panel("reward_accuracy", "reward accuracy", "accuracy (fraction of pairs)", ("reward_accuracy",)),
    Panel("reward_margin", "reward margin (x beta where the loss has one)", "margin (nats)", ("reward_margin",)),
    Panel("lr", "learning-rate schedule", "learning rate (as applied at the step)", ("lr",), schedule=True),
    Panel("grad_norm", "gradient norm (before clipping)", "global L2 norm (of the gradient)", ("grad_norm",)),
    Panel("tokens_per_s", "throughput", "throughput (tokens/s)", ("tokens_per_s",)),
)
XLABEL = "optimizer step"


class MatplotlibMissing(RunFailed):
    pass


def read_metrics(path: str | Path) -> list[dict]:
    """Records of a metrics.jsonl; damaged lines (cut by a kill, not UTF-8, not JSON) are skipped."""
    rows = []
    with open(path, "rb") as f:
        for line in f:
            try:
                row = json.loads(line.decode("utf-8"))
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def smooth(values, weight: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, average = [], 0.0
    for n, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**n))
    return out


def plot_metrics(output_dir: str | Path) -> list[Path]:
    """Write OUTPUT_DIR/plots/<panel>.png for every panel with data; returns the paths."""
    output_dir = Path(output_dir)
    metrics_file = output_dir / "metrics.jsonl"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{metrics_file} does not exist (is {output_dir} a nash_fast.train output directory?)")
    plt = _pyplot(f"python -m nash_fast.plot {output_dir}")
    plots = output_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in metric_figures(read_metrics(metrics_file)):
        path = plots / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        written.append(path)
    return written


def _pyplot(command: str):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MatplotlibMissing(
            "matplotlib is not installed, so no plots were written; pip install matplotlib (or 'nash-fast[plot]') "
            f"and run: {command}"
        ) from None
    return plt


def metric_figures(rows: list[dict]):
    """(panel name, matplotlib Figure) for every panel of PANELS with data in the metrics rows."""
    plt = _pyplot("python -m nash_fast.plot OUTPUT_DIR")
    skipped = [r["step"] for r in rows if r.get("skipped")]
    for panel in PANELS:
        series = {}
        for key in panel.keys:
            points = [(r["step"], r[key]) for r in rows
                      if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if points:
                series[key] = points
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for key, points in series.items():
            steps, values = zip(*points)
            if panel.schedule:
                axes.plot(steps, values, linewidth=1.2, label=f"{key} (as applied, not smoothed)")
            else:
                line, = axes.plot(steps, values, alpha=0.35, linewidth=0.8, label=f"{key} (raw)")
                axes.plot(steps, smooth(values), color=line.get_color(), linewidth=1.5,
                          label=f"{key} (smoothed, EMA {SMOOTHING:g})")
        for k, step in enumerate(skipped):
            axes.axvline(step, color="red", alpha=0.3, linewidth=0.8, label="skipped step" if k == 0 else None)
        axes.set_title(panel.title)
        axes.set_xlabel(XLABEL)
        axes.set_ylabel(panel.ylabel)
        axes.legend(fontsize="small")
        figure.tight_layout()
        yield panel.name, figure


PROG = "python -m nash_fast.plot"


def main(argv: list[str] | None = None) -> int:
    """The CLI: one-line errors (nash_fast.cli), exit status 1 when there is nothing to plot or no matplotlib."""
    return run_cli(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--debug"]
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(f"usage: {PROG} OUTPUT_DIR   (writes OUTPUT_DIR/plots/*.png from metrics.jsonl)")
        return 0 if args and args[0] in ("-h", "--help") else 2
    try:
        paths = plot_metrics(args[0])
    except FileNotFoundError as error:
        raise RunFailed(str(error)) from None
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
