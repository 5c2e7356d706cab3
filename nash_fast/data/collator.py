"""Pack a batch of tokenized preference examples into one padding-free row.

For every pair the row holds prompt+chosen and prompt+rejected (and with augment=True also
aug_prompt+prompt+chosen and aug_prompt+prompt+rejected, the p + x passes of Sr-DPO / Sr-IPO); for every
K-response group it holds prompt+response_k for each k. Sequences are laid out example by example:

    pair i:   chosen (role 0), rejected (role 1)[, aug chosen (role 2), aug rejected (role 3)]
    group i:  response 0, ..., response K-1 (all role 0)

Returned keys (S sequences, P examples, T = total tokens):
    input_ids     long  [1, T]
    position_ids  long  [1, T]    restarts at 0 for every sequence
    labels        long  [1, T]    labels[t] = input_ids[t + 1] when token t + 1 is a response token of the same
                                  sequence, else ignore_index: prompt positions except the last one, and every
                                  sequence's last position, are ignored, so no label crosses a boundary and
                                  sequence s has exactly len(response_s) scored positions
    cu_seqlens    int32 [S + 1]   sequence s is tokens cu_seqlens[s]:cu_seqlens[s + 1]
    max_seqlen    int
    pair_index    long  [S]       which example each sequence belongs to (0..P-1)
    role          long  [S]       0 chosen / group member, 1 rejected, 2 augmented chosen, 3 augmented rejected
    num_pairs     int             P
    <field>       float32 [S]     for each name in sequence_fields: from the example's chosen_<field>,
                                  rejected_<field>, aug_chosen_<field>, aug_rejected_<field> (pairs) or
                                  responses_<field>[k] (groups), in the order of the sequences
    <field>       float32 [P]     for each name in pair_fields: the example's <field>

Every requested field is required on every example; a missing or non-numeric value raises ValueError naming
the example index and the key. Keys not requested are not carried.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

ROLE_CHOSEN, ROLE_REJECTED, ROLE_AUG_CHOSEN, ROLE_AUG_REJECTED = 0, 1, 2, 3
ROLE_NAMES = {ROLE_CHOSEN: "chosen", ROLE_REJECTED: "rejected", ROLE_AUG_CHOSEN: "aug_chosen", ROLE_AUG_REJECTED: "aug_rejected"}


def _token_list(example: dict, key: str, index: int) -> list[int]:
    if key not in example:
        raise ValueError(f"example {index}: missing field {key!r}")
    ids = example[key]
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"example {index}: field {key!r} must be a 1-D integer tensor or list of ints")
        ids = ids.tolist()
    if not isinstance(ids, (list, tuple)):
        raise ValueError(f"example {index}: field {key!r} must be a list of token ids, got {type(ids).__name__}")
    if not ids:
        raise ValueError(f"example {index}: field {key!r} is empty")
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"example {index}: field {key!r} holds {token!r}, not a non-negative int token id")
    return list(ids)


def _number(example: dict, key: str, index: int, position: int | None = None) -> float:
    if key not in example:
        raise ValueError(f"example {index}: missing field {key!r}")
    value = example[key] if position is None else example[key][position]
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        where = key if position is None else f"{key}[{position}]"
        raise ValueError(f"example {index}: field {where!r} must be a number, got {value!r}")
    return float(value)


def example_sequences(example: dict, index: int = 0, *, augment: bool = False) -> list[tuple[list[int], list[int], int]]:
    """The (prompt_ids, response_ids, role) sequences of one example, in packing order (validated)."""
    prompt = _token_list(example, "prompt_ids", index)
    if "responses_ids" in example:
        if augment:
            raise ValueError(f"example {index}: prompt augmentation is defined for pairs, not K-response groups")
        responses = example["responses_ids"]
        if not isinstance(responses, (list, tuple)) or not responses:
            raise ValueError(f"example {index}: field 'responses_ids' must be a non-empty list of token lists")
        return [
            (prompt, _token_list({f"responses_ids[{k}]": r}, f"responses_ids[{k}]", index), ROLE_CHOSEN)
            for k, r in enumerate(responses)
        ]
    chosen = _token_list(example, "chosen_ids", index)
    rejected = _token_list(example, "rejected_ids", index)
    sequences = [(prompt, chosen, ROLE_CHOSEN), (prompt, rejected, ROLE_REJECTED)]
    if augment:
        aug_prompt = _token_list(example, "aug_prompt_ids", index) + prompt
        sequences += [(aug_prompt, chosen, ROLE_AUG_CHOSEN), (aug_prompt, rejected, ROLE_AUG_REJECTED)]
    return sequences


def example_sequence_lengths(example: dict, index: int = 0, *, augment: bool = False) -> list[int]:
    """Token count of each sequence the collator builds from this example (for TokenBudgetBatchSampler)."""
    return [len(p) + len(r) for p, r, _ in example_sequences(example, index, augment=augment)]


class PackedPreferenceCollator:
    """Collate tokenized pair / K-group examples into one padding-free row (see the module docstring for keys).

    augment: also pack the prompt-augmented sequences (requires aug_prompt_ids on every pair).
    sequence_fields / pair_fields: per-sequence and per-example numbers to carry (e.g. ("winrate", "ref_logps")
        / ("preference",)).
    max_tokens: if set, a batch with more tokens raises ValueError (the sampler keeps batches within budget).
    """

    def __init__(
        self,
        *,
        augment: bool = False,
        sequence_fields: Sequence[str] = (),
        pair_fields: Sequence[str] = (),
        max_tokens: int | None = None,
        ignore_index: int = -100,
    ):
        reserved = {"input_ids", "position_ids", "labels", "cu_seqlens", "max_seqlen", "pair_index", "role", "num_pairs"}
        for name in list(sequence_fields) + list(pair_fields):
            if not isinstance(name, str) or name in reserved:
                raise ValueError(f"field name {name!r} is not a string or collides with a batch key")
        overlap = set(sequence_fields) & set(pair_fields)
        if overlap:
            raise ValueError(f"fields {sorted(overlap)} are listed in both sequence_fields and pair_fields")
        if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens <= 0):
            raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
        self.augment = augment
        self.sequence_fields = tuple(sequence_fields)
        self.pair_fields = tuple(pair_fields)
        self.max_tokens = max_tokens
        self.ignore_index = ignore_index

    def _sequence_value(self, example: dict, field: str, index: int, role: int, k: int) -> float:
        if "responses_ids" in example:
            key = f"responses_{field}"
            values = example.get(key)
            if key in example and (not isinstance(values, (list, tuple, torch.Tensor)) or len(values) != len(example["responses_ids"])):
                raise ValueError(f"example {index}: field {key!r} must hold one number per response")
            return _number(example, key, index, k)
        return _number(example, f"{ROLE_NAMES[role]}_{field}", index)

    def __call__(self, examples: Sequence[dict]) -> dict[str, Any]:
        if not examples:
            raise ValueError("examples is empty: a batch needs at least one example")
        ids, positions, labels, lengths, pair_index, roles = [], [], [], [], [], []
        per_sequence = {name: [] for name in self.sequence_fields}
        for index, example in enumerate(examples):
            if not isinstance(example, dict):
                raise ValueError(f"example {index}: expected a dict, got {type(example).__name__}")
            for k, (prompt, response, role) in enumerate(example_sequences(example, index, augment=self.augment)):
                sequence = prompt + response
                ids += sequence
                positions += range(len(sequence))
                # Position t predicts token t+1; only response tokens are scored.
                labels += [self.ignore_index] * (len(prompt) - 1) + response + [self.ignore_index]
                lengths.append(len(sequence))
                pair_index.append(index)
                roles.append(role)
                for name in self.sequence_fields:
                    per_sequence[name].append(self._sequence_value(example, name, index, role, k))
        if self.max_tokens is not None and len(ids) > self.max_tokens:
            raise ValueError(
                f"batch has {len(ids)} tokens, more than max_tokens={self.max_tokens} "
                f"(longest sequence {max(lengths)}); use TokenBudgetBatchSampler with the same budget"
            )
        cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
        batch: dict[str, Any] = {
            "input_ids": torch.tensor(ids, dtype=torch.long)[None],
            "position_ids": torch.tensor(positions, dtype=torch.long)[None],
            "labels": torch.tensor(labels, dtype=torch.long)[None],
            "cu_seqlens": cu_seqlens,
            "max_seqlen": max(lengths),
            "pair_index": torch.tensor(pair_index, dtype=torch.long),
            "role": torch.tensor(roles, dtype=torch.long),
            "num_pairs": len(examples),
        }
        for name, values in per_sequence.items():
            batch[name] = torch.tensor(values, dtype=torch.float32)
        for name in self.pair_fields:
            batch[name] = torch.tensor([_number(e, name, i) for i, e in enumerate(examples)], dtype=torch.float32)
        return batch


def split_by_role(values: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
    """Per-sequence values [S] -> {"chosen": [P], "rejected": [P][, "aug_chosen", "aug_rejected"]} in pair order.

    For pair batches only (every example contributes exactly one sequence of each role present).
    """
    role, pair_index = batch["role"].to(values.device), batch["pair_index"].to(values.device)
    out = {}
    for code, name in ROLE_NAMES.items():
        mask = role == code
        if not mask.any():
            continue
        if int(mask.sum()) != batch["num_pairs"]:
            raise ValueError(f"batch has {int(mask.sum())} {name} sequences for {batch['num_pairs']} examples")
        # The collator emits sequences example by example, so masking keeps pair order; check it anyway.
        if not torch.equal(pair_index[mask], torch.arange(batch["num_pairs"], device=values.device)):
            raise ValueError(f"{name} sequences are not in pair order")
        out[name] = values[mask]
    return out
