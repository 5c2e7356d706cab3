"""Preference data: loading, formats, tokenization, packing collator, token-budget sampler, tiny shipped sets.

    loading.py   load_rows: rows of a file / datasets name / the shipped sets
    formats.py   what a row is: TRL's standard and conversational formats, explicit or implicit prompt,
                 SPPO's K-response groups; validate_records (with --columns and the loss's needs)
    records.py   rows -> token ids (chat template; the prompt/response boundary)
    collator.py  examples -> one packed row;  sampler.py  token-budget batches, the run's stream of them
    dataset.py   the trainer's --dataset: load_records(cfg) (rows, --columns, validation), tokenize(cfg, ...)

    from nash_fast.data import load_tiny_preferences, tokenize_records, PackedPreferenceCollator
    examples = tokenize_records(tokenizer, load_tiny_preferences())
    batch = PackedPreferenceCollator(pair_fields=("preference",))(examples[:8])
"""

from nash_fast.data.collator import (
    ROLE_AUG_CHOSEN,
    ROLE_AUG_REJECTED,
    ROLE_CHOSEN,
    ROLE_REJECTED,
    PackedPreferenceCollator,
    example_sequence_lengths,
    example_sequences,
    split_by_role,
)
from nash_fast.data.formats import (
    ACCEPTED_FORMATS,
    extract_prompt,
    is_conversational,
    normalize_record,
    validate_records,
)
from nash_fast.data.loading import load_rows
from nash_fast.data.records import (
    apply_chat_template_option,
    load_jsonl,
    load_tiny_preferences,
    load_tiny_prompts,
    tokenize_group,
    tokenize_pair,
    tokenize_prompt,
    tokenize_records,
    tokenize_response,
)
from nash_fast.data.sampler import BatchStream, TokenBudgetBatchSampler

__all__ = [
    "BatchStream",
    "PackedPreferenceCollator",
    "TokenBudgetBatchSampler",
    "ROLE_CHOSEN",
    "ROLE_REJECTED",
    "ROLE_AUG_CHOSEN",
    "ROLE_AUG_REJECTED",
    "example_sequence_lengths",
    "example_sequences",
    "split_by_role",
    "ACCEPTED_FORMATS",
    "apply_chat_template_option",
    "extract_prompt",
    "is_conversational",
    "load_rows",
    "normalize_record",
    "validate_records",
    "load_jsonl",
    "load_tiny_preferences",
    "load_tiny_prompts",
    "tokenize_group",
    "tokenize_pair",
    "tokenize_prompt",
    "tokenize_records",
    "tokenize_response",
]
