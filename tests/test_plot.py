"""nash_fast.plot: labelled axes with units, raw and smoothed curves in the legend, schedules never smoothed."""

import pytest

pytest.importorskip("matplotlib")

from nash_fast import plot  # noqa: E402
from nash_fast.train import lr_factor  # noqa: E402


def _rows(total=100, warmup=33, peak=1e-3):
    rows = []
    for s in range(total):
        rows.append({"step": s + 1, "loss": 10.0 / (s + 1) + (s % 3), "chosen_logratio": 0.01 * s,
                     "rejected_logratio": -0.01 * s, "reward_accuracy": 0.5 + 0.004 * s, "reward_margin": 0.02 * s,
                     "lr": peak * lr_factor(s, total_steps=total, warmup_steps=warmup, schedule="linear"),
                     "grad_norm": 1.0 + (s % 5), "tokens_per_s": 1000.0 + 10 * (s % 7), "skipped": s in (40, 41)})
    return rows


def test_every_panel_has_labelled_axes_and_a_legend_naming_raw_and_smoothed():
    rows = _rows()
    figures = dict(plot.metric_figures(rows))
    assert sorted(figures) == sorted(p.name for p in plot.PANELS)
    for panel in plot.PANELS:
        axes = figures[panel.name].axes[0]
        assert axes.get_xlabel() == "optimizer step"
        assert axes.get_ylabel() == panel.ylabel and "(" in panel.ylabel and panel.ylabel.endswith(")")
        labels = [t.get_text() for t in axes.get_legend().get_texts()]
        assert "skipped step" in labels and labels.count("skipped step") == 1
        for key in panel.keys:
            if key not in rows[0]:
                continue
            if panel.schedule:
                assert f"{key} (as applied, not smoothed)" in labels
            else:
                assert {f"{key} (raw)", f"{key} (smoothed, EMA {plot.SMOOTHING:g})"} <= set(labels), labels
                raw, smoothed = (next(l for l in axes.get_lines() if l.get_label() == f"{key}{suffix}")
                                 for suffix in (" (raw)", f" (smoothed, EMA {plot.SMOOTHING:g})"))
                assert list(raw.get_ydata()) == [r[key] for r in rows]
                assert list(smoothed.get_ydata()) == pytest.approx(plot.smooth([r[key] for r in rows]))


def test_the_learning_rate_is_drawn_as_applied():
    """The schedule's peak (1e-3 at step 34, after 33 warmup steps) is where the plotted curve peaks: an EMA
    would lower it and move it later (the issue saw 9.3e-4 at step 55)."""
    rows = _rows()
    axes = dict(plot.metric_figures(rows))["lr"].axes[0]
    (line,) = [l for l in axes.get_lines() if l.get_label().startswith("lr")]
    assert list(line.get_ydata()) == [r["lr"] for r in rows]
    peak = max(range(len(rows)), key=lambda i: line.get_ydata()[i])
    assert line.get_xdata()[peak] == 34 and line.get_ydata()[peak] == 1e-3


def test_plot_metrics_writes_one_png_per_panel(tmp_path):
    import json

    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(20, 2)))
    paths = plot.plot_metrics(tmp_path)
    assert sorted(p.stem for p in paths) == sorted(p.name for p in plot.PANELS)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
