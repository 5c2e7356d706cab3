"""python -m nash_fast.train cannot be hijacked, corrupted or clobbered (issue 12): nothing in a checkpoint needs
unpickling, every file is verified before use and a damaged newest checkpoint falls back to the next older one,
one run owns its output directory, SIGINT / SIGTERM stop it at a safe point everywhere, user errors are one line,
path-like names never reach the network, a changed run length does not silently change the schedule, and a
damaged metrics.jsonl is rebuilt from the checkpoint. Every rerun is checked bitwise against one straight run."""

import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import nash_fast.precompute as precompute
import nash_fast.train as trainer
from nash_fast.checkpoint import MANIFEST, list_checkpoints
from nash_fast.rundir import sha256_file
from nash_fast.config import parse_config
from nash_fast.data import load_tiny_preferences
from nash_fast.rundir import RunDirectoryLocked, RunLock, hostname

REPO = Path(__file__).resolve().parents[1]
TIMING = ("tokens_per_s", "step_time_s")
ARGS = ["--max-steps", "6", "--save-steps", "2", "--save-total-limit", "3", "--seed", "3", "--lr", "3e-3",
        "--precompute-max-tokens", "300"]  # several precompute batches, so a stop can land between them


def argv(small_data, out, *extra):
    return ["--dataset", small_data, "--output-dir", str(out), "--progress-bar", "false", "--plot", "false",
            "--max-tokens", "512", "--tensorboard", "false", *ARGS, *extra]


def run(small_data, out, *extra):
    return trainer.train(parse_config(argv(small_data, out, *extra)))


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "final" / "model.safetensors"))


def metrics(out):
    with open(Path(out) / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def assert_same_run(out, reference):
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "final weights differ"
    assert metrics(out) == metrics(reference)


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """One straight 6-step run (checkpoints at 2, 4, 6) every test compares with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run(small_data, out)
    return out


def copy_checkpoints(reference, out, upto=None):
    """A run directory holding the reference's checkpoints (up to step `upto`) and precompute cache only."""
    (out / "checkpoints").mkdir(parents=True)
    for step, path in list_checkpoints(reference / "checkpoints"):
        if upto is None or step <= upto:
            shutil.copytree(path, out / "checkpoints" / path.name)
    shutil.copytree(reference / "precompute", out / "precompute")
    return out


def resign(checkpoint, name):
    """What an attacker who can write the directory does after replacing a file: recompute the manifest entry."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    manifest["files"][name] = {"bytes": (checkpoint / name).stat().st_size, "sha256": sha256_file(checkpoint / name)}
    (checkpoint / MANIFEST).write_text(json.dumps(manifest))


class Payload:
    """A pickle that runs a shell command when unpickled with weights_only=False."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------------------ 1. no pickle

def test_checkpoints_need_no_unpickling_and_a_planted_pickle_never_runs(tmp_path, small_data, reference, capsys):
    newest = list_checkpoints(reference / "checkpoints")[-1][1]
    names = sorted(str(p.relative_to(newest)) for p in newest.rglob("*") if p.is_file())
    assert names == ["complete.json", "metrics.jsonl", "model.pt", "optimizer.pt", "rng_rank0.json", "scheduler.pt",
                     "trainer_state.json"]
    for name in names:
        if name.endswith(".pt"):  # tensors and plain containers only
            assert torch.serialization.get_unsafe_globals_in_checkpoint(str(newest / name)) == [], name
            torch.load(newest / name, weights_only=True)
        elif name.endswith(".json"):
            json.loads((newest / name).read_text())
    cache = next((reference / "precompute").glob("ref-logps-*.pt"))
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(cache)) == []

    # An attacker replaces the newest checkpoint's optimizer state with a pickle and re-signs the manifest; another
    # plants the old RNG file name, which is not in the manifest. Neither runs; both checkpoints are skipped.
    out = copy_checkpoints(reference, tmp_path / "out")
    marker = tmp_path / "pwned"
    step6, step4 = out / "checkpoints" / "step-00000006", out / "checkpoints" / "step-00000004"
    torch.save({"state": Payload(marker)}, step6 / "optimizer.pt")
    resign(step6, "optimizer.pt")
    with open(step4 / "rng_rank0.pt", "wb") as f:
        pickle.dump(Payload(marker), f)
    run(small_data, out)
    log = capsys.readouterr().out
    assert not marker.exists()
    assert f"skipping checkpoint {step6}: optimizer.pt: cannot be loaded (UnpicklingError" in log
    assert f"skipping checkpoint {step4}: rng_rank0.pt: present but not listed in the manifest" in log
    assert "resumed from" in log and "step-00000002 at step 2" in log
    assert_same_run(out, reference)


def test_deepspeed_engine_files_are_checked_and_loaded_weights_only(tmp_path):
    """DeepSpeed's loader unpickles (torch.load(weights_only=False)): a checkpoint is verified before it is handed
    over, every engine file may reference only DeepSpeed's data classes, and the load itself runs weights_only."""
    from nash_fast.checkpoint import CheckpointDamaged
    from nash_fast.resume import _check_deepspeed_files, _weights_only_torch_load

    marker = tmp_path / "pwned"
    engine = tmp_path / "step-00000001" / "engine"
    engine.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "ds_version": "0.19"}, engine / "mp_rank_00_model_states.pt")
    _check_deepspeed_files(tmp_path / "step-00000001")  # the real files' form passes (see ZeRO tests)
    torch.save({"optimizer_state_dict": Payload(marker)}, engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointDamaged, match=r"engine/zero_pp_rank_0_mp_rank_00_optim_states.pt: would unpickle "
                                                r"posix.system"):
        _check_deepspeed_files(tmp_path / "step-00000001")
    with _weights_only_torch_load():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(engine / "zero_pp_rank_0_mp_rank_00_optim_states.pt", weights_only=False)  # as DeepSpeed calls it
    assert not marker.exists()
    assert torch.load is not None and torch.load.__name__ == "load"  # restored


# ------------------------------------------------------------------------------------------------ 2-3. damage

DAMAGE = {
    # A single bit flipped inside the optimizer state (the run went non-finite on every step).
    "bit flip in optimizer.pt": ("optimizer.pt", lambda p: p.write_bytes(_flip(p.read_bytes(), 8 * 4000 + 3)), "SHA-256"),
    "bit flip in model.pt": ("model.pt", lambda p: p.write_bytes(_flip(p.read_bytes(), 8 * 9000)), "SHA-256"),
    "non-UTF-8 manifest": (MANIFEST, lambda p: p.write_bytes(b"\xff\xfe\x00" + p.read_bytes()), "UnicodeDecodeError"),
    "truncated trainer state": ("trainer_state.json", lambda p: p.write_bytes(p.read_bytes()[:-9]), "bytes"),
    "garbage RNG state": ("rng_rank0.json", lambda p: p.write_text("{" + " " * (p.stat().st_size - 1)), "SHA-256"),
}


def _flip(data: bytes, bit: int) -> bytes:
    data = bytearray(data)
    data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_for_the_next_older_one(tmp_path, small_data, reference, capsys, damage):
    name, corrupt, reason = DAMAGE[damage]
    out = copy_checkpoints(reference, tmp_path / "out")
    newest = out / "checkpoints" / "step-00000006"
    corrupt(newest / name)
    damaged_files = {p.relative_to(newest): p.read_bytes() for p in newest.rglob("*") if p.is_file()}
    run(small_data, out)
    log = capsys.readouterr().out
    warning = next(line for line in log.splitlines() if "skipping checkpoint" in line)
    assert f"{newest}: {name}:" in warning and reason in warning
    # Set aside, never deleted: out/checkpoints/damaged/step-00000006, byte for byte, named in the warning.
    aside = out / "checkpoints" / "damaged" / "step-00000006"
    assert f"moved to {aside}" in warning
    assert {p.relative_to(aside): p.read_bytes() for p in aside.rglob("*") if p.is_file()} == damaged_files
    assert "step-00000004 at step 4" in log
    assert_same_run(out, reference)


def test_every_checkpoint_damaged_starts_over(tmp_path, small_data, reference, capsys):
    out = copy_checkpoints(reference, tmp_path / "out")
    for _, path in list_checkpoints(out / "checkpoints"):
        (path / "model.pt").write_bytes(_flip((path / "model.pt").read_bytes(), 77))
    run(small_data, out)
    assert capsys.readouterr().out.count("skipping checkpoint") == 3
    assert_same_run(out, reference)
    with pytest.raises(ValueError, match=r"--resume .*step-00000002: model.pt: SHA-256 does not match"):
        damaged = copy_checkpoints(reference, tmp_path / "explicit", upto=2) / "checkpoints" / "step-00000002"
        (damaged / "model.pt").write_bytes(_flip((damaged / "model.pt").read_bytes(), 77))
        run(small_data, tmp_path / "explicit", "--resume", str(damaged))


def test_damaged_precompute_cache_is_recomputed(tmp_path, small_data, reference, capsys):
    out = copy_checkpoints(reference, tmp_path / "out", upto=4)
    cache = next((out / "precompute").glob("ref-logps-*.pt"))
    cache.write_bytes(_flip(cache.read_bytes(), 8 * (cache.stat().st_size // 2)))
    run(small_data, out)
    assert f"not using cache file {cache} ({cache.name}: SHA-256 does not match" in capsys.readouterr().out
    assert_same_run(out, reference)
    assert torch.load(cache, weights_only=True)["logps"] == torch.load(
        next((reference / "precompute").glob("ref-logps-*.pt")), weights_only=True)["logps"]


# ------------------------------------------------------------------------------------------------ 4. one run per dir

def test_a_second_run_on_a_locked_output_dir_exits_at_once_naming_the_holder(tmp_path, small_data, capsys):
    out = tmp_path / "out"
    with RunLock(out):
        with pytest.raises(RunDirectoryLocked, match=rf"--output-dir {out} is in use by another run: pid {os.getpid()} "
                                                     rf"on host {hostname()}"):
            run(small_data, out)
        assert sorted(p.name for p in out.iterdir()) == [".nash_fast.lock"]  # nothing else was touched
        capsys.readouterr()
        assert trainer.main(argv(small_data, out)) == 2
        err = capsys.readouterr().err
        assert err.startswith("python -m nash_fast.train: error: --output-dir") and err.count("\n") == 1


def test_dead_temporaries_and_incomplete_checkpoints_are_removed(tmp_path, small_data, reference, capsys):
    out = copy_checkpoints(reference, tmp_path / "out", upto=4)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait(timeout=60)
    host = hostname()
    debris = [out / f".tmp-final.{gone.pid}@{host}.0", out / "checkpoints" / f".tmp-step-00000006.{gone.pid}@{host}.6",
              out / "checkpoints" / ".tmp-step-00000005", out / "checkpoints" / "step-00000008"]
    for path in debris:
        path.mkdir()
        (path / "model.pt").write_bytes(b"partial")
    files = [out / "metrics.jsonl.tmp", out / "precompute" / "ref-logps-0123.pt.tmp4242",
             out / "precompute" / f".tmp-file_hashes.json.{gone.pid}@{host}.1"]
    for path in files:
        path.write_bytes(b"partial")
    (out / "notes.txt").write_text("mine")
    run(small_data, out)
    assert not any(p.exists() for p in debris + files)
    # Dead temporaries are removed; the incomplete step-00000008 is set aside (damaged/), never deleted.
    assert (out / "checkpoints" / "damaged" / "step-00000008" / "model.pt").read_bytes() == b"partial"
    assert (out / "notes.txt").read_text() == "mine"
    assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------------ 5. signals

def signal_at(monkeypatch, target, name, when, signum, count=1):
    """Make target.name send `signum` to this process `count` times on its `when`-th call (the real handlers run)."""
    real, calls = getattr(target, name), [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == when:
            for _ in range(count):
                os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapped)


def test_sigint_in_the_loop_checkpoints_prints_how_to_resume_and_exits_130(tmp_path, small_data, reference,
                                                                           monkeypatch, capfd):
    out = tmp_path / "out"
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        signal_at(patch, trainer, "_train_step", 3, signal.SIGINT)  # Ctrl-C during step 3: it finishes, is saved
        assert trainer.main(argv(small_data, out)) == 130
    captured = capfd.readouterr()
    assert "SIGINT: stopping at the next safe point" in captured.err and "Traceback" not in captured.err
    assert f"SIGINT: stopped after step 3; checkpoint {out}/checkpoints/step-00000003 (step 3 of 6)" in captured.out
    assert f"Resume with python -m nash_fast.train --dataset {small_data} --output-dir {out}" in captured.out
    assert not (out / "final").exists()
    assert trainer.main(argv(small_data, out)) == 0
    assert "resumed from" in capfd.readouterr().out
    assert_same_run(out, reference)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # restored after the run


def test_second_ctrl_c_aborts_at_once(tmp_path, small_data, reference, monkeypatch, capsys):
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        signal_at(patch, trainer, "_train_step", 3, signal.SIGINT, count=2)
        assert trainer.main(argv(small_data, out)) == 130
    err = capsys.readouterr().err
    assert "aborted by a second Ctrl-C" in err and "Traceback" not in err
    assert [step for step, _ in list_checkpoints(out / "checkpoints")] == [2]  # no step-3 checkpoint: aborted
    assert trainer.main(argv(small_data, out)) == 0
    assert_same_run(out, reference)


@pytest.mark.parametrize("phase", ["precompute", "model loading", "final save"])
def test_sigterm_outside_the_loop(tmp_path, small_data, reference, monkeypatch, capsys, phase):
    """SIGTERM while precomputing keeps the finished shards; while loading a model it stops before training; during
    the final save the run completes. In every case the rerun (or the run itself) equals the straight run."""
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        if phase == "precompute":
            patch.setattr(precompute, "SHARD_BATCHES", 1)
            signal_at(patch, precompute, "packed_sequence_logprobs", 2, signal.SIGTERM)
        elif phase == "model loading":
            signal_at(patch, trainer, "load_model", 2, signal.SIGTERM)  # call 1: precompute's reference model
        else:
            signal_at(patch, trainer, "_save_final_model", 1, signal.SIGTERM)
        status = trainer.main(argv(small_data, out))
    log = capsys.readouterr().out
    assert status == 0
    if phase == "final save":
        assert "done: 6 steps" in log
    else:
        assert "SIGTERM: stopped" in log and "Resume with" in log and not (out / "checkpoints").exists()
        if phase == "precompute":
            shards = list((out / "precompute").glob("ref-logps-*.partial-*/shard-*.pt"))
            assert len(shards) == 2, "the two batches done before the stop are kept"
        assert trainer.main(argv(small_data, out)) == 0
        if phase == "precompute":
            assert "(2 of " in capsys.readouterr().out  # only the remaining batches were computed
            assert not list((out / "precompute").glob("*.partial-*"))
            cache = lambda d: torch.load(next((d / "precompute").glob("ref-logps-*.pt")), weights_only=True)  # noqa
            assert cache(out)["logps"] == cache(reference)["logps"]
    assert_same_run(out, reference)


def test_signals_reach_the_real_cli_process(tmp_path, small_data):
    """A real SIGINT / SIGTERM delivered to `python -m nash_fast.train` mid-run: checkpoint, one-line note, status
    130 / 0, no traceback."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "CUDA_VISIBLE_DEVICES": ""}
    for signum, status in ((signal.SIGINT, 130), (signal.SIGTERM, 0)):
        out = tmp_path / signum.name
        args = argv(small_data, out, "--max-steps", "100000", "--save-steps", "0", "--lr-scheduler", "constant")
        process = subprocess.Popen([sys.executable, "-m", "nash_fast.train", *args], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 240
        while time.time() < deadline and process.poll() is None and not (
                (out / "metrics.jsonl").exists() and (out / "metrics.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.05)
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=240)
        assert process.returncode == status, stderr[-2000:]
        assert "Traceback" not in stderr and f"{signum.name}: stopped after step" in stdout
        step = list_checkpoints(out / "checkpoints")[-1][0]
        assert step >= 2 and f"step-{step:08d}" in stdout


# ------------------------------------------------------------------------------------------------ 6. user errors

def bad_data(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(load_tiny_preferences()[0]).encode() + b"\n" + '{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    return path


@pytest.mark.parametrize("case", ["beta", "seed", "utf8", "split", "yaml", "lam", "flag", "missing"])
def test_user_errors_are_one_line_with_status_2(tmp_path, small_data, capsys, case):
    extra = {
        "beta": (["--loss", "dpo", "--beta", "1e300"], "--beta must be finite in float32"),
        "seed": (["--seed", "99999999999999999999"], "--seed must be an integer in [0, 2**32 - 1]"),
        "utf8": (["--dataset", str(bad_data(tmp_path))], f"{tmp_path}/latin1.jsonl: line 2 is not UTF-8 (byte 0xe9"),
        "split": (["--dataset-split", "test"], "--dataset-split test: " + small_data + " is a .jsonl file"),
        "yaml": (["--config", str(tmp_path / "run.yaml")], "option 'lr' is given twice (lines 1 and 3)"),
        "lam": (["--loss", "sr_dpo", "--beta", "0.1", "--lam", "-1"], "--lam must be >= 0"),
        "flag": (["--max-steps", "ten"], "argument --max-steps/--max_steps: invalid int value: 'ten'"),
        "missing": (["--dataset", "data/nope.jsonl"], "--dataset data/nope.jsonl: no such file or directory"),
    }[case]
    (tmp_path / "run.yaml").write_text("lr: 0.1\nloss: sppo\nlr: 0.2\n")
    args = argv(small_data, tmp_path / "out") + extra[0]
    if case == "flag":
        with pytest.raises(SystemExit) as exit_info:
            trainer.main(args)
        status = exit_info.value.code
    else:
        status = trainer.main(args)
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("python -m nash_fast.train: error: ") and extra[1] in err, err
    if case != "flag":  # --debug (or NASH_FAST_DEBUG=1) adds the traceback
        assert trainer.main(args + ["--debug"]) == 2
        assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_bugs_keep_their_traceback_and_the_cli_prints_one_line(tmp_path, small_data, monkeypatch):
    monkeypatch.setattr(trainer, "load_records", lambda cfg: {}["a bug"])
    with pytest.raises(KeyError):  # not a user error: it propagates (Python prints the traceback, status 1)
        trainer.main(argv(small_data, tmp_path / "out"))
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for module, args in (("nash_fast.train", ["--loss", "ipo", "--beta", "1e-30"]),
                         ("nash_fast.selfplay", ["--num-samples", "1"]),
                         ("nash_fast.generate", ["--model", "tiny", "--prompts", "nope.jsonl", "--output", "o.jsonl"]),
                         ("nash_fast.nash", ["--K", "x"])):
        result = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                                timeout=120, cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert result.stderr.startswith(f"python -m {module}: error: ") and "--" in result.stderr
        if module != "nash_fast.nash":  # an argparse error has no traceback to show
            result = subprocess.run([sys.executable, "-m", module, *args], env={**env, "NASH_FAST_DEBUG": "1"},
                                    capture_output=True, text=True, timeout=120, cwd=tmp_path)
            assert result.returncode == 2 and "Traceback" in result.stderr


# ------------------------------------------------------------------------------------------------ 7. no network

def test_path_like_names_fail_at_once_and_hub_names_stay_offline(tmp_path, monkeypatch):
    lookups = []

    def no_network(*args, **kwargs):
        lookups.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    for flag, name in (("--dataset", "data/nope.jsonl"), ("--dataset", "./nope"), ("--dataset", "a/b/c"),
                       ("--dataset", "nope.parquet"), ("--model", "checkpoints/final/model.safetensors"),
                       ("--ref-model", str(tmp_path / "missing")), ("--tokenizer", "~/missing-tokenizer")):
        with pytest.raises(ValueError, match=f"{flag} {name}: no such file or directory"):
            parse_config([flag, name])
    # A hub-style name is looked up by datasets; with HF_HUB_OFFLINE only in the local cache, so it fails fast.
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    start = time.time()
    with pytest.raises(ValueError, match=r"--dataset 'someone/no-such-dataset': .*HF_HUB_OFFLINE is set"):
        trainer.load_rows(parse_config(["--dataset", "someone/no-such-dataset"]))
    assert lookups == [], "a network lookup was attempted"
    assert time.time() - start < 60  # no retries against an unreachable hub (it fails at once; bound generous)


# ------------------------------------------------------------------------------------------------ 8. run length

def test_a_longer_rerun_refuses_a_changed_schedule_unless_asked(tmp_path, small_data, reference, capsys):
    out = copy_checkpoints(reference, tmp_path / "out")
    with pytest.raises(ValueError, match=r"trained as a 6-step run \(0 warmup steps, linear schedule\); this run has "
                                         r"12 steps .* from step 1 on .*--allow-schedule-change"):
        run(small_data, out, "--max-steps", "12")
    run(small_data, out, "--max-steps", "12", "--allow-schedule-change")
    assert "continuing with the new schedule" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == list(range(1, 13))
    # A schedule that does not depend on the length (constant after a fixed warmup) extends silently and exactly.
    constant = ["--lr-scheduler", "constant", "--warmup-steps", "1"]
    run(small_data, tmp_path / "short", *constant)
    run(small_data, tmp_path / "short", *constant, "--max-steps", "9")
    run(small_data, tmp_path / "straight", *constant, "--max-steps", "9")
    assert_same_run(tmp_path / "short", tmp_path / "straight")


# ------------------------------------------------------------------------------------------------ 9. metrics log

METRICS_DAMAGE = {
    "line cut mid-way": lambda p: p.write_bytes(p.read_bytes().replace(b"\n", b"", 1)[:-40]),
    "non-UTF-8 bytes": lambda p: p.write_bytes(b"\xff\xc3(" + p.read_bytes()),
    "a directory": lambda p: (p.unlink(), p.mkdir(), (p / "x").write_text("x")),
}


@pytest.mark.parametrize("damage", sorted(METRICS_DAMAGE))
def test_damaged_metrics_log_is_rebuilt_from_the_checkpoint(tmp_path, small_data, reference, capsys, damage):
    out = copy_checkpoints(reference, tmp_path / "out", upto=4)
    shutil.copy(reference / "metrics.jsonl", out / "metrics.jsonl")  # as the run left it: 6 steps, 4 checkpointed
    METRICS_DAMAGE[damage](out / "metrics.jsonl")
    run(small_data, out)
    log = capsys.readouterr().out
    assert "warning" in log and "metrics.jsonl" in log
    assert_same_run(out, reference)
    if damage == "a directory":
        assert len(list(out.glob("metrics.jsonl.moved-aside-*/x"))) == 1


def test_a_run_whose_every_step_was_skipped_fails_without_a_model(tmp_path, small_data, monkeypatch, capsys):
    real = trainer.build_loss_fn

    def poisoned(cfg):
        loss_fn = real(cfg)

        def wrapped(*args, **kwargs):
            loss, metrics = loss_fn(*args, **kwargs)
            return loss * float("nan"), metrics

        wrapped.softcap = None
        return wrapped

    monkeypatch.setattr(trainer, "build_loss_fn", poisoned)
    status = trainer.main(argv(small_data, tmp_path / "out", "--max-steps", "3", "--max-consecutive-bad-steps", "5"))
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1 and "all 3 optimizer steps were skipped" in err
    assert not (tmp_path / "out" / "final").exists()
