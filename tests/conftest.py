import os
import random

# Triton kernels run on CPU through the interpreter; it must be chosen before triton is imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import core as hypothesis_core
from hypothesis import settings

# CI has 2 cores and a 30-minute budget; property tests draw a modest number of examples and
# never fail on wall-clock (the interpreter is slow and other processes share the cores).
settings.register_profile("ci", max_examples=25, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=300, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    """Every run explores new examples, and every run can be repeated exactly.

    Without --hypothesis-seed a fresh seed is drawn here and forced on every property test (so the
    example database, empty on a fresh CI clone, plays no part); the header and the summary print it:
    `python -m pytest --hypothesis-seed=SEED` replays the same draws. A failing example also prints its
    @reproduce_failure blob (print_blob above).
    """
    seed = config.getoption("--hypothesis-seed", None)
    if seed is None:
        seed = random.SystemRandom().randrange(2**32)
        config.option.hypothesis_seed = str(seed)
        hypothesis_core.global_force_seed = seed
    config._nash_fast_hypothesis_seed = seed


def pytest_report_header(config):
    seed = getattr(config, "_nash_fast_hypothesis_seed", None)
    return None if seed is None else f"hypothesis seed {seed}: rerun these draws with --hypothesis-seed={seed}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    seed = getattr(config, "_nash_fast_hypothesis_seed", None)
    if seed is not None and exitstatus != 0:
        terminalreporter.write_line(f"hypothesis seed {seed}: rerun these draws with --hypothesis-seed={seed}")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 16 shipped preference records as a JSONL file: the trainer tests' small --dataset."""
    import json

    from nash_fast.data import load_tiny_preferences

    path = tmp_path_factory.mktemp("data") / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in load_tiny_preferences()[:16]))
    return str(path)


@pytest.fixture
def sigterm_after_step():
    """arm(patch, step): the trainer sends its own process SIGTERM right after optimizer step `step`, as a signal
    from outside would arrive (its handler checkpoints, then stops the loop). `patch` is the test's monkeypatch
    or one of its contexts, which decides when nash_fast.train._train_step is restored."""
    import signal

    import nash_fast.train as trainer

    def arm(patch, step):
        real_step = trainer._train_step

        def step_then_sigterm(run):
            record = real_step(run)
            if run.state.step == step:
                os.kill(os.getpid(), signal.SIGTERM)
            return record

        patch.setattr(trainer, "_train_step", step_then_sigterm)

    return arm
