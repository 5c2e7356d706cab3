"""nash_fast.attention: packed attention keeps every sequence to itself (varlen fallback, masks, dispatch).

The packed forward through whole models (every family, both attention paths, gradients, no leakage) is
tests/test_model.py's; here the attention pieces on their own: packed_attention_kwargs, varlen_attention_forward
and its batched-matmul path (_BucketAttention) against float64 attention of each sequence alone.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import nash_fast.attention
from nash_fast.attention import packed_attention_kwargs, varlen_attention_forward
from nash_fast.data import PackedPreferenceCollator, load_tiny_preferences, tokenize_records
from nash_fast.model import backbone, packed_sequence_logprobs
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

TOKENIZER = build_tiny_tokenizer()
VOCAB = len(TOKENIZER)
EXAMPLES = tokenize_records(TOKENIZER, load_tiny_preferences()[:12])


def test_auto_attention_is_varlen_for_sdpa_and_the_mask_for_eager():
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    sdpa = packed_attention_kwargs(build_tiny_model(VOCAB), cu, 7, "cpu", torch.float32)
    assert sdpa["attention_mask"].numel() == 0 and torch.equal(sdpa["cu_seq_lens_q"], cu)
    eager = packed_attention_kwargs(build_tiny_model(VOCAB, attn_implementation="eager"), cu, 7, "cpu", torch.float32)
    assert eager["attention_mask"].shape == (1, 1, 12, 12) and "cu_seq_lens_q" not in eager


@pytest.mark.parametrize("family,overrides", [
    ("llama", {"attn_implementation": "eager"}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}),  # mixed layer types
    ("gemma2", {"sliding_window": 8, "final_logit_softcapping": 30.0}),  # eager, softcap, mixed layer types
], ids=["eager", "qwen2-mixed", "gemma2"])
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
    monkeypatch.setattr(nash_fast.attention._BucketAttention, "apply", lambda *a: calls.append(a))
    query, key, value = (torch.randn(1, h, 10, 8) for h in (4, 2, 2))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    monkeypatch.setattr(nash_fast.attention, "_MATH_MAX_WIDTH", {torch.float32: 5})
    out, _ = varlen_attention_forward(_Attention(), query, key, value, None, scaling=0.3, cu_seq_lens_q=cu)
    assert not calls
    assert torch.allclose(out.double(), dense_reference(query, key, value, [4, 6], None, None, 0.3), atol=1e-5)


def test_unsupported_attention_choices_are_refused():
    model = build_tiny_model(VOCAB)
    batch = PackedPreferenceCollator()(EXAMPLES[:2])
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
