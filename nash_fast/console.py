"""What the trainer prints: messages and progress that stay readable on a terminal and in a log file.

    console = Console()                           # messages on stdout, progress on stderr
    console.log("saved checkpoint ...")           # "[nash_fast] saved checkpoint ..." on a line of its own
    with console.progress(total=330, initial=0, desc="sppo") as progress:
        progress.update(step, loss=..., tokens=..., tokens_per_s=...)

On a terminal (the progress stream is a TTY) progress is a tqdm bar, and every message goes through the bar:
tqdm.write clears the bar's line, prints the message and redraws the bar, so no message is printed onto the
bar. DeepSpeed's and transformers' log records are routed the same way while the bar is shown.

Anywhere else (a log file, a pipe, CI) a bar would be one endless line of carriage returns, so there is none:
progress is a plain line at the first step, each tenth of the run, the last step, and at least every
`interval_s` seconds in between:

    [nash_fast] step 33/330 (10%) | loss 1.234 | 1,234 tokens/s | elapsed 0:00:03 | ETA 0:00:27

loss and tokens/s there are the mean loss of the (non-skipped) steps and the token rate since the previous
line; ETA is this session's mean time per step times the steps left.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import time
from typing import Callable, TextIO

__all__ = ["Console", "PlainProgress", "BarProgress", "is_terminal", "library_bars_only_on_a_terminal", "log"]

PREFIX = "[nash_fast]"
# Loggers whose records would otherwise be printed onto the bar's line.
ROUTED_LOGGERS = ("DeepSpeed", "transformers")


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(0.0, seconds))))


class Console:
    """Messages (to `out`) and progress (to `err`) of one process. enabled=False prints nothing (other ranks)."""

    def __init__(self, *, enabled: bool = True, out: TextIO | None = None, err: TextIO | None = None,
                 prefix: str = PREFIX, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.enabled = enabled
        self._out, self._err = out, err
        self.prefix = prefix
        self.interval_s = interval_s
        self.clock = clock

    @property
    def out(self) -> TextIO:
        return self._out if self._out is not None else sys.stdout  # looked up late: pytest swaps sys.stdout

    @property
    def err(self) -> TextIO:
        return self._err if self._err is not None else sys.stderr

    def log(self, message: str) -> None:
        """One message line; while a bar is shown it is printed through the bar (never onto its line)."""
        if not self.enabled:
            return
        from tqdm import tqdm

        tqdm.write(f"{self.prefix} {message}", file=self.out)  # without a bar: a plain write
        self.out.flush()

    @contextlib.contextmanager
    def progress(self, *, total: int, initial: int = 0, desc: str = "", show: bool = True):
        """A bar on a terminal, plain periodic lines elsewhere; nothing with show=False or enabled=False."""
        if not (self.enabled and show):
            yield _NoProgress()
        elif is_terminal(self.err):
            bar = BarProgress(total=total, initial=initial, desc=desc, file=self.err)
            try:
                with _routed_to_tqdm(self.err):
                    yield bar
            finally:
                bar.close()
        else:
            yield PlainProgress(total=total, initial=initial, write=self._write_err, prefix=self.prefix,
                                interval_s=self.interval_s, clock=self.clock)

    def _write_err(self, line: str) -> None:
        self.err.write(line + "\n")
        self.err.flush()


def log(message: str) -> None:
    """A "[nash_fast] ..." line on stdout, printed through the progress bar while one is shown."""
    Console().log(message)


class _NoProgress:
    def update(self, step: int, **metrics) -> None:
        pass


class BarProgress:
    """The tqdm bar (terminal only)."""

    def __init__(self, *, total: int, initial: int, desc: str, file: TextIO):
        from tqdm import tqdm  # the class whose write() clears it (tqdm.auto's may be a subclass with its own registry)

        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, file=file)

    def update(self, step: int, *, loss: float | None = None, tokens: int = 0, tokens_per_s: float | None = None) -> None:
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=loss, tok_s=round(tokens_per_s or 0))

    def close(self) -> None:
        self.bar.close()


class PlainProgress:
    """Plain progress lines for logs: first step, each tenth of the run, last step, and at least every
    interval_s seconds."""

    def __init__(self, *, total: int, initial: int, write: Callable[[str], None], prefix: str = PREFIX,
                 interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.initial = total, initial
        self.write, self.prefix, self.interval_s, self.clock = write, prefix, interval_s, clock
        self.start = self.last_time = clock()
        self.last_step = initial
        self.tokens_since_line = 0
        self.losses_since_line: list[float] = []

    def _due(self, step: int, now: float) -> bool:
        if step in (self.initial + 1, self.total):
            return True
        if step * 10 // self.total > self.last_step * 10 // self.total:  # crossed a tenth of the run
            return True
        return now - self.last_time >= self.interval_s

    def update(self, step: int, *, loss: float | None = None, tokens: int = 0, tokens_per_s: float | None = None) -> None:
        self.tokens_since_line += tokens
        if loss is not None and math.isfinite(loss):
            self.losses_since_line.append(loss)
        now = self.clock()
        if not self._due(step, now):
            return
        losses = self.losses_since_line
        loss = sum(losses) / len(losses) if losses else None
        elapsed = now - self.start
        done = step - self.initial
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        since = now - self.last_time
        rate = self.tokens_since_line / since if since > 0 else tokens_per_s
        parts = [f"{self.prefix} step {step}/{self.total} ({100 * step / self.total:.0f}%)",
                 "loss " + ("n/a" if loss is None else f"{loss:.4g}"),
                 ("n/a" if rate is None else f"{rate:,.0f}") + " tokens/s",
                 f"elapsed {_duration(elapsed)}", f"ETA {_duration(eta)}"]
        self.write(" | ".join(parts))
        self.last_time, self.last_step, self.tokens_since_line, self.losses_since_line = now, step, 0, []


@contextlib.contextmanager
def _routed_to_tqdm(stream: TextIO):
    """DeepSpeed's and transformers' console log handlers write through tqdm while the bar is shown."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    loggers = [logging.getLogger(name) for name in ROUTED_LOGGERS]
    loggers = [logger for logger in loggers if logger.handlers]  # only those that print by themselves
    with logging_redirect_tqdm(loggers=loggers):
        yield


@contextlib.contextmanager
def library_bars_only_on_a_terminal(stream: TextIO | None = None):
    """transformers' and huggingface_hub's own tqdm bars (loading and writing weights, downloads) are turned
    off while `stream` (default stderr) is not a terminal, and restored afterwards."""
    if is_terminal(stream if stream is not None else sys.stderr):
        yield
        return
    from transformers.utils import logging as transformers_logging

    restore = []
    if transformers_logging.is_progress_bar_enabled():
        transformers_logging.disable_progress_bar()
        restore.append(transformers_logging.enable_progress_bar)
    try:
        import huggingface_hub.utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        yield
    finally:
        for undo in restore:
            undo()
