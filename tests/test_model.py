"""nash_fast.model: packed (padding-free) log-probs equal each sequence run alone through the model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nash_fast.data import PackedPreferenceCollator, load_tiny_preferences, tokenize_records
from nash_fast.model import (
    backbone,
    check_packable,
    gathered_lm_head,
    packed_attention_kwargs,
    packed_hidden_states,
    packed_sequence_logprobs,
)
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
VOCAB = len(TOKENIZER)
EXAMPLES = tokenize_records(TOKENIZER, load_tiny_preferences()[:12])

# Sliding windows of 8 tokens are shorter than the ~30-token sequences, so the window logic is exercised.
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


@pytest.mark.parametrize("family,overrides", FAMILIES, ids=[f"{f}-{'-'.join(o) or 'default'}" for f, o in FAMILIES])
def test_packed_equals_each_sequence_alone(family, overrides):
    model = build_tiny_model(VOCAB, family=family, **overrides)
    if family == "gemma2":
        assert model.config.final_logit_softcapping == 30.0
    batch = PackedPreferenceCollator(augment=False)(EXAMPLES[:5])
    with torch.no_grad():
        packed = packed_sequence_logprobs(model, batch)
        reference = alone_logprobs(model, batch)
    assert packed.shape == (10,) and packed.dtype == torch.float32
    assert relative_error(packed, reference) <= 1e-4


def test_average_divides_by_each_sequence_own_token_count():
    model = build_tiny_model(VOCAB)
    batch = PackedPreferenceCollator()(EXAMPLES[:4])
    with torch.no_grad():
        packed = packed_sequence_logprobs(model, batch, average=True)
        reference = alone_logprobs(model, batch, average=True)
    assert relative_error(packed, reference) <= 1e-4


def test_gradients_match_running_sequences_alone():
    model = build_tiny_model(VOCAB, family="qwen2")
    batch = PackedPreferenceCollator()(EXAMPLES[:3])
    weights = torch.linspace(-1.0, 1.0, 6)  # a non-uniform combination, so per-sequence errors cannot cancel

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = grads((packed_sequence_logprobs(model, batch) * weights).sum())
    alone = grads((alone_logprobs(model, batch) * weights).sum())
    for name in packed:
        scale = alone[name].abs().max().clamp_min(1e-6)
        assert (packed[name] - alone[name]).abs().max() / scale <= 1e-4, name


def test_no_leakage_between_sequences():
    model = build_tiny_model(VOCAB, family="mistral", sliding_window=8)
    batch = PackedPreferenceCollator(augment=False)(EXAMPLES[:4])
    cu = batch["cu_seqlens"].tolist()
    with torch.no_grad():
        before = packed_sequence_logprobs(model, batch)
        for victim in range(len(cu) - 1):
            perturbed = dict(batch, input_ids=batch["input_ids"].clone())
            start, end = cu[victim], cu[victim + 1]
            perturbed["input_ids"][0, start : end - 1] = (perturbed["input_ids"][0, start : end - 1] + 7) % VOCAB
            after = packed_sequence_logprobs(model, perturbed)
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


@pytest.mark.parametrize("family,overrides", [FAMILIES[1], FAMILIES[3], FAMILIES[6]], ids=["eager", "qwen2-mixed", "gemma2"])
def test_explicit_mask_alone_separates_sequences(family, overrides):
    # With a cache object (use_cache=True) transformers does not infer packing from position_ids, so only the
    # block-diagonal mask (dict per layer type where needed) keeps sequences apart here.
    model = build_tiny_model(VOCAB, family=family, **overrides)
    batch = PackedPreferenceCollator()(EXAMPLES[:3])
    kwargs = packed_attention_kwargs(model, batch["cu_seqlens"], batch["max_seqlen"], "cpu", torch.float32)
    with torch.no_grad():
        hidden = backbone(model)(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True,
                                 **kwargs).last_hidden_state[0]
        cu = batch["cu_seqlens"].tolist()
        for s in range(len(cu) - 1):
            alone = backbone(model)(input_ids=batch["input_ids"][:, cu[s] : cu[s + 1]]).last_hidden_state[0]
            assert torch.allclose(hidden[cu[s] : cu[s + 1]], alone, atol=1e-5, rtol=1e-4)


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
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="attn_implementation"):
        packed_sequence_logprobs(model, batch)
