"""How the command-line programs end: one line per user error, a traceback only for bugs.

    prog: error: --beta must be finite in float32 (|beta| <= 3.4e+38), got 1e+300      exit status 2

run_cli(prog, body, argv) runs body(argv) and maps what escapes it:

    ValueError (bad option, value, record, file; a locked output directory)    one line, exit 2
    OSError (a file system or device problem)                                  one line, exit 1
    RunFailed (the run itself stopped: e.g. too many non-finite steps)         one line, exit 1
    KeyboardInterrupt (a second Ctrl-C)                                         one line, exit 130
    anything else (a bug)                                                       traceback, exit 1

`--debug` anywhere on the command line, or NASH_FAST_DEBUG=1, prints the full traceback as well.
ArgumentParser is argparse's parser with the same one-line error format (no usage block).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Callable, Sequence


class RunFailed(RuntimeError):
    """The run stopped for a reason that is not a bug and not bad input (reported in one line, exit status 1)."""


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def debug_requested(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get("NASH_FAST_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, ValueError) and error.filename is not None:
        text = f"{error.strerror or text}: {error.filename}"
    return text


def run_cli(prog: str, body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        status = body(argv)
        return 0 if status is None else int(status)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: aborted by a second Ctrl-C; the newest complete checkpoint, if any, is intact: rerun the same "
              "command to resume from it", file=sys.stderr, flush=True)
        return 130
    except (ValueError, OSError, RunFailed) as error:
        if debug:
            traceback.print_exc()
        status = 2 if isinstance(error, ValueError) else 1
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
        return status
