"""nash_fast.model: packed (padding-free) log-probs equal each sequence run alone through the model."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nash_fast.data import PackedPreferenceCollator, load_tiny_preferences, tokenize_records
import nash_fast.model
from nash_fast.model import (
    VarlenPlan,
    backbone,
    check_packable,
    enable_activation_checkpointing,
    gathered_lm_head,
    packed_attention_kwargs,
    packed_hidden_states,
    packed_sequence_logprobs,
    varlen_attention_forward,
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

    monkeypatch.setattr(nash_fast.model, "VarlenPlan", RecordedPlan)
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


def test_auto_attention_is_varlen_for_sdpa_and_the_mask_for_eager():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    sdpa = packed_attention_kwargs(build_tiny_model(VOCAB), cu, 7, "cpu", torch.float32)
    assert sdpa["attention_mask"].numel() == 0 and torch.equal(sdpa["cu_seq_lens_q"], cu)
    eager = packed_attention_kwargs(build_tiny_model(VOCAB, attn_implementation="eager"), cu, 7, "cpu", torch.float32)
    assert eager["attention_mask"].shape == (1, 1, 12, 12) and "cu_seq_lens_q" not in eager


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


class _Attention(torch.nn.Module):
    is_causal = True


def dense_reference(query, key, value, lengths, window, softcap, scaling):
    """Float64 attention of each sequence on its own, written out: softmax(mask(softcap(q k^T s))) v."""
    out, start = [], 0
    repeats = query.shape[1] // key.shape[1]
    for length in lengths:
        q = query[0, :, start : start + length].double()
        k = key[0, :, start : start + length].double().repeat_interleave(repeats, 0)
        v = value[0, :, start : start + length].double().repeat_interleave(repeats, 0)
        scores = q @ k.transpose(-1, -2) * scaling
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(length)
        visible = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        out.append((scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v).transpose(0, 1))
        start += length
    return torch.cat(out)[None]


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 24), min_size=1, max_size=9).filter(sum),
    window=st.sampled_from([None, 1, 5, 64]),
    softcap=st.sampled_from([None, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_varlen_attention_equals_each_sequence_alone(lengths, window, softcap, seed):
    # Empty and 1-token sequences, equal and unequal lengths (shared and padded buckets), GQA 4/2, windows
    # shorter and longer than sequences, soft-capping; boundaries passed as cu_seq_lens_q (no plan).
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    query, key, value = (torch.randn(1, h, total, 8, generator=generator) for h in (4, 2, 2))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out, weights = varlen_attention_forward(_Attention(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu,
                                            cu_seq_lens_k=cu, sliding_window=window, softcap=softcap)
    assert weights is None and out.shape == (1, total, 4, 8)
    expected = dense_reference(query, key, value, [n for n in lengths if n], window, softcap, 0.3)
    assert torch.allclose(out.double(), expected, atol=1e-5)


def _bucket_attention_bounds(q, k, v, grad, lengths, window, scaling, dtype):
    """Elementwise first-order error bounds of _BucketAttention's output and gradients against float64 on the
    same (rounded) inputs, from the roundings it performs, as tensors shaped like out / d_query / d_key / d_value.
    r: unit roundoff of the input dtype (it rounds S, P, O, dP, dS, dQ, dK, dV to that dtype once each); u: of
    the accumulation (fp32 matmuls and softmax; float64 stays float64); w: the sequence length, d: head dim.
    Per sequence and query head, with the exact P, S, dP = g v^T, dS = scaling P (dP - c), c = rowsum(P dP):
      S_ij: |e| <= r |S_ij| + d u (|q||k|^T)_ij;  a = scaling S: the row's logits move by at most
      x_i = max_j (scaling e_ij + u |a_ij|), so P_ij moves by a factor within e^{+-2 x_i}:
      eps_i = 2 x_i + (w + 4) u + r                 (exp, sum and divide in the accumulation type; P rounded)
      e_P = eps_i P_ij + eta                        (eta: fp16's subnormal rounding, below; 0 where masked)
      O_i = sum_j P_ij v_j:   (e_P|v|)_i + w u (P|v|)_i + r |O_i| + eta
      dV_j = sum_i P_ij g_i:  (e_P^T|g|)_j + w u (P^T|g|)_j + r |dV_j| + eta
      dP_ij: e_dP = (r + d u) (|g||v|^T)_ij + eta;  c_i: e_c = sum_j (e_P |dP| + P e_dP + w u P |dP|)_ij
      dS_ij: e_dS = scaling (e_P |dP_ij - c_i| + P_ij (e_dP_ij + e_c_i)) + (r + 3u) |dS_ij| + eta
      dQ_i = sum_j dS_ij k_j: e_dS|k| + w u |dS||k| + r |dQ_i| + eta;  dK_j: e_dS^T|q| + w u |dS|^T|q| + r |dK_j| + eta
    (dK, dV summed over the query heads sharing a KV head.) Second-order terms are covered by doubling."""
    r = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    u = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    # fp16's subnormals: a value below 2^-14 rounds to a multiple of 2^-24, an absolute error up to 2^-25 that
    # r |X| does not cover (a tiny probability or dS loses its relative precision); the other types' ranges
    # hold every value here normal.
    eta = 2.0**-25 if dtype == torch.float16 else 0.0
    heads, kv_heads, d = q.shape[1], k.shape[1], q.shape[-1]
    repeats = heads // kv_heads
    b_out, b_q = torch.zeros_like(grad), torch.zeros_like(q)
    b_k, b_v = torch.zeros_like(k), torch.zeros_like(v)
    start = 0
    for w in lengths:
        rows = slice(start, start + w)
        qs, gs = q[0, :, rows], grad[0, rows].transpose(0, 1)
        ks, vs = (t[0, :, rows].repeat_interleave(repeats, 0) for t in (k, v))
        i = torch.arange(w)
        visible = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] < window) if window else True)
        s_exact = qs @ ks.transpose(-1, -2)
        p = (s_exact * scaling).masked_fill(~visible, float("-inf")).softmax(-1)
        e_s = (r * s_exact.abs() + d * u * (qs.abs() @ ks.abs().transpose(-1, -2))) * scaling
        x = (e_s + u * (scaling * s_exact).abs()).masked_fill(~visible, 0).amax(-1, keepdim=True)
        eps = 2 * x + (w + 4) * u + r
        e_p = (eps * p + eta).masked_fill(~visible, 0)  # a masked P is exactly 0
        out = p @ vs
        b_out[0, rows] = (e_p @ vs.abs() + w * u * (p @ vs.abs()) + r * out.abs() + eta).transpose(0, 1)
        d_v = p.transpose(-1, -2) @ gs
        b_v_heads = e_p.transpose(-1, -2) @ gs.abs() + w * u * (p.transpose(-1, -2) @ gs.abs())
        d_p = gs @ vs.transpose(-1, -2)
        e_dp = (r + d * u) * (gs.abs() @ vs.abs().transpose(-1, -2)) + eta
        c = (p * d_p).sum(-1, keepdim=True)
        e_c = (e_p * d_p.abs() + p * e_dp + w * u * p * d_p.abs()).sum(-1, keepdim=True)
        d_s = scaling * p * (d_p - c)
        e_ds = (scaling * (e_p * (d_p - c).abs() + p * (e_dp + e_c)) + (r + 3 * u) * d_s.abs() + eta).masked_fill(
            ~visible, 0)
        b_q[0, :, rows] = e_ds @ ks.abs() + w * u * (d_s.abs() @ ks.abs()) + r * (d_s @ ks).abs() + eta
        b_k_heads = e_ds.transpose(-1, -2) @ qs.abs() + w * u * (d_s.abs().transpose(-1, -2) @ qs.abs())
        b_k[0, :, rows] = b_k_heads.view(kv_heads, repeats, w, d).sum(1) + r * (d_s.transpose(-1, -2) @ qs).view(
            kv_heads, repeats, w, d).sum(1).abs() + eta
        b_v[0, :, rows] = b_v_heads.view(kv_heads, repeats, w, d).sum(1) + r * d_v.view(
            kv_heads, repeats, w, d).sum(1).abs() + eta
        start += w
    return 2 * b_out, 2 * b_q, 2 * b_k, 2 * b_v


@settings(max_examples=20, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 24), min_size=1, max_size=9).filter(sum),
    window=st.sampled_from([None, 1, 5, 64]),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    heads=st.sampled_from([(4, 2), (3, 3), (6, 1)]),
    seed=st.integers(0, 2**16),
)
def test_bucket_attention_forward_and_backward(lengths, window, dtype, heads, seed):
    # The batched-matmul path short buckets take (_BucketAttention, no soft-cap): output and d_query / d_key /
    # d_value against float64 attention of each sequence alone, within bounds derived from its roundings.
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    inputs = [torch.randn(1, h, total, 8, generator=generator).to(dtype) for h in (heads[0], heads[1], heads[1])]
    grad = torch.randn(1, total, heads[0], 8, generator=generator).to(dtype)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    ours = [t.clone().requires_grad_() for t in inputs]
    out, _ = varlen_attention_forward(_Attention(), *ours, None, scaling=0.3, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                      sliding_window=window)
    assert out.dtype == dtype and out.shape == (1, total, heads[0], 8)
    out.backward(grad)
    exact = [t.detach().double().clone().requires_grad_() for t in inputs]
    nonempty = [n for n in lengths if n]
    expected = dense_reference(*exact, nonempty, window, None, 0.3)
    expected.backward(grad.double())
    b_out, b_q, b_k, b_v = _bucket_attention_bounds(*(t.double() for t in inputs), grad.double(), nonempty, window,
                                                    0.3, dtype)
    assert ((out.double() - expected).abs() <= b_out).all()
    for ours_grad, exact_grad, bound in zip((t.grad for t in ours), (t.grad for t in exact), (b_q, b_k, b_v)):
        assert ((ours_grad.double() - exact_grad).abs() <= bound).all()


def test_bucket_attention_under_autocast():
    # fp32 q / k / v under a bf16 autocast (rotary's fp32 cos / sin promote q and k): computed in bf16, as sdpa
    # would be, gradients back in fp32.
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, h, 12, 8, generator=generator).requires_grad_() for h in (4, 2, 2))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = varlen_attention_forward(_Attention(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in (query, key, value))
    rounded = [t.detach().bfloat16() for t in (query, key, value)]
    expected, _ = varlen_attention_forward(_Attention(), *rounded, None, scaling=0.3, cu_seq_lens_q=cu)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_bucket_attention_backward_twice_keeps_its_saved_probabilities(dtype):
    # retain_graph=True, two backwards: the same gradients (the backward must not write into the saved P, which
    # is the accumulation-dtype tensor itself for float32 / float64 inputs).
    query, key, value = (torch.randn(1, h, 9, 8, dtype=dtype).requires_grad_() for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out, _ = varlen_attention_forward(_Attention(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu)
    grad = torch.randn_like(out)
    first = torch.autograd.grad(out, (query, key, value), grad, retain_graph=True)
    second = torch.autograd.grad(out, (query, key, value), grad)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_wide_buckets_take_sdpa(monkeypatch):
    # Buckets wider than _MATH_MAX_WIDTH[dtype] keep sdpa's O(L)-memory kernels; the short-bucket path is not called.
    calls = []
    monkeypatch.setattr(nash_fast.model._BucketAttention, "apply", lambda *a: calls.append(a))
    query, key, value = (torch.randn(1, h, 10, 8) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    monkeypatch.setattr(nash_fast.model, "_MATH_MAX_WIDTH", {torch.float32: 5})
    out, _ = varlen_attention_forward(_Attention(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu)
    assert not calls
    assert torch.allclose(out.double(), dense_reference(query, key, value, [4, 6], None, None, 0.3), atol=1e-5)


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
    # packed attention kwargs keep sequences apart here: the block-diagonal mask (dict per layer type where
    # needed) for the eager models, the varlen plan with an empty placeholder mask for sdpa (qwen2-mixed).
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
    with pytest.raises(ValueError, match="attention="):
        packed_sequence_logprobs(model, batch, attention="dense")
    cu, max_seqlen = batch["cu_seqlens"], batch["max_seqlen"]
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="varlen"):
        packed_attention_kwargs(model, cu, max_seqlen, "cpu", torch.float32, attention="varlen")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="mask"):
        packed_attention_kwargs(model, cu, max_seqlen, "cpu", torch.float32, attention="mask")
    model.config._attn_implementation = "paged|sdpa"
    with pytest.raises(ValueError, match="attn_implementation"):
        packed_sequence_logprobs(model, batch)
    query = torch.zeros(1, 4, 6, 8)
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_attention_forward(_Attention(), query, query, query, None)
    with pytest.raises(ValueError, match="6"):
        varlen_attention_forward(_Attention(), query, query, query, None, cu_seq_lens_q=torch.tensor([0, 5]))
