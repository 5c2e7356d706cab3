"""nash_fast.data: tokenization, the packing collator and the token-budget sampler."""

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nash_fast.data import (
    PackedPreferenceCollator,
    TokenBudgetBatchSampler,
    example_sequence_lengths,
    load_tiny_preferences,
    load_tiny_prompts,
    split_by_role,
    tokenize_pair,
    tokenize_records,
)
from nash_fast.tiny import build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
PAIR = {"prompt": "What is 2 + 3?", "chosen": "2 + 3 = 5.", "rejected": "2 + 3 = 6."}


# ------------------------------------------------------------------------------------------- tokenization

def test_chat_template_pair_renders_the_whole_conversation():
    example = tokenize_pair(TOKENIZER, dict(PAIR, aug_prompt="Answer carefully."))
    for name in ("chosen", "rejected"):
        full = TOKENIZER.apply_chat_template(
            [{"role": "user", "content": PAIR["prompt"]}, {"role": "assistant", "content": PAIR[name]}], tokenize=False
        )
        assert TOKENIZER.decode(example["prompt_ids"] + example[f"{name}_ids"]) == full
        assert example[f"{name}_ids"][-1] == TOKENIZER.eos_token_id  # the end of turn is scored
    assert TOKENIZER.decode(example["prompt_ids"]).endswith("<|assistant|>\n")
    assert TOKENIZER.decode(example["aug_prompt_ids"]) == "Answer carefully."


def test_raw_text_pair_appends_eos():
    example = tokenize_pair(TOKENIZER, PAIR, use_chat_template=False)
    assert TOKENIZER.decode(example["prompt_ids"]) == PAIR["prompt"]
    assert example["chosen_ids"][-1] == TOKENIZER.eos_token_id
    assert TOKENIZER.decode(example["chosen_ids"][:-1]) == PAIR["chosen"]
    # a response that already ends with EOS (TRL adds it only then) gets no second one
    ended = tokenize_pair(TOKENIZER, dict(PAIR, chosen=PAIR["chosen"] + TOKENIZER.eos_token), use_chat_template=False)
    assert ended["chosen_ids"] == example["chosen_ids"]


def test_k_response_record_keeps_winrates_in_order():
    record = {"prompt": "Spell 'otter' backwards.", "responses": ["retto", "rotte", "otter"], "winrates": [0.9, 0.4, 0.1]}
    (example,) = tokenize_records(TOKENIZER, [record])
    assert [TOKENIZER.decode(r) for r in example["responses_ids"]] == [f"{r}</s>" for r in record["responses"]]
    batch = PackedPreferenceCollator(sequence_fields=("winrate",))([example])
    assert batch["role"].tolist() == [0, 0, 0] and batch["pair_index"].tolist() == [0, 0, 0]
    assert torch.allclose(batch["winrate"], torch.tensor([0.9, 0.4, 0.1]))


def test_extra_fields_are_copied_and_probabilities_checked():
    example = tokenize_pair(TOKENIZER, dict(PAIR, preference=1, task="arithmetic", id=7))
    assert example["preference"] == 1.0 and example["task"] == "arithmetic" and example["id"] == 7


@pytest.mark.parametrize(
    "record,field",
    [
        ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt"),
        ({"prompt": "q", "chosen": "   ", "rejected": "b"}, "chosen"),
        ({"prompt": "q", "chosen": "a"}, "rejected"),
        ({"prompt": 3, "chosen": "a", "rejected": "b"}, "prompt"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "preference": "0.7"}, "preference"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_winrate": 1.5}, "chosen_winrate"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "preference": float("nan")}, "preference"),
        ({"prompt": "q", "responses": []}, "responses"),
        ({"prompt": "q", "responses": ["a", ""]}, "responses"),
        ({"prompt": "q", "responses": ["a", "b"], "winrates": [0.5]}, "winrates"),
    ],
)
def test_bad_records_name_the_record_and_field(record, field):
    records = [PAIR, PAIR, record]
    with pytest.raises(ValueError, match=rf"record 2: .*'?{field}"):
        tokenize_records(TOKENIZER, records)


def test_too_long_record_is_refused_not_truncated():
    long = dict(PAIR, chosen="word " * 200)
    with pytest.raises(ValueError, match=r"record 1: prompt \+ chosen is \d+ tokens, longer than max_length=64"):
        tokenize_records(TOKENIZER, [PAIR, long], max_length=64)


def test_shipped_preferences_are_correct_and_tokenize():
    records = load_tiny_preferences()
    assert len(records) == 320
    examples = tokenize_records(TOKENIZER, records)
    assert all(0.0 <= e["preference"] <= 1.0 for e in examples)
    for record in records:
        match = re.fullmatch(r"What is (-?\d+) ([-+*]) (-?\d+)\?", record["prompt"])
        if match:  # independent check that `chosen` is right and `rejected` wrong
            a, op, b = int(match[1]), match[2], int(match[3])
            truth = {"+": a + b, "-": a - b, "*": a * b}[op]
            assert record["chosen"].startswith(f"{a} {op} {b} = {truth}.")
            assert not record["rejected"].startswith(f"{a} {op} {b} = {truth}.")
    assert {r["task"] for r in records} == {"arithmetic", "count", "reverse", "sort"}


def test_shipped_prompts_have_answers():
    prompts = load_tiny_prompts()
    assert len(prompts) == len({p["prompt"] for p in prompts}) == 168  # distinct: self-play refuses repeats
    for p in prompts:
        word = re.fullmatch(r"Spell the word '(\w+)' backwards\.", p["prompt"])
        if word:
            assert p["answer"] == word[1][::-1]


# ------------------------------------------------------------------------------------------- collator

token_ids = st.lists(st.integers(0, 511), min_size=1, max_size=12)
pair_examples = st.fixed_dictionaries(
    {"prompt_ids": st.lists(st.integers(0, 511), min_size=1, max_size=40), "chosen_ids": token_ids,
     "rejected_ids": token_ids, "aug_prompt_ids": token_ids,
     "chosen_ref": st.floats(-50, 0), "rejected_ref": st.floats(-50, 0),
     "aug_chosen_ref": st.floats(-50, 0), "aug_rejected_ref": st.floats(-50, 0), "preference": st.floats(0, 1)}
)
group_examples = st.fixed_dictionaries(
    {"prompt_ids": token_ids, "responses_ids": st.lists(token_ids, min_size=1, max_size=4)}
).map(lambda e: dict(e, responses_ref=[-float(k) for k in range(len(e["responses_ids"]))], preference=0.5))


def expected_sequences(example, augment):
    """Independent spelling of the layout: (prompt tokens, response tokens, role, ref value) per sequence."""
    if "responses_ids" in example:
        return [(example["prompt_ids"], r, 0, example["responses_ref"][k]) for k, r in enumerate(example["responses_ids"])]
    out = [(example["prompt_ids"], example["chosen_ids"], 0, example["chosen_ref"]),
           (example["prompt_ids"], example["rejected_ids"], 1, example["rejected_ref"])]
    if augment:
        aug = example["aug_prompt_ids"] + example["prompt_ids"]
        out += [(aug, example["chosen_ids"], 2, example["aug_chosen_ref"]),
                (aug, example["rejected_ids"], 3, example["aug_rejected_ref"])]
    return out


@given(data=st.data(), augment=st.booleans())
def test_collator_layout_round_trips(data, augment):
    strategy = pair_examples if augment else st.one_of(pair_examples, group_examples)
    examples = data.draw(st.lists(strategy, min_size=1, max_size=5))
    batch = PackedPreferenceCollator(augment=augment, sequence_fields=("ref",), pair_fields=("preference",))(examples)
    expected = [(i, *s) for i, e in enumerate(examples) for s in expected_sequences(e, augment)]
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu.shape == (len(expected) + 1,)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (1, int(cu[-1]))
    assert batch["num_pairs"] == len(examples)
    assert batch["max_seqlen"] == max(len(p) + len(r) for _, p, r, _, _ in expected)
    for s, (pair, prompt, response, role, ref) in enumerate(expected):
        start, end = int(cu[s]), int(cu[s + 1])
        ids, labels = batch["input_ids"][0, start:end].tolist(), batch["labels"][0, start:end].tolist()
        assert ids == prompt + response
        assert batch["position_ids"][0, start:end].tolist() == list(range(end - start))
        scored = [t for t, y in enumerate(labels) if y != -100]
        # Exactly the response tokens are predicted, each from the position before it, never across a boundary.
        assert scored == list(range(len(prompt) - 1, end - start - 1))
        assert [labels[t] for t in scored] == response and labels[-1] == -100
        assert (batch["pair_index"][s].item(), batch["role"][s].item()) == (pair, role)
        assert batch["ref"][s].item() == pytest.approx(ref, abs=1e-5)
    assert torch.allclose(batch["preference"], torch.tensor([e["preference"] for e in examples], dtype=torch.float32))


@given(examples=st.lists(pair_examples, min_size=1, max_size=4), augment=st.booleans())
def test_split_by_role_returns_pairs_in_order(examples, augment):
    batch = PackedPreferenceCollator(augment=augment, sequence_fields=("ref",))(examples)
    parts = split_by_role(batch["ref"], batch)
    assert set(parts) == ({"chosen", "rejected", "aug_chosen", "aug_rejected"} if augment else {"chosen", "rejected"})
    for name, values in parts.items():
        assert torch.allclose(values, torch.tensor([e[f"{name}_ref"] for e in examples], dtype=torch.float32))


@pytest.mark.parametrize(
    "bad,key",
    [
        ({"prompt_ids": []}, "prompt_ids"),
        ({"chosen_ids": [1, 2.5]}, "chosen_ids"),
        ({"rejected_ids": [-1]}, "rejected_ids"),
        ({"rejected_ids": "abc"}, "rejected_ids"),
        ({"chosen_ref": "x"}, "chosen_ref"),
        ({"chosen_ref": None}, "chosen_ref"),
    ],
)
def test_collator_bad_fields_name_the_example(bad, key):
    good = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "chosen_ref": -1.0, "rejected_ref": -2.0}
    with pytest.raises(ValueError, match=rf"example 1: .*{key}"):
        PackedPreferenceCollator(sequence_fields=("ref",))([good, dict(good, **bad)])


def test_collator_missing_fields_name_the_example():
    good = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4], "preference": 0.5}
    missing = {k: v for k, v in good.items() if k != "preference"}
    with pytest.raises(ValueError, match="example 1: missing field 'preference'"):
        PackedPreferenceCollator(pair_fields=("preference",))([good, missing])
    with pytest.raises(ValueError, match="example 0: missing field 'aug_prompt_ids'"):
        PackedPreferenceCollator(augment=True)([good])
    with pytest.raises(ValueError, match="example 0: missing field 'chosen_winrate'"):
        PackedPreferenceCollator(sequence_fields=("winrate",))([good])
    with pytest.raises(ValueError, match="batch has 12 tokens, more than max_tokens=5"):
        PackedPreferenceCollator(max_tokens=5)([good, good])
    with pytest.raises(ValueError, match="collides"):
        PackedPreferenceCollator(sequence_fields=("labels",))


# ------------------------------------------------------------------------------------------- sampler

example_lengths = st.lists(st.lists(st.integers(1, 60), min_size=1, max_size=4), min_size=1, max_size=60)


@settings(max_examples=40)
@given(lengths=example_lengths, budget=st.integers(240, 600), seed=st.integers(0, 100), shuffle=st.booleans(),
       bucket=st.integers(1, 64))
def test_sampler_respects_budget_and_never_splits_groups(lengths, budget, seed, shuffle, bucket):
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=seed, shuffle=shuffle, bucket_size=bucket)
    batches = list(sampler)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every example (a whole group) exactly once
    stats = sampler.stats()
    for batch, tokens in zip(batches, stats["tokens_per_batch"]):
        assert tokens == sum(sum(lengths[i]) for i in batch) <= budget
    # Greedy filling: a batch is only closed when the next example would not fit.
    if not shuffle:
        for batch, following in zip(batches, batches[1:]):
            assert sum(sum(lengths[i]) for i in batch) + sum(lengths[following[0]]) > budget
    real = sum(sum(x) for x in lengths)
    padded = sum(len([n for i in b for n in lengths[i]]) * max(n for i in b for n in lengths[i]) for b in batches)
    assert stats["padding_fraction"] == pytest.approx(1 - real / padded)
    assert sampler.all_batches() == batches  # deterministic for a seed and epoch


def test_sampler_groups_similar_lengths():
    lengths = [[n] for n in torch.randperm(100, generator=torch.Generator().manual_seed(0)).add(1).tolist()]
    sampler = TokenBudgetBatchSampler(lengths, 300, shuffle=True, bucket_size=100)
    for batch in sampler:  # one bucket: each batch is a contiguous run of the sorted lengths
        sizes = sorted(lengths[i][0] for i in batch)
        assert sizes == list(range(sizes[0], sizes[-1] + 1))
    ungrouped = TokenBudgetBatchSampler(lengths, 300, shuffle=True, bucket_size=1)
    assert sampler.stats()["padding_fraction"] < ungrouped.stats()["padding_fraction"]


@given(lengths=example_lengths, replicas=st.integers(1, 4))
def test_sampler_ranks_share_batches_evenly(lengths, replicas):
    samplers = [TokenBudgetBatchSampler(lengths, 300, num_replicas=replicas, rank=r, seed=1) for r in range(replicas)]
    per_rank = [list(s) for s in samplers]
    assert len({len(b) for b in per_rank}) == 1
    seen = {i for batches in per_rank for b in batches for i in b}
    assert seen == set(range(len(lengths)))


def test_sampler_epochs_reshuffle():
    lengths = [[n % 17 + 1, n % 5 + 1] for n in range(200)]
    sampler = TokenBudgetBatchSampler(lengths, 100, seed=0)
    first = sampler.all_batches()
    sampler.set_epoch(1)
    assert sampler.all_batches() != first


def test_sampler_refuses_oversized_examples_and_bad_arguments():
    with pytest.raises(ValueError, match=r"example 1: its 2 sequences hold 120 tokens, more than max_tokens=100"):
        TokenBudgetBatchSampler([[10, 10], [60, 60]], 100)
    with pytest.raises(ValueError, match="example 0"):
        TokenBudgetBatchSampler([[0, 3]], 100)
    with pytest.raises(ValueError, match="max_tokens"):
        TokenBudgetBatchSampler([[3]], 0)


def test_sampler_and_collator_agree_on_lengths():
    examples = tokenize_records(TOKENIZER, load_tiny_preferences()[:40])
    for augment in (False, True):
        if augment:
            examples = [dict(e, aug_prompt_ids=[7, 8, 9]) for e in examples]
        lengths = [example_sequence_lengths(e, i, augment=augment) for i, e in enumerate(examples)]
        sampler = TokenBudgetBatchSampler(lengths, 512, seed=0)
        collate = PackedPreferenceCollator(augment=augment, max_tokens=512)
        for batch_indices, tokens in zip(sampler, sampler.stats()["tokens_per_batch"]):
            batch = collate([examples[i] for i in batch_indices])
            assert batch["input_ids"].shape[1] == tokens
            assert batch["cu_seqlens"].diff().tolist() == [n for i in batch_indices for n in lengths[i]]
