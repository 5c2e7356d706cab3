"""Fault injection against `python -m nash_fast.train` on the tiny default: kill -9 at random moments (a share of
them aimed at checkpoint writes), single bit flips in every checkpoint file and in the precompute cache, two runs
on one --output-dir (at once, and one after another's kill -9), and SIGINT / SIGTERM (once, and twice) at random
moments. After every fault the same command is rerun; a trial counts as passed when the rerun finishes and its
final weights are bitwise those of an uninterrupted run, its metrics.jsonl holds exactly that run's steps, and no
temporary or incomplete directory is left behind. Prints the counts per kind.

    python tests/fault_injection.py                          # 10 trials of each kind, 200-step runs
    python tests/fault_injection.py --trials 30 --kinds kill,bitflip --steps 200 --seed 1
    python tests/fault_injection.py --trials 1 --steps 24    # the CI smoke test (tests/test_fault_injection.py)
    python tests/fault_injection.py --kinds kill,bitflip --train-args "--zero-stage 2"   # DeepSpeed, one process

Every subprocess is bounded by --timeout seconds. Exit status 1 when any trial failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINDS = ("kill", "bitflip", "overlap", "stale", "signal", "double_sigint")
TIMING = ("tokens_per_s", "step_time_s")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Harness:
    def __init__(self, work: Path, steps: int, save_steps: int, timeout: float, rng: random.Random,
                 train_args: list[str] = ()):
        self.work, self.steps, self.save_steps, self.timeout, self.rng = work, steps, save_steps, timeout, rng
        self.train_args = list(train_args)
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
        self.counter = 0
        self.last_stderr = self.last_stdout = ""

    def args(self, out: Path) -> list[str]:
        return [sys.executable, "-m", "nash_fast.train", "--output-dir", str(out), "--max-steps", str(self.steps),
                "--save-steps", str(self.save_steps), "--save-total-limit", "3", "--seed", "7",
                "--progress-bar", "false", "--plot", "false", "--tensorboard", "false", *self.train_args]

    def fresh(self, name: str) -> Path:
        self.counter += 1
        return self.work / f"{self.counter:03d}-{name}"

    def start(self, out: Path) -> subprocess.Popen:
        env = dict(self.env)
        if any(a in ("--zero-stage", "--deepspeed") for a in self.train_args):  # a DeepSpeed world of one process
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1",
                       LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        return subprocess.Popen(self.args(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, cwd=self.work)

    def finish(self, process: subprocess.Popen) -> tuple[int, str, str]:
        try:
            out, err = process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
            out, err = out, err + "\n[fault_injection] timed out"
            self.last_stderr, self.last_stdout = err[-4000:], out[-4000:]
            return -999, out, err
        self.last_stderr = f"exit status {process.returncode}\n{err[-4000:]}"
        self.last_stdout = out[-4000:]
        return process.returncode, out, err

    def run(self, out: Path) -> tuple[int, str, str]:
        return self.finish(self.start(out))

    # ------------------------------------------------------------------------------------------ checks
    def weights(self, out: Path):
        from safetensors.torch import load_file

        return load_file(str(out / "final" / "model.safetensors"))

    def metrics(self, out: Path) -> list[dict]:
        with open(out / "metrics.jsonl", "rb") as f:
            return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]

    def verdict(self, out: Path, reference: "Reference", rc: int, stderr: str) -> str | None:
        """None when the rerun reached the uninterrupted run's weights and log and left no debris; else why not."""
        import torch

        if rc != 0:
            return f"rerun exit status {rc}: {stderr.strip().splitlines()[-1:] if stderr.strip() else ''}"
        try:
            weights = self.weights(out)
        except Exception as error:  # noqa: BLE001 - reported as a failed trial
            return f"no final model ({error})"
        if weights.keys() != reference.weights.keys() or not all(torch.equal(weights[k], reference.weights[k])
                                                                  for k in weights):
            return "final weights differ from the uninterrupted run"
        try:
            if self.metrics(out) != reference.metrics:
                return "metrics.jsonl differs from the uninterrupted run's"
        except (OSError, ValueError) as error:
            return f"metrics.jsonl unreadable ({error})"
        debris = [str(p.relative_to(out)) for p in out.rglob("*") if p.name.startswith(".tmp-") or ".tmp" in p.suffix]
        from nash_fast.checkpoint import is_complete, list_checkpoints

        debris += [str(p.relative_to(out)) for _, p in list_checkpoints(out / "checkpoints") if not is_complete(p)]
        if debris:
            return f"left behind: {debris[:4]}"
        return None


class Reference:
    def __init__(self, harness: Harness):
        self.out = harness.work / "reference"
        start = time.time()
        rc, _, err = harness.run(self.out)
        self.seconds = time.time() - start
        if rc != 0:
            raise SystemExit(f"the uninterrupted reference run failed ({rc}):\n{err[-3000:]}")
        self.weights = harness.weights(self.out)
        self.metrics = harness.metrics(self.out)


def poll_until(predicate, deadline: float, interval: float = 0.002) -> bool:
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def phase(out: Path) -> str:
    """Where a run is now, from its files: refined by refine() from what it had printed by then."""
    root = out / "checkpoints"
    if root.is_dir() and any(p.name.startswith(".tmp-step") for p in root.iterdir()):
        return "checkpoint write"
    if not (out / "metrics.jsonl").exists():
        return "before training"
    return "training"


def refine(where: str, stdout: str) -> str:
    if where != "before training":
        return where
    if "[nash_fast]" not in stdout:
        return "start-up (imports, arguments)"
    if "precompute ref: computing" in stdout or "precompute ref: cache" in stdout:
        return "precompute / model loading"
    return "data loading"


# ------------------------------------------------------------------------------------------------ trials

def trial_kill(h: Harness, ref: Reference) -> tuple[str | None, str]:
    """kill -9 at a uniformly random moment, or (half the trials) as soon as a checkpoint write is under way."""
    out = h.fresh("kill")
    process = h.start(out)
    aim_at_write = h.rng.random() < 0.5
    if aim_at_write:
        root = out / "checkpoints"
        poll_until(lambda: process.poll() is not None or (root.is_dir() and any(
            p.name.startswith(".tmp-step") for p in root.iterdir())), time.time() + h.timeout)
    else:
        poll_until(lambda: process.poll() is not None, time.time() + h.rng.uniform(0.2, ref.seconds))
    where = phase(out)
    if process.poll() is not None:
        where = "after the run finished (not killed)"
    process.send_signal(signal.SIGKILL)
    _, stdout, _ = h.finish(process)
    rc, _, err = h.run(out)
    return h.verdict(out, ref, rc, err), refine(where, stdout)


def _checkpoint_base(h: Harness, ref: Reference) -> Path:
    base = h.work / "bitflip-base"
    if not base.exists():
        shutil.copytree(ref.out / "checkpoints", base / "checkpoints")
        shutil.copytree(ref.out / "precompute", base / "precompute")
    return base


def trial_bitflip(h: Harness, ref: Reference) -> tuple[str | None, str]:
    """Flip one random bit of one file of the newest checkpoint (or of the precompute cache) and rerun: the file is
    named in a warning, the next older checkpoint (or a recomputation) is used, the result is bitwise the same."""
    from nash_fast.checkpoint import list_checkpoints

    base = _checkpoint_base(h, ref)
    out = h.fresh("bitflip")
    shutil.copytree(base, out)
    newest = list_checkpoints(out / "checkpoints")[-1][1]
    files = sorted(p for p in newest.rglob("*") if p.is_file()) + sorted((out / "precompute").glob("ref-logps-*.pt"))
    target = h.rng.choice(files)
    data = bytearray(target.read_bytes())
    bit = h.rng.randrange(len(data) * 8)
    data[bit // 8] ^= 1 << (bit % 8)
    target.write_bytes(bytes(data))
    name = str(target.relative_to(out))
    rc, stdout, err = h.run(out)
    problem = h.verdict(out, ref, rc, err)
    if problem is None:
        if target.name == "complete.json":  # a flip in the manifest may name the entry it broke, or the manifest
            named = f"skipping checkpoint {newest}: " in stdout
        else:
            named = target.name in stdout and ("skipping checkpoint" in stdout or "not using cache file" in stdout)
        if not named:
            problem = f"no warning naming {target.name}: {[l for l in stdout.splitlines() if 'warning' in l][:3]}"
    return problem, name


def _holder(out: Path) -> int | None:
    try:
        return int(json.loads((out / ".nash_fast.lock").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def trial_overlap(h: Harness, ref: Reference) -> tuple[str | None, str]:
    """A second run on the same --output-dir, started at the same moment as the first or while the first trains:
    exactly one trains, the other exits at once with status 2 naming the holder; the survivor's result is the
    reference. The holder is paused (SIGSTOP) as soon as it holds the lock and resumed once the other has exited,
    so the outcome does not depend on how fast either process runs."""
    out = h.fresh("overlap")
    together = h.rng.random() < 0.5
    processes = [h.start(out)]
    if together:
        processes.append(h.start(out))
    else:
        poll_until(lambda: processes[0].poll() is not None or (out / "metrics.jsonl").exists(), time.time() + h.timeout)
    by_pid = {p.pid: p for p in processes}
    where = "at once" if together else "while training"
    if not poll_until(lambda: _holder(out) in by_pid or processes[0].poll() is not None, time.time() + h.timeout):
        return "no process took the lock", where
    holder = by_pid.get(_holder(out))
    if holder is not None:
        holder.send_signal(signal.SIGSTOP)
        if _holder(out) != holder.pid:  # it released the lock (its run finished) just before the pause
            holder.send_signal(signal.SIGCONT)
            holder = None
    if holder is None:  # the first run finished before it could be paused: no overlap to test this time
        results = [h.finish(p) for p in processes]
        rc, _, err = h.run(out)  # a rerun finds a finished run and exits 0
        bad = [r for r in results if r[0] not in (0, 2)]  # 2: refused while the other held the lock
        return h.verdict(out, ref, bad[0][0] if bad else rc, bad[0][2] if bad else err), "first run finished first"
    if not together:
        processes.append(h.start(out))
    other = next(p for p in processes if p is not holder)
    rc_other, _, err_other = h.finish(other)
    holder.send_signal(signal.SIGCONT)
    rc_holder, _, err_holder = h.finish(holder)
    if (rc_holder, rc_other) != (0, 2):
        return f"exit statuses: holder {rc_holder}, other {rc_other} (expected 0 and 2): {err_other[-300:]}", where
    if f"is in use by another run: pid {holder.pid}" not in err_other or len(err_other.strip().splitlines()) != 1:
        return f"refusal is not one line naming the holder: {err_other.strip()[-300:]}", where
    return h.verdict(out, ref, 0, ""), where


def trial_stale(h: Harness, ref: Reference) -> tuple[str | None, str]:
    """kill -9 a run holding the lock, then rerun: the dead holder's lock is taken over (and said so)."""
    out = h.fresh("stale")
    process = h.start(out)
    poll_until(lambda: process.poll() is not None or (out / "metrics.jsonl").exists(), time.time() + h.timeout)
    time.sleep(h.rng.uniform(0.0, ref.seconds / 3))
    where = phase(out)
    process.send_signal(signal.SIGKILL)
    h.finish(process)
    alive = _holder(out) == process.pid  # it died holding the lock (a clean release empties the file)
    rc, stdout, err = h.run(out)
    problem = h.verdict(out, ref, rc, err)
    if problem is None and alive and f"took over the lock of pid {process.pid}" not in stdout:
        problem = "no 'took over the lock' message"
    return problem, where if alive else "after the run released the lock"


def trial_signal(h: Harness, ref: Reference) -> tuple[str | None, str]:
    """SIGINT or SIGTERM at a random moment: the run stops at a safe point (exit 130 / 0, saying how to resume) and
    the rerun completes it."""
    out = h.fresh("signal")
    name = h.rng.choice(("SIGINT", "SIGTERM"))
    process = h.start(out)
    poll_until(lambda: process.poll() is not None, time.time() + h.rng.uniform(0.2, ref.seconds))
    where = phase(out)
    process.send_signal(getattr(signal, name))
    rc, stdout, err = h.finish(process)
    where = f"{name} in {refine(where, stdout)}"
    finished = "done:" in stdout
    expected = 0 if finished or name == "SIGTERM" else 130
    if rc != expected:
        return f"{name}: exit status {rc}, expected {expected} ({err.strip()[-300:]})", where
    nothing_started = "no work in progress to save" in err  # a signal before the run began (imports, parsing)
    if not finished and not nothing_started and "Resume with" not in stdout:
        return f"{name}: no resume instructions printed", where
    if "Traceback" in err:
        return f"{name}: a traceback was printed", where
    rc, _, err = h.run(out)
    return h.verdict(out, ref, rc, err), where


def trial_double_sigint(h: Harness, ref: Reference) -> tuple[str | None, str]:
    """Two Ctrl-Cs: the second aborts at once (exit 130, one line, no traceback); the rerun completes the run."""
    out = h.fresh("double")
    process = h.start(out)
    poll_until(lambda: process.poll() is not None, time.time() + h.rng.uniform(0.2, ref.seconds))
    where = phase(out)
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    rc, stdout, err = h.finish(process)
    where = refine(where, stdout)
    if rc not in (130, 0) or "Traceback" in err:
        return f"exit status {rc} / traceback: {err.strip()[-300:]}", where
    rc, _, err = h.run(out)
    return h.verdict(out, ref, rc, err), where


TRIALS = {"kill": trial_kill, "bitflip": trial_bitflip, "overlap": trial_overlap, "stale": trial_stale,
          "signal": trial_signal, "double_sigint": trial_double_sigint}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials of each kind")
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of each run")
    parser.add_argument("--save-steps", type=int, default=None, help="checkpoint interval (default: steps / 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fault times, files and bits")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed for any one subprocess")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--json", default=None, help="also write the counts to this JSON file")
    parser.add_argument("--train-args", default="", help="extra trainer flags for every run, e.g. '--zero-stage 2'")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"unknown kinds {unknown}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="nash-fast-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    import shlex

    harness = Harness(work, args.steps, args.save_steps or max(1, args.steps // 8), args.timeout,
                      random.Random(args.seed), shlex.split(args.train_args))
    try:
        reference = Reference(harness)
        print(f"uninterrupted run: {args.steps} steps in {reference.seconds:.1f} s (checkpoint every "
              f"{harness.save_steps} steps)", flush=True)
        counts = {}
        for kind in kinds:
            passed, detail = 0, {}
            for number in range(args.trials):
                problem, where = TRIALS[kind](harness, reference)
                passed += problem is None
                detail[where] = detail.get(where, 0) + 1
                print(f"  {kind} {number + 1}/{args.trials} [{where}]: {'ok' if problem is None else 'FAILED: ' + problem}",
                      flush=True)
                if problem is not None:
                    with open(work / "failures.log", "a") as log:
                        log.write(f"== {kind} {number + 1} [{where}]\n{problem}\n{harness.last_stderr}\n"
                                  f"stdout:\n{harness.last_stdout}\n")
            counts[kind] = {"passed": passed, "trials": args.trials, "where": detail}
        print("\nfault injection: passed / trials (where the fault landed)")
        for kind, c in counts.items():
            print(f"  {kind:14s} {c['passed']:3d} / {c['trials']:<3d} " + ", ".join(f"{k}: {v}" for k, v in c["where"].items()))
        if args.json:
            Path(args.json).write_text(json.dumps({"steps": args.steps, "save_steps": harness.save_steps,
                                                   "seed": args.seed, "counts": counts}, indent=1))
        return 0 if all(c["passed"] == c["trials"] for c in counts.values()) else 1
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
