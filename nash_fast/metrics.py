"""What a training run reports: OUTPUT/metrics.jsonl (one JSON line per optimizer step, TensorBoard when
installed), its plots (nash_fast.plot) and the summary printed at the end.

    metrics_log = MetricsLog(output_dir, enabled=is_rank_0, tensorboard=True, lines=run.metrics_lines)
    metrics_log.write({"step": 1, "loss": ...}); metrics_log.close()
    print_summary({..., "loss_start_end": loss_start_end(metrics_log.path), "plots": write_plots(cfg, output_dir)})
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from nash_fast import rundir
from nash_fast.config import TrainConfig
from nash_fast.console import log
from nash_fast.plot import MatplotlibMissing, plot_metrics, read_metrics

__all__ = ["MetricsLog", "write_plots", "loss_start_end", "print_summary"]


class MetricsLog:
    """OUTPUT/metrics.jsonl (one JSON line per step) and TensorBoard when installed; rank 0 only.

    On resume the file is rebuilt from the checkpoint's own copy of the log (verified with the checkpoint),
    whatever state the file is in: lines cut mid-way, bytes that are not UTF-8, another run's lines, or a
    directory in its place (moved aside, with a warning). Lines after the checkpoint describe steps that will be
    redone and are dropped."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, lines: list[str]):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        self.lines = lines  # the run's list (TrainRun.metrics_lines): appended to here, saved with every checkpoint
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._rebuild()
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def _rebuild(self) -> None:
        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            aside = self.path.with_name(f"metrics.jsonl.moved-aside-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(self.path, aside)
            log(f"warning: {self.path} was not a file; moved it to {aside}")
        elif self.path.is_file():
            damaged = _damaged_lines(self.path)
            if damaged:
                log(f"warning: {self.path}: line(s) {', '.join(map(str, damaged[:5]))} damaged (cut, not UTF-8 or not "
                    f"JSON); rebuilt the log{' from the checkpoint' if self.lines else ''}")
        rundir.write_bytes_atomic(self.path, "".join(self.lines).encode())

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self.lines.append(line)
        self.file.write(line)
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _damaged_lines(path: Path) -> list[int]:
    """1-based numbers of the lines of a metrics file that are not a UTF-8 JSON record with a step."""
    damaged = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                if not raw.endswith(b"\n") or not isinstance(json.loads(raw.decode("utf-8"))["step"], int):
                    damaged.append(number)
            except (ValueError, KeyError, TypeError):
                damaged.append(number)
    return damaged


def write_plots(cfg: TrainConfig, output_dir: Path) -> str:
    if not cfg.plot:
        return "disabled (--plot false)"
    try:
        paths = plot_metrics(output_dir)
    except MatplotlibMissing as error:
        return str(error)
    return str(paths[0].parent) if paths else "no metrics to plot"


def loss_start_end(path: Path) -> tuple[float, float] | None:
    """Mean loss of the first and of the last tenth of the steps (per-step losses of small batches are noisy)."""
    losses = [r["loss"] for r in read_metrics(path) if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return None
    window = max(1, len(losses) // 10)
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def print_summary(summary: dict) -> None:
    start_end = summary.get("loss_start_end")
    trend = "" if start_end is None else f", mean loss {start_end[0]:.4g} (first 10% of steps) -> {start_end[1]:.4g} (last 10%)"
    print(
        "\n".join([
            "",
            f"[nash_fast] done: {summary['steps']} steps ({summary['skipped_steps']} skipped){trend}",
            f"  metrics: {summary['metrics']}",
            f"  plots:   {summary['plots']}",
            f"  model:   {summary['model']}  ({summary.get('model_kind', 'transformers.AutoModelForCausalLM.from_pretrained')})",
        ] + ([f"  merged:  {summary['merged_model']}  (transformers.AutoModelForCausalLM.from_pretrained)"]
             if summary.get("merged_model") else [])),
        flush=True,
    )
