"""Atomic checkpoints: complete-or-absent under crashes (exception mid-save, kill -9 mid-save), keep last K."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from nash_fast import checkpoint, rundir
from nash_fast.checkpoint import (
    checkpoint_step,
    is_complete,
    latest_checkpoint,
    list_checkpoints,
    save_checkpoint,
)


def writer(value):
    def write(directory):
        torch.save({"value": torch.full((1000,), float(value))}, directory / "state.pt")
        (directory / "sub").mkdir()
        (directory / "sub" / "note.txt").write_text(f"step {value}")
    return write


def load_value(path):
    return torch.load(path / "state.pt", weights_only=True)["value"][0].item()


def test_save_then_latest_and_keep_last(tmp_path):
    for step in (1, 2, 3, 4):
        final = save_checkpoint(tmp_path, step, writer(step), keep_last=2)
        assert is_complete(final) and checkpoint_step(final) == step
    assert [step for step, _ in list_checkpoints(tmp_path)] == [3, 4]
    latest = latest_checkpoint(tmp_path)
    assert checkpoint_step(latest) == 4 and load_value(latest) == 4.0
    assert (latest / "sub" / "note.txt").read_text() == "step 4"
    with pytest.raises(FileExistsError):
        save_checkpoint(tmp_path, 4, writer(99))
    assert load_value(latest_checkpoint(tmp_path)) == 4.0
    with pytest.raises(ValueError, match="keep_last"):
        save_checkpoint(tmp_path, 5, writer(5), keep_last=0)


def test_crash_between_write_and_rename_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, writer(1), keep_last=1)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "rename", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(tmp_path, 2, writer(2), keep_last=1)
    monkeypatch.undo()
    latest = latest_checkpoint(tmp_path)
    assert checkpoint_step(latest) == 1 and load_value(latest) == 1.0
    # The failed save took its temporary with it (nash_fast.rundir.publish_directory); a killed one leaves a dead
    # temporary instead, cleared by the next save (test_a_dead_writers_temporary_is_cleared_by_the_next_save).
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    save_checkpoint(tmp_path, 2, writer(2), keep_last=1)
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
    assert load_value(latest_checkpoint(tmp_path)) == 2.0


def test_a_dead_writers_temporary_is_cleared_by_the_next_save(tmp_path):
    """A save killed mid-way (kill -9: no cleanup) leaves .tmp-step-N.<pid>@<host>.<step>; it is never loaded, and
    the next save removes it once its writer is provably dead."""
    save_checkpoint(tmp_path, 1, writer(1), keep_last=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = tmp_path / f".tmp-step-00000002.{int(dead.stdout)}@{rundir.hostname()}.2"
    writer(2)(leftover.mkdir() or leftover)
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 1
    save_checkpoint(tmp_path, 2, writer(2), keep_last=1)
    assert not leftover.exists() and load_value(latest_checkpoint(tmp_path)) == 2.0


def test_crash_inside_writer_keeps_previous(tmp_path):
    save_checkpoint(tmp_path, 1, writer(1))

    def failing(directory):
        writer(2)(directory)
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 2, failing)
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 1


def test_damaged_checkpoint_falls_back_to_previous(tmp_path, capsys):
    save_checkpoint(tmp_path, 1, writer(1))
    newest = save_checkpoint(tmp_path, 2, writer(2))
    with open(newest / "state.pt", "r+b") as f:
        f.truncate(10)
    assert not is_complete(newest)
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 1
    assert "incomplete" in capsys.readouterr().out
    # A step-N directory without a manifest (e.g. copied by hand, half-way) is not complete either.
    (newest / "complete.json").unlink()
    assert not is_complete(newest)
    assert latest_checkpoint(tmp_path / "does-not-exist") is None


SAVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from nash_fast.checkpoint import save_checkpoint
    root = Path(sys.argv[1])
    step = int(sys.argv[2])
    while True:
        step += 1
        def write(d, step=step):
            # Several MB over many files, so a kill lands mid-save often.
            for k in range(8):
                torch.save(torch.full((200_000,), float(step)), d / f"part{k}.pt")
        save_checkpoint(root, step, write, keep_last=2)
        print(step, flush=True)
    """
)


def test_kill_9_mid_save_never_leaves_a_bad_latest(tmp_path):
    """A process saving checkpoints back to back is SIGKILLed at varied moments; every time the newest complete
    checkpoint loads and holds its own step's data, and the run can keep saving after it."""
    root = tmp_path / "ckpt"
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    last_step = 0
    for attempt in range(4):
        process = subprocess.Popen([sys.executable, str(script), str(root), str(last_step)], stdout=subprocess.PIPE, text=True)
        first = process.stdout.readline()  # at least one save completed in this process
        assert first.strip(), "saver produced no checkpoint"
        time.sleep(0.05 + 0.07 * attempt)
        process.send_signal(signal.SIGKILL)
        process.wait()
        latest = latest_checkpoint(root)
        assert latest is not None
        step = checkpoint_step(latest)
        assert step >= int(first)
        for k in range(8):
            assert torch.load(latest / f"part{k}.pt", weights_only=True)[0].item() == float(step)
        last_step = step
    complete = [p for _, p in list_checkpoints(root) if is_complete(p)]
    assert 1 <= len(complete) <= 3  # keep_last=2, plus possibly one renamed just before the kill, pre-prune


# ------------------------------------------------------------------------------------------------ verification

def _flip_bit(path, bit):
    data = bytearray(path.read_bytes())
    data[bit // 8 % len(data)] ^= 1 << (bit % 8)
    path.write_bytes(bytes(data))


def test_manifest_has_a_sha256_per_file_and_verify_names_every_damaged_file(tmp_path):
    import hashlib
    import json
    import shutil

    from nash_fast.checkpoint import MANIFEST, CheckpointDamaged, verify_checkpoint

    good = save_checkpoint(tmp_path / "root", 1, writer(1))
    manifest = json.loads((good / MANIFEST).read_text())
    assert manifest["format"] == 2 and sorted(manifest["files"]) == ["state.pt", "sub/note.txt"]
    for name, entry in manifest["files"].items():
        data = (good / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert verify_checkpoint(good)["step"] == 1

    copies = iter(range(10**6))

    def damaged(name, damage):
        copy = tmp_path / f"copy-{next(copies)}"
        shutil.copytree(good, copy)
        damage(copy / name)
        with pytest.raises(CheckpointDamaged) as caught:
            verify_checkpoint(copy)
        return copy, caught.value

    for name in manifest["files"]:
        for bit in (0, 7, 1000, 8 * (good / name).stat().st_size - 1):  # first, last and inner bits
            copy, error = damaged(name, lambda p, bit=bit: _flip_bit(p, bit))
            assert error.file == name and "SHA-256" in error.reason
            assert is_complete(copy)  # same size: only the digest sees it
        copy, error = damaged(name, lambda p: p.write_bytes(p.read_bytes()[:-1]))
        assert error.file == name and "bytes" in error.reason and not is_complete(copy)
        copy, error = damaged(name, lambda p: p.unlink())
        assert error.file == name and error.reason == "missing"
    # The manifest itself: cut, not UTF-8, not JSON, an older format without digests, a path outside.
    for damage in (lambda p: p.write_bytes(p.read_bytes()[:20]), lambda p: p.write_bytes(b"\xff\xfe" + p.read_bytes()),
                   lambda p: p.write_text("[1, 2"),
                   lambda p: p.write_text(json.dumps({"step": 1, "files": {"state.pt": 8000}})),
                   lambda p: p.write_text(json.dumps({**manifest, "files": {"../x": {"bytes": 1, "sha256": "0"}}}))):
        copy, error = damaged(MANIFEST, damage)
        assert error.file == MANIFEST and not is_complete(copy)
    # A file the manifest does not list (e.g. a planted rng_rank1.pt) is refused too.
    copy, error = damaged("extra.pt", lambda p: p.write_bytes(b"payload"))
    assert error.file == "extra.pt" and "not listed" in error.reason


def test_remove_incomplete_checkpoints_keeps_complete_ones_and_sets_incomplete_ones_aside(tmp_path):
    """Dead temporaries (never a checkpoint) are removed; an incomplete step-N is moved to damaged/, never deleted."""
    from nash_fast.checkpoint import remove_incomplete_checkpoints

    save_checkpoint(tmp_path, 1, writer(1))
    save_checkpoint(tmp_path, 2, writer(2))
    (tmp_path / "step-00000002" / "complete.json").unlink()  # e.g. a kill -9 while an old version pruned it
    (tmp_path / ".tmp-step-00000003").mkdir()  # a legacy temporary
    messages = []
    removed = remove_incomplete_checkpoints(tmp_path, log=messages.append)
    assert sorted(p.name for p in removed) == [".tmp-step-00000003", "step-00000002"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "step-00000001"] and len(messages) == 2
    aside = tmp_path / "damaged" / "step-00000002"
    assert (aside / "sub" / "note.txt").read_text() == "step 2"  # its files, intact
    assert f"moved to {aside}" in messages[-1]


def test_quarantined_checkpoints_are_kept_apart(tmp_path):
    """A checkpoint set aside is never deleted, never resumed from, and not counted by keep_last; a second one of
    the same step gets its own name."""
    from nash_fast.checkpoint import quarantine_checkpoint

    first = save_checkpoint(tmp_path, 1, writer(1))
    assert quarantine_checkpoint(first) == tmp_path / "damaged" / "step-00000001"
    again = save_checkpoint(tmp_path, 1, writer(1))
    with open(again / "state.pt", "r+b") as f:
        f.truncate(10)
    save_checkpoint(tmp_path, 1, writer(1))  # an incomplete step-1 in the way is set aside, not deleted
    assert sorted(p.name for p in (tmp_path / "damaged").iterdir()) == ["step-00000001", "step-00000001.1"]
    assert (tmp_path / "damaged" / "step-00000001.1" / "state.pt").stat().st_size == 10
    for step in (2, 3, 4):
        save_checkpoint(tmp_path, step, writer(step), keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]  # keep_last counts step-N in root only
    assert len(list((tmp_path / "damaged").iterdir())) == 2
    assert checkpoint_step(latest_checkpoint(tmp_path)) == 4
