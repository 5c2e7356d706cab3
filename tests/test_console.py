"""nash_fast.console: messages never share the progress bar's line; logs get plain progress lines, not a bar."""

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nash_fast.console import Console, PlainProgress

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"\[nash_fast\] step (\d+)/(\d+) \((\d+)%\) \| loss (\S+) \| ([\d,]+|n/a) tokens/s \| "
                  r"elapsed \d+:\d\d:\d\d \| ETA \d+:\d\d:\d\d")


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def screen(text: str) -> list[str]:
    """What a terminal shows for `text`: carriage return goes back to column 0 and overwrites, "\\x1b[A" moves
    up a line (tqdm's nested-bar control; a single bar uses "\\r" only), other escape sequences are dropped."""
    lines, row, col = [[]], 0, 0
    for token in re.findall(r"\x1b\[A|\x1b\[[0-9;]*[A-Za-z]|\r|\n|[^\r\n\x1b]", text):
        if token == "\r":
            col = 0
        elif token == "\n":
            row, col = row + 1, 0
            if row == len(lines):
                lines.append([])
        elif token == "\x1b[A":
            row = max(0, row - 1)
        elif token.startswith("\x1b"):
            continue
        else:
            line = lines[row]
            line.extend(" " * (col - len(line) + 1)) if col >= len(line) else None
            line[col] = token
            col += 1
    return ["".join(line).rstrip() for line in lines]


class Clock:
    def __init__(self, step_s):
        self.now, self.step_s = 0.0, step_s

    def __call__(self):
        return self.now

    def tick(self):
        self.now += self.step_s


def run_plain(total, initial=0, interval_s=1e9, step_s=1.0):
    lines, clock = [], Clock(step_s)
    progress = PlainProgress(total=total, initial=initial, write=lines.append, interval_s=interval_s, clock=clock)
    for step in range(initial + 1, total + 1):
        clock.tick()
        progress.update(step, loss=float(step), tokens=100)
    return lines


def test_plain_lines_at_the_first_step_each_tenth_and_the_last():
    lines = run_plain(total=40)
    steps = [int(LINE.fullmatch(line)[1]) for line in lines]
    assert steps == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    first, last = LINE.fullmatch(lines[0]), LINE.fullmatch(lines[-1])
    assert first[4] == "1" and first[5] == "100"  # step 1's loss; 100 tokens in 1 s
    assert last[4] == "38.5" and last[5] == "100" and lines[-1].endswith("ETA 0:00:00")  # mean of steps 37..40
    assert "elapsed 0:00:40" in lines[-1] and "ETA 0:00:39" in lines[0]  # 1 s per step, 39 left
    # A resumed run counts from where it resumed: its first line is its first step.
    assert [int(LINE.fullmatch(line)[1]) for line in run_plain(total=40, initial=30)] == [31, 32, 36, 40]


def test_plain_lines_at_least_every_interval():
    steps = [int(LINE.fullmatch(line)[1]) for line in run_plain(total=1000, interval_s=25.0, step_s=10.0)]
    assert steps[:4] == [1, 4, 7, 10] and 100 in steps and steps[-1] == 1000
    assert all(b - a <= 3 for a, b in zip(steps, steps[1:]))  # 3 steps of 10 s reach the 25 s interval


def test_messages_never_share_the_bar_line(monkeypatch):
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    console = Console(out=terminal, err=terminal)
    library = logging.getLogger("DeepSpeed")  # as DeepSpeed's logger: a handler on the console stream, no propagation
    handler, propagate = logging.StreamHandler(terminal), library.propagate
    library.addHandler(handler)
    library.propagate = False
    try:
        with console.progress(total=10, desc="sppo") as progress:
            for step in range(1, 6):
                progress.update(step, loss=0.5, tokens=10, tokens_per_s=100.0)
            console.log("saved checkpoint outputs/checkpoints/step-00000005")
            library.warning("a library warning")  # routed through the bar too
            for step in range(6, 11):
                progress.update(step, loss=0.25, tokens=10, tokens_per_s=100.0)
    finally:
        library.removeHandler(handler)
        library.propagate = propagate
    assert library.handlers == [h for h in library.handlers if h is not handler]  # restored
    shown = screen(terminal.getvalue())
    assert "[nash_fast] saved checkpoint outputs/checkpoints/step-00000005" in shown
    assert "a library warning" in shown
    bars = [line for line in shown if line.startswith("sppo:")]
    assert bars and all("saved" not in line and "warning" not in line for line in bars)
    assert any(line.startswith("sppo: 100%") for line in bars)


def test_no_bar_when_stderr_is_not_a_terminal():
    out, err = io.StringIO(), io.StringIO()
    console = Console(out=out, err=err)
    with console.progress(total=20, desc="sppo") as progress:
        for step in range(1, 21):
            progress.update(step, loss=1.0, tokens=5)
        console.log("saved checkpoint x")
    assert "\r" not in err.getvalue() + out.getvalue()
    assert all(LINE.fullmatch(line) for line in err.getvalue().splitlines())
    assert out.getvalue() == "[nash_fast] saved checkpoint x\n"
    with Console(out=out, err=err).progress(total=5, show=False) as progress:
        progress.update(1, loss=1.0)
    with Console(enabled=False, out=out, err=err).progress(total=5) as progress:  # other ranks print nothing
        progress.update(1, loss=1.0)
    assert len(err.getvalue().splitlines()) == 11


def _run_train(args, tmp_path, timeout_s=300):
    """python -m nash_fast.train with stdin, stdout and stderr a pseudo-terminal; returns what it printed."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    import time

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows x 160 columns
    process = subprocess.Popen([sys.executable, "-m", "nash_fast.train", *args], cwd=tmp_path, env=env,
                               stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1.0)[0]:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        else:
            pytest.fail(f"the trainer did not finish within {timeout_s} s")
    finally:
        os.close(master)
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
    text = b"".join(chunks).decode()
    assert process.wait(timeout=60) == 0, text[-3000:]
    return text.replace("\r\n", "\n")  # the pty's output processing adds \r before \n


def _data(tmp_path):
    import json

    from nash_fast.data import load_tiny_preferences

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in load_tiny_preferences()[:16]))
    return ["--dataset", str(data), "--max-steps", "6", "--save-steps", "3", "--plot", "false", "--tensorboard", "false",
            "--max-tokens", "512"]


def test_trainer_console_in_a_log_file(tmp_path, capfd):
    """stderr is not a terminal (pytest captures the file descriptors): plain progress lines, no carriage return
    from our progress or transformers' bars (writing the final model shows one on a terminal)."""
    import nash_fast.train as trainer
    from nash_fast.config import parse_config

    trainer.train(parse_config(_data(tmp_path) + ["--output-dir", str(tmp_path / "out")]))
    out, err = capfd.readouterr()
    assert "\r" not in out + err
    for step in (3, 6):
        assert f"[nash_fast] saved checkpoint {tmp_path}/out/checkpoints/step-0000000{step}" in out.splitlines()
    steps = [int(m[1]) for m in map(LINE.fullmatch, err.splitlines()) if m]
    assert steps[0] == 1 and steps[-1] == 6 and steps == sorted(steps)


def test_trainer_console_on_a_terminal(tmp_path):
    """A pseudo-terminal: the bar is drawn, and every message is on a line of its own."""
    shown = screen(_run_train(_data(tmp_path) + ["--output-dir", "out"], tmp_path))
    for step in (3, 6):
        assert f"[nash_fast] saved checkpoint out/checkpoints/step-0000000{step}" in shown, shown
    assert any(re.match(r"sppo: 100%.*6/6", line) for line in shown), shown
    assert not any(LINE.fullmatch(line) for line in shown)  # no plain progress lines on a terminal
