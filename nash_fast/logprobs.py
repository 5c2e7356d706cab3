"""Per-sequence log-probabilities from final hidden states and the LM-head weight.

    logp(seq s) = sum_{i in s, y_i != ignore} log softmax(cap(W h_i + b))_{y_i}      (average=False)
                = (1 / n_s) * the same sum, n_s = scored tokens of s (0 when n_s = 0) (average=True)

This is log pi(y | x) of the DPO/IPO/SPPO/INPO objectives (SPPO eq. 4.7, INPO eq. 8, Sr-DPO eq. 12,
OSP eq. 8): the only part of those losses that touches the [tokens x vocab] logits, which it
never materializes. Ignored tokens are compacted away before any vocabulary work, so prompt
tokens of a packed batch cost nothing.

Three backends compute the same function on scored tokens:
  "triton"  nash_fast.kernels.sequence_logprobs: fused tile kernels (GPU; CPU under TRITON_INTERPRET=1),
            registered as torch.library.triton_op (nash_fast::triton_token_logprobs_forward/_backward)
  "native"  nash_fast._C (csrc/): C++ tile kernels on the CPU's matrix units (AMX) or vector units (AVX512-BF16)
  "torch"   plain PyTorch over token chunks (forward) and vocabulary slices (backward): the readable
            reference, and the CPU fallback when nash_fast._C is not built
"auto" picks triton on CUDA, native on CPU when built, torch otherwise. All keep logits in fp32
for bf16/fp16 inputs (never rounded to 16 bits) and return fp32. A gradient nobody asked for (a
frozen LM head, frozen hidden states) is not computed: no [V, H] buffer, 2NHV fewer FLOPs.

Gradient filtering (filter_eps, as Apple's cut-cross-entropy): d_z = g (onehot - softmax) cap' is mostly
entries whose softmax value is far below the gradient's own rounding; with filter_eps = eps the backward may
drop any entry with p = softmax < eps that is not a label (native and Triton: whole blocks of them, skipping
their share of the two gradient GEMMs on the native path; torch: each such entry, labels included, 1 - p -> 1).
Each dropped entry is under eps |g_i|, so for every element
    |d_hidden_ih - exact| <= eps |g_i| sum_v |W_vh| cap'_iv <= eps |g_i| ||W_{:,h}||_1,
    |d_weight_vh - exact| <= eps sum_i |g_i| |h_ih|,       |d_bias_v - exact| <= eps sum_i |g_i|
(d_bias is exact on the native backend, which sums it before any GEMM is skipped). "auto" is cut-cross-entropy's
finfo(dtype).eps / 32; tests/test_gradient_filter.py holds every backend to these bounds plus its rounding bound.

torch.compile: the work runs inside the custom operators nash_fast::sequence_logprobs and
nash_fast::sequence_logprobs_backward (torch.library, with fake implementations and a registered
autograd formula), so `torch.compile(fullgraph=True)` traces sequence_logprobs without a graph
break; the checks that need the values (label range, cu_seqlens order) run inside the operator.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import operator
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from nash_fast.capabilities import mm_fp32_output_works

__all__ = ["sequence_logprobs", "token_logprobs", "native_status", "native_cpu_isa", "resolve_filter_eps"]

# Largest [chunk x V]-shaped buffer the Triton backend allocates, in elements (its backward d_z slice).
# 2**26 bf16 = 128 MiB; with V = 128256 that is 523 tokens' worth.
MAX_CHUNK_ELEMENTS = 2**26
# The native backward keeps d_z for N x Vs elements (twice, in two layouts) in the input dtype on the AMX
# path, and for 2 N x Vs elements once in fp32 on the MKL path (csrc/cpu/sequence_logprobs_mkl.cpp,
# backward_mkl: a deeper d_hidden sgemm); Vs is at least 512 (csrc/cpu/common.h). Measured on AMX (1 thread): Vs = 512-1024 keeps the slice buffers in L2
# and beats 2048-4096 by 10-30% per backward phase.
NATIVE_CHUNK_ELEMENTS = 2**21
# The torch backend allocates several fp32 [chunk x V] temporaries, so its chunks are smaller.
TORCH_CHUNK_ELEMENTS = 2**22

BACKENDS = ("auto", "torch", "triton", "native")
_NATIVE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------- native library

_NATIVE: dict = {}


def native_status() -> tuple[bool, str]:
    """(True, "") when nash_fast._C (the C++ CPU kernels) is built for this torch and loaded, else (False, why)."""
    if "ok" not in _NATIVE:
        _NATIVE["ok"], _NATIVE["why"] = _load_native()
    return _NATIVE["ok"], _NATIVE["why"]


def _load_native() -> tuple[bool, str]:
    if os.environ.get("NASH_FAST_DISABLE_NATIVE") == "1":
        return False, "disabled by NASH_FAST_DISABLE_NATIVE=1"
    spec = importlib.util.find_spec("nash_fast._C")
    if spec is None or spec.origin is None:
        return False, "nash_fast._C is not built"
    info_path = Path(spec.origin).with_name("_C.json")
    try:
        built_for = json.loads(info_path.read_text())["torch"]
    except (OSError, ValueError, KeyError):
        return False, f"{info_path} (the build record of nash_fast._C) is missing or unreadable"
    if built_for != torch.__version__:
        return False, f"nash_fast._C was built for torch {built_for}, but torch {torch.__version__} is installed"
    try:
        importlib.import_module("nash_fast._C")
    except (ImportError, OSError) as exc:
        return False, f"nash_fast._C failed to load: {exc}"
    return True, ""


_BUILD_HINT = ("build it with `pip install -e .` from the repository (needs cmake and a C++17 compiler), "
               "or use backend='torch'")


def native_cpu_isa(dtype: torch.dtype = torch.bfloat16) -> str:
    """The CPU code path the native backend takes for inputs of `dtype`: vnni, avx512, avx2 or portable.

    vnni: 16-bit operands through oneDNN's brgemm, on AMX tiles where the CPU has AMX, else AVX512-BF16/FP16.

    NASH_FAST_CPU_ISA=avx512|avx2|portable forces a lower one (read on every call; "amx", vnni's former name,
    still reads as vnni)."""
    ok, why = native_status()
    if not ok:
        raise ValueError(f"the native backend is unavailable: {why}; {_BUILD_HINT}")
    return torch.ops.nash_fast.cpu_isa(dtype)


# ----------------------------------------------------------------------------- validation

# filter_eps's named values: a fraction of the compute dtype's machine epsilon (torch.finfo(dtype).eps).
#   "auto"  eps / 32   (cut-cross-entropy's "auto"): bf16 2^-12 = 2.44e-4, fp16 2^-15 = 3.05e-5, fp32 2^-28 = 3.7e-9
#   "high"  eps / 1024 (ours, 32x tighter):           bf16 2^-17 = 7.63e-6, fp16 2^-20 = 9.5e-7,  fp32 2^-33 = 1.2e-10
FILTER_EPS_NAMES = {"auto": 2.0**-5, "high": 2.0**-10}


def resolve_filter_eps(filter_eps, dtype: torch.dtype) -> Optional[float]:
    """The threshold filter_eps means for inputs of `dtype`: None (exact) for None or 0, a float in (0, 1)
    as given, or a named value (FILTER_EPS_NAMES) times torch.finfo(dtype).eps. Raises a one-line ValueError
    for anything else."""
    if filter_eps is None:
        return None
    if isinstance(filter_eps, str):
        if filter_eps not in FILTER_EPS_NAMES:
            raise ValueError(f"filter_eps must be None, {' or '.join(map(repr, FILTER_EPS_NAMES))} or a float in "
                             f"[0, 1), got {filter_eps!r}")
        return float(torch.finfo(dtype).eps * FILTER_EPS_NAMES[filter_eps])
    if isinstance(filter_eps, bool) or not isinstance(filter_eps, (int, float)):
        raise ValueError(f"filter_eps must be None, 'auto', 'high' or a float in [0, 1), got {filter_eps!r}")
    value = float(filter_eps)
    if not 0 <= value < 1:  # also NaN
        raise ValueError(f"filter_eps must be None, 'auto', 'high' or a float in [0, 1), got {filter_eps!r}")
    return value if value > 0 else None


_MATMUL_PRECISIONS = ("highest", "high", "medium")


@torch.compiler.assume_constant_result
def _global_matmul_precision() -> str:
    # Dynamo cannot trace this getter (a str-returning torch.* call); as a constant it is read when a graph is
    # traced and becomes an argument of the operators in it.
    return torch.get_float32_matmul_precision()


def _float32_matmul_precision(dtype: torch.dtype) -> str:
    """torch.get_float32_matmul_precision() for fp32 inputs ("highest" for others, which it does not concern): read
    on every eager call and passed to the operators as an argument; under torch.compile, read when the graph is
    traced, and a later change of precision retraces it (tests/test_gradient_filter.py)."""
    if dtype != torch.float32:
        return "highest"
    precision = _global_matmul_precision()
    return precision if precision in _MATMUL_PRECISIONS else "highest"


# float32's largest finite number and its smallest normal one (2^-126): the soft-cap's range (_effective_softcap).
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
# Label dtypes that convert to int64 exactly (uint64 has no CPU comparison kernels, and values >= 2^63 would wrap).
_LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16, torch.uint32)


def _validate_static(hidden, weight, labels, cu_seqlens, bias, softcap, backend, ignore_index=-100):
    """Checks that need no tensor values (safe inside torch.compile)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise ValueError("hidden must be a floating-point tensor")
    if (backend == "triton" and hidden.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1"):
        raise ValueError(
            f"backend='triton' needs CUDA tensors, but hidden is on {hidden.device}; use backend='torch' "
            "(or set TRITON_INTERPRET=1 before triton is imported to run the kernels on the CPU, slowly)"
        )
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
        if not isinstance(bias, torch.Tensor):
            raise ValueError(f"bias must be a [V] tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must match weight dtype/device ({weight.dtype}, {weight.device}), got ({bias.dtype}, {bias.device})")
    if softcap is not None:
        try:
            value = float(softcap)
        except (TypeError, ValueError):
            value = float("nan")
        # Beyond float32's range the cap has no fp32 value (it would round to inf: NaN logits on every path).
        if not 0 < value <= _FLOAT32_MAX:
            raise ValueError(f"softcap must be a positive finite number no larger than float32's largest "
                             f"({_FLOAT32_MAX:.4g}) or None, got {softcap}")
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {getattr(labels, 'dtype', type(labels))}")
    if labels.dtype not in _LABEL_DTYPES:
        raise ValueError(f"labels of dtype {labels.dtype} are not supported (values >= 2^63 would not convert to "
                         f"int64 exactly); use int64 labels")
    try:
        index = operator.index(ignore_index)
    except TypeError:
        index = None
    if isinstance(ignore_index, bool) or index is None or not -(2**63) <= index < 2**63:
        raise ValueError(f"ignore_index must be an integer in [-2**63, 2**63), got {ignore_index!r}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}")
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden is on {hidden.device}")
    if hidden.dim() == 3 and cu_seqlens is not None:
        raise ValueError("cu_seqlens must be None for padded [B, T, H] hidden (each row is one sequence)")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"cu_seqlens must be an int32 (or int64) tensor, got {getattr(cu_seqlens, 'dtype', type(cu_seqlens))}")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
        # Its values are read (the checks, the layout): on hidden's device, or a host copy (flash-attn style).
        if cu_seqlens.device != hidden.device and cu_seqlens.device.type != "cpu":
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device} "
                             "(it must be on hidden's device or the CPU)")


def _effective_softcap(softcap):
    """The cap the kernels compute with: softcap, or float32's smallest normal number 2^-126 for a smaller one.

    Every path computes s = c tanh(z / c) with an fp32 c (the native kernels as c and 1/c): a c under 2^-126
    would round to a subnormal (1/c = inf, NaN at z = 0) or to 0 (read as "no cap"). Capped logits lie in
    [-c, c], and c tanh(z / c) grows with c by less than |dc|, so 2^-126 moves each logit by under 2^-126:
    below float32's resolution at any log-probability but an exact 0 (V = 1, or all logits equal).
    """
    return None if softcap is None else max(float(softcap), _FLOAT32_TINY)


def _validate_values(labels, cu_seqlens, num_tokens, ignore_index, vocab):
    """Checks that read tensor values (inside the operator: one host sync each, never traced)."""
    if cu_seqlens is not None:
        cu = cu_seqlens.tolist()
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
        if cu[-1] != num_tokens:
            raise ValueError(f"cu_seqlens must end at N = {num_tokens} (tokens in hidden), got {cu[-1]}")
        if any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError("cu_seqlens must be non-decreasing")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = labels[bad].flatten()[0].item()
        raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}; found {first}")


# "auto" picks the native backend on CPU for every dtype it takes (_NATIVE_DTYPES): the fastest of ours for each.
# Measured (2 threads, AMX machine, N=4096 in 3 sequences, H=1024, V=32000, forward+backward, interleaved
# best of 3, bench/cpu_interleaved.py):
#   bf16: naive 1.98 s, torch 4.41 s, native 1.02 s   (AMX tiles)
#   fp16: naive 4.39 s, torch 5.34 s, native 4.82 s   (converted exactly to fp32: no fp16 matrix path here)
#   fp32: naive 4.11 s, torch 5.01 s, native 4.25 s   (MKL packed sgemm)
# fp16 / fp32 stay 3-20% behind naive run to run (fp32 1.20x in another run) when every token is scored:
# recompute makes the fused op 8NHV against naive's 6NHV, and the fp32 GEMMs already run at the sgemm peak
# (<= 1.33x naive when GEMMs dominate, less the passes naive makes over its [N, V] logits).


def _resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    device, dtype = hidden.device, hidden.dtype
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        if device.type == "cpu" and dtype in _NATIVE_DTYPES:
            ok, why = native_status()
            if ok:
                return "native"
            if not _NATIVE.get("warned"):
                _NATIVE["warned"] = True
                warnings.warn(f"nash_fast: native CPU kernels unavailable ({why}); using backend='torch', "
                              f"several times slower. To get them, {_BUILD_HINT.split(', or')[0]}.", stacklevel=3)
        return "torch"
    if backend == "native":
        ok, why = native_status()
        if not ok:
            raise ValueError(f"backend='native' is unavailable: {why}; {_BUILD_HINT}")
        if device.type != "cpu":
            raise ValueError(f"backend='native' runs on CPU tensors, but hidden is on {device}; use backend='triton' on GPUs")
        if dtype not in _NATIVE_DTYPES:
            raise ValueError(f"backend='native' takes float32, bfloat16 or float16 inputs, got {dtype}; use backend='torch'")
    return backend


# ----------------------------------------------------------------------------- torch backend

def _acc_dtype(dtype):
    """float32 for 16/32-bit inputs; float64 inputs keep float64 (exact gradchecks)."""
    return torch.promote_types(dtype, torch.float32)


def _in_acc_dtype(t):
    """t in the accumulation dtype when 16-bit products with fp32 output need an upcast copy here, else None.

    Logits are never rounded to a 16-bit dtype (the Triton kernels keep them in fp32 too): on CUDA the
    GEMM writes fp32 from bf16 operands; elsewhere the operand is upcast (one fp32 copy per call).
    """
    acc = _acc_dtype(t.dtype)
    if t.dtype == acc or mm_fp32_output_works(t.device, t.dtype):
        return None
    return t.to(acc)


def _workspace(n_elements, h):
    """One flat fp32 (accumulation dtype) buffer, reused by every chunk of a call: allocating and
    freeing a [chunk x V] temporary per chunk leaves glibc's heap fragmented on the CPU (measured:
    peak resident memory 2-6x the live buffers, varying run to run)."""
    return torch.empty(n_elements, device=h.device, dtype=_acc_dtype(h.dtype))


def _rows_by(buf, rows, cols):
    """A contiguous [rows, cols] view of the start of a flat workspace."""
    return buf[: rows * cols].view(rows, cols)


def _torch_logits(h, h_acc, w, w_acc, bias, softcap, out):
    """Capped logits h w^T (+ b) in the accumulation dtype, written into out (in place after that)."""
    acc = _acc_dtype(h.dtype)
    if h.dtype == acc:
        z = torch.mm(h, w.t(), out=out)
    elif w_acc is None:
        z = torch.mm(h, w.t(), out_dtype=acc)
    else:
        z = torch.mm(h_acc if h_acc is not None else h.to(acc), w_acc.t(), out=out)
    z = z.to(acc)  # a no-op, except under a caller's autocast
    if bias is not None:
        z += bias
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _torch_forward(hidden, weight, bias, labels, softcap, precision="highest"):
    """Token chunks: every row of a chunk sees the whole vocabulary.
        lse = m + log sum_j exp(s_j - m),  m = max_j s_j;   logp = s[label] - lse
    exp is taken in place on the chunk's logits after the target is gathered (no second buffer)."""
    N = hidden.shape[0]
    V = weight.shape[0]
    chunk = max(1, TORCH_CHUNK_ELEMENTS // V)
    logp = torch.empty(N, device=hidden.device, dtype=_acc_dtype(hidden.dtype))
    lse = torch.empty_like(logp)
    weight_acc = _in_acc_dtype(weight)
    logits = _workspace(min(N, chunk) * V, hidden)
    for start in range(0, N, chunk):
        end = min(N, start + chunk)
        s = _torch_logits(hidden[start:end], None, weight, weight_acc, bias, softcap,
                          _rows_by(logits, end - start, V))
        target = s.gather(1, labels[start:end, None]).squeeze(1)
        row_max = s.amax(dim=1)
        # An all -inf row (every logit -inf) would give nan from -inf - -inf; it gives lse = -inf.
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        torch.log(s.sub_(row_max[:, None]).exp_().sum(dim=1), out=lse[start:end])
        lse[start:end] += row_max
        torch.sub(target, lse[start:end], out=logp[start:end])
    return logp, lse


def _torch_backward(hidden, weight, bias, labels, softcap, lse, grad, filter_eps, precision, need_hidden, need_weight,
                    need_bias):
    """Vocabulary slices of Vs = TORCH_CHUNK_ELEMENTS // N entries, all tokens at once:
        d_z = g (onehot - exp(s - lse)) cap'      [N, Vs], s the recomputed capped logits
                                                  (filter_eps: each exp(s - lse) < filter_eps taken as 0)
        d_weight[slice] = d_z^T h                 written once
        d_hidden += d_z W[slice]                  accumulated in fp32
        d_bias[slice] = sum_i d_z
    On the CPU (no 16-bit GEMM with fp32 output) the products are exact fp32 ones against upcast
    operands; on CUDA d_z is rounded to the 16-bit input dtype for the tensor cores (as in Triton).
    The two [N, Vs] buffers (logits, d_z) are allocated once per call and reused by every slice.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    acc = _acc_dtype(hidden.dtype)
    vs = max(1, TORCH_CHUNK_ELEMENTS // max(N, 1))
    weight_acc = _in_acc_dtype(weight)
    hidden_acc = _in_acc_dtype(hidden)
    d_hidden = torch.zeros(N, H, device=hidden.device, dtype=acc) if need_hidden else None
    d_weight = torch.empty_like(weight) if need_weight else None
    d_bias = torch.empty(V, device=hidden.device, dtype=acc) if need_bias else None
    logits = _workspace(N * min(V, vs), hidden)
    d_logits = _workspace(N * min(V, vs), hidden)
    d_weight_acc = (_workspace(min(V, vs) * H, hidden)
                    if need_weight and weight_acc is not None and hidden.dtype != acc else None)
    rows = torch.arange(N, device=hidden.device)
    for v0 in range(0, V, vs):
        v1 = min(V, v0 + vs)
        w = weight[v0:v1]
        w_acc = None if weight_acc is None else weight_acc[v0:v1]
        s = _torch_logits(hidden, hidden_acc, w, w_acc, None if bias is None else bias[v0:v1], softcap,
                          _rows_by(logits, N, v1 - v0))
        dz = torch.sub(s, lse[:, None], out=_rows_by(d_logits, N, v1 - v0)).exp_()
        if filter_eps is not None:
            dz.masked_fill_(dz < filter_eps, 0.0)
        dz.neg_()
        local = labels - v0
        here = (local >= 0) & (local < v1 - v0)
        dz.index_put_((rows[here], local[here]), torch.ones((), device=dz.device, dtype=dz.dtype), accumulate=True)
        dz.mul_(grad[:, None])
        if softcap is not None:
            dz.mul_(s.div_(softcap).square_().neg_().add_(1.0))  # d cap(z) / dz = 1 - tanh^2
        del s
        if need_bias:
            torch.sum(dz, dim=0, out=d_bias[v0:v1])
        if hidden.dtype == acc:
            if need_weight:
                torch.mm(dz.t(), hidden, out=d_weight[v0:v1])
            if need_hidden:
                d_hidden.addmm_(dz, w)
        elif weight_acc is not None:  # CPU: exact fp32 products, d_z never rounded to 16 bits
            if need_weight:
                d_weight[v0:v1] = torch.mm(dz.t(), hidden_acc, out=_rows_by(d_weight_acc, v1 - v0, H))
            if need_hidden:
                d_hidden.addmm_(dz, w_acc)
        else:  # CUDA: 16-bit d_z into the tensor cores, fp32 outputs
            dz = dz.to(hidden.dtype)
            if need_weight:
                torch.mm(dz.t(), hidden, out=d_weight[v0:v1])
            if need_hidden:
                d_hidden += torch.mm(dz, w, out_dtype=acc)
    return (None if d_hidden is None else d_hidden.to(hidden.dtype), d_weight,
            None if d_bias is None else d_bias.to(weight.dtype))


# ----------------------------------------------------------------------------- backend table

def _native_forward(hidden, weight, bias, labels, softcap, precision="highest"):
    return torch.ops.nash_fast.token_logprobs_forward(hidden, weight, bias, labels, softcap, precision)


def _native_backward(hidden, weight, bias, labels, softcap, lse, grad, filter_eps, precision, need_hidden, need_weight,
                     need_bias):
    d_hidden, d_weight, d_bias = torch.ops.nash_fast.token_logprobs_backward(
        hidden, weight, bias, labels, softcap, lse, grad, need_hidden, need_weight, need_bias, NATIVE_CHUNK_ELEMENTS,
        filter_eps or 0.0, precision)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None)


def _triton_forward(hidden, weight, bias, labels, softcap, precision="highest"):
    # Imported on first use: importing Triton takes seconds and needs a GPU or TRITON_INTERPRET=1 to be useful.
    from nash_fast.kernels import sequence_logprobs as kern

    return kern.token_logprobs_forward(hidden, weight, bias, labels, softcap)


def _triton_backward(hidden, weight, bias, labels, softcap, lse, grad, filter_eps, precision, need_hidden, need_weight,
                     need_bias):
    from nash_fast.kernels import sequence_logprobs as kern

    d_hidden, d_weight, d_bias = kern.token_logprobs_backward(
        hidden, weight, bias, labels, softcap, lse, grad, MAX_CHUNK_ELEMENTS, need_hidden, need_weight, need_bias,
        filter_eps or 0.0)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None, d_bias if need_bias else None)


_TOKEN_KERNELS = {
    "torch": (_torch_forward, _torch_backward),
    "native": (_native_forward, _native_backward),
    "triton": (_triton_forward, _triton_backward),
}


# ----------------------------------------------------------------------------- operators

def _layout(hidden, cu_seqlens, num_rows):
    """(sequence id of every token [N], number of sequences S) for the three layouts of the operator."""
    N = hidden.shape[0]
    device = hidden.device
    if num_rows >= 0:  # num_rows consecutive rows of N / num_rows tokens
        per_row = N // num_rows if num_rows else 0
        return torch.arange(num_rows, device=device).repeat_interleave(per_row), num_rows
    if cu_seqlens is None:  # one sequence
        return torch.zeros(N, dtype=torch.long, device=device), 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(device=device, dtype=torch.long)
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths, output_size=N), lengths.numel()


@torch.library.custom_op("nash_fast::sequence_logprobs", mutates_args=())
def _sequence_logprobs_op(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], labels: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor], num_rows: int, ignore_index: int, average: bool,
    softcap: Optional[float], backend: str, filter_eps: Optional[float] = None, precision: str = "highest",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence log-probs [S], log-sum-exp of every token [N] (0 where ignored)) for [N, H] hidden."""
    _validate_values(labels, cu_seqlens, hidden.shape[0], ignore_index, weight.shape[0])
    seq_id, num_seqs = _layout(hidden, cu_seqlens, num_rows)
    scored = (labels != ignore_index).nonzero().squeeze(1)
    forward, _ = _TOKEN_KERNELS[backend]
    token_lp, token_lse = forward(hidden.index_select(0, scored).contiguous(), weight.contiguous(),
                                  None if bias is None else bias.contiguous(),
                                  labels.index_select(0, scored).long().contiguous(), softcap, precision)
    scored_seq = seq_id.index_select(0, scored)
    out = torch.zeros(num_seqs, device=hidden.device, dtype=token_lp.dtype).index_add_(0, scored_seq, token_lp)
    if average:
        out = out / torch.bincount(scored_seq, minlength=num_seqs).clamp_min(1)
    lse = torch.zeros(hidden.shape[0], device=hidden.device, dtype=token_lse.dtype).index_copy_(0, scored, token_lse)
    return out, lse


@_sequence_logprobs_op.register_fake
def _(hidden, weight, bias, labels, cu_seqlens, num_rows, ignore_index, average, softcap, backend, filter_eps=None,
      precision="highest"):
    num_seqs = num_rows if num_rows >= 0 else (1 if cu_seqlens is None else cu_seqlens.shape[0] - 1)
    dtype = _acc_dtype(hidden.dtype)
    return hidden.new_empty((num_seqs,), dtype=dtype), hidden.new_empty((hidden.shape[0],), dtype=dtype)


@torch.library.custom_op("nash_fast::sequence_logprobs_backward", mutates_args=())
def _sequence_logprobs_backward_op(
    grad: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, cu_seqlens: Optional[torch.Tensor], num_rows: int, ignore_index: int, average: bool,
    softcap: Optional[float], backend: str, filter_eps: Optional[float], precision: str, lse: torch.Tensor,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum_s grad_s logp_s w.r.t. hidden, weight and bias; an unneeded one is an empty tensor."""
    need_bias = need_bias and bias is not None
    seq_id, num_seqs = _layout(hidden, cu_seqlens, num_rows)
    scored = (labels != ignore_index).nonzero().squeeze(1)
    scored_seq = seq_id.index_select(0, scored)
    acc = _acc_dtype(hidden.dtype)
    g = grad.to(acc)
    if average:
        g = g / torch.bincount(scored_seq, minlength=num_seqs).clamp_min(1)
    token_grad = g.index_select(0, scored_seq).contiguous()
    _, backward = _TOKEN_KERNELS[backend]
    if scored.numel() == 0 or not (need_hidden or need_weight or need_bias):
        d_hidden_c = hidden.new_zeros((0, hidden.shape[1])) if need_hidden else None
        d_weight = torch.zeros_like(weight) if need_weight else None
        d_bias = torch.zeros_like(bias) if need_bias else None
    else:
        d_hidden_c, d_weight, d_bias = backward(
            hidden.index_select(0, scored).contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(),
            labels.index_select(0, scored).long().contiguous(), softcap, lse.index_select(0, scored).contiguous(),
            token_grad, filter_eps, precision, need_hidden, need_weight, need_bias)
    empty = lambda: hidden.new_empty((0,))  # noqa: E731 (outputs must not alias each other)
    d_hidden = empty()
    if need_hidden:
        d_hidden = torch.zeros_like(hidden).index_copy_(0, scored, d_hidden_c.to(hidden.dtype))
    return (d_hidden, d_weight.to(weight.dtype) if need_weight else empty(),
            d_bias.to(bias.dtype) if need_bias else empty())


@_sequence_logprobs_backward_op.register_fake
def _(grad, hidden, weight, bias, labels, cu_seqlens, num_rows, ignore_index, average, softcap, backend, filter_eps,
      precision, lse, need_hidden, need_weight, need_bias):
    empty = lambda: hidden.new_empty((0,))  # noqa: E731
    return (torch.empty_like(hidden) if need_hidden else empty(), torch.empty_like(weight) if need_weight else empty(),
            torch.empty_like(bias) if need_bias and bias is not None else empty())


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, cu_seqlens, num_rows, ignore_index, average, softcap, backend, filter_eps, precision = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, cu_seqlens, output[1])
    ctx.options = (num_rows, ignore_index, average, softcap, backend, filter_eps, precision)


def _backward(ctx, grad, _grad_lse):
    hidden, weight, bias, labels, cu_seqlens, lse = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    d_hidden, d_weight, d_bias = torch.ops.nash_fast.sequence_logprobs_backward(
        grad, hidden, weight, bias, labels, cu_seqlens, *ctx.options, lse, need_hidden, need_weight,
        need_bias and bias is not None)
    return (d_hidden if need_hidden else None, d_weight if need_weight else None,
            d_bias if need_bias and bias is not None else None, None, None, None, None, None, None, None, None, None)


torch.library.register_autograd("nash_fast::sequence_logprobs", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

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
    filter_eps: float | str | None = None,
) -> torch.Tensor:
    """Per-sequence log p(labels | hidden) under the LM head, without materializing logits.

    Args:
        hidden: [N, H] packed tokens (with `cu_seqlens`) or [B, T, H] padded rows (one sequence each).
        weight: LM-head weight [V, H] (same dtype and device as hidden).
        labels: [N] or [B, T] integer ids (int8 to int64, uint8 to uint32: compared by value, as int64);
            labels[i] is the token predicted at position i; `ignore_index` marks positions that are not scored.
        cu_seqlens: int32 [S + 1] boundaries of the packed sequences, 0 = cu[0] <= ... <= cu[S] = N
            (empty sequences allowed). None with [N, H] hidden means one sequence.
        average: divide each sequence's sum by its own count of scored tokens (0 if it has none).
        bias: optional LM-head bias [V].
        softcap: optional final-logit soft-cap c (Gemma-2): logits -> c * tanh(logits / c); 0 < c <= 3.4e38
            (float32's range); a c below 2^-126 is computed as 2^-126 (each logit moves by < 2^-126).
        backend: "auto" (triton on CUDA, native on CPU when built, torch otherwise), "triton",
            "native" or "torch".
        filter_eps: gradient filtering (the forward is never affected). None (default): exact gradients. A float
            eps in (0, 1) (0 = None), or "auto" = finfo(dtype).eps / 32 (bf16 2.44e-4, fp16 3.05e-5, fp32 3.7e-9)
            or "high" = finfo(dtype).eps / 1024 (bf16 7.6e-6): the backward drops d_z entries whose softmax
            value is below eps (never a label's on native/triton), so each gradient element moves by at most
            eps |g_i| ||W_{:,h}||_1 (d_hidden) or eps sum_i |g_i| |h_ih| (d_weight); see the module docstring.
            The native backend skips their GEMM work (bench/gradient_filter.py).

    The native backend reads torch.get_float32_matmul_precision() at call time: "medium" lets float32 inputs
    multiply as bf16 (each operand rounded once to bf16, fp32 accumulation) where the CPU has the bf16 vnni
    path; "highest" (the default) and "high" are exact fp32.

    Returns:
        [S] (packed) or [B] (padded), float32 (float64 for float64 inputs, so gradcheck is exact).
        Differentiable w.r.t. hidden, weight and bias; under torch.no_grad() nothing is saved.

    Under torch.autocast the op is the Linear LM head it replaces: float32 hidden / weight / bias are cast to the
    autocast dtype (float64 is left alone, as autocast does), and the op itself runs outside the autocast.
    """
    # (autocast exists for some device types only: asking about another, e.g. meta, is an error)
    if (isinstance(hidden, torch.Tensor) and torch.amp.is_autocast_available(hidden.device.type)
            and torch.is_autocast_enabled(hidden.device.type)):
        device_type = hidden.device.type
        cast = torch.get_autocast_dtype(device_type)
        hidden, weight, bias = (t.to(cast) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t
                                for t in (hidden, weight, bias))
        with torch.autocast(device_type, enabled=False):
            return sequence_logprobs(hidden, weight, labels, cu_seqlens=cu_seqlens, ignore_index=ignore_index,
                                     average=average, bias=bias, softcap=softcap, backend=backend,
                                     filter_eps=filter_eps)
    _validate_static(hidden, weight, labels, cu_seqlens, bias, softcap, backend, ignore_index)
    eps = resolve_filter_eps(filter_eps, hidden.dtype)
    backend = _resolve_backend(backend, hidden)
    H = hidden.shape[-1]
    num_rows = hidden.shape[0] if hidden.dim() == 3 else -1
    # Labels compare with ignore_index by value, in int64: a uint8 label 156 is class 156, not a wrapped -100.
    labels = labels.reshape(-1).to(torch.int64)
    # [labels.numel(), H], not [-1, H]: a zero-width (H = 0) hidden has no elements to infer -1 from.
    out, _ = torch.ops.nash_fast.sequence_logprobs(
        hidden.reshape(labels.shape[0], H), weight, bias, labels, cu_seqlens, num_rows, operator.index(ignore_index),
        bool(average), _effective_softcap(softcap), backend, eps, _float32_matmul_precision(hidden.dtype))
    return out


def token_logprobs(hidden, weight, labels, *, bias=None, softcap=None, backend="auto", filter_eps=None):
    """log p(labels[i] | hidden[i]) for [N, H] hidden and [N] labels that are all valid class ids.

    The building block of `sequence_logprobs` (each token its own sequence). Returns float32 [N]
    (float64 for float64 inputs); differentiable w.r.t. hidden, weight and bias.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(getattr(hidden, 'shape', ()))}")
    return sequence_logprobs(hidden[:, None, :], weight, labels.reshape(-1, 1), bias=bias, softcap=softcap,
                             ignore_index=-(2**62), backend=backend, filter_eps=filter_eps)
