"""Atomic, verified checkpoint directories: written aside, fsynced, digested, then renamed into place.

Layout under a root (the trainer uses OUTPUT_DIR/checkpoints):

    step-00000050/            a complete checkpoint (the name appears only once everything is on disk)
        ...files...           whatever the writer put there (model, optimizer, scheduler, RNG, trainer state)
        complete.json         manifest, written last: {"format": 2, "step": N, "files": {name: {"bytes", "sha256"}}}
    .tmp-step-00000060.<pid>@<host>.<n>/
                              a save in progress, or one killed mid-way: never loaded; removed by the next save
                              once its writer is provably dead (nash_fast.rundir)
    damaged/step-00000040/    a checkpoint that failed verification or is incomplete, moved aside (never deleted:
                              its owner may want to inspect or recover it); not resumed from, not counted by
                              keep_last (save_total_limit). A second one of the same step: step-00000040.1, ...

A save writes everything into the temporary directory, fsyncs every file and the directory, records each
file's size and SHA-256 in the manifest, then os.rename()s the directory to step-N and fsyncs the root.
rename is atomic on POSIX file systems, so after a kill -9 at any moment the root holds the previous
complete checkpoints and possibly a dead temporary. Two checks read the manifest:

    is_complete(dir)         cheap: a format-2 manifest, and every file present with the recorded size
    verify_checkpoint(dir)   before anything is loaded: every recorded file's SHA-256 matches, and no file
                             is present that the manifest does not list (CheckpointDamaged names the file)

so a checkpoint damaged after it was written (truncated, bit-flipped, a file added or swapped) is never
loaded; the trainer falls back to the next older one. Old checkpoints beyond keep_last are deleted only
after the new one is in place, each renamed to a temporary first, so a kill -9 mid-delete leaves no
half-deleted step-N behind.

A manifest proves integrity, not authorship: whoever can write the directory can rewrite it. Nothing the
trainer writes needs unpickling to be read back (torch.load(weights_only=True), JSON); DeepSpeed's engine
files are loaded under the same weights_only rule (nash_fast.resume).

Distributed: every rank calls save_checkpoint (each may write its own files, e.g. DeepSpeed's
partitioned optimizer states) with the same temporary name (owner = rank 0's pid@host); rank 0 alone
digests, writes the manifest, renames (nash_fast.rundir.publish_directory) and prunes, between barriers.
Digests and their checks are nash_fast.rundir's file records (file_record, verify_files).

The trainer's checkpoints (what goes into step-N/, and resuming from it) are nash_fast.resume's.
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path
from typing import Callable

from nash_fast import rundir
from nash_fast.console import log
from nash_fast.rundir import fsync_path

MANIFEST = "complete.json"
FORMAT = 2  # 1: sizes only (no digests; such checkpoints are not loaded)
_NAME = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"
QUARANTINE = "damaged"  # root/damaged/: checkpoints set aside (quarantine_checkpoint)


class CheckpointDamaged(ValueError):
    """A checkpoint fails verification; `file` names the offending file (or the manifest)."""

    def __init__(self, directory: Path, file: str, reason: str):
        self.directory, self.file, self.reason = Path(directory), file, reason
        super().__init__(f"checkpoint {directory}: {file}: {reason}")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def read_manifest(directory: Path) -> dict:
    """The parsed manifest; CheckpointDamaged if it is missing, unreadable, or not format 2."""
    path = Path(directory) / MANIFEST
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise CheckpointDamaged(directory, MANIFEST, "missing (the save never finished)") from None
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointDamaged(directory, MANIFEST, f"unreadable ({type(error).__name__}: {error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointDamaged(directory, MANIFEST, f"not a format-{FORMAT} manifest with SHA-256 digests "
                                "(written by an older nash-fast, or damaged)")
    files = manifest.get("files")
    if (not isinstance(files, dict) or not isinstance(manifest.get("step"), int)
            or not all(rundir.is_file_record(e) for e in files.values())):
        raise CheckpointDamaged(directory, MANIFEST, "malformed (step, files: {name: {bytes, sha256}})")
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointDamaged(directory, MANIFEST, f"lists a file outside the checkpoint: {name!r}")
    return manifest


def is_complete(directory: Path) -> bool:
    """Cheap check: a format-2 manifest, and every file it lists present with the recorded size."""
    try:
        files = read_manifest(Path(directory))["files"]
        return all((Path(directory) / name).stat().st_size == entry["bytes"] for name, entry in files.items())
    except (OSError, CheckpointDamaged):
        return False


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Check every file against the manifest's size and SHA-256, and that no unlisted file is present.
    Returns the manifest; raises CheckpointDamaged naming the first offending file."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    problem = rundir.verify_files(directory, manifest["files"], record="the manifest", exact=True, ignore=(MANIFEST,))
    if problem is not None:
        raise CheckpointDamaged(directory, *problem)
    return manifest


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every step-N directory under root, oldest first (complete or not)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under root (cheap check), or None. Incomplete ones are skipped (with a warning)."""
    for step, path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
        print(f"[nash_fast] warning: checkpoint {path} is incomplete (manifest missing or files damaged); skipping it")
    return None


def checkpoint_step(directory: str | os.PathLike) -> int:
    return int(read_manifest(Path(directory))["step"])


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    *,
    keep_last: int | None = None,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
    owner: str | None = None,
) -> Path:
    """Atomically create root/step-N from write(tmp_dir); keep the newest keep_last checkpoints.

    write(tmp_dir) is called on every rank with the same temporary directory, named after `owner`
    ("pid@host" of rank 0; default this process). Returns the final path.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last!r}")
    root = Path(root)
    final = root / checkpoint_name(step)
    if is_complete(final):
        # Replacing it would open a window with neither the old nor the new one in place.
        raise FileExistsError(f"a complete checkpoint for step {step} already exists: {final}")
    # One name on every rank (rank 0's pid@host and the step), registered as live by rank 0, its publisher.
    tmp = rundir.temporary_path(final, owner=owner, serial=step, register=rank == 0)
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        rundir.remove_dead_temporaries(root, locked=False)  # dead writers' leftovers (kill -9 mid-save)
        if tmp.exists():  # this process's own earlier attempt at this step, which raised
            rundir.remove_tree(tmp)
        tmp.mkdir()
    barrier()
    try:
        write(tmp)
        barrier()
        if rank == 0:
            files = _files(tmp)
            manifest = {"format": FORMAT, "step": step, "files": {
                str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": d}
                for p, d in zip(files, rundir.sha256_files(files))}}
            rundir.write_json_atomic(tmp / MANIFEST, manifest)
            if final.exists():  # only a damaged one can be here (a complete one was refused above): set aside
                dest = quarantine_checkpoint(final)
                log(f"warning: checkpoint {final} is incomplete; moved to {dest} before saving step {step} again")
            rundir.publish_directory(tmp, final)  # fsync the tree, rename, fsync root
            if keep_last is not None:
                complete = [path for _, path in list_checkpoints(root) if is_complete(path)]
                for path in complete[:-keep_last]:
                    rundir.remove_tree(path)
    finally:
        if rank == 0:
            rundir.done(tmp)  # a failed save leaves a dead temporary, removed by the next save
    barrier()
    return final


def quarantine_checkpoint(path: str | os.PathLike) -> Path:
    """Move a checkpoint that must not be loaded (it failed verification, or is incomplete) from root/step-N to
    root/damaged/step-N (step-N.1, step-N.2, ... when taken) and return where it went; never delete it: the
    files may be what its owner needs to recover (a trusted system quarantines, it does not destroy). Outside
    root's step-N names it is neither resumed from nor counted by keep_last. One rename (atomic, same file
    system), then both directories are fsynced. The caller's warning names both places."""
    path = Path(path)
    aside = path.parent / QUARANTINE
    aside.mkdir(exist_ok=True)
    dest = aside / path.name
    for n in itertools.count(1):
        if not dest.exists():
            break
        dest = aside / f"{path.name}.{n}"
    os.rename(path, dest)
    fsync_path(aside)
    fsync_path(path.parent)
    return dest


def remove_incomplete_checkpoints(root: str | os.PathLike, log=None) -> list[Path]:
    """Remove dead temporaries (saves whose writer died: never a checkpoint) and move step-N directories that are
    not complete (a manifest-less or truncated copy: never loaded, and nothing writes a step-N in place) to
    root/damaged/ (quarantine_checkpoint). Returns the paths taken out of root. Call only while holding the run lock."""
    root = Path(root)
    removed = rundir.remove_dead_temporaries(root, locked=True, log=log)
    for _, path in list_checkpoints(root):
        if not is_complete(path):
            dest = quarantine_checkpoint(path)
            removed.append(path)
            if log is not None:
                log(f"warning: checkpoint {path} is incomplete (manifest missing or files damaged); moved to {dest} "
                    "(not resumed from; inspect or delete it)")
    return removed


def remove_checkpoints(root: str | os.PathLike) -> None:
    """Delete every checkpoint (complete or not) under root (for --resume never); root/damaged/ is left alone."""
    root = Path(root)
    if root.is_dir():
        for path in list(root.iterdir()):
            if _NAME.match(path.name) or path.name.startswith(_TMP_PREFIX):
                rundir.remove_tree(path)
