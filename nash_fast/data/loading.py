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

__all__ = ["load_rows"]


def load_rows(name: str, *, split: str = "train", config: str | None = None, option: str = "--dataset",
              tiny=None) -> list[dict]:
    """Rows of `name` (no model, no tokenizer). `option` names the flag in errors; `tiny` loads the shipped set
    that the name "tiny" means (default: the preference pairs)."""
    if name == "tiny":
        if tiny is None:
            from nash_fast.data.records import load_tiny_preferences as tiny
        return tiny()
    path = Path(name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            from nash_fast.data.records import load_jsonl

            return load_jsonl(path)
        if suffix == ".json":
            with open(path) as f:
                try:
                    data = json.load(f)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{option} {name}: not valid JSON ({error})") from None
            if isinstance(data, dict) and isinstance(data.get(split), list):
                data = data[split]
            if not isinstance(data, list):
                raise ValueError(f"{option} {name}: expected a JSON list of records (or {{split: [records]}})")
            return data
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        raise ValueError(f"{option} {name}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")
    if path.suffix.lower() in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"{option}: no such file {name!r}")  # not a datasets name: do not ask the hub
    import datasets

    from nash_fast.console import is_terminal

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
        try:
            loaded = datasets.load_dataset(name, config, split=split)
        except Exception as error:
            raise ValueError(f"{option} {name!r}: not a file and could not be loaded with datasets ({error})") from error
    return loaded.to_list()
