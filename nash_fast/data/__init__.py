"""Preference data: tokenization, packing collator, token-budget sampler, and the tiny shipped data sets.

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
from nash_fast.data.records import (
    load_jsonl,
    load_tiny_preferences,
    load_tiny_prompts,
    tokenize_group,
    tokenize_pair,
    tokenize_prompt,
    tokenize_records,
    tokenize_response,
)
from nash_fast.data.sampler import TokenBudgetBatchSampler

__all__ = [
    "PackedPreferenceCollator",
    "TokenBudgetBatchSampler",
    "ROLE_CHOSEN",
    "ROLE_REJECTED",
    "ROLE_AUG_CHOSEN",
    "ROLE_AUG_REJECTED",
    "example_sequence_lengths",
    "example_sequences",
    "split_by_role",
    "load_jsonl",
    "load_tiny_preferences",
    "load_tiny_prompts",
    "tokenize_group",
    "tokenize_pair",
    "tokenize_prompt",
    "tokenize_records",
    "tokenize_response",
]
