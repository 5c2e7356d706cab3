"""SIGINT / SIGTERM as stop requests: recorded once, kept until the outermost block ends (so self-play sees its
trainer's stop), a second Ctrl-C aborts, a launcher's SIGTERM after a Ctrl-C does not; handlers restored."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nash_fast import interrupt
from nash_fast.interrupt import exit_status, stop_requested, stop_signals

REPO = Path(__file__).resolve().parents[1]


def test_requests_are_shared_by_nested_blocks_and_cleared_at_the_outermost_end():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_signals("outer"):
        assert stop_requested() is None
        with stop_signals("inner"):  # e.g. train() inside selfplay(): same handlers, same request
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop_requested() == "SIGTERM"
        assert stop_requested() == "SIGTERM"  # the outer program stops too
        os.kill(os.getpid(), signal.SIGTERM)  # a repeated SIGTERM is not an abort...
        assert stop_requested() == "SIGTERM"
        os.kill(os.getpid(), signal.SIGINT)  # ...and a Ctrl-C after it is the first Ctrl-C
        assert stop_requested() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert stop_requested() is None
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_second_ctrl_c_aborts_and_a_launchers_sigterm_does_not():
    with pytest.raises(KeyboardInterrupt):
        with stop_signals():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # torchrun / deepspeed forward a Ctrl-C as SIGTERM: still stopping
            assert stop_requested() == "SIGINT"
            os.kill(os.getpid(), signal.SIGINT)
            pytest.fail("the second SIGINT did not abort")
    assert stop_requested() is None
    assert exit_status("SIGINT") == 130 and exit_status("SIGTERM") == 0


def test_request_stop_for_embedding_programs():
    with stop_signals():
        interrupt.request_stop("SIGINT")
        assert stop_requested() == "SIGINT"


QUIET = textwrap.dedent(
    """
    import os, signal, sys, time
    from nash_fast.interrupt import exit_quietly_on_signals, exit_with, mark_finished
    exit_quietly_on_signals("prog")
    if sys.argv[1] == "finished":
        mark_finished()
    print("ready", flush=True)
    if sys.argv[1] == "exit":
        exit_with(3)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("case, signum, status, message",
                         [("working", signal.SIGINT, 130, "prog: SIGINT: stopped (no work in progress to save)"),
                          ("working", signal.SIGTERM, 0, "prog: SIGTERM: stopped"),
                          ("finished", signal.SIGINT, 0, ""), ("exit", None, 3, "")])
def test_outside_the_work_a_signal_exits_quietly(case, signum, status, message):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", QUIET, case], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    if signum is not None:
        process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == status and "Traceback" not in err
    assert message in err


ABORT_MODULE = textwrap.dedent(
    """
    import os, signal, sys
    from nash_fast.cli import run_cli
    from nash_fast.interrupt import exit_with, stop_signals

    def body(argv):
        with stop_signals():
            os.kill(os.getpid(), signal.SIGINT)
            # The second Ctrl-C lands while exec() runs a source string (as dataclasses and namedtuple do): CPython
            # then marks the KeyboardInterrupt "unhandled" and, under python -m, ends the process by SIGINT.
            exec("import os, signal\\nos.kill(os.getpid(), signal.SIGINT)\\nx = 1")
        return 0

    exit_with(run_cli("prog", body, []))
    """
)


def test_an_abort_exits_130_even_through_exec(tmp_path):
    (tmp_path / "abort_module.py").write_text(ABORT_MODULE)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "abort_module"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 130 and "prog: aborted by a second Ctrl-C" in result.stderr
    assert "Traceback" not in result.stderr


LEAVE_MODULE = textwrap.dedent(
    """
    import atexit, sys
    import torch
    import torch.distributed as dist
    from nash_fast.interrupt import exit_with

    # Registered first, so it runs last among the atexit handlers: after exit_with has done its part.
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized(), flush=True))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    gathered = [torch.zeros(1)]
    dist.all_gather(gathered, torch.ones(1))
    exit_with(int(sys.argv[1]))
    """
)


@pytest.mark.parametrize("status", [0, 2])
def test_exit_with_leaves_the_process_group_before_interpreter_shutdown(status):
    """A gloo group left to interpreter shutdown can end a rank by SIGABRT instead of its status (seen as exit -6 on
    the rank whose peer failed first); exit_with destroys it while Python is whole."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", LEAVE_MODULE, str(status)], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == status, result.stderr[-2000:]
    assert "initialized at exit: False" in result.stdout, result.stdout + result.stderr[-2000:]


def test_exit_with_does_not_import_torch():
    code = "import sys\nfrom nash_fast.interrupt import exit_with\nexit_with(0 if 'torch' not in sys.modules else 5)"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
