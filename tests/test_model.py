"""nash_fast.model: packed (padding-free) log-probs equal each sequence run alone through the model.

Every family through both packed attention paths of nash_fast.attention (varlen and mask); the attention pieces
on their own are tests/test_attention.py's."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nash_fast.attention
from nash_fast.attention import VarlenPlan
from nash_fast.data import PackedPreferenceCollator, load_tiny_preferences, tokenize_records
from nash_fast.model import (
    check_packable,
    enable_activation_checkpointing,
    gathered_lm_head,
    packed_hidden_states,
    packed_sequence_logprobs,
)
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
VOCAB = len(TOKENIZER)
EXAMPLES = tokenize_records(TOKENIZER, load_tiny_preferences()[:12])

# Sliding windows of 8 tokens are shorter than the ~30-token sequences, so the window logic is exercised.
# Every family runs through both packed attention paths: "varlen" (per-sequence buckets; for the eager models,
# Llama-eager and Gemma-2, through the registered nash_fast_varlen function) and "mask" (block-diagonal mask).
FAMILIES = [
    ("llama", {}),
    ("llama", {"attn_implementation": "eager"}),
    ("qwen2", {}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # mixed layer types
    ("mistral", {"sliding_window": 8}),
    ("gemma", {}),
    ("gemma2", {"sliding_window": 8, "final_logit_softcapping": 30.0}),  # eager, softcap, mixed layer types
]


def alone_logprobs(model, batch, *, average=False):
    """Independent reference: every sequence alone through the full model (logits included), float64 log-softmax."""
    cu = batch["cu_seqlens"].tolist()
    out = []
    for s in range(len(cu) - 1):
        ids = batch["input_ids"][:, cu[s] : cu[s + 1]]
        labels = batch["labels"][0, cu[s] : cu[s + 1]]
        logits = model(input_ids=ids).logits[0].double()
        scored = labels != -100
        token_logps = logits.log_softmax(-1)[scored].gather(1, labels[scored][:, None])[:, 0]
        out.append(token_logps.mean() if average and scored.any() else token_logps.sum())
    return torch.stack(out)


def relative_error(a, b):
    return ((a.double() - b.double()).abs() / b.double().abs().clamp_min(1e-6)).max().item()


FAMILY_IDS = [f"{f}-{'-'.join(o) or 'default'}" for f, o in FAMILIES]


@pytest.fixture
def varlen_plans(monkeypatch):
    """Every VarlenPlan the packed forward builds, so a test can check the varlen path really ran."""
    plans = []

    class RecordedPlan(VarlenPlan):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            plans.append(self)

    monkeypatch.setattr(nash_fast.attention, "VarlenPlan", RecordedPlan)
    return plans


@pytest.mark.parametrize("attention", ["varlen", "mask"])
@pytest.mark.parametrize("family,overrides", FAMILIES, ids=FAMILY_IDS)
def test_packed_equals_each_sequence_alone(family, overrides, attention, varlen_plans):
    model = build_tiny_model(VOCAB, family=family, **overrides)
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 30.0 and model.config.attn_logit_softcapping
    batch = PackedPreferenceCollator(augment=False)(EXAMPLES[:5])
    with torch.no_grad():
        packed = packed_sequence_logprobs(model, batch, attention=attention)
        reference = alone_logprobs(model, batch)
    assert packed.shape == (10,) and packed.dtype == torch.float32
    assert relative_error(packed, reference) <= 1e-4
    # The varlen path ran once per layer (no dense mask); the mask path built no plan.
    assert [plan.calls for plan in varlen_plans] == ([model.config.num_hidden_layers] if attention == "varlen" else [])


def test_average_divides_by_each_sequence_own_token_count():
    model = build_tiny_model(VOCAB)
    batch = PackedPreferenceCollator()(EXAMPLES[:4])
    with torch.no_grad():
        packed = packed_sequence_logprobs(model, batch, average=True)
        reference = alone_logprobs(model, batch, average=True)
    assert relative_error(packed, reference) <= 1e-4


def weighted_grads(model, logps):
    # A non-uniform combination, so per-sequence errors cannot cancel.
    model.zero_grad()
    (logps * torch.linspace(-1.0, 1.0, logps.numel())).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, expected):
    assert got.keys() == expected.keys()
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-6)
        assert (got[name] - expected[name]).abs().max() / scale <= 1e-4, name


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=FAMILY_IDS)
def test_gradients_match_running_sequences_alone(family, overrides):
    model = build_tiny_model(VOCAB, family=family, **overrides)
    batch = PackedPreferenceCollator()(EXAMPLES[:3])
    packed = weighted_grads(model, packed_sequence_logprobs(model, batch, attention="varlen"))
    assert_same_grads(packed, weighted_grads(model, alone_logprobs(model, batch)))


def test_varlen_survives_gradient_checkpointing_recomputation():
    # The backward recomputes each layer; the sdpa dispatcher must route the recomputation to varlen again.
    model = build_tiny_model(VOCAB, family="mistral", sliding_window=8).train()
    batch = PackedPreferenceCollator()(EXAMPLES[:3])
    plain = weighted_grads(model, packed_sequence_logprobs(model, batch))
    enable_activation_checkpointing(model)
    assert_same_grads(weighted_grads(model, packed_sequence_logprobs(model, batch)), plain)
    # An eager model reaches varlen only by renaming its implementation for the forward: refused here.
    eager = build_tiny_model(VOCAB, attn_implementation="eager").train()
    enable_activation_checkpointing(eager)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        packed_sequence_logprobs(eager, batch, attention="varlen")
    assert eager.config._attn_implementation == "eager"
    weighted_grads(eager, packed_sequence_logprobs(eager, batch))  # "auto" takes the mask path


def test_attention_dropout_applies_in_training_only():
    model = build_tiny_model(VOCAB, family="qwen2", attention_dropout=0.5)
    batch = PackedPreferenceCollator()(EXAMPLES[:2])
    with torch.no_grad():
        assert relative_error(packed_sequence_logprobs(model, batch), alone_logprobs(model, batch)) <= 1e-4
        model.train()
        torch.manual_seed(0)
        first = packed_sequence_logprobs(model, batch)
        torch.manual_seed(0)
        again = packed_sequence_logprobs(model, batch)
        second = packed_sequence_logprobs(model, batch)
    assert torch.equal(first, again) and not torch.equal(first, second)


@pytest.mark.parametrize("attention", ["varlen", "mask"])
@pytest.mark.parametrize("family,overrides", FAMILIES, ids=FAMILY_IDS)
def test_no_leakage_between_sequences(family, overrides, attention):
    model = build_tiny_model(VOCAB, family=family, **overrides)
    batch = PackedPreferenceCollator(augment=False)(EXAMPLES[:4])
    cu = batch["cu_seqlens"].tolist()
    with torch.no_grad():
        before = packed_sequence_logprobs(model, batch, attention=attention)
        for victim in range(len(cu) - 1):
            perturbed = dict(batch, input_ids=batch["input_ids"].clone())
            start, end = cu[victim], cu[victim + 1]
            perturbed["input_ids"][0, start : end - 1] = (perturbed["input_ids"][0, start : end - 1] + 7) % VOCAB
            after = packed_sequence_logprobs(model, perturbed, attention=attention)
            others = torch.arange(len(cu) - 1) != victim
            assert torch.equal(after[others], before[others])
            assert after[victim] != before[victim]


MISTRAL = build_tiny_model(VOCAB, family="mistral", sliding_window=8, seed=3)


@settings(max_examples=8)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 3), st.integers(1, 3)), min_size=1, max_size=3),
    augment=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_lengths_match_alone(lengths, augment, seed):
    # Long prompts, 1-token responses and optional prompt augmentation, on a model with sliding windows.
    generator = torch.Generator().manual_seed(seed)
    examples = [
        {
            "prompt_ids": torch.randint(0, VOCAB, (p,), generator=generator).tolist(),
            "chosen_ids": torch.randint(0, VOCAB, (c,), generator=generator).tolist(),
            "rejected_ids": torch.randint(0, VOCAB, (r,), generator=generator).tolist(),
            "aug_prompt_ids": torch.randint(0, VOCAB, (3,), generator=generator).tolist(),
        }
        for p, c, r in lengths
    ]
    batch = PackedPreferenceCollator(augment=augment)(examples)
    with torch.no_grad():
        assert relative_error(packed_sequence_logprobs(MISTRAL, batch), alone_logprobs(MISTRAL, batch)) <= 1e-4


def test_hidden_states_are_one_row_per_token():
    model = build_tiny_model(VOCAB)
    batch = PackedPreferenceCollator()(EXAMPLES[:2])
    hidden = packed_hidden_states(model, batch)
    assert hidden.shape == (batch["input_ids"].shape[1], model.config.hidden_size)


def test_gathered_lm_head_without_deepspeed_yields_the_parameters():
    model = build_tiny_model(VOCAB)
    with gathered_lm_head(model) as (weight, bias):
        assert weight is model.lm_head.weight and bias is None


def test_multimodal_rope_is_refused():
    from transformers import Qwen2VLTextConfig, Qwen2VLTextModel

    config = Qwen2VLTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, bos_token_id=1, eos_token_id=2)
    with pytest.raises(ValueError, match="M-RoPE"):
        check_packable(Qwen2VLTextModel(config))


def test_bad_batches_are_refused():
    model = build_tiny_model(VOCAB)
    batch = PackedPreferenceCollator()(EXAMPLES[:2])
    with pytest.raises(ValueError, match="position_ids"):
        packed_sequence_logprobs(model, dict(batch, position_ids=batch["position_ids"][None].expand(3, 1, -1)))
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed_sequence_logprobs(model, dict(batch, cu_seqlens=batch["cu_seqlens"].long()))
    shifted = batch["cu_seqlens"].clone()
    shifted[1] += 1
    with pytest.raises(ValueError, match="position_ids"):
        packed_sequence_logprobs(model, dict(batch, cu_seqlens=shifted))
    with pytest.raises(ValueError, match="labels"):
        packed_sequence_logprobs(model, {k: v for k, v in batch.items() if k != "labels"})
    with pytest.raises(ValueError, match="attention="):
        packed_sequence_logprobs(model, batch, attention="dense")
