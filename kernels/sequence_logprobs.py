"""Triton kernels for token log-probabilities from hidden states and an LM-head weight.

For scored tokens i (already compacted: every label is a valid class id) with hidden h_i in R^H,
LM-head weight W in R^{V x H}, optional bias b and optional soft-cap c:

    z_iv  = W_v . h_i + b_v                   (fp32 accumulation of input-dtype operands)
    s_iv  = c * tanh(z_iv / c)   if c else z_iv
    lse_i = log sum_v exp(s_iv)
    logp_i = s_{i, y_i} - lse_i

Forward (`_logits_lse_kernel`): a 2-D grid of [BLOCK_N x BLOCK_V] logit tiles, each the full
H-reduction of a matmul tile, visited in grouped order so the weight tiles are reused from L2.
Each tile reduces to a partial log-sum-exp per row, written to a [num_v_blocks, N] fp32 buffer
(combined afterwards by one logsumexp: deterministic, no locks), and the tile that holds a row's
label writes that row's target logit. Extra memory: N * ceil(V / BLOCK_V) floats, never N * V.

Backward: d logp_i / d s_iv = onehot(y_i)_v - softmax(s_i)_v, times the chain factor
1 - (s_iv / c)^2 for the soft-cap. `_dlogits_kernel` recomputes each logit tile, forms
d_z = g_i * (onehot - softmax) * cap', and writes it in the input dtype for one vocabulary slice
(all tokens); d_weight[slice] = d_z^T @ h and d_hidden += d_z @ W[slice] then run as dense GEMMs
(cuBLAS on GPU), because H is thousands wide and a [BLOCK x H] accumulator cannot live on chip.
The d_z slice is the only [tokens x vocab]-shaped buffer and its size is capped
(`max_chunk_elements`), so peak extra memory is O(N x H + chunk) besides the gradients.
FLOPs: 2NHV forward, 6NHV backward (recompute + two GEMMs).

Gradient filtering (filter_eps > 0, FILTER): a d_z tile whose softmax values are all < filter_eps and that holds
no label is stored as zeros (each dropped entry is under filter_eps |g|). The GEMMs after it stay dense, so on
a GPU this gives filtered gradients but saves no time (cut-cross-entropy fuses the GEMMs into the tile kernel to
skip them; that is not done here).
"""

from __future__ import annotations

import os

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from torch.library import triton_op, wrap_triton

from nash_fast.capabilities import mm_fp32_output_works

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    if _INTERPRET:
        # Small tiles keep the CPU interpreter fast; tile edges are still exercised by the tests.
        return [triton.Config({"BLOCK_N": 16, "BLOCK_V": 32, "BLOCK_K": 16, "GROUP_N": 2}, num_warps=4)]
    return gpu_configs(torch.bfloat16) + gpu_configs(torch.float32)


_TENSOR_CORE_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64, "GROUP_N": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=8, num_stages=4),
]
# fp32 inputs multiply in exact fp32 (FMA, no tensor cores): the 16-bit tiles above would spill
# tens of KiB of registers there (ptxas, sm_90), so they get tiles of their own.
_FP32_CONFIGS = [
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 64, "BLOCK_K": 32, "GROUP_N": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 16, "GROUP_N": 8}, num_warps=4, num_stages=4),
]


def gpu_configs(dtype=torch.bfloat16):
    """Autotuning candidates on GPU for inputs of `dtype` (compiled for sm_90 in the tests)."""
    return list(_FP32_CONFIGS if dtype == torch.float32 else _TENSOR_CORE_CONFIGS)


def _configs_for_inputs(configs, named_args, **kwargs):
    """Autotuner pruning: only the candidates of the hidden states' dtype are timed."""
    if _INTERPRET:
        return configs
    wanted = gpu_configs(named_args["h_ptr"].dtype)
    return [c for c in configs if any(c is w for w in wanted)]


def _min_block(dtype, name):
    """Buffers whose row count depends on the tile the autotuner picks are sized for the smallest tile."""
    configs = _configs() if _INTERPRET else gpu_configs(dtype)
    return min(c.kwargs[name] for c in configs)


@triton.jit
def _tile_indices(pid, N, V, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_N: tl.constexpr):
    # Grouped ordering: GROUP_N row-blocks sweep the vocabulary together, so each weight tile is
    # fetched from HBM once per group instead of once per row-block.
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_v = tl.cdiv(V, BLOCK_V)
    num_in_group = GROUP_N * num_pid_v
    group_id = pid // num_in_group
    first_n = group_id * GROUP_N
    group_size = tl.minimum(num_pid_n - first_n, GROUP_N)
    pid_n = first_n + ((pid % num_in_group) % group_size)
    pid_v = (pid % num_in_group) // group_size
    return pid_n, pid_v


@triton.jit
def _tanh(x, PORTABLE: tl.constexpr):
    """tanh(x) to a few ulp relative everywhere. 2 sigmoid(2x) - 1 was off by an absolute ulp of 1: a soft-cap
    c > 1e7 moved every logit by more than u c, and c >= 1e9 turned them all to 0.

    Compiled (GPU): libdevice's tanhf (CUDA's __nv_tanhf: 2 ulp). PORTABLE (the CPU interpreter, which has
    no libdevice): |x| < 1/4: x (1 + x^2 P(x^2)), Taylor to x^9 (the x^11 term is < 0.009 |x|^11: under 1e-8
    relative); else sign(x) (1 - e) / (1 + e), e = exp(-2|x|) <= 0.61, so 1 - e >= 0.39 loses under 2 ulp to
    e's rounding."""
    if not PORTABLE:
        return libdevice.tanh(x)
    a = tl.abs(x)
    x2 = x * x
    small = a * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    e = tl.exp(-2.0 * a)
    t = tl.where(a < 0.25, small, (1.0 - e) / (1.0 + e))
    return tl.where(x < 0, -t, t)


@triton.jit
def _logit_tile(
    h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The tile's logits before the soft-cap, z + b [BLOCK_N, BLOCK_V] (fp32); the caller applies the cap
    (_tanh_of_cap), so the backward keeps the tanh itself for the slope."""
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < N
    col_ok = cols < V
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[:, None] * stride_w + ks[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = (ks + k * BLOCK_K) < H
        a = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:  # the CPU interpreter cannot multiply bf16 operands correctly
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _tanh_of_cap(z, softcap, UPCAST: tl.constexpr):
    """tanh(z / c): the soft-capped logit is c times it, its slope ds/dz 1 - its square (exactly 0 where it
    saturates to +-1, e.g. z = -inf; s * (1/c) would miss that when 1/c is subnormal, c near 3.4e38)."""
    # (a multiply by the reciprocal: a per-element IEEE division costs registers the tile needs)
    return _tanh(z * (1.0 / softcap), UPCAST)  # UPCAST: the interpreter, without libdevice


# restore_value: benchmarking a config must not leave its partial rows behind for the next one.
@triton.autotune(configs=_configs(), key=["H", "V", "HAS_BIAS", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _configs_for_inputs},
                 restore_value=["partial_lse_ptr", "target_ptr"])
@triton.jit
def _logits_lse_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, partial_lse_ptr, target_ptr,
    N, V, H, stride_h, stride_w, softcap,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = _tile_indices(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    s = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w,
                    HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    if HAS_SOFTCAP:
        s = softcap * _tanh_of_cap(s, softcap, UPCAST)
    s = tl.where((cols < V)[None, :], s, float("-inf"))
    m = tl.max(s, axis=1)
    # A row whose logits in this tile are all -inf (a masked vocabulary block): shift by 0, not by m = -inf
    # (exp(-inf - -inf) = NaN); its partial LSE is then -inf + log(0) = -inf, which the final logsumexp ignores.
    shift = tl.where(m == float("-inf"), 0.0, m)
    lse = shift + tl.log(tl.sum(tl.exp(s - shift[:, None]), axis=1))
    row_ok = rows < N
    tl.store(partial_lse_ptr + pid_v.to(tl.int64) * N + rows, lse, mask=row_ok)

    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    hit = cols[None, :] == labels[:, None]
    target = tl.sum(tl.where(hit, s, 0.0), axis=1)
    mine = row_ok & (labels >= pid_v * BLOCK_V) & (labels < pid_v * BLOCK_V + BLOCK_V)
    tl.store(target_ptr + rows, target, mask=mine)


@triton.autotune(configs=_configs(), key=["H", "V", "HAS_BIAS", "HAS_SOFTCAP"],
                 prune_configs_by={"early_config_prune": _configs_for_inputs}, reset_to_zero=["dbias_partial_ptr"])
@triton.jit
def _dlogits_kernel(
    h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, grad_ptr, dz_ptr, dbias_partial_ptr,
    N, V, H, v_offset, stride_h, stride_w, stride_dz, softcap, filter_eps,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
    FILTER: tl.constexpr = False,
):
    """d_z for every row and the V columns of one vocabulary slice starting at v_offset."""
    pid_n, pid_v = _tile_indices(tl.program_id(0), N, V, BLOCK_N, BLOCK_V, GROUP_N)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(grad_ptr + rows, mask=row_ok, other=0.0)
    dz_ptrs = dz_ptr + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tile_ok = row_ok[:, None] & col_ok[None, :]
    # Each branch stores its own tile: a branch that yields a [BLOCK_N, BLOCK_V] value would keep a
    # second accumulator-sized tile live across the matmul (register spills on Hopper).
    if tl.max(tl.abs(g), axis=0) == 0.0:
        # Tokens of sequences that receive no gradient (e.g. detached passes): skip the matmul.
        tl.store(dz_ptrs, tl.zeros((BLOCK_N, BLOCK_V), dtype=dz_ptr.dtype.element_ty), mask=tile_ok)
        # dbias_partial is zeroed before launch (reset_to_zero / torch.zeros), so nothing to add.
    else:
        s = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, N, V, H, stride_h, stride_w,
                        HAS_BIAS, UPCAST, PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        if HAS_SOFTCAP:
            t = _tanh_of_cap(s, softcap, UPCAST)
            s = softcap * t
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1) - v_offset
        p = tl.exp(s - lse[:, None])
        is_label = cols[None, :] == labels[:, None]
        dz = tl.where(is_label, 1.0 - p, -p) * g[:, None]
        if FILTER:
            # Negligible tile: every softmax value < filter_eps (a NaN counts as not negligible) and no label.
            keep = tile_ok & (is_label | ~(p < filter_eps))
            dz = tl.where(tl.max(keep.to(tl.int32)) > 0, dz, 0.0)
        if HAS_SOFTCAP:
            dz = dz * (1.0 - t * t)
        dz = tl.where(tile_ok, dz, 0.0)
        tl.store(dz_ptrs, dz.to(dz_ptr.dtype.element_ty), mask=tile_ok)
        if HAS_BIAS:
            tl.store(dbias_partial_ptr + pid_n.to(tl.int64) * V + cols, tl.sum(dz, axis=0), mask=col_ok)


def _launch_args(hidden: torch.Tensor):
    upcast = _INTERPRET
    precision = "ieee" if (hidden.dtype == torch.float32 or upcast) else "tf32"
    return upcast, precision


@triton_op("nash_fast::triton_token_logprobs_forward", mutates_args={})
def token_logprobs_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                           labels: torch.Tensor, softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (logp [N] fp32, lse [N] fp32) for compacted tokens (every label valid).

    A torch.library.triton_op: in a torch.compile'd graph on a GPU, Inductor sees the kernel launch."""
    N, H = hidden.shape
    V = weight.shape[0]
    partial = torch.full((triton.cdiv(V, _min_block(hidden.dtype, "BLOCK_V")), N), float("-inf"), device=hidden.device, dtype=torch.float32)
    target = torch.zeros(N, device=hidden.device, dtype=torch.float32)
    if N == 0:
        return target, target.clone()
    upcast, precision = _launch_args(hidden)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(V, meta["BLOCK_V"]),)
    wrap_triton(_logits_lse_kernel)[grid](
        hidden, weight, bias if bias is not None else hidden, labels, partial, target,
        N, V, H, hidden.stride(0), weight.stride(0), float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast, PRECISION=precision,
    )
    lse = torch.logsumexp(partial, dim=0)
    return target - lse, lse


@triton_op("nash_fast::triton_token_logprobs_backward", mutates_args={})
def token_logprobs_backward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            labels: torch.Tensor, softcap: Optional[float], lse: torch.Tensor, grad: torch.Tensor,
                            max_chunk_elements: int, need_hidden: bool, need_weight: bool,
                            need_bias: bool, filter_eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_i grad_i * logp_i w.r.t. hidden, weight and bias, each in its input dtype; one that
    is not needed comes back as an empty tensor (a torch.library.triton_op, like the forward).

    The vocabulary is processed in slices of Vc = max_chunk_elements // N columns: for each slice the
    kernel writes d_z [N, Vc]; d_weight[slice] = d_z^T @ hidden is then final (one GEMM over all tokens,
    written once, no [V, H] fp32 buffer) and d_hidden += d_z @ W[slice] accumulates in fp32 [N, H].
    A gradient that is not needed costs nothing: no buffer, no GEMM (a frozen LM head saves 2NHV).
    filter_eps > 0: negligible d_z tiles are zeros (see the module docstring); 0: exact.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    need_bias = need_bias and bias is not None
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty_like(bias) if need_bias else None
    if N == 0:
        return tuple(torch.zeros_like(t) if need else hidden.new_empty((0,))
                     for t, need in ((hidden, need_hidden), (weight, need_weight), (bias, need_bias)))
    v_chunk = max(1, min(V, max_chunk_elements // N))
    upcast, precision = _launch_args(hidden)
    # On GPU d_z is stored in the 16-bit input dtype for the tensor-core GEMMs below (the kernel rounds
    # it to nearest). Under the CPU interpreter it stays fp32 and the GEMMs multiply exactly in fp32
    # (the interpreter would also truncate fp32 -> bf16 stores instead of rounding them).
    dz = torch.empty(N, v_chunk, device=hidden.device, dtype=torch.float32 if _INTERPRET else hidden.dtype)
    d_hidden = torch.zeros(N, H, device=hidden.device, dtype=torch.float32) if need_hidden else None
    grad = grad.contiguous().float()
    for v_start in range(0, V, v_chunk):
        v_end = min(V, v_start + v_chunk)
        vc = v_end - v_start
        w = weight[v_start:v_end]
        b = bias[v_start:v_end] if bias is not None else None
        dbias_partial = (
            torch.zeros(triton.cdiv(N, _min_block(hidden.dtype, "BLOCK_N")), vc, device=hidden.device, dtype=torch.float32)
            if bias is not None else None
        )
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(vc, meta["BLOCK_V"]),)
        wrap_triton(_dlogits_kernel)[grid](
            hidden, w, b if b is not None else hidden, labels, lse, grad,
            dz, dbias_partial if bias is not None else dz,
            N, vc, H, v_start, hidden.stride(0), weight.stride(0), dz.stride(0), float(softcap or 1.0),
            float(filter_eps), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast,
            PRECISION=precision, FILTER=filter_eps > 0,
        )
        dz_v = dz[:, :vc]
        if _INTERPRET:
            # CPU: exact fp32 products (d_z is not rounded to 16 bits; no tensor cores to feed).
            if need_weight:
                d_weight[v_start:v_end] = torch.mm(dz_v.t(), hidden.float())
            if need_hidden:
                d_hidden.addmm_(dz_v, w.float())
        else:
            if need_weight:
                torch.mm(dz_v.t(), hidden, out=d_weight[v_start:v_end])
            if need_hidden:
                _accumulate_mm(d_hidden, dz_v, w)
        if need_bias:
            d_bias[v_start:v_end] = dbias_partial.sum(0)
    empty = lambda: hidden.new_empty((0,))  # noqa: E731 (outputs must not alias each other)
    return (d_hidden.to(hidden.dtype) if need_hidden else empty(), d_weight if need_weight else empty(),
            d_bias if need_bias else empty())


def _accumulate_mm(out_fp32: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """out_fp32 += a @ b, accumulating across vocabulary slices in fp32 (a, b may be bf16)."""
    if a.dtype == torch.float32:
        out_fp32.addmm_(a, b)
        return
    if _ADDMM_OUT_DTYPE[0]:
        try:  # bf16 operands, fp32 C read and written in the GEMM epilogue: no extra pass
            torch.addmm(out_fp32, a, b, out_dtype=torch.float32, out=out_fp32)
            return
        except (TypeError, RuntimeError, NotImplementedError):
            _ADDMM_OUT_DTYPE[0] = False
    if mm_fp32_output_works(a.device, a.dtype):  # exact too, at one extra pass over the fp32 [N, H] product
        out_fp32.add_(torch.mm(a, b, out_dtype=torch.float32))
        return
    # torch without out_dtype GEMMs: each slice's product is rounded to bf16 before the fp32 sum.
    out_fp32.add_(torch.mm(a, b))


_ADDMM_OUT_DTYPE = [True]
