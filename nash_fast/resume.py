"""The trainer's checkpoints: what a training run puts into a verified checkpoint directory (nash_fast.checkpoint),
and resuming a run from one, bitwise.

    save_run_checkpoint(run)   step-N/ with model.pt, optimizer.pt (or DeepSpeed's engine/), scheduler.pt,
                               trainer_state.json (TrainerState, data position, config, the loss's running state
                               such as bco_pair's running mean of rewards), rng_rank<r>.json
                               (rng_state: every RNG as JSON) and metrics.jsonl (the log up to step N)
    resume_run(run)            the checkpoint --resume names, or the newest one that verifies and loads (a damaged
                               one is named, moved to damaged/, and the next older one tried); a checkpoint of another run
                               (RESUMABLE_CHANGES) or of another schedule (_check_schedule) is refused

`run` is anything with the fields of ResumableRun (the trainer's TrainRun): this module reads and sets them and
knows nothing else of the training loop. Nothing here needs unpickling: torch.load(weights_only=True) and JSON;
DeepSpeed's engine files are loaded under the same weights_only rule (_check_deepspeed_files,
_weights_only_torch_load).
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nash_fast.checkpoint import (
    CheckpointDamaged,
    read_manifest,
    checkpoint_name,
    is_complete,
    list_checkpoints,
    quarantine_checkpoint,
    remove_incomplete_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from nash_fast.config import TrainConfig, to_dict
from nash_fast.console import log
from nash_fast.optimization import lr_factor
from nash_fast.options import changed_options
from nash_fast.rundir import write_json_atomic


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

class ResumableRun(Protocol):
    """What saving and resuming read and set of a training run (nash_fast.train.TrainRun has these fields)."""

    cfg: TrainConfig
    dist: Any  # nash_fast.distributed.Dist: rank, world_size, is_main, owner, barrier(), all_reduce()
    device: torch.device
    model: torch.nn.Module
    optimizer: Any
    scheduler: Any
    engine: Any  # a DeepSpeed engine, or None on the plain path
    adapters: Any  # nash_fast.adapters.Adapters, or None for full-weight training
    loss_fn: Any
    stream: Any  # nash_fast.data.sampler.BatchStream: locate(position) -> (epoch, batch_in_epoch)
    state: TrainerState
    metrics_lines: list[str]
    checkpoint_root: Path
    total_steps: int
    warmup_steps: int


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (applied or skipped)
    position: int = 0  # global micro-batches consumed
    consecutive_bad: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def save_run_checkpoint(run: ResumableRun) -> Path | None:
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
RESUMABLE_CHANGES = {"output_dir", "resume", "max_steps", "num_epochs", "save_steps", "save_total_limit",
                      "progress_bar", "plot", "tensorboard", "max_consecutive_bad_steps", "cache_dir",
                      "precompute_max_tokens", "device", "deepspeed", "zero_stage", "offload_optimizer",
                      "offload_param", "grad_accum", "gradient_checkpointing", "torch_compile", "logprob_backend", "attn_implementation",
                      "allow_schedule_change", "merge_adapters"}


def _check_resumable(saved_config: dict, cfg: TrainConfig, path: Path) -> None:
    details = changed_options(saved_config, to_dict(cfg), RESUMABLE_CHANGES)
    if details:
        raise ValueError(f"checkpoint {path} belongs to a different run ({details}); use another --output-dir or "
                         "--resume never to start over")


def _check_schedule(saved: dict, run: ResumableRun, path: Path) -> None:
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


def _read_checkpoint(run: ResumableRun, path: Path, verify: bool = True) -> LoadedCheckpoint:
    """Verify every file's SHA-256 against the manifest, then read it (weights_only / JSON) without applying it.
    CheckpointDamaged names the file that fails. verify=False: rank 0 has verified it (the files are read the
    same weights_only way)."""
    manifest = verify_checkpoint(path) if verify else read_manifest(path)
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


def _apply_checkpoint(run: ResumableRun, loaded: LoadedCheckpoint) -> None:
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


def resume_run(run: ResumableRun) -> Path | None:
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
