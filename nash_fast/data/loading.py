"""Rows of a data set, as plain dicts, before any format check: the shipped tiny sets, local files, or
Hugging Face datasets.

    rows = load_rows("tiny")                                  # the shipped preference pairs
    rows = load_rows("data/prefs.jsonl")                      # .jsonl, .json (a list, or {split: list}), .parquet
    rows = load_rows("trl-lib/ultrafeedback_binarized", split="train")   # datasets (local cache or hub), or a
                                                              # save_to_disk directory

nash_fast.data.formats decides what each row is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from nash_fast.console import is_terminal
from nash_fast.data.records import load_jsonl, load_tiny_preferences, read_utf8

__all__ = ["load_rows", "looks_like_path", "check_local_path"]

# Suffixes of files a --dataset / --model can name; a hub id never ends in one of them.
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".tsv", ".arrow", ".txt", ".yaml", ".yml", ".safetensors",
                  ".bin", ".pt", ".pth", ".gguf")


def looks_like_path(name: str) -> bool:
    """True for a name that can only mean a local path, never a hub id ('name' or 'namespace/name'): absolute or
    ./ ../ ~ prefixed, a backslash or more than one '/', a file suffix, or a first component that exists here."""
    if name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1:
        return True
    if name.lower().endswith(_FILE_SUFFIXES):
        return True
    return "/" in name and Path(name.split("/", 1)[0]).exists()


def check_local_path(option: str, name: str | None) -> None:
    """A path-like --dataset / --model that does not exist fails at once: it never becomes a hub lookup (which
    would try the network, retrying, before failing)."""
    if name is None or name == "tiny" or Path(name).expanduser().exists():
        return
    if looks_like_path(name):
        raise ValueError(f"{option} {name}: no such file or directory")


def load_rows(name: str, *, split: str | None = None, config: str | None = None, option: str = "--dataset",
              tiny=None) -> list[dict]:
    """Rows of `name` (no model, no tokenizer). `option` names the flag in errors; `tiny` loads the shipped set
    that the name "tiny" means (default: the preference pairs). `split` (default train) applies to hub datasets,
    saved DatasetDicts and .json files of the form {split: [records]}; a file without splits refuses it.
    A path-like name that does not exist fails at once; only hub-style names reach datasets.load_dataset
    (offline with HF_HUB_OFFLINE=1)."""
    if name == "tiny":
        return (tiny or load_tiny_preferences)()
    check_local_path(option, name)
    path = Path(name).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if split is not None and suffix != ".json":
            raise ValueError(f"{option}-split {split}: {name} is a {suffix} file, which has no splits (drop the "
                             "option, or give a .json file of the form {split: [records]})")
        if suffix == ".jsonl":
            return load_jsonl(path)
        if suffix == ".json":
            try:
                data = json.loads(read_utf8(path))
            except json.JSONDecodeError as error:
                raise ValueError(f"{option} {name}: not valid JSON ({error})") from None
            if isinstance(data, dict):
                key = split or "train"
                if not isinstance(data.get(key), list):
                    raise ValueError(f"{option} {name}: a JSON object needs a list of records under {option}-split "
                                     f"{key!r}; its keys are {sorted(data)[:10]}")
                data = data[key]
            elif split is not None:
                raise ValueError(f"{option}-split {split}: {name} holds a JSON list, which has no splits")
            if not isinstance(data, list):
                raise ValueError(f"{option} {name}: expected a JSON list of records (or {{split: [records]}})")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                return pq.read_table(path).to_pylist()
            except Exception as error:  # pyarrow's ArrowInvalid & co. for a damaged file
                raise ValueError(f"{option} {name}: not a readable parquet file ({error})") from None
        raise ValueError(f"{option} {name}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    split = split or "train"
    import datasets

    quiet = not is_terminal(sys.stderr) and not datasets.are_progress_bars_disabled()
    if quiet:  # in a log file a bar is one line of carriage returns
        datasets.disable_progress_bars()
    try:
        return _load_with_datasets(datasets, path, name, split, config, option)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _load_with_datasets(datasets, path: Path, name: str, split: str, config: str | None, option: str) -> list[dict]:
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()):
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{option} {name}: split {split!r} not in {sorted(loaded)}")
            loaded = loaded[split]
    else:
        from huggingface_hub import constants

        offline = constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE
        try:
            loaded = datasets.load_dataset(name, config, split=split)
        except Exception as error:
            where = "in the local datasets cache (HF_HUB_OFFLINE is set)" if offline else "locally or on the hub"
            raise ValueError(f"{option} {name!r}: not a file, and not a dataset found {where} "
                             f"({type(error).__name__}: {' '.join(str(error).split())[:300]})") from None
    return loaded.to_list()
