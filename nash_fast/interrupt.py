"""SIGINT and SIGTERM as stop requests: the program finishes what it is doing, saves, says how to resume, exits.

    with stop_signals("nash_fast"):      # installs the handlers (main thread only); nested uses share them
        ...
        if stop_requested():             # at a safe point: after an optimizer step, a precompute shard, a stage
            save(); return

The first SIGINT (Ctrl-C) or SIGTERM records a request and prints one line saying so; the program honours it
at its next safe point. A second Ctrl-C aborts at once (KeyboardInterrupt, which the CLIs turn into a
one-line message and exit status 130): the last complete checkpoint is still there. SIGTERMs after a request
are ignored, since launchers (torchrun, the deepspeed launcher) follow a Ctrl-C with a SIGTERM to every
worker, which must not turn the graceful stop into an abort; a Ctrl-C after a SIGTERM counts as the first.

The request lives until the outermost `with` block ends, so self-play (which trains in-process) sees the
trainer's stop too and stops at its stage boundary. Exit status of the CLIs after a graceful stop:
0 for SIGTERM (a scheduler's preemption: the checkpoint is complete), 130 for SIGINT, as shells expect.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

_state = {"depth": 0, "requested": None, "previous": {}, "label": "nash_fast"}


class Interrupted(Exception):
    """Raised at a safe point after a stop request, when the caller has nothing left to return."""

    def __init__(self, signal_name: str, message: str):
        self.signal_name = signal_name
        super().__init__(message)


def _handle(signum, frame):
    name = signal.Signals(signum).name
    if signum == signal.SIGINT:
        if _state["requested"] == "SIGINT":
            _state["aborted"] = True
            raise KeyboardInterrupt("second Ctrl-C")
        _state["requested"] = "SIGINT"  # a first Ctrl-C, also after a SIGTERM: the next one aborts
        os.write(2, f"\n[{_state['label']}] SIGINT: stopping at the next safe point (the current step finishes and "
                    "is saved); press Ctrl-C again to abort at once\n".encode())
    elif _state["requested"] is None:
        _state["requested"] = name
        os.write(2, f"\n[{_state['label']}] {name}: stopping at the next safe point (the current step finishes and "
                    "is saved); Ctrl-C twice aborts at once\n".encode())
    # A SIGTERM after a stop request (a launcher forwarding the Ctrl-C): already stopping.


def stop_requested() -> str | None:
    """'SIGINT' or 'SIGTERM' once a stop was requested inside stop_signals(), else None."""
    return _state["requested"]


def request_stop(signal_name: str = "SIGTERM") -> None:
    """Ask for a stop as a signal would (for embedding programs and tests)."""
    if _state["requested"] is None:
        _state["requested"] = signal_name


@contextlib.contextmanager
def stop_signals(label: str = "nash_fast"):
    """Install the SIGINT/SIGTERM handlers for the block (outermost block only; no-op outside the main thread)."""
    outermost = _state["depth"] == 0
    installed = outermost and threading.current_thread() is threading.main_thread()
    if outermost:
        _state["label"] = label
        _state["requested"] = None
    if installed:
        _state["previous"] = {s: signal.signal(s, _handle) for s in (signal.SIGINT, signal.SIGTERM)}
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
        if installed:
            for s, previous in _state["previous"].items():
                signal.signal(s, previous)
            _state["previous"] = {}
        if outermost:
            _state["requested"] = None


def exit_quietly_on_signals(prog: str) -> None:
    """Outside the work (a CLI's imports, argument parsing, the final printout): SIGINT / SIGTERM end the process at
    once with one line and the usual exit status; stop_signals() replaces these handlers while there is work."""
    def handle(signum, frame):
        name = signal.Signals(signum).name
        if _state.get("finished"):  # the work is done: the signal changes nothing
            os._exit(0)
        os.write(2, f"\n{prog}: {name}: stopped (no work in progress to save)\n".encode())
        os._exit(exit_status(name))

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, handle)


def mark_finished() -> None:
    """The program's work is complete: a signal from now on exits with status 0."""
    _state["finished"] = True


def exit_with(status: int):
    """sys.exit(status) with SIGINT / SIGTERM ignored: the interpreter's shutdown resets Python-level handlers to
    the defaults (not ignored ones), and a signal in that window would turn the status into death by signal."""
    import sys

    if threading.current_thread() is threading.main_thread():
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
    if _state.get("aborted"):
        # After an abort (a KeyboardInterrupt raised and caught), CPython may still end the process by SIGINT
        # (exit -2) instead of this status: a KeyboardInterrupt that passed through exec() of a source string
        # (dataclasses, namedtuple) marks it "unhandled". An abort has nothing left to clean up: exit now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    _leave_process_group()
    sys.exit(status)


def _leave_process_group() -> None:
    """destroy_process_group() while the interpreter is whole. Left to interpreter shutdown, a gloo group's worker
    threads can free work objects holding tensors after Python is gone: the process dies by SIGABRT (exit -6)
    instead of its status, seen on a rank whose peer stopped first (pytorch/pytorch#179291). Every collective has
    returned by now, so leaving needs no peer; torch is not imported here when the program never did."""
    import sys

    dist = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - a group that cannot be torn down is left to the interpreter, as before
        pass


def exit_status(signal_name: str | None) -> int:
    """The CLIs' exit status after a graceful stop."""
    return 130 if signal_name == "SIGINT" else 0
