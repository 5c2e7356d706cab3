"""Packed (padding-free) attention: each sequence of one packed row attends only to itself.

    kwargs = packed_attention_kwargs(model, cu_seqlens, max_seqlen, device, dtype)    # attention="auto"
    model.model(input_ids=..., position_ids=..., use_cache=False, **kwargs)

nash_fast.model runs the backbone with these kwargs (packed_hidden_states); this module holds how attention
is kept inside each sequence (`attention=` of packed_attention_kwargs):
- flash_attention_2/3 (CUDA, flash-attn installed): the varlen kernel, fed position_ids plus
  cu_seq_lens_q/k and max_length_q/k and *no* attention_mask (flash-attn's path ignores cu_seqlens once a mask
  is given).
- sdpa, attention="auto" or "varlen": varlen_attention_forward, a per-sequence fallback costing
  O(sum_i L_i^2) instead of O(T^2). Sequences are grouped into buckets of similar length (each at least
  _BUCKET_MIN_FILL of its bucket's longest), right-padded to that length and run as one batched
  torch.nn.functional.scaled_dot_product_attention(is_causal=True) call per bucket; right padding is exact under
  a causal mask because a real query only sees keys at or before it. A sequence longer than its layer's sliding
  window gets a banded causal mask (key k visible from query q iff q - window < k <= q, transformers'
  convention); Gemma-2 style attention-logit soft-capping, which sdpa cannot do, is computed explicitly
  (eager-style) for the bucket. It reaches the layers through transformers' AttentionInterface: the "sdpa" entry
  is wrapped (once, on first use) by a dispatcher that runs the varlen path only when the forward carries this
  module's VarlenPlan kwarg and calls the original sdpa function unchanged otherwise, so it survives gradient
  checkpointing's recomputation and leaves every other sdpa call alone.
- sdpa with attention="mask", and eager with "auto" or "mask": an explicit block-diagonal causal mask built
  from cu_seqlens, 4-D [1, 1, T, T] (boolean for sdpa, additive 0 / dtype-min for eager);
  masking_utils.create_*_mask return a 4-D mask unchanged. Models with both full and sliding-window layers
  (config.layer_types) get a dict {layer type: mask}, which their forward accepts in place of building its
  own; a model-wide config.sliding_window (Mistral) is folded into the mask. This costs O(T^2) time and memory
  over the whole packed row (T=16k: 256 MiB boolean), which on CPU makes packing slower than padding.
- eager with attention="varlen": eager's attention function is each model's own, so it cannot be wrapped;
  instead config._attn_implementation names the registered "nash_fast_varlen" function for the duration of
  the forward (attn_implementation_for_forward, used by nash_fast.model.packed_hidden_states). Refused under
  gradient checkpointing (its backward recomputes the layers after the name is restored). Gemma-2 is eager-only
  in transformers 5.23: this is its O(sum L^2) path, soft-capping included.
- flex_attention: the same masks as BlockMasks (flex skips fully masked blocks).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

_FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4")


def text_config(config):
    """The text model's config of a multimodal config (get_text_config), else `config` itself."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# ----------------------------------------------------------------------------------------------- masks

def _allowed(sequence_id: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, T] boolean: query q may attend key k (same sequence, k <= q, and q - k < window if windowed)."""
    position = torch.arange(sequence_id.numel(), device=sequence_id.device)
    allowed = (sequence_id[:, None] == sequence_id[None, :]) & (position[None, :] <= position[:, None])
    if window is not None:
        # Same convention as transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window.
        allowed &= position[None, :] > position[:, None] - window
    return allowed


def _dense_mask(sequence_id, window, implementation, dtype):
    allowed = _allowed(sequence_id, window)[None, None]
    if implementation == "sdpa":
        return allowed
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)


def _block_mask(sequence_id, window):
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch_idx, head_idx, q_idx, kv_idx):
        allowed = (sequence_id[q_idx] == sequence_id[kv_idx]) & (kv_idx <= q_idx)
        if window is not None:
            allowed = allowed & (kv_idx > q_idx - window)
        return allowed

    T = sequence_id.numel()
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=sequence_id.device)


def _layer_windows(config) -> dict[str, int | None] | int | None:
    """{layer type: window} for models with mixed layer types, else the single window (None = full attention)."""
    layer_types = getattr(config, "layer_types", None)
    sliding_window = getattr(config, "sliding_window", None)
    if layer_types:
        windows = {t: (sliding_window if t == "sliding_attention" else None) for t in set(layer_types)}
        return windows if len(windows) > 1 else next(iter(windows.values()))
    return sliding_window


# ----------------------------------------------------------------------------------------------- varlen fallback

# A sequence joins a bucket when it is at least this fraction of the bucket's longest: its attention then costs
# at most 1 / 0.8^2 = 1.56x its own L^2, while one batched call per bucket keeps per-call overhead low.
_BUCKET_MIN_FILL = 0.8
PLAN_KWARG = "nash_fast_varlen_plan"
# Buckets at most this wide take _BucketAttention (batched matmuls with the probabilities saved for backward)
# instead of sdpa. On short sequences sdpa's CPU flash kernel is mostly overhead: on SmolLM2-135M's shapes
# (30 sequences of 40-80 tokens, 9 query / 3 KV heads of 64) forward+backward of 30 layers took 1.5 s (fp32)
# and 2.8 s (bf16: its backward is slow) against 0.93 s / 0.6 s here (AMD EPYC Zen 4, 1 thread; one training
# step of 1.7k tokens is ~13 s). Crossover, 2k tokens in sequences of one length, forward+backward: fp32 wins
# at 96 (40 vs 50 ms), loses at 128 (64 vs 45 ms); bf16 wins at 384 (73 vs 115 ms), loses at 512 (193 vs 146).
# The saved probabilities cost heads * width * (2 or 4) bytes per token and layer (7 KiB at 384 with 9 heads
# in bf16), below a decoder layer's other saved activations; wider buckets keep sdpa's O(L) memory.
_MATH_MAX_WIDTH = {torch.float32: 96, torch.float64: 96, torch.bfloat16: 384, torch.float16: 384}


class VarlenPlan:
    """How varlen_attention_forward splits one packed row: buckets of similar-length sequences.

    Built once per forward from cu_seqlens (int [S+1]) and shared by every layer. Per bucket: `gather` [n, width]
    token indices of its n sequences, right-padded by repeating each sequence's last token (padded queries are
    discarded; under a causal mask no real query sees a padded key), and `real_rows` (None when nothing is
    padded), the rows of the flattened [n * width] output that are real tokens. `restore` puts the concatenated
    bucket outputs back in packed-row order (None when they already are). `calls` counts attention calls.
    """

    def __init__(self, cu_seqlens: torch.Tensor, device, *, min_fill: float = _BUCKET_MIN_FILL):
        cu = cu_seqlens.to("cpu", torch.long)
        lengths = cu.diff()
        self.total_tokens = int(cu[-1])
        by_length = sorted((s for s in range(lengths.numel()) if lengths[s] > 0), key=lambda s: -int(lengths[s]))
        self.buckets: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []
        token_order = []
        i = 0
        while i < len(by_length):
            width = int(lengths[by_length[i]])
            j = i + 1
            while j < len(by_length) and int(lengths[by_length[j]]) >= min_fill * width:
                j += 1
            members = torch.tensor(by_length[i:j])
            starts, member_lengths = cu[members], lengths[members]
            offsets = torch.arange(width)
            gather = starts[:, None] + torch.minimum(offsets[None, :], member_lengths[:, None] - 1)
            real = (offsets[None, :] < member_lengths[:, None]).flatten()
            real_rows = None if bool(real.all()) else real.nonzero()[:, 0]
            token_order.append(gather.flatten() if real_rows is None else gather.flatten()[real_rows])
            self.buckets.append((width, gather.to(device), None if real_rows is None else real_rows.to(device)))
            i = j
        order = torch.cat(token_order) if token_order else torch.zeros(0, dtype=torch.long)
        identity = torch.arange(self.total_tokens)
        self.restore = None
        if not torch.equal(order, identity):
            restore = torch.empty_like(order)
            restore[order] = identity
            self.restore = restore.to(device)
        self.calls = 0
        self._masks: dict[tuple, torch.Tensor] = {}
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def bucket_rows(self, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token ids of bucket `index`'s real rows, in its flattened [n * width] order; those rows' positions in
        that order, or None when nothing is padded)."""
        if index not in self._rows:
            _, gather, real_rows = self.buckets[index]
            flat = gather.flatten()
            self._rows[index] = (flat if real_rows is None else flat[real_rows], real_rows)
        return self._rows[index]

    def causal_bias(self, width: int, window: int | None, groups: int, device, dtype=torch.float32) -> torch.Tensor:
        """[groups * width, width] of `dtype`: 0 where allowed(width, window), -inf elsewhere, repeated per query
        head of a KV group (the grouped layout of _BucketAttention)."""
        key = ("bias", width, window, groups, str(device), dtype)
        if key not in self._masks:
            allowed = self.allowed(width, window, device)
            bias = torch.zeros(width, width, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
            self._masks[key] = bias.repeat(groups, 1)
        return self._masks[key]

    def allowed(self, width: int, window: int | None, device) -> torch.Tensor:
        """[width, width] boolean: causal, and banded (q - k < window) when a window is given."""
        key = (width, window, str(device))
        if key not in self._masks:
            position = torch.arange(width, device=device)
            allowed = position[None, :] <= position[:, None]
            if window is not None:
                allowed &= position[None, :] > position[:, None] - window
            self._masks[key] = allowed
        return self._masks[key]


class _BucketAttention(torch.autograd.Function):
    """Causal (optionally banded) attention of every bucket of a VarlenPlan in batched matmuls, GQA folded in.

    query [H, T, d], key / value [KV, T, d] -> [T, H, d]. Per bucket of n sequences right-padded to width w, the
    g = H / KV query heads sharing a KV head are stacked along the query axis, so no KV head is repeated:
        q [n, KV, g w, d], k, v [n, KV, w, d];  S = q k^T (input dtype, fp32 accumulation)
        P = softmax(scaling S + bias) in fp32 (bias: 0 / -inf, causal and banded), rounded to the input dtype
        O = P v
    as transformers' eager attention computes it. Backward from the saved P (no recomputation):
        dV = P^T dO,  dP = dO v^T,  dS = scaling P (dP - rowsum(P * dP)) (fp32, then the input dtype),
        dQ = dS k,  dK = dS^T q.
    Padded query rows are dropped from O and get dO = 0; a padded key is visible only to padded queries (causal),
    so its dK / dV rows are 0 and are dropped too: every real token's gradient is written exactly once.
    """

    @staticmethod
    def forward(ctx, query, key, value, plan, scaling, window):
        heads, total, dim = query.shape
        kv_heads = key.shape[0]
        groups = heads // kv_heads
        out = query.new_empty(total, heads, dim)
        accumulate = torch.promote_types(query.dtype, torch.float32)
        probabilities = []
        for index, (width, gather, _) in enumerate(plan.buckets):
            n = gather.shape[0]
            q = query[:, gather].view(kv_heads, groups, n, width, dim).permute(2, 0, 1, 3, 4)
            q = q.reshape(n, kv_heads, groups * width, dim)
            k, v = key[:, gather].transpose(0, 1), value[:, gather].transpose(0, 1)
            scores = torch.matmul(q, k.transpose(-1, -2)).to(accumulate)
            scores = scores.mul_(scaling).add_(plan.causal_bias(width, window, groups, query.device, accumulate))
            p = torch.softmax(scores, dim=-1).to(query.dtype)
            o = torch.matmul(p, v).view(n, kv_heads, groups, width, dim).permute(0, 3, 1, 2, 4)
            o = o.reshape(n * width, heads, dim)
            tokens, real_rows = plan.bucket_rows(index)
            out.index_copy_(0, tokens, o if real_rows is None else o.index_select(0, real_rows))
            probabilities.append(p)
        ctx.save_for_backward(query, key, value, *probabilities)
        ctx.plan, ctx.scaling = plan, scaling
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        query, key, value, *probabilities = ctx.saved_tensors
        plan, scaling = ctx.plan, ctx.scaling
        heads, total, dim = query.shape
        kv_heads = key.shape[0]
        groups = heads // kv_heads
        accumulate = torch.promote_types(query.dtype, torch.float32)
        grad_out = grad_out.contiguous()
        d_query, d_key, d_value = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for index, ((width, gather, _), p) in enumerate(zip(plan.buckets, probabilities)):
            n = gather.shape[0]
            tokens, real_rows = plan.bucket_rows(index)
            d_o = grad_out.new_zeros(n * width, heads, dim)
            d_o[real_rows if real_rows is not None else slice(None)] = grad_out.index_select(0, tokens)
            d_o = d_o.view(n, width, kv_heads, groups, dim).permute(0, 2, 3, 1, 4).reshape(n, kv_heads, groups * width, dim)
            q = query[:, gather].view(kv_heads, groups, n, width, dim).permute(2, 0, 1, 3, 4)
            q = q.reshape(n, kv_heads, groups * width, dim)
            k, v = key[:, gather].transpose(0, 1), value[:, gather].transpose(0, 1)
            d_v = torch.matmul(p.transpose(-1, -2), d_o)  # [n, KV, w, d]
            d_p = torch.matmul(d_o, v.transpose(-1, -2)).to(accumulate)
            p32 = p.to(accumulate)
            # Not in place: p32 is the saved P itself when the input dtype is the accumulation dtype.
            d_s = (p32 * (d_p - (p32 * d_p).sum(-1, keepdim=True))).mul_(scaling).to(query.dtype)
            d_q = torch.matmul(d_s, k).view(n, kv_heads, groups, width, dim).permute(1, 2, 0, 3, 4)
            d_q = d_q.reshape(heads, n * width, dim)
            d_k = torch.matmul(d_s.transpose(-1, -2), q).transpose(0, 1).reshape(kv_heads, n * width, dim)
            d_v = d_v.transpose(0, 1).reshape(kv_heads, n * width, dim)
            if real_rows is not None:
                d_q, d_k, d_v = (t.index_select(1, real_rows) for t in (d_q, d_k, d_v))
            d_query.index_copy_(1, tokens, d_q)
            d_key.index_copy_(1, tokens, d_k)
            d_value.index_copy_(1, tokens, d_v)
        return d_query, d_key, d_value, None, None, None


def _softcapped_attention(query, key, value, allowed, scaling, softcap, dropout):
    """Eager attention with Gemma-2 logit soft-capping: softmax(c * tanh(q k^T * scaling / c) masked) v."""
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Causal attention confined to each sequence of one packed row, in transformers' AttentionInterface form.

    query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] (GQA: kv heads repeated per bucket);
    returns ([1, T, heads, head_dim], None). Sequence boundaries come from the VarlenPlan kwarg when present,
    else from cu_seq_lens_q (which cu_seq_lens_k must equal). attention_mask is ignored (the packed forward
    passes an empty placeholder so transformers builds no [T, T] mask). For sequence s with L_s tokens:
    out_s = softmax(scaling * q_s k_s^T + causal [and banded: q - k < sliding_window] mask) v_s, with
    softcap * tanh(. / softcap) on the logits when softcap is set; dropout as the module passes it
    (its attention_dropout while training, else 0). Cost O(sum_s L_s^2), not O(T^2).
    """
    plan = kwargs.pop(PLAN_KWARG, None)
    if query.shape[0] != 1:
        raise ValueError(f"varlen attention takes one packed row (batch 1), got query shape {tuple(query.shape)}")
    if key.shape[2] != query.shape[2]:
        raise ValueError("varlen attention does not support a KV cache prefix (key and query lengths differ)")
    if kwargs.get("is_causal") is False or getattr(module, "is_causal", True) is False:
        raise ValueError("varlen attention is causal only (this attention module is bidirectional)")
    if plan is None:
        if cu_seq_lens_q is None:
            raise ValueError("varlen attention needs cu_seq_lens_q (cumulative sequence lengths of the packed row)")
        if cu_seq_lens_k is not None and not torch.equal(cu_seq_lens_k.cpu(), cu_seq_lens_q.cpu()):
            raise ValueError("varlen attention needs cu_seq_lens_k == cu_seq_lens_q (self-attention)")
        plan = VarlenPlan(cu_seq_lens_q, query.device)
    if plan.total_tokens != query.shape[2]:
        raise ValueError(f"cu_seqlens cover {plan.total_tokens} tokens but the row has {query.shape[2]}")
    plan.calls += 1
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window", None)
    if softcap is None:
        softcap = getattr(module, "attn_logit_softcapping", None)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    heads, head_dim = query.shape[1], value.shape[-1]
    repeats = heads // key.shape[1]
    widest = max((width for width, _, _ in plan.buckets), default=0)
    device_type = query.device.type
    # Under autocast sdpa runs in the autocast dtype (it is on autocast's lower-precision list); so does the
    # bucket path, whose matmuls autocast must not recast one by one inside the autograd.Function.
    autocast_on = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast_on else query.dtype
    if (not softcap and dropout == 0.0 and widest <= _MATH_MAX_WIDTH.get(compute_dtype, 0)
            and head_dim == query.shape[-1]):
        banded = window if window is not None and widest > window else None
        query, key, value = (t[0].to(compute_dtype) for t in (query, key, value))
        with torch.autocast(device_type, enabled=False):
            return _BucketAttention.apply(query, key, value, plan, float(scaling), banded)[None], None
    outputs = []
    for width, gather, real_rows in plan.buckets:
        # [heads, n, width, d] -> [n, heads, width, d]
        q = query[0][:, gather].transpose(0, 1)
        k = key[0][:, gather].transpose(0, 1)
        v = value[0][:, gather].transpose(0, 1)
        if repeats > 1:
            k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        banded = window is not None and width > window
        if softcap:
            allowed = plan.allowed(width, window if banded else None, query.device)
            out = _softcapped_attention(q, k, v, allowed, scaling, float(softcap), dropout)
        else:
            mask = plan.allowed(width, window, query.device) if banded else None
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None, scale=scaling
            )
        out = out.transpose(1, 2).reshape(-1, heads, head_dim)  # [n * width, heads, d]
        outputs.append(out if real_rows is None else out.index_select(0, real_rows))
    result = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    if plan.restore is not None:
        result = result.index_select(0, plan.restore)
    return result[None], None


# ----------------------------------------------------------------------------------------------- dispatch

_original_sdpa = None


def _sdpa_or_varlen(module, query, key, value, attention_mask, **kwargs):
    """The "sdpa" entry of transformers' AttentionInterface: varlen when the forward carries a VarlenPlan."""
    if kwargs.get(PLAN_KWARG) is not None:
        return varlen_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return _original_sdpa(module, query, key, value, attention_mask, **kwargs)


VARLEN_IMPLEMENTATION = "nash_fast_varlen"


def _install_varlen_dispatch() -> None:
    global _original_sdpa
    from transformers.modeling_utils import AttentionInterface

    current = AttentionInterface._global_mapping["sdpa"]
    if current is not _sdpa_or_varlen:
        _original_sdpa = current
        AttentionInterface.register("sdpa", _sdpa_or_varlen)
    AttentionInterface.register(VARLEN_IMPLEMENTATION, varlen_attention_forward)


def exclude_varlen_attention_from_compile() -> None:
    """Rebind this module's varlen_attention_forward to torch._dynamo.disable of it (once), so torch.compile of a
    decoder layer runs it eagerly: its bucket plan is Python data. _sdpa_or_varlen and _install_varlen_dispatch
    read the global at call time, so both dispatch paths get the rebound function."""
    global varlen_attention_forward
    if not getattr(varlen_attention_forward, "_torchdynamo_disable", False):
        varlen_attention_forward = torch._dynamo.disable(varlen_attention_forward)


@contextlib.contextmanager
def attn_implementation_for_forward(model, implementation: str | None) -> Iterator[None]:
    """Run the block with config._attn_implementation = implementation (None: unchanged), then restore it."""
    config = text_config(model.config)
    previous = config._attn_implementation
    if implementation is None or implementation == previous:
        yield
        return
    config._attn_implementation = implementation
    try:
        yield
    finally:
        config._attn_implementation = previous


# ----------------------------------------------------------------------------------------------- backbone kwargs

def _empty_mask_placeholder(device) -> torch.Tensor:
    # A 4-D mask makes masking_utils return it as is (no [T, T] mask is built); being empty, it fails loudly
    # rather than silently masking nothing should any layer bypass the AttentionInterface and use it.
    return torch.zeros((1, 1, 0, 0), dtype=torch.bool, device=device)


ATTENTION_MODES = ("auto", "varlen", "mask")


def packed_attention_kwargs(
    model, cu_seqlens: torch.Tensor, max_seqlen: int, device, dtype, *, attention: str = "auto"
) -> dict[str, Any]:
    """Keyword arguments for the backbone so attention stays inside each packed sequence (see module docstring).

    attention: "auto" (flash varlen for flash_attention_*, the varlen fallback for sdpa, masks for eager and
    flex_attention), "varlen" (flash, or the varlen fallback for sdpa and eager models; ValueError for
    flex_attention) or "mask" (the dense block-diagonal mask for sdpa/eager, BlockMask for flex; ValueError for
    flash). For an eager model, "varlen" works only through nash_fast.model.packed_hidden_states /
    packed_sequence_logprobs, which point config._attn_implementation at the registered "nash_fast_varlen"
    function for the forward.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention={attention!r} is not one of {ATTENTION_MODES}")
    config = text_config(model.config)
    implementation = config._attn_implementation or "eager"
    cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
    if implementation in _FLASH_IMPLEMENTATIONS or "flash" in implementation:
        if attention == "mask":
            raise ValueError(f"attention='mask' cannot be used with {implementation} (flash-attn takes no dense mask)")
        return {
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": int(max_seqlen),
            "max_length_k": int(max_seqlen),
        }
    if implementation not in ("sdpa", "eager", "flex_attention"):
        raise ValueError(
            f"attn_implementation={implementation!r} is not supported by the packed forward "
            "(use flash_attention_2, sdpa, eager or flex_attention)"
        )
    if attention == "varlen" or (attention == "auto" and implementation == "sdpa"):
        if implementation == "flex_attention":
            raise ValueError("attention='varlen' is not available for flex_attention (use 'auto' or 'mask')")
        _install_varlen_dispatch()
        return {
            "attention_mask": _empty_mask_placeholder(device),
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": int(max_seqlen),
            "max_length_k": int(max_seqlen),
            PLAN_KWARG: VarlenPlan(cu_seqlens, device),
        }
    lengths = cu_seqlens.diff().long()
    sequence_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    windows = _layer_windows(config)

    def build(window):
        if implementation == "flex_attention":
            return _block_mask(sequence_id, window)
        return _dense_mask(sequence_id, window, implementation, dtype)

    if isinstance(windows, dict):
        return {"attention_mask": {layer_type: build(window) for layer_type, window in windows.items()}}
    return {"attention_mask": build(windows)}

