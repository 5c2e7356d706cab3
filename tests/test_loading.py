"""nash_fast.data.loading: rows of the shipped sets, jsonl / json / parquet files and datasets directories."""

import json

import pytest

from nash_fast.data import load_tiny_preferences, normalize_record
from nash_fast.data.loading import load_rows

CONVERSATION = {"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
                "rejected": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "B."}]}


def test_every_source_gives_the_same_rows(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [CONVERSATION, CONVERSATION]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.json").write_text(json.dumps({"test": rows}))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dir"))
    # Files without splits take no split (an explicit one is refused, not ignored: below).
    for name, split in (("a.jsonl", None), ("a.json", None), ("b.json", "test"), ("a.parquet", None),
                        ("dir", "train")):
        loaded = load_rows(str(tmp_path / name), split=split)
        assert loaded == rows, name
        assert normalize_record(loaded[0])["prompt"] == [{"role": "user", "content": "Q?"}]  # Arrow keeps the messages
    assert load_rows("tiny") == load_tiny_preferences()
    with pytest.raises(ValueError, match=r"--dataset .*dir: split 'test' not in \['train'\]"):
        load_rows(str(tmp_path / "dir"), split="test")
    with pytest.raises(ValueError, match="--prompts .*missing.jsonl: no such file"):  # a missing file is not a hub name
        load_rows(str(tmp_path / "missing.jsonl"), option="--prompts")
    for name in ("a.jsonl", "a.parquet", "a.json"):
        with pytest.raises(ValueError, match=rf"--dataset-split train: .*{name} (is a .* file|holds a JSON list), "
                                             "which has no splits"):
            load_rows(str(tmp_path / name), split="train")
    (tmp_path / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match="unsupported file type '.csv'"):
        load_rows(str(tmp_path / "a.csv"))
