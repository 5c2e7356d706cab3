"""python -m nash_fast.plot OUTPUT_DIR: PNG curves of a run's metrics.jsonl (loss, log-ratios, reward
accuracy and margin, learning rate, gradient norm, tokens/s) into OUTPUT_DIR/plots/.

Every axis is labelled with its quantity and unit (x: optimizer step). A measured metric is drawn raw (faint)
and smoothed (bias-corrected exponential moving average, TensorBoard's), both named in the legend. A schedule
(the learning rate) is drawn as it was applied, never smoothed: smoothing would move its peak. Skipped steps
are marked in red.

matplotlib (a core dependency) is imported only here, so the trainer starts without it.

Also here: svg_report, self-play's OUTPUT/report.svg (win rates, response lengths and time per stage over the
iterations), plain SVG text that needs no matplotlib.
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


# =============================================================================================== self-play report
# nash_fast.selfplay writes OUTPUT/report.svg with svg_report: SVG text written out by hand (no matplotlib).

def _svg_panel(x0: float, title: str, ylabel: str, xs: list[int], series: dict[str, list], colors: list[str],
               y_range: tuple[float, float] | None = None, reference: tuple[float, str] | None = None) -> str:
    """One panel: title, x axis "iteration", y axis `ylabel` (quantity and unit), a legend naming every series
    and the dashed reference line (value, name); values per iteration are drawn as they are, nothing is smoothed."""
    width, height, pad = 300.0, 220.0, 40.0
    reference, reference_name = reference if reference is not None else (None, None)
    values = [v for ys in series.values() for v in ys if v is not None] + ([reference] if reference is not None else [])
    lo, hi = y_range if y_range else (min(values, default=0.0), max(values, default=1.0))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    x_lo, x_hi = min(xs, default=1), max(max(xs, default=1), min(xs, default=1) + 1)
    px = lambda x: x0 + pad + (x - x_lo) / (x_hi - x_lo) * (width - 2 * pad)  # noqa: E731
    py = lambda y: height - pad - (y - lo) / (hi - lo) * (height - 2 * pad)  # noqa: E731
    out = [f'<text x="{x0 + width / 2}" y="18" text-anchor="middle" font-size="13">{title}</text>',
           f'<line x1="{x0 + pad}" y1="{height - pad}" x2="{x0 + width - pad}" y2="{height - pad}" stroke="black"/>',
           f'<line x1="{x0 + pad}" y1="{pad}" x2="{x0 + pad}" y2="{height - pad}" stroke="black"/>',
           f'<text x="{x0 + pad - 4}" y="{py(lo) + 4}" text-anchor="end" font-size="10">{lo:.3g}</text>',
           f'<text x="{x0 + pad - 4}" y="{py(hi) + 4}" text-anchor="end" font-size="10">{hi:.3g}</text>',
           f'<text x="{x0 + width / 2}" y="{height - 8}" text-anchor="middle" font-size="11">iteration</text>',
           f'<text x="{x0 + 12}" y="{height / 2}" text-anchor="middle" font-size="11" '
           f'transform="rotate(-90 {x0 + 12} {height / 2})">{ylabel}</text>']
    for x in xs:
        out.append(f'<text x="{px(x)}" y="{height - pad + 14}" text-anchor="middle" font-size="10">{x}</text>')
    if reference is not None:
        out.append(f'<line x1="{x0 + pad}" y1="{py(reference)}" x2="{x0 + width - pad}" y2="{py(reference)}" '
                   'stroke="gray" stroke-dasharray="4 3"/>')
    for k, ((name, ys), color) in enumerate(zip(series.items(), colors)):
        points = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None]
        if points:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                       + " ".join(f"{a:.1f},{b:.1f}" for a, b in points) + '"/>')
            out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{color}"/>' for a, b in points]
        out.append(f'<text x="{x0 + pad + 6}" y="{pad + 12 * k + 2}" font-size="10" fill="{color}">{name}</text>')
    if reference is not None:
        out.append(f'<text x="{x0 + pad + 6}" y="{pad + 12 * len(series) + 2}" font-size="10" fill="gray">'
                   f'- - {reference_name}</text>')
    return "\n".join(out)


def svg_report(rows: list[dict], stages) -> str:
    """Three panels: win rates of pi_{t+1} (vs pi_t, vs pi_1), mean response tokens, seconds per stage (`stages`,
    the stage names in legend order: nash_fast.selfplay.STAGES). rows: nash_fast.selfplay.report_rows."""
    xs = [r["iteration"] for r in rows]
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    panels = [
        _svg_panel(0, "win rate of pi_{t+1}", "P(pi_{t+1} wins) (0 to 1)", xs,
                   {"vs pi_t": [r["win_rate_vs_previous"] for r in rows],
                    "vs pi_1": [r["win_rate_vs_initial"] for r in rows]},
                   colors, y_range=(0.0, 1.0), reference=(0.5, "1/2: a tie")),
        _svg_panel(300, "mean response length", "tokens per response", xs,
                   {"pi_{t+1} held-out": [r["mean_response_tokens"] for r in rows],
                    "pi_t samples": [r["generated_response_tokens"] for r in rows]}, colors),
        _svg_panel(600, "time per stage", "wall time (s)", xs, {s: [r["seconds"].get(s) for r in rows] for s in stages},
                   colors),
    ]
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="900" height="220" font-family="sans-serif">\n'
            '<rect width="900" height="220" fill="white"/>\n' + "\n".join(panels) + "\n</svg>\n")


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
