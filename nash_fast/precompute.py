"""Precompute pass: per-sequence log-probs of a frozen model over a whole dataset, cached on disk.

The losses compare the policy pi with frozen models on the same sequences:

    reference          log pi_ref(y | x)        every loss (Delta = log pi - log pi_ref)
    previous iterate   log pi_t(y | x)          INPO's h_t (INPO eq. 9)
    augmented ref.     log pi_ref(y | p + x)    Sr-DPO / Sr-IPO's refinement (Sr-DPO eq. 11)

Those never change during training, so they are computed once, forward-only (torch.no_grad() and
nash_fast.model.packed_sequence_logprobs: the backbone over packed rows, the fused log-prob op over the
LM head, no [tokens x vocab] logits, nothing saved for backward), and written next to the run. Training
then never holds the frozen models.

The cache file is keyed by a fingerprint of
    the model      its name or path, config, and weights (hash of each weight file, or the HF hub blob
                   id that already is one; the tiny model's in-memory state dict), and
    the data       the exact token ids of every sequence (so also the tokenizer, chat template, column
                   mapping and augmentation prompt), plus the settings that change the numbers (average,
                   dtype, attention implementation).
Change any of them and the key changes (a miss); rerun with the same ones and it is a hit.

Every cache file is verified before use: it is written aside under a temporary name, fsynced and renamed,
and its size and SHA-256 go into a sidecar FILE.sha256 (JSON) written after it. A file whose sidecar is
missing or does not match (bit flips, truncation, a swapped file) is not loaded; it is recomputed. Files are
read with torch.load(weights_only=True).

The pass is resumable: the packed batches (fixed by the data and the token budget) are computed in shards of
SHARD_BATCHES batches, each written (verified, as above) to NAME-logps-KEY.partial-MAXTOKENS/ as soon as it is
complete. A stop request (SIGINT / SIGTERM, nash_fast.interrupt) ends the pass after the current batch with
its completed work on disk (nash_fast.interrupt.Interrupted); a kill -9 loses at most one shard. The next run
computes only the batches no verified shard holds, in the same batches, so its numbers are those of an
uninterrupted pass; once all are done the shards are merged into the cache file and removed.

Multi-process (DeepSpeed / torchrun): of the batches still to compute, rank r computes batches r, r + W, ...;
each shard's results are all-gathered and rank 0 writes it; the stop request is agreed on after every round
of W batches (the caller's stop() is a collective).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from nash_fast import rundir
from nash_fast.data import PackedPreferenceCollator, TokenBudgetBatchSampler, example_sequence_lengths
from nash_fast.interrupt import Interrupted
from nash_fast.model import packed_sequence_logprobs
from nash_fast.pretrained import is_gguf_model, resolve_model

CACHE_VERSION = 1
SHARD_BATCHES = 64  # precompute batches per shard written to disk (rounded up to a multiple of the process count)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASH_CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------- fingerprints

def _file_identity(path: Path, memo: dict | None = None) -> str:
    """Content hash of a weight file. Files in a Hugging Face hub cache are symlinks to blobs named by their
    sha256 (LFS) or git hash, which identify the content without reading it. Other files are hashed once per
    (path, size, mtime) when a memo dict is given (a 15 GB checkpoint is read once, not on every run)."""
    resolved = path.resolve()
    if path.is_symlink() and resolved.parent.name == "blobs":
        return "blob:" + resolved.name
    stat = resolved.stat()
    key = f"{resolved}:{stat.st_size}:{stat.st_mtime_ns}"
    if memo is not None and key in memo:
        return memo[key]
    identity = "sha256:" + rundir.sha256_file(resolved, chunk=_HASH_CHUNK)
    if memo is not None:
        memo[key] = identity
    return identity


def directory_fingerprint(directory: str | os.PathLike, memo_file: str | os.PathLike | None = None) -> str:
    """sha256 over config.json and every weight file (name + content identity) of a model directory.
    memo_file: a JSON file remembering file hashes by (path, size, mtime)."""
    directory = Path(directory)
    memo = None
    if memo_file is not None:
        try:
            with open(memo_file, "rb") as f:
                memo = json.loads(f.read().decode("utf-8"))
        except (OSError, ValueError):
            memo = {}
        if not isinstance(memo, dict) or not all(isinstance(v, str) for v in memo.values()):
            memo = {}  # damaged: the hashes are recomputed
    before = dict(memo) if memo is not None else None
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            digest.update(path.name.encode())
            digest.update(_file_identity(path, memo).encode())
    if memo is not None and memo != before:
        Path(memo_file).parent.mkdir(parents=True, exist_ok=True)
        rundir.write_bytes_atomic(memo_file, json.dumps(memo).encode())
    return digest.hexdigest()


def state_dict_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the config and every parameter / buffer (name, dtype, shape, bytes) of an in-memory model."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def resolve_model_directory(name_or_path: str) -> Path | None:
    """A local directory for a model: the path itself, a GGUF model's converted directory (nash_fast.pretrained),
    or the hub cache snapshot of a hub name (no download)."""
    if is_gguf_model(name_or_path):
        try:
            return Path(resolve_model(name_or_path))
        except ValueError:  # a directory of several GGUF files: the loaded model is fingerprinted instead
            return None
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception:
        return None


def model_fingerprint(name_or_path: str, model: torch.nn.Module | None = None, *,
                      memo_file: str | os.PathLike | None = None) -> str:
    """Fingerprint of a model given by name or path, from its files when they are local (no load),
    else from an already loaded model's state dict."""
    directory = resolve_model_directory(name_or_path) if name_or_path != "tiny" else None
    if directory is not None:
        return "dir:" + directory_fingerprint(directory, memo_file)
    if model is None:
        raise ValueError(f"model {name_or_path!r}: no local files to fingerprint; pass the loaded model")
    return "weights:" + state_dict_fingerprint(model)


def data_fingerprint(examples: Sequence[dict], *, augment: bool) -> str:
    """sha256 over the token ids of every sequence the collator would build, in dataset order."""
    digest = hashlib.sha256()
    keys = ("prompt_ids", "chosen_ids", "rejected_ids", "responses_ids") + (("aug_prompt_ids",) if augment else ())
    for example in examples:
        payload = {k: example[k] for k in keys if k in example}
        digest.update(json.dumps(payload, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- the pass

def _autocast(model: torch.nn.Module, dtype: torch.dtype | None):
    """torch.autocast of `dtype` on the model's device (for None: no change to the caller's autocast state)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=dtype)


@torch.no_grad()
def dataset_sequence_logprobs(
    model: torch.nn.Module,
    examples: Sequence[dict],
    *,
    augment: bool = False,
    average: bool = False,
    max_tokens: int = 4096,
    backend: str = "auto",
    rank: int = 0,
    world_size: int = 1,
    progress: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> list[list[float]]:
    """Per example, the log-prob of each of its sequences in the collator's order
    (pairs: chosen, rejected[, aug chosen, aug rejected]; groups: response 0..K-1). autocast_dtype: run the
    model under torch.autocast of that dtype (as a trainer's autocast policy computes them)."""
    lengths = [example_sequence_lengths(e, i, augment=augment) for i, e in enumerate(examples)]
    batches = TokenBudgetBatchSampler(lengths, max_tokens, shuffle=False).all_batches()
    mine = batches[rank::world_size]
    collate = PackedPreferenceCollator(augment=augment)
    was_training = model.training
    model.eval()
    results: dict[int, list[float]] = {}
    iterator = mine
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(mine, desc="precompute", unit="batch", leave=False)
    for batch_indices in iterator:
        batch = collate([examples[i] for i in batch_indices])
        with _autocast(model, autocast_dtype):
            logps = packed_sequence_logprobs(model, batch, average=average, backend=backend).float().cpu()
        pair_index = batch["pair_index"]
        for position, example_index in enumerate(batch_indices):
            results[example_index] = logps[pair_index == position].tolist()
    model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(gathered, results)
        results = {k: v for part in gathered for k, v in part.items()}
    missing = [i for i in range(len(examples)) if i not in results]
    if missing:
        raise RuntimeError(f"precompute produced no log-probs for examples {missing[:8]}")
    return [results[i] for i in range(len(examples))]


class CacheDamaged(ValueError):
    """A cache file that fails verification (reason says why); it is recomputed, never loaded."""


def write_verified(path: Path, obj) -> None:
    """torch.save obj to path atomically, then its record {"file", "bytes", "sha256"} to path.sha256 (JSON,
    written second; nash_fast.rundir's file record)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with rundir.atomic_file(path) as tmp:
        torch.save(obj, tmp)
        record = {"file": path.name, **rundir.file_record(tmp)}
    rundir.write_json_atomic(_sidecar(path), record)


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def read_verified(path: Path):
    """torch.load(weights_only=True) of a file written by write_verified, after checking its size and SHA-256
    against the sidecar. CacheDamaged when the sidecar is missing or either does not match."""
    try:
        record = json.loads(_sidecar(path).read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise CacheDamaged(f"{_sidecar(path).name} is missing (written by an older version, or killed in between)") from None
    except (OSError, ValueError) as error:
        raise CacheDamaged(f"{_sidecar(path).name} is unreadable ({type(error).__name__})") from None
    entry = {k: record.get(k) for k in ("bytes", "sha256")} if isinstance(record, dict) else None
    problem = rundir.verify_files(path.parent, {path.name: entry}, record=f"{_sidecar(path).name}")
    if problem is not None:
        raise CacheDamaged(f"{path.name}: {problem[1]}")
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:
        raise CacheDamaged(f"{path.name} cannot be loaded ({type(error).__name__})") from None


def _remove_verified(path: Path) -> None:
    for p in (path, _sidecar(path)):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _gather(results: dict, world_size: int) -> dict:
    if world_size == 1:
        return results
    import torch.distributed as dist

    gathered: list[dict] = [None] * world_size  # type: ignore[list-item]
    dist.all_gather_object(gathered, results)
    return {k: v for part in gathered for k, v in part.items()}


def _read_shards(partial: Path, key: str, batches: list[list[int]], log) -> tuple[dict[int, list[float]], set[int]]:
    """Results and batch ids of the verified shards in `partial`; damaged ones are deleted (and recomputed)."""
    results: dict[int, list[float]] = {}
    done: set[int] = set()
    if not partial.is_dir():
        return results, done
    for path in sorted(partial.glob("shard-*.pt")):
        try:
            shard = read_verified(path)
            ids, rows = shard["batches"], shard["results"]
            if shard.get("key") != key or not all(isinstance(b, int) and 0 <= b < len(batches) for b in ids):
                raise CacheDamaged(f"{path.name} belongs to another pass")
            rows = {int(i): [float(x) for x in v] for i, v in rows.items()}
            if set(rows) != {i for b in ids for i in batches[b]}:
                raise CacheDamaged(f"{path.name} does not hold its batches' examples")
        except (CacheDamaged, KeyError, TypeError, AttributeError, ValueError) as error:
            log(f"precompute: ignoring shard {path} ({error}); its batches are recomputed")
            _remove_verified(path)
            continue
        results.update(rows)
        done.update(ids)
    return results, done


def cached_sequence_logprobs(
    name: str,
    model_name: str,
    load_model: Callable[[], torch.nn.Module],
    examples: Sequence[dict],
    *,
    cache_dir: str | os.PathLike,
    augment: bool = False,
    average: bool = False,
    max_tokens: int = 4096,
    backend: str = "auto",
    settings: dict | None = None,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
    progress: bool = False,
    log: Callable[[str], None] = lambda message: print(f"[nash_fast] {message}", flush=True),
    stop: Callable[[], str | None] | None = None,
    locked: bool = False,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[list[float]], bool]:
    """dataset_sequence_logprobs of load_model() over examples, from cache_dir when the fingerprints match and
    the cache file verifies; resumed from verified shards of an interrupted pass.

    name labels the pass ("ref", "prev"); settings (e.g. dtype, attention implementation) enter the key.
    autocast_dtype: the forward runs under torch.autocast of that dtype (the trainer's --bf16 plain path: an fp32
    model under bf16 autocast, so the reference's numerics are the policy's and step 1's log-ratios are ~0).
    stop() -> 'SIGINT' / 'SIGTERM' / None is asked after every round of world_size batches (every rank calls it,
    so it may be a collective); on a request the pass saves its shard and raises nash_fast.interrupt.Interrupted.
    locked: the caller holds the run lock of a directory containing cache_dir (dead temporaries of other
    processes are then removed too). Returns (per-example log-probs, hit). On a miss the model is loaded,
    used and released.
    """
    cache_dir = Path(cache_dir)
    if rank == 0:
        rundir.remove_dead_temporaries(cache_dir, locked=locked, log=log)
    model = None
    memo_file = cache_dir / "file_hashes.json" if rank == 0 else None
    model_key = (model_fingerprint(model_name, None, memo_file=memo_file)
                 if model_name != "tiny" and resolve_model_directory(model_name) else None)
    if model_key is None:  # nothing on disk to hash (tiny, or a model only loadable by code): hash its weights
        model = load_model()
        model_key = model_fingerprint(model_name, model)
    key_material = json.dumps(
        {
            "version": CACHE_VERSION,
            "model": model_key,
            "data": data_fingerprint(examples, augment=augment),
            "augment": augment,
            "average": average,
            "settings": settings or {},
        },
        sort_keys=True,
    )
    key = hashlib.sha256(key_material.encode()).hexdigest()[:20]
    path = cache_dir / f"{name}-logps-{key}.pt"
    if path.is_file():
        try:
            cached = read_verified(path)
            if cached.get("key") != key or len(cached["logps"]) != len(examples):
                raise CacheDamaged(f"{path.name} holds another pass's results")
            if rank == 0:
                log(f"precompute {name}: cache hit {path}")
            return [list(map(float, row)) for row in cached["logps"]], True
        except (CacheDamaged, KeyError, TypeError, AttributeError) as error:  # recomputed, not trusted
            if rank == 0:
                log(f"precompute {name}: not using cache file {path} ({error}); recomputing")
    lengths = [example_sequence_lengths(e, i, augment=augment) for i, e in enumerate(examples)]
    batches = TokenBudgetBatchSampler(lengths, max_tokens, shuffle=False).all_batches()
    partial = cache_dir / f"{name}-logps-{key}.partial-{max_tokens}"
    if rank == 0:
        rundir.remove_dead_temporaries(partial, locked=locked)
    results, done = _read_shards(partial, key, batches, log if rank == 0 else (lambda m: None))
    pending = [b for b in range(len(batches)) if b not in done]
    if rank == 0:
        kept = f" ({len(done)} of {len(batches)} batches kept from an interrupted pass in {partial})" if done else ""
        log(f"precompute {name}: computing log-probs of {len(examples)} examples with {model_name}{kept}")
    if pending:
        if model is None:
            model = load_model()
        shard_rounds = max(1, -(-SHARD_BATCHES // world_size))
        rounds = [pending[i:i + world_size] for i in range(0, len(pending), world_size)]
        collate = PackedPreferenceCollator(augment=augment)
        was_training = model.training
        model.eval()
        mine: dict[int, list[float]] = {}
        shard_ids: list[int] = []
        iterator = rounds
        if progress and rank == 0:
            from tqdm.auto import tqdm

            iterator = tqdm(rounds, desc=f"precompute {name}", unit="round", leave=False)
        signal_name = None
        for number, round_ids in enumerate(iterator, 1):
            if rank < len(round_ids):
                batch_indices = batches[round_ids[rank]]
                with torch.no_grad(), _autocast(model, autocast_dtype):
                    batch = collate([examples[i] for i in batch_indices])
                    logps = packed_sequence_logprobs(model, batch, average=average, backend=backend).float().cpu()
                for position, example_index in enumerate(batch_indices):
                    mine[example_index] = logps[batch["pair_index"] == position].tolist()
            shard_ids += round_ids
            signal_name = stop() if stop is not None else None
            if signal_name or number % shard_rounds == 0 or number == len(rounds):
                gathered = _gather(mine, world_size)
                if rank == 0:
                    write_verified(partial / f"shard-{shard_ids[0]:07d}-{len(shard_ids):05d}.pt",
                                   {"key": key, "batches": shard_ids, "results": gathered})
                results.update(gathered)
                done.update(shard_ids)
                mine, shard_ids = {}, []
                barrier()
            if signal_name:
                break
        model.train(was_training)
        model = None
        if signal_name:
            raise Interrupted(signal_name, f"precompute {name}: {len(done)} of {len(batches)} batches done and kept in "
                              f"{partial}")
    model = None  # release the frozen model before training loads the policy
    missing = [i for i in range(len(examples)) if i not in results]
    if missing:
        raise RuntimeError(f"precompute produced no log-probs for examples {missing[:8]}")
    logps = [results[i] for i in range(len(examples))]
    if rank == 0:
        write_verified(path, {"key": key, "key_material": key_material, "logps": logps})
        for leftover in cache_dir.glob(f"{name}-logps-{key}.partial-*"):  # this pass's, or one with other batching
            rundir.remove_tree(leftover)
    barrier()
    return logps, False


def attach_logprobs(examples: list[dict], logps: Sequence[Sequence[float]], field: str, *, augment: bool) -> None:
    """Store per-sequence values under the collator's per-sequence field names (in place):
    pairs: chosen_<field>, rejected_<field>[, aug_chosen_<field>, aug_rejected_<field>]; groups: responses_<field>."""
    for index, (example, values) in enumerate(zip(examples, logps)):
        if "responses_ids" in example:
            if len(values) != len(example["responses_ids"]):
                raise ValueError(f"example {index}: {len(values)} log-probs for {len(example['responses_ids'])} responses")
            example[f"responses_{field}"] = list(values)
            continue
        roles = ("chosen", "rejected", "aug_chosen", "aug_rejected") if augment else ("chosen", "rejected")
        if len(values) != len(roles):
            raise ValueError(f"example {index}: {len(values)} log-probs for sequences {roles}")
        for role, value in zip(roles, values):
            example[f"{role}_{field}"] = float(value)
