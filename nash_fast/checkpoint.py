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
files are loaded under the same weights_only rule (_check_deepspeed_files, _weights_only_torch_load).

Distributed: every rank calls save_checkpoint (each may write its own files, e.g. DeepSpeed's
partitioned optimizer states) with the same temporary name (owner = rank 0's pid@host); rank 0 alone
digests, writes the manifest, renames and prunes, between barriers.

The trainer's checkpoints (nash_fast.train's Run):

    save_run_checkpoint(run)   step-N/ with model.pt, optimizer.pt (or DeepSpeed's engine/), scheduler.pt,
                               trainer_state.json (TrainerState, data position, config, the loss's running state
                               such as bco_pair's running mean of rewards), rng_rank<r>.json
                               (rng_state: every RNG as JSON) and metrics.jsonl (the log up to step N)
    resume_run(run)            the checkpoint --resume names, or the newest one that verifies and loads (a damaged
                               one is named, moved to damaged/, and the next older one tried); a checkpoint of another run
                               (_RESUMABLE_CHANGES) or of another schedule (_check_schedule) is refused
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import random
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from nash_fast import rundir
from nash_fast.rundir import fsync_path, sha256_file  # noqa: F401 (sha256_file: re-exported)
from nash_fast.config import TrainConfig, to_dict
from nash_fast.console import log
from nash_fast.optimization import lr_factor

if TYPE_CHECKING:
    from nash_fast.train import Run

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


def _sha256_many(paths: list[Path]) -> list[str]:
    """SHA-256 of several files, in parallel (hashlib releases the GIL on large buffers)."""
    if len(paths) <= 1:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def fsync_tree(directory: Path) -> None:
    """fsync every file and directory under `directory` (and itself), so a rename after it is durable."""
    for path in _files(directory):
        fsync_path(path)
    for sub in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        fsync_path(sub)
    fsync_path(directory)


def write_json_atomic(path: Path, data) -> None:
    """Write JSON to a temporary unique to this process, fsync, rename over path."""
    rundir.write_bytes_atomic(path, json.dumps(data, indent=1, sort_keys=True).encode())


def _read_manifest(directory: Path) -> dict:
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
            or not all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                       for e in files.values())):
        raise CheckpointDamaged(directory, MANIFEST, "malformed (step, files: {name: {bytes, sha256}})")
    for name in files:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointDamaged(directory, MANIFEST, f"lists a file outside the checkpoint: {name!r}")
    return manifest


def is_complete(directory: Path) -> bool:
    """Cheap check: a format-2 manifest, and every file it lists present with the recorded size."""
    try:
        files = _read_manifest(Path(directory))["files"]
        return all((Path(directory) / name).stat().st_size == entry["bytes"] for name, entry in files.items())
    except (OSError, CheckpointDamaged):
        return False


def verify_checkpoint(directory: str | os.PathLike) -> dict:
    """Check every file against the manifest's size and SHA-256, and that no unlisted file is present.
    Returns the manifest; raises CheckpointDamaged naming the first offending file."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    files = manifest["files"]
    present = {str(p.relative_to(directory)) for p in _files(directory)}
    for name in sorted(present - set(files)):
        raise CheckpointDamaged(directory, name, "present but not listed in the manifest")
    paths = []
    for name, entry in sorted(files.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except OSError:
            raise CheckpointDamaged(directory, name, "missing") from None
        if size != entry["bytes"]:
            raise CheckpointDamaged(directory, name, f"{size} bytes, the manifest recorded {entry['bytes']}")
        paths.append((name, path, entry["sha256"]))
    digests = _sha256_many([p for _, p, _ in paths])
    for (name, _, expected), actual in zip(paths, digests):
        if actual != expected:
            raise CheckpointDamaged(directory, name, "SHA-256 does not match the manifest (the file changed after "
                                    "it was written)")
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
    return int(_read_manifest(Path(directory))["step"])


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
    owner = owner or f"{os.getpid()}@{rundir.hostname()}"
    tmp = root / f"{_TMP_PREFIX}{final.name}.{owner}.{step}"
    if is_complete(final):
        # Replacing it would open a window with neither the old nor the new one in place.
        raise FileExistsError(f"a complete checkpoint for step {step} already exists: {final}")
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        rundir.remove_dead_temporaries(root, locked=False)  # dead writers' leftovers (kill -9 mid-save)
        if tmp.exists():  # this process's own earlier attempt at this step, which raised
            rundir.remove_tree(tmp)
        rundir._live.add(str(tmp))
        tmp.mkdir()
    barrier()
    try:
        write(tmp)
        barrier()
        if rank == 0:
            fsync_tree(tmp)
            files = _files(tmp)
            digests = _sha256_many(files)
            manifest = {"format": FORMAT, "step": step, "files": {
                str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": d} for p, d in zip(files, digests)}}
            write_json_atomic(tmp / MANIFEST, manifest)
            fsync_path(tmp)
            if final.exists():  # only a damaged one can be here (a complete one was refused above): set aside
                dest = quarantine_checkpoint(final)
                log(f"warning: checkpoint {final} is incomplete; moved to {dest} before saving step {step} again")
            os.rename(tmp, final)
            rundir.done(tmp)
            fsync_path(root)
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


# =============================================================================================== RNG state

def rng_state() -> dict:
    """Every RNG's state as plain JSON values (no pickle): Python's Mersenne Twister words, numpy's, torch's bytes."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                                 float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state(); ValueError if the structure is not one rng_state() writes (then nothing is set)."""
    _apply_rng_state(_parse_rng_state(state))


def _parse_rng_state(state: dict) -> tuple:
    try:
        version, words, gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        python = (int(version), tuple(int(w) for w in words), None if gauss is None else float(gauss))
        numpy_state = (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        torch_state = torch.tensor(state["torch"], dtype=torch.uint8)
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state.get("cuda", [])]
        if len(python[1]) != 625 or numpy_state[1].shape != (624,) or torch_state.shape != torch.get_rng_state().shape:
            raise ValueError("wrong state sizes")
        if not all(0 <= w < 2**32 for w in python[1][:624]) or not 0 <= python[1][624] <= 624 or not 0 <= pos <= 624:
            raise ValueError("values out of range")
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise ValueError(f"not an RNG state written by nash_fast ({type(error).__name__}: {error})") from None
    return python, numpy_state, torch_state, cuda


def _apply_rng_state(parsed: tuple) -> None:
    python, numpy_state, torch_state, cuda = parsed
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# =============================================================================================== the trainer's checkpoints

@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (applied or skipped)
    position: int = 0  # global micro-batches consumed
    consecutive_bad: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def save_run_checkpoint(run: Run) -> Path | None:
    """Atomic, digested checkpoint of the current step (no-op if one exists for it). Nothing in it needs
    unpickling: model / optimizer / scheduler tensors for torch.load(weights_only=True) (or DeepSpeed's engine
    files, loaded under the same rule), trainer state, RNG states and the metrics log as JSON."""
    final = run.checkpoint_root / checkpoint_name(run.state.step)
    if is_complete(final):
        return final
    rank = run.dist.rank

    def write(tmp: Path) -> None:
        if run.engine is not None:  # adapters: the frozen base is --model, not saved
            run.engine.save_checkpoint(str(tmp), tag="engine", client_state={}, save_latest=False,
                                       exclude_frozen_parameters=run.adapters is not None)
        elif rank == 0:
            torch.save(run.model.state_dict() if run.adapters is None else run.adapters.checkpoint_state(),
                       tmp / "model.pt")
            torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
        if rank == 0:
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            write_json_atomic(tmp / "trainer_state.json", {
                **run.state.to_dict(), "world_size": run.dist.world_size, "grad_accum": run.cfg.grad_accum,
                # The data position: global micro-batch `position` is batch `batch_in_epoch` of epoch `epoch`,
                # whose order is a function of (sampler_seed + epoch); nothing else is random in the stream.
                "data": dict(zip(("epoch", "batch_in_epoch"), run.stream.locate(run.state.position)),
                             sampler_seed=run.cfg.seed),
                "total_steps": run.total_steps, "warmup_steps": run.warmup_steps, "config": to_dict(run.cfg),
                # The loss's running state (bco_pair's running mean of rewards; {} for stateless losses), the same on
                # every rank (its updates are all-reduced); JSON floats round-trip exactly, so a resume is bitwise.
                "loss_state": _loss_state(run.loss_fn),
            })
            with open(tmp / "metrics.jsonl", "w") as f:
                f.writelines(run.metrics_lines)
        write_json_atomic(tmp / f"rng_rank{rank}.json", rng_state())

    path = save_checkpoint(run.checkpoint_root, run.state.step, write, keep_last=run.cfg.save_total_limit,
                           rank=rank, barrier=run.dist.barrier, owner=run.dist.owner)
    if run.dist.is_main:
        log(f"saved checkpoint {path}")
    return path


def _loss_state(loss_fn) -> dict:
    """The loss's running state (FusedLinearPreferenceLoss.loss_state()); {} for a loss without one (any callable)."""
    return loss_fn.loss_state() if hasattr(loss_fn, "loss_state") else {}


def _load_loss_state(loss_fn, state) -> None:
    """Restores _loss_state's dict; ValueError if it is not what loss_fn keeps."""
    if hasattr(loss_fn, "load_loss_state"):
        loss_fn.load_loss_state(state)
    elif state != {}:
        raise ValueError(f"loss state must be {{}} for this loss, got {state!r:.200}")


# Options that may change between a run and its resumption (they do not change what is being trained).
_RESUMABLE_CHANGES = {"output_dir", "resume", "max_steps", "num_epochs", "save_steps", "save_total_limit",
                      "progress_bar", "plot", "tensorboard", "max_consecutive_bad_steps", "cache_dir",
                      "precompute_max_tokens", "device", "deepspeed", "zero_stage", "offload_optimizer",
                      "offload_param", "grad_accum", "gradient_checkpointing", "torch_compile", "logprob_backend", "attn_implementation",
                      "allow_schedule_change", "merge_adapters"}


def _check_resumable(saved_config: dict, cfg: TrainConfig, path: Path) -> None:
    current = to_dict(cfg)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved_config.get(k, current[k]) != current[k])
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {saved_config.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"checkpoint {path} belongs to a different run ({details}); use another --output-dir or "
                         "--resume never to start over")


def _check_schedule(saved: dict, run: Run, path: Path) -> None:
    """A checkpoint of a run with another length (--max-steps / --num-epochs) was trained with another learning-rate
    schedule whenever lr_factor depends on the total: resuming it silently would give neither the old run nor a
    straight run of the new length. Refused unless --allow-schedule-change."""
    cfg, step = run.cfg, saved["step"]
    old_total, old_warmup = saved["total_steps"], saved.get("warmup_steps", run.warmup_steps)
    if (old_total, old_warmup) == (run.total_steps, run.warmup_steps):
        return
    old = [lr_factor(s, total_steps=old_total, warmup_steps=old_warmup, schedule=cfg.lr_scheduler) for s in range(step)]
    new = [lr_factor(s, total_steps=run.total_steps, warmup_steps=run.warmup_steps, schedule=cfg.lr_scheduler)
           for s in range(step)]
    first = next((s for s in range(step) if old[s] != new[s]), None)
    if first is None:  # e.g. a constant schedule after a fixed warmup: the steps taken are those of the new run
        if run.dist.is_main:
            log(f"resuming {path} (a {old_total}-step run) as a {run.total_steps}-step run: the steps taken so far "
                "follow the same learning-rate schedule")
        return
    what = (f"checkpoint {path} was trained as a {old_total}-step run ({old_warmup} warmup steps, {cfg.lr_scheduler} "
            f"schedule); this run has {run.total_steps} steps ({run.warmup_steps} warmup), whose learning rate differs "
            f"from step {first + 1} on (x{new[first]:.4g} vs x{old[first]:.4g} of --lr)")
    if not cfg.allow_schedule_change:
        raise ValueError(f"{what}: resuming would match neither run. Pass --allow-schedule-change to continue with the "
                         "new schedule from here, keep the old --max-steps / --num-epochs, or --resume never")
    if run.dist.is_main:
        log(f"warning: {what}; continuing with the new schedule (--allow-schedule-change)")


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint read into memory, ready to apply (nothing applied yet)."""

    path: Path
    saved: dict
    rng: tuple | None
    metrics_lines: list[str]
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None


def _read_json(path: Path, name: str):
    try:
        with open(path / name, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointDamaged(path, name, f"unreadable ({type(error).__name__}: {error})") from None


def _torch_load(path: Path, name: str, device) -> Any:
    try:
        return torch.load(path / name, map_location=device, weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise CheckpointDamaged(path, name, f"cannot be loaded ({type(error).__name__}: "
                                f"{' '.join(str(error).split())[:200]})") from None


def _read_checkpoint(run: Run, path: Path, verify: bool = True) -> LoadedCheckpoint:
    """Verify every file's SHA-256 against the manifest, then read it (weights_only / JSON) without applying it.
    CheckpointDamaged names the file that fails. verify=False: rank 0 has verified it (the files are read the
    same weights_only way)."""
    manifest = verify_checkpoint(path) if verify else _read_manifest(path)
    saved = _read_json(path, "trainer_state.json")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in TrainerState().to_dict()) \
            or not isinstance(saved.get("total_steps"), int) or saved["step"] != manifest["step"]:
        raise CheckpointDamaged(path, "trainer_state.json", "does not hold this checkpoint's trainer state")
    _check_resumable(saved.get("config", {}), run.cfg, path)  # another run's checkpoint: an error, not damage
    try:  # checked on a copy now, applied with the rest in _apply_checkpoint
        _load_loss_state(copy.deepcopy(run.loss_fn), saved.get("loss_state", {}))
    except ValueError as error:
        raise CheckpointDamaged(path, "trainer_state.json", f"does not hold this run's loss state ({error})") from None
    rng_name = f"rng_rank{run.dist.rank}.json"
    rng = _read_json(path, rng_name) if (path / rng_name).is_file() else None  # absent: more processes than saved
    try:
        lines = (path / "metrics.jsonl").read_bytes().decode("utf-8").splitlines(keepends=True)
        steps = [json.loads(line)["step"] for line in lines]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointDamaged(path, "metrics.jsonl", f"unreadable ({type(error).__name__}: {error})") from None
    if steps != list(range(1, saved["step"] + 1)):
        raise CheckpointDamaged(path, "metrics.jsonl", f"does not hold steps up to {saved['step']}")
    loaded = LoadedCheckpoint(path, saved, rng, lines)
    if run.engine is not None:
        if not (path / "engine").is_dir():
            raise ValueError(f"checkpoint {path} was not written by a DeepSpeed run; resume it without --deepspeed/--zero-stage")
        _check_deepspeed_files(path)
    else:
        if not (path / "model.pt").is_file():
            raise ValueError(f"checkpoint {path} was written by a DeepSpeed run; resume it with the same --deepspeed/--zero-stage")
        loaded.model = _torch_load(path, "model.pt", run.device)
        loaded.optimizer = _torch_load(path, "optimizer.pt", run.device)
    loaded.scheduler = _torch_load(path, "scheduler.pt", "cpu")
    if rng is not None:
        try:
            loaded.rng = _parse_rng_state(rng)
        except ValueError as error:
            raise CheckpointDamaged(path, rng_name, str(error)) from None
    return loaded


# DeepSpeed's engine files (ZeRO 0-3, fp32 / bf16) hold these classes besides tensors and plain containers. They are
# data holders (an IntEnum, a dataclass, the loss scaler's attributes): rebuilding them runs no code from the file.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def _deepspeed_safe_globals() -> list:
    import importlib

    objects = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attribute = name.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):  # another DeepSpeed version: that name cannot occur then
            pass
    return objects


def _check_deepspeed_files(path: Path) -> None:
    """Every pickle-based file of a DeepSpeed checkpoint may reference only tensors, plain containers and
    DEEPSPEED_SAFE_GLOBALS; anything else (e.g. os.system) is refused before DeepSpeed ever sees the file."""
    for file in sorted((path / "engine").rglob("*")):
        if not file.is_file() or file.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
            continue
        name = str(file.relative_to(path))
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception as error:
            raise CheckpointDamaged(path, name, f"cannot be read ({type(error).__name__}: {error})") from None
        unexpected = sorted(set(unsafe) - set(DEEPSPEED_SAFE_GLOBALS))
        if unexpected:
            raise CheckpointDamaged(path, name, f"would unpickle {', '.join(unexpected)} (not a DeepSpeed checkpoint "
                                    "type); refused")


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's engine loader calls torch.load(weights_only=False); inside this block every torch.load is
    weights_only=True with DEEPSPEED_SAFE_GLOBALS allowed, so no file can run code while it loads."""
    real = torch.load
    allowed = _deepspeed_safe_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _apply_checkpoint(run: Run, loaded: LoadedCheckpoint) -> None:
    path, saved = loaded.path, loaded.saved
    if run.engine is not None:
        with _weights_only_torch_load():
            load_path, _ = run.engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                      load_lr_scheduler_states=False,
                                                      load_module_strict=run.adapters is None)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {path}")
    elif run.adapters is not None:  # adapters hook: model.pt holds the trainable tensors only
        run.adapters.load_checkpoint_state(loaded.model, path)
        run.optimizer.load_state_dict(loaded.optimizer)
    else:
        run.model.load_state_dict(loaded.model)
        run.optimizer.load_state_dict(loaded.optimizer)
    run.scheduler.load_state_dict(loaded.scheduler)
    run.state = TrainerState(**{k: saved[k] for k in TrainerState().to_dict()})
    _load_loss_state(run.loss_fn, saved.get("loss_state", {}))
    if loaded.rng is not None:
        _apply_rng_state(loaded.rng)
    run.metrics_lines = list(loaded.metrics_lines)
    if saved.get("world_size") != run.dist.world_size or saved.get("grad_accum") != run.cfg.grad_accum:
        if run.dist.is_main:
            log(f"warning: resuming a run of {saved.get('world_size')} processes x grad_accum {saved.get('grad_accum')} "
                f"with {run.dist.world_size} x {run.cfg.grad_accum}: the data position carries over, the batches per step change")


def resume_run(run: Run) -> Path | None:
    """Load the checkpoint --resume names, or the newest one that passes verification and loads (auto / latest):
    a damaged one is skipped with a warning naming the file, and moved to root/damaged/ (quarantine_checkpoint:
    never deleted). Returns the checkpoint used, or None for a fresh start. Every rank loads the same one (rank 0
    decides)."""
    cfg, dist = run.cfg, run.dist
    if cfg.resume == "never":
        return None
    if cfg.resume not in ("auto", "latest"):
        path = Path(cfg.resume)
        try:
            loaded = _read_checkpoint(run, path)
        except CheckpointDamaged as error:
            raise ValueError(f"--resume {path}: {error.file}: {error.reason}") from None
        _check_schedule(loaded.saved, run, path)
        _apply_checkpoint(run, loaded)
        return path
    candidates = [p for _, p in reversed(list_checkpoints(run.checkpoint_root))]
    chosen, loaded = -1, None
    if dist.is_main:
        for index, path in enumerate(candidates):
            try:
                loaded = _read_checkpoint(run, path)
            except CheckpointDamaged as error:
                dest = quarantine_checkpoint(path)
                log(f"warning: skipping checkpoint {path}: {error.file}: {error.reason}; moved to {dest} (not resumed "
                    "from; inspect or delete it)")
                continue
            chosen = index
            break
        remove_incomplete_checkpoints(run.checkpoint_root, log=log)
    chosen = int(dist.all_reduce(torch.tensor([float(chosen if dist.is_main else -1)]), "max").item())
    if chosen < 0:
        if cfg.resume == "latest":
            raise ValueError(f"--resume: no complete checkpoint under {run.checkpoint_root}")
        return None
    path = candidates[chosen]
    if not dist.is_main:
        loaded = _read_checkpoint(run, path, verify=False)  # rank 0 verified it: one pass over the files
    _check_schedule(loaded.saved, run, path)
    _apply_checkpoint(run, loaded)
    return path
