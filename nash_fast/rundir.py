"""One run per output directory: an exclusive lock held for the run's life, and temporaries that say whose they are.

Lock. OUTPUT/.nash_fast.lock is opened and locked with fcntl.flock(LOCK_EX | LOCK_NB) (POSIX lockf where
the file system has no flock) before the run writes anything there, and held until it ends. The kernel
releases such a lock when its holder exits in any way, kill -9 and power loss of a client included, so a
lock whose holder is dead is free by construction: the next run simply acquires it, and says that it
took over from the pid/host written in the file. The file holds JSON {pid, host, started, command} of
the current holder; a second run on the same directory fails at once with RunDirectoryLocked naming
them. The file is never deleted (deleting a lock file another process has open but not yet locked lets
two processes hold "the" lock on two different inodes); on release its contents are emptied.

Writing aside. Every durable file or directory the project writes appears under its name only when complete:

    with atomic_file(path) as tmp:          # write tmp (any way: open, torch.save, save_pretrained of a file)
        ...                                 # then: fsync tmp, rename over path, fsync the parent
    with atomic_directory(path) as tmp:     # fill the directory tmp
        ...                                 # then: fsync the tree, rename to path (replacing an old one, which
                                            # is first renamed aside), fsync the parent
    write_bytes_atomic(path, payload); write_json_atomic(path, obj)

If the block raises, the temporary is removed and `path` is untouched. A kill -9 at any moment leaves the old
`path` (or none) and at most a dead temporary, removed by the next run (remove_dead_temporaries).

Records. A file's integrity record is {"bytes": size, "sha256": hex digest} (file_record); the checkpoint
manifest, the precompute cache's sidecar, self-play's shard records and the GGUF cache's record all hold such
entries, and verify_files() is their one reader.

Temporaries. Everything written aside and renamed into place gets a name from temporary_path():
`.tmp-<name>.<pid>@<host>.<n>`, unique per process and call. remove_dead_temporaries() deletes the
temporaries of a directory that are provably dead, and only those:
  - ours (pid@host of this machine): dead when that pid no longer runs, or when it is this process and
    the temporary is not one it is still writing (registered by temporary_path, released by done());
  - another machine's, or an unnamed legacy one (`.tmp-*`, `*.json.tmp`, `*.pt.tmp<pid>`): only under the
    directory lock, which proves no other run writes there.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".nash_fast.lock"
_TEMP = re.compile(r"^\.tmp-(?P<name>.+)\.(?P<pid>\d+)@(?P<host>.+)\.(?P<n>\d+)$")
# Names earlier versions gave their temporaries (no owner in the name).
_LEGACY_TEMP = re.compile(r"^(\.tmp-.+|.+\.(json|jsonl|pt)\.tmp\d*)$")
_counter = itertools.count()
_live: set[str] = set()  # temporaries this process is writing now


class RunDirectoryLocked(ValueError):
    """Another live run holds the output directory (a user error: exit status 2 in the CLIs)."""


def hostname() -> str:
    return socket.gethostname() or "localhost"


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this machine (a reused pid counts as alive: never a false 'dead')."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def temporary_path(final: str | os.PathLike, *, owner: str | None = None, serial: int | None = None,
                   register: bool = True) -> Path:
    """A fresh temporary name next to `final`, registered as live until done(path) is called. owner ("pid@host")
    and serial name a temporary several processes share (a distributed checkpoint: rank 0's pid@host, the step);
    register=False: only the name (another process writes it and keeps it live)."""
    final = Path(final)
    owner = owner or f"{os.getpid()}@{hostname()}"
    path = final.parent / f".tmp-{final.name}.{owner}.{next(_counter) if serial is None else serial}"
    if register:
        _live.add(str(path))
    return path


def done(path: str | os.PathLike) -> None:
    """The temporary `path` was renamed into place or removed: it is no longer live."""
    _live.discard(str(path))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; when the block ends, the file written there is fsynced and renamed
    over `path` and the parent directory fsynced: readers see the old file or the whole new one, never a part.
    If the block raises, the temporary is removed and `path` is left as it was."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
        done(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Yields a temporary directory path next to `path` (not created: save_pretrained and mkdir make it); when the
    block ends, publish_directory(tmp, path, replace=replace). If the block raises, the temporary is removed."""
    tmp = temporary_path(path)
    try:
        yield tmp
    except BaseException:
        remove_tree(tmp)
        done(tmp)
        raise
    publish_directory(tmp, path, replace=replace)


def write_bytes_atomic(path: str | os.PathLike, payload: bytes) -> None:
    """`payload` as the whole of `path`, written aside and renamed into place (atomic_file)."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """JSON (indented, keys sorted) as the whole of `path`, written aside and renamed into place (atomic_file)."""
    write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file or directory (a directory's fsync makes the renames inside it durable)."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: str | os.PathLike) -> None:
    """fsync every file and directory under `directory`, deepest first, then itself: a rename after it is durable."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts), str(p))):
        fsync_path(path)
    fsync_path(directory)


def publish_directory(tmp: str | os.PathLike, final: str | os.PathLike, *, replace: bool = False) -> bool:
    """Move the fully written directory `tmp` (from temporary_path(final)) to `final` atomically: fsync every file
    and directory under it, rename, fsync the parent. Readers see no `final` or the whole of it.
    replace=True: an existing `final` is replaced (renamed aside first, then removed: a kill -9 in between leaves
    no half-deleted directory under the name). replace=False: when another process published `final` first, ours
    is removed and False is returned (the first one stays)."""
    tmp, final = Path(tmp), Path(final)
    try:
        fsync_tree(tmp)
        if replace and (final.exists() or final.is_symlink()):
            remove_tree(final)
        try:
            os.rename(tmp, final)
        except OSError as error:
            if replace or error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                raise
            return False
        fsync_path(final.parent)
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        done(tmp)


# =============================================================================================== file records

def file_record(path: str | os.PathLike) -> dict:
    """{"bytes": size, "sha256": hex digest}: the integrity record of one file."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def bytes_record(payload: bytes) -> dict:
    """file_record of a file that will hold exactly `payload`."""
    return {"bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def is_file_record(entry) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("bytes"), int) and isinstance(entry.get("sha256"), str)


def sha256_files(paths: list[Path]) -> list[str]:
    """SHA-256 of several files, in parallel (hashlib releases the GIL on large buffers)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def verify_files(directory: str | os.PathLike, records: dict[str, dict], *, record: str = "the record",
                 exact: bool = False, ignore: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(name, what is wrong) for the first file under `directory` that does not match its record
    {name: {"bytes", "sha256"}} (sizes first, then the digests in parallel); None when all match.
    exact: a file present under `directory` that `records` does not list (other than `ignore`) is wrong too.
    `record` names the record in the messages ("the manifest", "its sidecar")."""
    directory = Path(directory)
    for name, entry in sorted(records.items()):
        if not is_file_record(entry):
            return name, f"{record} entry is malformed (bytes, sha256)"
    if exact:
        present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()} - set(ignore)
        for name in sorted(present - set(records)):
            return name, f"present but not listed in {record}"
    checked = []
    for name, entry in sorted(records.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            return name, "missing"
        if size != entry["bytes"]:
            return name, f"{size} bytes, {record} recorded {entry['bytes']}"
        checked.append((name, path, entry["sha256"]))
    for (name, _, expected), actual in zip(checked, sha256_files([p for _, p, _ in checked])):
        if actual != expected:
            return name, f"SHA-256 does not match {record} (the file changed after it was written)"
    return None


def remove_tree(path: Path) -> None:
    """Delete a file or directory so that a crash part-way never leaves a half-deleted directory under its name:
    a directory is first renamed to a temporary (atomic), then removed."""
    if path.is_dir() and not path.is_symlink():
        aside = temporary_path(path)
        try:
            os.rename(path, aside)
            shutil.rmtree(aside, ignore_errors=True)
        except FileNotFoundError:
            pass
        finally:
            done(aside)  # if the removal was cut short, what is left is a dead temporary
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _is_dead_temporary(path: Path, locked: bool) -> bool:
    match = _TEMP.match(path.name)
    if match is not None:
        pid, host = int(match["pid"]), match["host"]
        if host == hostname():
            if pid == os.getpid():
                return str(path) not in _live
            return not pid_alive(pid)
        return locked
    return locked and bool(_LEGACY_TEMP.match(path.name)) and path.name != LOCK_NAME


def remove_dead_temporaries(directory: str | os.PathLike, *, locked: bool, log=None) -> list[Path]:
    """Remove the provably dead temporaries directly inside `directory` (see the module docstring).

    locked: the caller holds this directory's run lock (or the lock of a directory above it)."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in entries:
        if _is_dead_temporary(path, locked):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
            removed.append(path)
            if log is not None:
                log(f"removed {path} (left by an interrupted run)")
    return removed


def _lock_fd(fd: int) -> None:
    """flock, or POSIX lockf where the file system does not support flock; OSError(EWOULDBLOCK) when held."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(65536).decode("utf-8", "replace") or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def describe_holder(holder: dict) -> str:
    if not holder:
        return "an unknown process"
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if holder.get("started"):
        text += f" (started {holder['started']}"
        text += f": {holder['command']})" if holder.get("command") else ")"
    return text


class RunLock:
    """Exclusive lock on a run directory for a `with` block (or acquire() / release())."""

    def __init__(self, directory: str | os.PathLike, *, option: str = "--output-dir", log=None,
                 extra: dict | None = None):
        self.directory = Path(directory)
        self.extra = dict(extra or {})  # more fields for the lock file (self-play: the job id its other ranks check)
        self.path = self.directory / LOCK_NAME
        self.option = option
        self.log = log
        self.fd: int | None = None
        self.previous: dict = {}

    def acquire(self) -> "RunLock":
        if self.fd is not None:
            raise RuntimeError(f"{self.path} is already held by this object")
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _lock_fd(fd)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _read_holder(self.path)
                    raise RunDirectoryLocked(
                        f"{self.option} {self.directory} is in use by another run: {describe_holder(holder)}; wait for "
                        f"it to finish, stop it, or use another {self.option}") from None
                raise OSError(error.errno, f"cannot lock {self.path} ({error.strerror}); this file system does not "
                              "support file locks: use a local directory") from None
            # The file we locked must still be the one at the path (nothing deletes it, but be sure).
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.previous = _read_holder(self.path)
        holder = {"pid": os.getpid(), "host": hostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:500], **self.extra}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        os.fsync(fd)
        if self.previous and self.log is not None:
            self.log(f"{self.option} {self.directory}: took over the lock of {describe_holder(self.previous)}, "
                     "which is no longer running")
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # the next holder sees a clean hand-over (no "took over" message)
        except OSError:
            pass
        os.close(self.fd)  # closing the only descriptor drops the flock / lockf lock
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
