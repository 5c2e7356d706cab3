"""One run per output directory: the lock names its holder, a dead holder's lock is taken over, temporaries carry
their owner, and only provably dead ones are removed."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nash_fast import rundir
from nash_fast.rundir import RunDirectoryLocked, RunLock

REPO = Path(__file__).resolve().parents[1]
HOLDER = textwrap.dedent(
    """
    import sys, time
    from nash_fast.rundir import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    sys.stdin.read()  # hold until the test closes stdin (or kills us)
    """
)


def start_holder(tmp_path, directory):
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], env=env, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(timeout=60)
    return process.pid


def test_second_lock_names_the_holder_and_a_released_lock_is_free(tmp_path):
    with RunLock(tmp_path / "out"):
        holder = json.loads((tmp_path / "out" / rundir.LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == rundir.hostname()
        # Another open file description conflicts even within one process (flock semantics).
        with pytest.raises(RunDirectoryLocked, match=rf"--output-dir .* is in use by another run: pid {os.getpid()} "
                                                     rf"on host {rundir.hostname()}"):
            RunLock(tmp_path / "out").acquire()
    messages = []
    with RunLock(tmp_path / "out", log=messages.append):
        pass
    assert messages == []  # a clean hand-over says nothing


def test_lock_held_by_another_process_then_taken_over_after_its_kill_9(tmp_path):
    holder = start_holder(tmp_path, tmp_path / "out")
    try:
        with pytest.raises(RunDirectoryLocked, match=rf"pid {holder.pid} on host"):
            RunLock(tmp_path / "out").acquire()
    finally:
        holder.kill()
        holder.wait(timeout=60)
    messages = []
    with RunLock(tmp_path / "out", log=messages.append):
        assert json.loads((tmp_path / "out" / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(messages) == 1 and f"took over the lock of pid {holder.pid}" in messages[0]


def test_temporary_names_are_unique_and_carry_the_owner(tmp_path):
    a, b = rundir.temporary_path(tmp_path / "x.json"), rundir.temporary_path(tmp_path / "x.json")
    assert a != b and a.parent == tmp_path
    match = rundir._TEMP.match(a.name)
    assert match and match["name"] == "x.json" and int(match["pid"]) == os.getpid()
    assert match["host"] == rundir.hostname()
    rundir.done(a)
    rundir.done(b)


def test_only_provably_dead_temporaries_are_removed(tmp_path):
    host, me, parent, gone = rundir.hostname(), os.getpid(), os.getppid(), dead_pid()
    names = {
        f".tmp-step-00000004.{gone}@{host}.0": "dead pid here",
        f".tmp-step-00000005.{parent}@{host}.0": "live pid here",
        f".tmp-metrics.jsonl.{me}@{host}.7": "ours, not live",
        f".tmp-step-00000006.{gone}@elsewhere.0": "another machine",
        ".tmp-step-00000003": "legacy, no owner",
        "ref-logps-abc.pt.tmp1234": "legacy precompute temporary",
        "notes.tmp": "a user's file",
        "model.pt": "a user's file",
    }
    for name in names:
        (tmp_path / name).mkdir() if name.startswith(".tmp-step") else (tmp_path / name).write_text("x")
    live = rundir.temporary_path(tmp_path / "final")  # ours and still being written
    live.mkdir()
    removed = {p.name for p in rundir.remove_dead_temporaries(tmp_path, locked=False)}
    assert removed == {f".tmp-step-00000004.{gone}@{host}.0", f".tmp-metrics.jsonl.{me}@{host}.7"}
    removed = {p.name for p in rundir.remove_dead_temporaries(tmp_path, locked=True)}
    assert removed == {f".tmp-step-00000006.{gone}@elsewhere.0", ".tmp-step-00000003", "ref-logps-abc.pt.tmp1234"}
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {f".tmp-step-00000005.{parent}@{host}.0", "notes.tmp", "model.pt", live.name}
    rundir.done(live)
    assert live.name in {p.name for p in rundir.remove_dead_temporaries(tmp_path, locked=False)}


def test_remove_tree_never_leaves_a_half_deleted_directory(tmp_path, monkeypatch):
    """A kill part-way through deleting a directory (simulated: rmtree dies after one file) leaves a dead
    temporary, never a partial directory under the original name; the next cleanup removes it."""
    victim = tmp_path / "step-00000002"
    victim.mkdir()
    for k in range(3):
        (victim / f"f{k}").write_text("x")
    real_rmtree = rundir.shutil.rmtree

    def dies_midway(path, ignore_errors=False):
        next(Path(path).iterdir()).unlink()
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(rundir.shutil, "rmtree", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        rundir.remove_tree(victim)
    monkeypatch.setattr(rundir.shutil, "rmtree", real_rmtree)
    assert not victim.exists()
    leftovers = [p for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-step-00000002.")
    rundir.remove_dead_temporaries(tmp_path, locked=True)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ writing aside

def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    path = tmp_path / "state.json"
    rundir.write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1}
    with pytest.raises(RuntimeError, match="disk full"):
        with rundir.atomic_file(path) as tmp:
            tmp.write_text('{"a": 2, "half')
            raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"a": 1}  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]  # the temporary went with the error
    assert not rundir._live  # and is no longer registered as being written
    rundir.write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_directory_publishes_replaces_and_cleans_up(tmp_path):
    final = tmp_path / "final"
    with rundir.atomic_directory(final) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"1")
        assert not final.exists()  # nothing under the name until the block ends
    assert (final / "weights").read_bytes() == b"1"
    with rundir.atomic_directory(final) as tmp:  # replace=True (default): the old directory is replaced
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"2")
    assert [p.name for p in final.iterdir()] == ["weights"] and (final / "weights").read_bytes() == b"2"
    with pytest.raises(ValueError, match="bad"):
        with rundir.atomic_directory(final) as tmp:
            tmp.mkdir()
            (tmp / "weights").write_bytes(b"3")
            raise ValueError("bad")
    assert (final / "weights").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    with rundir.atomic_directory(final, replace=False) as tmp:  # another writer published first: it stays
        tmp.mkdir()
        (tmp / "weights").write_bytes(b"4")
    assert (final / "weights").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert not rundir._live


def test_verify_files_names_the_first_file_that_does_not_match_its_record(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, payload in (("a.bin", b"alpha"), ("sub/b.bin", b"beta")):
        (tmp_path / name).write_bytes(payload)
    records = {"a.bin": rundir.file_record(tmp_path / "a.bin"), "sub/b.bin": rundir.bytes_record(b"beta")}
    assert records["sub/b.bin"] == rundir.file_record(tmp_path / "sub" / "b.bin")
    assert rundir.verify_files(tmp_path, records) is None
    assert rundir.verify_files(tmp_path, records, exact=True) is None
    (tmp_path / "extra").write_bytes(b"")
    assert rundir.verify_files(tmp_path, records, exact=True, record="the manifest") == (
        "extra", "present but not listed in the manifest")
    assert rundir.verify_files(tmp_path, records, exact=True, ignore=("extra",)) is None
    (tmp_path / "sub" / "b.bin").write_bytes(b"bet@")  # same size, other bytes
    assert rundir.verify_files(tmp_path, records, record="the record") == (
        "sub/b.bin", "SHA-256 does not match the record (the file changed after it was written)")
    (tmp_path / "a.bin").write_bytes(b"alph")
    assert rundir.verify_files(tmp_path, records, record="the record") == ("a.bin", "4 bytes, the record recorded 5")
    (tmp_path / "a.bin").unlink()
    assert rundir.verify_files(tmp_path, records) == ("a.bin", "missing")
    for bad in (None, {"bytes": "5", "sha256": "x"}, {"bytes": 5}, {"bytes": True, "sha256": 3}):
        assert rundir.verify_files(tmp_path, {"a.bin": bad})[1].endswith("entry is malformed (bytes, sha256)")
