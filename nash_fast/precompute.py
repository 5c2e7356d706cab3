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

Multi-process (DeepSpeed / torchrun): rank r computes batches r, r + W, ...; the results are all-gathered
and rank 0 writes the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from nash_fast.data import PackedPreferenceCollator, TokenBudgetBatchSampler, example_sequence_lengths
from nash_fast.model import packed_sequence_logprobs

CACHE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASH_CHUNK = 1 << 24


# ----------------------------------------------------------------------------------------------- fingerprints

def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
    identity = "sha256:" + _sha256_file(resolved)
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
            with open(memo_file) as f:
                memo = json.load(f)
        except (OSError, ValueError):
            memo = {}
    before = dict(memo) if memo is not None else None
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.name == "config.json" or path.name.endswith(_WEIGHT_SUFFIXES) or path.name.endswith(".index.json"):
            digest.update(path.name.encode())
            digest.update(_file_identity(path, memo).encode())
    if memo is not None and memo != before:
        Path(memo_file).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{memo_file}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_file)
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
    """A local directory for a model: the path itself, or the hub cache snapshot of a hub name (no download)."""
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
) -> list[list[float]]:
    """Per example, the log-prob of each of its sequences in the collator's order
    (pairs: chosen, rejected[, aug chosen, aug rejected]; groups: response 0..K-1)."""
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
) -> tuple[list[list[float]], bool]:
    """dataset_sequence_logprobs of load_model() over examples, from cache_dir when the fingerprints match.

    name labels the pass ("ref", "prev"); settings (e.g. dtype, attention implementation) enter the key.
    Returns (per-example log-probs, hit). On a miss the model is loaded, used and released.
    """
    model = None
    memo_file = Path(cache_dir) / "file_hashes.json" if rank == 0 else None
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
    path = Path(cache_dir) / f"{name}-logps-{key}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, weights_only=True)
            if cached.get("key") == key and len(cached["logps"]) == len(examples):
                if rank == 0:
                    log(f"precompute {name}: cache hit {path}")
                return [list(map(float, row)) for row in cached["logps"]], True
        except Exception as error:  # a damaged cache file is recomputed, not trusted
            if rank == 0:
                log(f"precompute {name}: ignoring unreadable cache {path} ({error})")
    if rank == 0:
        log(f"precompute {name}: cache miss, computing log-probs of {len(examples)} examples with {model_name}")
    if model is None:
        model = load_model()
    logps = dataset_sequence_logprobs(
        model, examples, augment=augment, average=average, max_tokens=max_tokens, backend=backend,
        rank=rank, world_size=world_size, progress=progress and rank == 0,
    )
    del model
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save({"key": key, "key_material": key_material, "logps": logps}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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
