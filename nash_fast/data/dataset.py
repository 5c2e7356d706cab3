"""The trainer's --dataset: rows (loading.py) -> validated records in explicit form (formats.py) -> token ids
(records.py), with errors that name the option and the dataset's row.

    records = load_records(cfg)                         # load_rows + validate_records, before any model
    examples = tokenize(cfg, tokenizer, records)        # the fields the collator and losses read
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from nash_fast.data import apply_chat_template_option, tokenize_records
from nash_fast.data.formats import validate_records as validate
from nash_fast.data.loading import load_rows as load

if TYPE_CHECKING:  # annotations only: nash_fast.config (a layer above) imports nash_fast.data
    from nash_fast.config import TrainConfig

__all__ = ["load_rows", "validate_records", "load_records", "tokenize"]


def load_rows(cfg: TrainConfig) -> list[dict]:
    """Raw rows of --dataset (no model, no tokenizer): nash_fast.data.loading."""
    return load(cfg.dataset, split=cfg.dataset_split, config=cfg.dataset_config)


def validate_records(rows: Sequence[Any], cfg: TrainConfig) -> list[dict]:
    """Rename columns (--columns), decide each row's format and check what the loss needs
    (nash_fast.data.formats: TRL's standard / conversational, explicit / implicit prompt, SPPO groups).

    Errors name the row and the dataset's column. Returns the records in explicit form with canonical field
    names (other columns are kept unchanged)."""
    return validate(rows, columns=cfg.column_mapping(), loss=cfg.loss, default_preference=cfg.default_preference,
                    aug_prompt=cfg.aug_prompt, source=f"--dataset {cfg.dataset}")


def load_records(cfg: TrainConfig) -> list[dict]:
    """load_rows + validate_records: the validated records of --dataset."""
    return validate_records(load_rows(cfg), cfg)


def tokenize(cfg: TrainConfig, tokenizer, records: list[dict]) -> list[dict]:
    use_chat_template = apply_chat_template_option(tokenizer, cfg.chat_template)  # a given template is installed
    try:
        examples = tokenize_records(tokenizer, records, use_chat_template=use_chat_template, max_length=cfg.max_length)
    except ValueError as error:  # "record i: ..." is row i of --dataset
        message = str(error)
        if message.startswith("record "):
            message = f"--dataset {cfg.dataset}: row {message[len('record '):]}"
        raise ValueError(message) from None
    # Only the fields the collator and losses read travel with the examples.
    keep = ("prompt_ids", "chosen_ids", "rejected_ids", "aug_prompt_ids", "responses_ids", "responses_winrate", "preference")
    return [{k: e[k] for k in keep if k in e} for e in examples]
