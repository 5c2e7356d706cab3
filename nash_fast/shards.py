"""Self-play over a launcher's ranks: the world, its agreements, and per-shard work that resumes shard by shard.

    torchrun --nproc-per-node 8 -m nash_fast.selfplay ...      (or the deepspeed launcher, or srun under SLURM)

World. Under a launcher (RANK, WORLD_SIZE, LOCAL_RANK in the environment, WORLD_SIZE > 1) World.from_environment()
joins the job's process group (env://, MASTER_ADDR / MASTER_PORT): gloo on CPU; on GPUs NCCL, as DeepSpeed's
training wants, plus a gloo group for self-play's own small messages. Every collective has a timeout
(--collective-timeout), so nothing waits forever. Without a launcher (or WORLD_SIZE=1) the world is this
process and nothing distributed is touched.

Agreements. A step that every rank runs ends in World.step(where, fn): each rank reports success or its one-line
error (JSON over gloo, never pickle); when any rank failed, every rank raises RankFailed naming the failing rank(s)
and the step ("rank 1 failed in iteration 1 judge: ..."). A rank that died (kill -9, out of memory) or hangs
makes the others' collective fail (at once for a dead peer, after the timeout for a hung one); the survivors
then read from the job's store which ranks never arrived and name them. A failed step is final: the job ends
and the same command resumes it.

Shards. A stage's items (prompts) are cut into units of a fixed size that does not depend on the world size
(unit_size: for the Hugging Face backend, a whole number of generation batches, so that every batch holds the
same rows whatever the world size and the samples are bitwise the same), and the units are dealt to the
working ranks in contiguous blocks. Each finished unit is written atomically (DIR/shard-NNNNN.jsonl, then its
record DIR/shard-NNNNN.json with the file's size and SHA-256 and a key digesting everything that determines
its content: options, policy, the unit's inputs). A rerun skips the units whose record matches and whose file
verifies, and redoes the rest, so killing one rank mid-stage costs only that rank's unfinished units. Rank 0
merges the verified units in unit order (the merged artifact is therefore the same bytes for any world size),
writes the stage's artifact and manifest entry, and then removes DIR.

The output directory must be one directory seen by every rank (a shared file system on several nodes): rank 0
holds its run lock (nash_fast.rundir) for the job's life, with the job's id written in the lock file; every
other rank checks that the lock file names rank 0's process and this job before touching anything, which
also catches a directory that is not shared.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from nash_fast import rundir
from nash_fast.cli import RunFailed, one_line
from nash_fast.data import load_jsonl
from nash_fast.interrupt import Interrupted, stop_requested

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
RECORD_FORMAT = 1


class RankFailed(RunFailed):
    """A rank of the job failed a step; raised on every rank with the same one-line message."""


# =============================================================================================== world


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    timeout_s: float = 1800.0
    group: object = None  # the gloo group of self-play's messages (None in a world of one)
    _sequence: int = field(default=0, repr=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_environment(cls, timeout_s: float = 1800.0) -> "World":
        """This process's place in the launcher's job (a world of one without a launcher)."""
        env = os.environ
        try:
            world_size = int(env.get("WORLD_SIZE", "1"))
            rank = int(env.get("RANK", "0"))
            local_rank = int(env.get("LOCAL_RANK", "0"))
            # torchrun: LOCAL_WORLD_SIZE; the deepspeed launcher: LOCAL_SIZE
            local_world_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world_size)
        except ValueError:
            raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (set by the "
                             f"launcher); got {', '.join(f'{k}={env.get(k)!r}' for k in LAUNCHER_VARIABLES)}") from None
        if world_size <= 1:
            return cls(timeout_s=timeout_s)
        if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
            raise ValueError(f"RANK={rank} / LOCAL_RANK={local_rank} outside WORLD_SIZE={world_size} / "
                             f"LOCAL_WORLD_SIZE={local_world_size}")
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not env.get(name):
                raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set: start the job with torchrun, the "
                                 "deepspeed launcher or srun (see docs/multi-gpu.md), which set it")
        import torch
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=timeout_s)
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", init_method="env://", rank=rank,
                                    world_size=world_size, timeout=timeout)
        group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else dist.group.WORLD
        return cls(rank, world_size, local_rank, local_world_size, timeout_s, group)

    # ------------------------------------------------------------------------------ messages
    def _store(self):
        import torch.distributed as dist

        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - the store is only used to name a lost rank
            return None

    def _gather_json(self, obj, where: str) -> list:
        """obj of every rank (JSON over gloo). A rank that never arrives (dead or hung) raises RankFailed naming it."""
        import torch
        import torch.distributed as dist

        self._sequence += 1
        arrived = f"nash_fast/selfplay/{self._sequence}/"
        store = self._store()
        try:
            if store is not None:
                store.set(arrived + str(self.rank), "1")
            data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
            sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
            dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64), group=self.group)
            longest = int(max(s.item() for s in sizes))
            padded = torch.zeros(longest, dtype=torch.uint8)
            padded[: data.numel()] = data
            out = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
            dist.all_gather(out, padded, group=self.group)
        except RuntimeError as error:  # torch.distributed.DistBackendError, a closed connection, a timeout
            raise RankFailed(f"{where}: {self._lost_ranks(store, arrived)} (no answer within the "
                             f"{self.timeout_s:g}s --collective-timeout, or the connection closed: "
                             f"{' '.join(str(error).split())[:200]}); rerun the same command to resume: finished "
                             "stages and shards are kept") from None
        return [json.loads(bytes(t[: int(s.item())].tolist()).decode()) for t, s in zip(out, sizes)]

    def _lost_ranks(self, store, prefix: str) -> str:
        if store is None:
            return "a rank stopped (killed, crashed or hung)"
        try:
            missing = [r for r in range(self.world_size) if not store.check([prefix + str(r)])]
        except Exception:  # noqa: BLE001 - rank 0 hosts the store: it is gone
            return "lost contact with rank 0 (killed, crashed or hung; it hosts the job's store)"
        if not missing:
            return "a rank stopped (killed, crashed or hung)"
        return f"rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} stopped (killed, crashed or hung)"

    def step(self, where: str, fn: Callable[[], object]):
        """fn() on this rank, then agreement: every rank raises RankFailed when any rank failed (see the docstring).
        In a world of one, fn() runs as is (its errors propagate unchanged)."""
        if not self.distributed:
            return fn()
        try:
            result, error = fn(), None
        except KeyboardInterrupt:
            raise  # an abort (a second Ctrl-C): no agreement
        except BaseException as caught:  # noqa: BLE001 - reported to the other ranks, then raised here
            if isinstance(caught, (RankFailed, Interrupted)) or getattr(caught, "agreed_by_ranks", False):
                raise  # already agreed by every rank (a nested step; the trainer's collective stop decision)
            result, error = None, caught
        if error is not None:
            message = one_line(error)
        reports = self._gather_json(None if error is None else message, where)
        failed = [(r, m) for r, m in enumerate(reports) if m is not None]
        if not failed:
            return result
        first, text = failed[0]
        others = f" (and rank{'s' if len(failed) > 2 else ''} {', '.join(str(r) for r, _ in failed[1:])})" \
            if len(failed) > 1 else ""
        summary = f"rank {first} failed in {where}{others}: {text}"
        if error is not None and not isinstance(error, (ValueError, OSError, RunFailed)):
            error.agreed_by_ranks = True
            if hasattr(error, "add_note"):
                error.add_note(summary)
            raise error  # a bug on this rank: its traceback (the other ranks print the one line)
        if error is not None and isinstance(error, ValueError):
            raised = ValueError(summary)  # bad input or options: exit status 2 as in a world of one
            raised.agreed_by_ranks = True
            raise raised from None
        raise RankFailed(summary) from None

    def broadcast(self, obj, where: str):
        """Rank 0's obj (JSON) on every rank."""
        if not self.distributed:
            return obj
        return self._gather_json(obj if self.is_main else None, where)[0]

    def main_step(self, where: str, fn: Callable[[], object]):
        """fn() on rank 0 only; its result (JSON) on every rank, its failure raised on every rank."""
        return self.broadcast(self.step(where, fn if self.is_main else (lambda: None)), where)

    def stop_requested(self, where: str) -> str | None:
        """A SIGINT / SIGTERM of any rank (the same answer on every rank)."""
        if not self.distributed:
            return stop_requested()
        requests = [r for r in self._gather_json(stop_requested(), where) if r]
        return "SIGINT" if "SIGINT" in requests else (requests[0] if requests else None)


def job_id() -> str:
    """An id for this job: the launcher's (torchrun, SLURM) when it has one, plus rank 0's pid@host and start time."""
    launcher = os.environ.get("TORCHELASTIC_RUN_ID") or os.environ.get("SLURM_JOB_ID") or ""
    return f"{launcher + ':' if launcher else ''}{os.getpid()}@{socket.gethostname() or 'localhost'}:{time.time_ns()}"


def verify_lock(directory: Path, holder: dict, rank: int) -> None:
    """On a rank other than 0: OUTPUT's lock file must name rank 0's process and this job (rank 0 holds the lock)."""
    path = Path(directory) / rundir.LOCK_NAME
    try:
        found = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        found = {}
    keys = ("pid", "host", "job")
    if not isinstance(found, dict) or any(found.get(k) != holder.get(k) for k in keys):
        raise ValueError(f"--output-dir {directory}: rank {rank} does not see the lock rank 0 holds for this job in "
                         f"{path} (found {rundir.describe_holder(found if isinstance(found, dict) else {})}); "
                         "every rank must see the same directory (a shared file system on several nodes)")


# =============================================================================================== shards


def unit_size(batch_rows: int, samples_per_prompt: int) -> int:
    """Prompts per shard unit: lcm(batch_rows, K) / K, the fewest whole prompts filling whole batches of rows."""
    import math

    return batch_rows // math.gcd(batch_rows, samples_per_prompt)


def units(num_items: int, size: int) -> list[range]:
    return [range(start, min(start + size, num_items)) for start in range(0, num_items, size)]


def assignment(num_units: int, workers: Sequence[int]) -> dict[int, list[int]]:
    """worker rank -> its units: contiguous blocks, sizes differing by at most one."""
    n = len(workers)
    return {w: list(range(k * num_units // n, (k + 1) * num_units // n)) for k, w in enumerate(workers)}


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _names(directory: Path, index: int) -> tuple[Path, Path]:
    return directory / f"shard-{index:05d}.jsonl", directory / f"shard-{index:05d}.json"


def _record(directory: Path, index: int) -> dict | None:
    _, record_path = _names(directory, index)
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def finished(directory: Path, index: int, key: str) -> bool:
    """Unit `index` has a record with this key and its file has the recorded size (digest checked at the merge)."""
    record = _record(directory, index)
    data, _ = _names(directory, index)
    try:
        return bool(record) and record.get("key") == key and data.stat().st_size == record.get("bytes")
    except OSError:
        return False


def write_unit(directory: Path, index: int, key: str, rows: Sequence, stats: dict, rank: int) -> None:
    """The unit's rows (JSON lines) atomically, then its record (size, SHA-256, key, who, stats) atomically."""
    data, record_path = _names(directory, index)
    payload = "".join(json.dumps(row) + "\n" for row in rows).encode()
    rundir.write_bytes_atomic(data, payload)
    rundir.write_json_atomic(record_path, {"format": RECORD_FORMAT, "index": index, "key": key,
                                           **rundir.bytes_record(payload), "rows": len(rows), "rank": rank,
                                           "stats": stats})


def read_unit(directory: Path, index: int, key: str) -> tuple[list, dict]:
    """(rows, stats) of a finished unit, verified against its record (ValueError naming the file otherwise)."""
    data, record_path = _names(directory, index)
    record = _record(directory, index)
    if record is None or record.get("key") != key:
        raise RunFailed(f"{record_path}: missing or written for other inputs; rerun the same command to redo it")
    if not data.is_file():
        raise RunFailed(f"{data}: missing; rerun the same command to redo it")
    problem = rundir.verify_files(directory, {data.name: {k: record.get(k) for k in ("bytes", "sha256")}},
                                  record="its record")
    if problem is not None:
        record_path.unlink(missing_ok=True)  # the rerun redoes this unit
        raise RunFailed(f"{data}: {problem[1]}; rerun the same command to redo this shard")
    rows = load_jsonl(data) if data.stat().st_size else []
    if len(rows) != record["rows"]:
        raise RunFailed(f"{data}: {len(rows)} rows, its record says {record['rows']}")
    return rows, record.get("stats") or {}


@dataclass
class ShardedStage:
    """One stage's work over units of items: run() on every rank, then merge() on rank 0."""

    world: World
    directory: Path
    where: str  # "iteration 1 generate": names the stage in messages
    keys: list[str]  # per unit: digest of everything its content depends on
    unit_ranges: list[range]
    workers: list[int]  # ranks that work (tensor-parallel groups: their first rank)
    log: Callable[[str], None] = print

    def mine(self) -> list[int]:
        return assignment(len(self.unit_ranges), self.workers).get(self.world.rank, [])

    def pending(self) -> list[int]:
        return [u for u in self.mine() if not finished(self.directory, u, self.keys[u])]

    def run(self, work: Callable[[list[int]], Iterable[tuple[int, list, dict]]]) -> None:
        """work(units) yields (unit, rows, stats) per finished unit, each written at once; then every rank agrees."""
        def body():
            self.directory.mkdir(parents=True, exist_ok=True)
            todo = self.pending()
            mine = self.mine()
            kept = len(mine) - len(todo)
            if mine and (self.world.distributed or kept):
                self.log(f"{self.where}: rank {self.world.rank}: {len(todo)} of its {len(mine)} shards to do"
                         + (f" ({kept} kept from an earlier run)" if kept else ""))
            for unit, rows, stats in (work(todo) if todo else ()):
                write_unit(self.directory, unit, self.keys[unit], rows, stats, self.world.rank)

        self.world.step(self.where, body)

    def merge(self) -> tuple[list, list[dict]]:
        """Rank 0: every unit's rows in unit order, and each unit's stats."""
        rows, stats = [], []
        for u in range(len(self.unit_ranges)):
            unit_rows, unit_stats = read_unit(self.directory, u, self.keys[u])
            if len(unit_rows) != len(self.unit_ranges[u]):
                raise RunFailed(f"{self.where}: shard {u} holds {len(unit_rows)} rows for "
                                f"{len(self.unit_ranges[u])} items")
            rows += unit_rows
            stats.append(unit_stats)
        return rows, stats


def remove_shards(directory: Path) -> None:
    """Delete a stage's shard directory once its artifact is in place (and .shards/ when that leaves it empty)."""
    rundir.remove_tree(directory)
    try:
        directory.parent.rmdir()
    except OSError:
        pass  # other stages' shards, or already gone
