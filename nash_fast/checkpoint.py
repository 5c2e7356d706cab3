"""Atomic, crash-safe checkpoint directories: written aside, fsynced, then renamed into place.

Layout under a root (the trainer uses OUTPUT_DIR/checkpoints):

    step-00000050/            a complete checkpoint (the name appears only once everything is on disk)
        ...files...           whatever the writer put there (model, optimizer, scheduler, RNG, trainer state)
        complete.json         manifest: step and every file's size, written last
    .tmp-step-00000060/       a save in progress (or one killed mid-way): never loaded, removed on the next save

A save writes everything into the .tmp directory, fsyncs every file and the directory, writes the
manifest, then os.rename()s the directory to step-N and fsyncs the root. rename is atomic on POSIX
file systems, so after a kill -9 at any moment the root holds the previous complete checkpoints and
possibly a stale .tmp directory; latest_checkpoint() also checks each manifest against the files, so
a checkpoint damaged afterwards (truncated file) is skipped for the previous one rather than loaded.
Old checkpoints beyond keep_last are deleted only after the new one is in place.

Distributed: every rank calls save_checkpoint (each may write its own files, e.g. DeepSpeed's
partitioned optimizer states); rank 0 alone renames, writes the manifest and prunes, between barriers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

MANIFEST = "complete.json"
_NAME = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory` (and itself), so a rename after it is durable."""
    for path in _files(directory):
        _fsync_path(path)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_path(sub)
    _fsync_path(directory)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to path.tmp, fsync, rename over path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(directory: Path) -> bool:
    """True when the manifest exists and every file it lists is present with the recorded size."""
    manifest = Path(directory) / MANIFEST
    try:
        with open(manifest) as f:
            recorded = json.load(f)["files"]
        return all((Path(directory) / name).stat().st_size == size for name, size in recorded.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


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
    """The newest complete checkpoint under root, or None. Incomplete ones are skipped (with a warning)."""
    for step, path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
        print(f"[nash_fast] warning: checkpoint {path} is incomplete (manifest missing or files damaged); skipping it")
    return None


def checkpoint_step(directory: str | os.PathLike) -> int:
    with open(Path(directory) / MANIFEST) as f:
        return int(json.load(f)["step"])


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    *,
    keep_last: int | None = None,
    rank: int = 0,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Atomically create root/step-N from write(tmp_dir); keep the newest keep_last checkpoints.

    write(tmp_dir) is called on every rank with the same temporary directory. Returns the final path.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last!r}")
    root = Path(root)
    final = root / checkpoint_name(step)
    tmp = root / (_TMP_PREFIX + checkpoint_name(step))
    if is_complete(final):
        # Replacing it would open a window with neither the old nor the new one in place.
        raise FileExistsError(f"a complete checkpoint for step {step} already exists: {final}")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(_TMP_PREFIX + "*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier()
    write(tmp)
    barrier()
    if rank == 0:
        fsync_tree(tmp)
        manifest = {"step": step, "files": {str(p.relative_to(tmp)): p.stat().st_size for p in _files(tmp)}}
        write_json_atomic(tmp / MANIFEST, manifest)
        _fsync_path(tmp)
        if final.exists():  # only a damaged one can be here (a complete one was refused above)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(root)
        if keep_last is not None:
            complete = [path for _, path in list_checkpoints(root) if is_complete(path)]
            for path in complete[:-keep_last]:
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return final


def remove_checkpoints(root: str | os.PathLike) -> None:
    """Delete every checkpoint (complete or not) under root (for --resume never)."""
    root = Path(root)
    if root.is_dir():
        for path in list(root.iterdir()):
            if _NAME.match(path.name) or path.name.startswith(_TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
