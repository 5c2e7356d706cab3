"""Per-sequence log-probabilities from final hidden states and the LM-head weight.

    logp(seq s) = sum_{i in s, y_i != ignore} log softmax(cap(W h_i + b))_{y_i}      (average=False)
                = (1 / n_s) * the same sum, n_s = scored tokens of s (0 when n_s = 0) (average=True)

This is log pi(y | x) of the DPO/IPO/SPPO/INPO objectives (SPPO eq. 4.7, INPO eq. 8, Sr-DPO eq. 12,
OSP eq. 8): the only part of those losses that touches the [tokens x vocab] logits, which it
never materializes. Ignored tokens are compacted away before any vocabulary work, so prompt
tokens of a packed batch cost nothing.

Two backends compute the same function:
  "triton"  nash_fast.kernels.sequence_logprobs: fused tile kernels (GPU; CPU under TRITON_INTERPRET=1)
  "torch"   token chunks through plain PyTorch ops, recomputed in backward (the CPU path)
Both keep the logits in fp32 for bf16/fp16 inputs (never rounded to 16 bits) and return fp32.
"""

from __future__ import annotations

import os

import torch

__all__ = ["sequence_logprobs", "token_logprobs"]

# Largest [chunk x V] buffer either backend allocates, in elements. 2**26 bf16 = 128 MiB; with
# V = 128256 that is a 523-token chunk (torch) or backward d_logits chunk (triton).
MAX_CHUNK_ELEMENTS = 2**26
# The torch backend allocates several fp32 [chunk x V] temporaries, so its chunks are smaller.
TORCH_CHUNK_ELEMENTS = 2**22

_BACKENDS = ("auto", "torch", "triton")


def _validate(hidden, weight, labels, cu_seqlens, ignore_index, bias, softcap, backend):
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if (backend == "triton" and isinstance(hidden, torch.Tensor) and hidden.device.type != "cuda"
            and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError(
            f"backend='triton' needs CUDA tensors, but hidden is on {hidden.device}; use backend='torch' "
            "(or set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU, slowly)"
        )
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise ValueError("hidden must be a floating-point tensor")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D [V, H] tensor, got shape {tuple(getattr(weight, 'shape', ()))}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be [N, H] (packed) or [B, T, H] (padded), got shape {tuple(hidden.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden width {hidden.shape[-1]} does not match weight width {weight.shape[1]} (weight is [V, H])")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V = 0)")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden dtype {hidden.dtype} differs from weight dtype {weight.dtype}")
    if hidden.device != weight.device:
        raise ValueError(f"hidden is on {hidden.device} but weight is on {weight.device}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must match weight dtype/device ({weight.dtype}, {weight.device}), got ({bias.dtype}, {bias.device})")
    if softcap is not None and not (float(softcap) > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {hidden.device}")
    if hidden.dim() == 3 and cu_seqlens is not None:
        raise ValueError("cu_seqlens must be None for padded [B, T, H] hidden (each row is one sequence)")
    if hidden.dim() == 2 and cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be an int32 (or int64) tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
        cu = cu_seqlens.tolist()
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
        if cu[-1] != hidden.shape[0]:
            raise ValueError(f"cu_seqlens must end at N = {hidden.shape[0]} (tokens in hidden), got {cu[-1]}")
        if any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
    V = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}; found {first}")


def _pick_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


# ----------------------------------------------------------------------------- torch backend

def _acc_dtype(dtype):
    """float32 for 16/32-bit inputs; float64 inputs keep float64 (exact gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


_MM_FP32_OUTPUT_WORKS: dict = {}


def mm_fp32_output_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch.mm(dtype, dtype, out_dtype=float32) runs here (CUDA in recent torch; not the CPU).

    Shared with the Triton backend's d_hidden accumulation (nash_fast.kernels.sequence_logprobs)."""
    key = (device.type, dtype)
    if key not in _MM_FP32_OUTPUT_WORKS:
        try:
            a = torch.ones(1, 1, device=device, dtype=dtype)
            _MM_FP32_OUTPUT_WORKS[key] = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_FP32_OUTPUT_WORKS[key] = False
    return _MM_FP32_OUTPUT_WORKS[key]


def _weight_for_logits(weight):
    """The weight in the accumulation dtype when 16-bit logits could only be made by upcasting it, else None.

    Logits are never rounded to a 16-bit dtype (the Triton kernels keep them in fp32 too): on CUDA the
    GEMM writes fp32 from bf16 operands; elsewhere the weight is upcast once per call (a [V, H] fp32 copy).
    """
    acc = _acc_dtype(weight.dtype)
    if weight.dtype == acc or mm_fp32_output_works(weight.device, weight.dtype):
        return None
    return weight.to(acc)


def _torch_chunk_logits(h, weight, weight_acc, bias, softcap):
    """Capped logits of one token chunk in the accumulation dtype (in-place where possible)."""
    acc = _acc_dtype(h.dtype)
    if h.dtype == acc:
        z = torch.matmul(h, weight.t())
    elif weight_acc is None:
        z = torch.mm(h, weight.t(), out_dtype=acc)
    else:
        z = torch.matmul(h.to(acc), weight_acc.t())
    z = z.to(acc)  # a no-op, except under a caller's autocast
    if bias is not None:
        z += bias
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _torch_forward(hidden, weight, bias, labels, softcap):
    N = hidden.shape[0]
    V = weight.shape[0]
    chunk = max(1, TORCH_CHUNK_ELEMENTS // V)
    logp = torch.empty(N, device=hidden.device, dtype=_acc_dtype(hidden.dtype))
    lse = torch.empty_like(logp)
    weight_acc = _weight_for_logits(weight)
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        s = _torch_chunk_logits(hidden[start:end], weight, weight_acc, bias, softcap)
        torch.logsumexp(s, dim=1, out=lse[start:end])
        logp[start:end] = s.gather(1, labels[start:end, None]).squeeze(1) - lse[start:end]
    return logp, lse


def _torch_backward(hidden, weight, bias, labels, softcap, lse, grad):
    """d_z = g * (onehot - softmax) * cap'; d_hidden = d_z @ W, d_weight = sum over chunks of d_z^T @ h."""
    N, H = hidden.shape
    V = weight.shape[0]
    chunk = max(1, TORCH_CHUNK_ELEMENTS // V)
    acc = _acc_dtype(hidden.dtype)
    d_hidden = torch.empty_like(hidden)
    d_weight = torch.zeros(V, H, device=hidden.device, dtype=acc)
    d_bias = torch.zeros(V, device=hidden.device, dtype=acc) if bias is not None else None
    weight_acc = _weight_for_logits(weight)
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        h = hidden[start:end]
        s = _torch_chunk_logits(h, weight, weight_acc, bias, softcap)
        dz = torch.sub(s, lse[start:end, None]).exp_().neg_()
        dz.scatter_add_(1, labels[start:end, None], torch.ones_like(dz[:, :1]))
        dz.mul_(grad[start:end, None])
        if softcap is not None:
            dz.mul_(s.div_(softcap).square_().neg_().add_(1.0))  # d cap(z) / dz = 1 - tanh^2
        del s
        if bias is not None:
            d_bias += dz.sum(0)
        if acc == hidden.dtype:
            torch.mm(dz, weight, out=d_hidden[start:end])
            d_weight.addmm_(dz.t(), h)
        elif weight_acc is not None:
            # No 16-bit GEMM with fp32 output here (the CPU): the fp32 weight copy already exists, so
            # exact fp32 products cost no extra pass; d_z is never rounded to 16 bits.
            d_hidden[start:end] = torch.mm(dz, weight_acc)
            d_weight.addmm_(dz.t(), h.to(acc))
        else:
            # CUDA: d_z rounded to 16 bits feeds the tensor cores (as in the Triton backend); the
            # d_weight products of each chunk are added in fp32, not rounded to 16 bits first.
            dz = dz.to(hidden.dtype)
            torch.mm(dz, weight, out=d_hidden[start:end])
            d_weight += torch.mm(dz.t(), h, out_dtype=acc)
    return d_hidden, d_weight, d_bias


# ----------------------------------------------------------------------------- autograd

def _backend_fns(backend):
    if backend == "triton":
        from nash_fast.kernels import sequence_logprobs as kern

        return kern.token_logprobs_forward, lambda *a: kern.token_logprobs_backward(*a, MAX_CHUNK_ELEMENTS)
    return _torch_forward, _torch_backward


class _TokenLogprobs(torch.autograd.Function):
    """logp_i = log softmax(cap(W h_i + b))_{y_i} for compacted tokens; saves only lse [N]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, backend):
        forward_fn, _ = _backend_fns(backend)
        logp, lse = forward_fn(hidden, weight, bias, labels, softcap)
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.softcap = softcap
        ctx.backend = backend
        return logp

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        _, backward_fn = _backend_fns(ctx.backend)
        d_hidden, d_weight, d_bias = backward_fn(hidden, weight, bias, labels, ctx.softcap, lse, grad.to(lse.dtype))
        return (
            d_hidden if ctx.needs_input_grad[0] else None,
            d_weight.to(weight.dtype) if ctx.needs_input_grad[1] else None,
            d_bias.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None,
            None, None, None,
        )


def token_logprobs(hidden, weight, labels, *, bias=None, softcap=None, backend="auto"):
    """log p(labels[i] | hidden[i]) for [N, H] hidden and [N] labels that are all valid class ids.

    The building block of `sequence_logprobs` (no ignore handling, no sequence reduction).
    Returns float32 [N] (float64 for float64 inputs); differentiable w.r.t. hidden, weight and bias.
    """
    backend = _pick_backend(backend, hidden.device)
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    labels = labels.contiguous().long()
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not needs_grad:  # forward-only path: nothing is saved
        forward_fn, _ = _backend_fns(backend)
        return forward_fn(hidden.detach(), weight.detach(), None if bias is None else bias.detach(), labels, softcap)[0]
    return _TokenLogprobs.apply(hidden, weight, bias, labels, softcap, backend)


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    ignore_index: int = -100,
    average: bool = False,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-sequence log p(labels | hidden) under the LM head, without materializing logits.

    Args:
        hidden: [N, H] packed tokens (with `cu_seqlens`) or [B, T, H] padded rows (one sequence each).
        weight: LM-head weight [V, H] (same dtype and device as hidden).
        labels: [N] or [B, T] integer ids; labels[i] is the token predicted at position i;
            `ignore_index` marks positions that are not scored.
        cu_seqlens: int32 [S + 1] boundaries of the packed sequences, 0 = cu[0] <= ... <= cu[S] = N
            (empty sequences allowed). None with [N, H] hidden means one sequence.
        average: divide each sequence's sum by its own count of scored tokens (0 if it has none).
        bias: optional LM-head bias [V].
        softcap: optional final-logit soft-cap c (Gemma-2): logits -> c * tanh(logits / c).
        backend: "auto" (triton on CUDA, torch elsewhere), "triton" or "torch".

    Returns:
        [S] (packed) or [B] (padded), float32 (float64 for float64 inputs, so gradcheck is exact).
    """
    _validate(hidden, weight, labels, cu_seqlens, ignore_index, bias, softcap, backend)
    softcap = None if softcap is None else float(softcap)
    H = hidden.shape[-1]
    device = hidden.device
    if hidden.dim() == 3:
        B, T = labels.shape
        num_seqs = B
        seq_id = torch.arange(B, device=device).repeat_interleave(T)
    else:
        if cu_seqlens is None:
            cu_seqlens = torch.tensor([0, hidden.shape[0]], device=device)
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
        num_seqs = lengths.numel()
        seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=device), lengths)
    flat_hidden = hidden.reshape(-1, H)
    flat_labels = labels.reshape(-1)

    scored = (flat_labels != ignore_index).nonzero().squeeze(1)
    token_lp = token_logprobs(
        flat_hidden.index_select(0, scored), weight, flat_labels.index_select(0, scored),
        bias=bias, softcap=softcap, backend=backend,
    )
    scored_seq = seq_id.index_select(0, scored)
    seq_lp = torch.zeros(num_seqs, device=device, dtype=token_lp.dtype).index_add(0, scored_seq, token_lp)
    if average:
        counts = torch.bincount(scored_seq, minlength=num_seqs).clamp_min(1)
        seq_lp = seq_lp / counts
    return seq_lp
