"""Independent references that materialize the logits, and the error bounds they are held to (tests only)."""

import math

import torch

# Unit roundoff u = 2^-p of round-to-nearest with p significand bits.
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Half the spacing of subnormals: the absolute error of rounding a value below the normal range.
UNDERFLOW = {torch.float64: 2.0**-1075, torch.float32: 2.0**-150, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


def _layout(hidden, labels, cu_seqlens, ignore_index):
    """Flat [N, H] hidden and labels, the sequence of every token, the number of sequences, the scored mask."""
    y = labels.reshape(-1).long()  # compared with ignore_index by value (a uint8 156 is not a wrapped -100)
    h = hidden.reshape(y.shape[0], hidden.shape[-1])  # not (-1, H): H may be 0
    if hidden.dim() == 3:
        B, T = labels.shape
        seq = torch.arange(B).repeat_interleave(T)
        num_seqs = B
    else:
        cu = [0, h.shape[0]] if cu_seqlens is None else cu_seqlens.tolist()
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor(cu[1:]) - torch.tensor(cu[:-1]))
        num_seqs = len(cu) - 1
    return h, y, seq, num_seqs, (y != ignore_index).cpu()


def reference_sequence_logprobs(hidden, weight, labels, cu_seqlens=None, *, ignore_index=-100, average=False,
                                bias=None, softcap=None, dtype=torch.float64):
    """Plain PyTorch in `dtype`: logits = hidden @ weight.T (+ bias), log_softmax, gather, per-sequence sum.

    dtype=float64 is the ground truth; dtype=hidden.dtype is the "plain same-dtype implementation".
    Logits are formed for the scored positions only: an unscored position's exact gradient is 0, which a dense
    backward through its logits would compute as 0 x NaN = NaN when they are all -inf (a masked vocabulary).
    """
    y = labels.reshape(-1).long()
    valid = y != ignore_index
    scored = valid.nonzero().squeeze(1)
    h = hidden.reshape(labels.numel(), hidden.shape[-1]).to(dtype)  # not (-1, H): H may be 0
    w = weight.to(dtype)
    logits = h.index_select(0, scored) @ w.t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    tok = torch.zeros(y.shape[0], dtype=dtype, device=h.device).index_copy(0, scored, logp.gather(1, y[scored][:, None]).squeeze(1))
    if hidden.dim() == 3:
        B, T = labels.shape
        bounds = [(b * T, (b + 1) * T) for b in range(B)]
    else:
        cu = [0, h.shape[0]] if cu_seqlens is None else cu_seqlens.tolist()
        bounds = list(zip(cu[:-1], cu[1:]))
    out = []
    for a, b in bounds:
        s = tok[a:b].to(torch.float64).sum() if b > a else torch.zeros((), dtype=torch.float64)
        if average:
            s = s / max(int(valid[a:b].sum()), 1)
        out.append(s)
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64)


@torch.no_grad()
def rounding_error_bounds(hidden, weight, labels, cu_seqlens, upstream, *, ignore_index=-100, average=False,
                          bias=None, softcap=None, dz_rounded=False, truncating_accumulation=False,
                          reduced_precision_reduction=False, flushes_subnormals=False):
    """Elementwise bounds on |computed - exact| for sequence_logprobs and its gradients.

    Derived from the roundings the fused paths perform on inputs of hidden.dtype; `exact` is the
    float64 reference on the same (already rounded) inputs. First-order in the unit roundoffs
    u = 2^-24 (fp32 arithmetic) and u_io (rounding an fp32 value to the input dtype: 2^-8 bf16,
    2^-11 fp16, 0 for fp32 inputs, whose fp32 results are not rounded again; each such rounding also
    adds eta, half the subnormal spacing: 2^-25 for fp16, whose subnormals start at 6e-5); the caller multiplies
    by 2 for the second-order terms and the float64 reference's own error (2^-53 relative).
    gamma(n) = n u / (1 - n u) bounds a sum of n terms in any order, products included (Higham 3.1).

    Path options (which roundings the path performs):
      dz_rounded     d_z is rounded to the 16-bit input dtype before the d_hidden / d_weight GEMMs
                     (GPU paths, for the tensor cores; the native `vnni` path, for the matrix units).
                     The other CPU paths keep d_z in fp32.
      truncating_accumulation   the GEMMs' fp32 accumulation may truncate instead of rounding
                     (tensor cores, Fasi et al. 2021; AMX tiles, whose FTZ/pairwise sums the SDM does
                     not pin to round-to-nearest): 2u per addition.
      reduced_precision_reduction   16-bit GEMMs may reduce split-K partials in 16 bits (cuBLAS) or a
                     slice's product may be rounded to 16 bits before the fp32 sum: 2 u_io sum|terms|
                     more for d_hidden and d_weight.

    Forward, per scored token i and vocabulary entry v (A_iv = sum_k |h_ik W_vk| + |b_v|):
      logit        dS = gamma(a (H + 1)) A                        fp32 dot of H terms, + bias; a = 2 if truncating
      soft-cap     dS += 32 u |s| + 2^-149 c (1 + |z|)            c tanh(z / c): 1/c and z/c (or z / c), a tanh of
                                                                  <= 4 ulp relative, x c; Lipschitz 1 in z. 1/c and
                                                                  z/c may be subnormal (c near 3.4e38): each such
                                                                  rounding is off by <= 2^-150 absolute, times c
                                                                  (and |z| for 1/c); 2^-126 each where the path
                                                                  flushes subnormals to 0 (flushes_subnormals: GPUs)
      lse          dLSE = max_v dS + u (4V + 32 + 16 ln V + 4R + 4|lse|),  R = max_v |s - lse|:
                   two levels (tiles, then their partial LSEs), each: V exps of (s - m) with <= 4 ulp (8u)
                   plus the subtraction (u R), a sum gamma(V), a log (8u ln V absolute), + m (u |lse|)
      token        dTok = dS[y] + dLSE + u |tok|                  target - lse
      sequence     sum_i dTok + gamma(n) sum_i |tok|              fp32 index_add of its n tokens
      average      (that) / n + u |logp|                          one division
    Backward (g_i = upstream of i's sequence, / n with average: dG = u |g|):
      p            dP = p expm1(dS + dLSE + u |s - lse| + 8u)     exp(s - lse)
      d_z          dz = g (onehot - p) cap',  cap' = 1 - (s/c)^2 (1 without soft-cap):
                   dDZ = |g| |q| dCap + |g| |cap'| (dP + u |q|) + dG |q| |cap'| + 3u |dz|,
                   dCap = 2 |t| dS / c + 6u  (t = s/c: a multiply, a square, a subtraction)
      rounded d_z  dDZq = dDZ + u_io (|dz| + dDZ)                 only with dz_rounded
      d_bias       sum_i dDZ + gamma(N) sum_i |dz|, then u_io (|d_bias| + that)   fp32 sum of unrounded d_z
      d_hidden     dDZq @ |W| + (gamma(a V) + r) |dz| @ |W|, then u_io (|d_hidden| + that)
      d_weight     dDZq^T @ |h| + (gamma(a N) + r) |dz|^T @ |h|, then u_io (|d_weight| + that)
                   (r = 2 u_io with reduced_precision_reduction, else 0)
    Positions that are not scored get bound 0 (their gradient is exactly zero).
    Returns dict(forward [S], d_hidden (hidden's shape), d_weight [V, H], d_bias [V] or None), and for the scored
    tokens (mask `scored` [N_all], labels `scored_labels`) the exact softmax p [n, V], its error bound dP,
    g [n] and cap' [n, V].
    """
    u = 2.0**-24
    dtype = hidden.dtype
    u_io = 0.0 if dtype in (torch.float32, torch.float64) else UNIT_ROUNDOFF[dtype]
    eta = 0.0 if u_io == 0.0 else UNDERFLOW[dtype]  # each rounding to the input dtype: u_io |x| + eta
    a = 2.0 if truncating_accumulation else 1.0
    r = 2 * u_io if reduced_precision_reduction else 0.0

    def gamma(n):
        return n * u / (1 - n * u)

    def io(x):  # u_io x: the final rounding to the input dtype (none for fp32: 0, even where a vacuous x is inf)
        return u_io * x if u_io else torch.zeros_like(x)

    h_all, y_all, seq_all, num_seqs, scored = _layout(hidden.detach().cpu().double(), labels.cpu(), cu_seqlens, ignore_index)
    h, y, seq = h_all[scored], y_all[scored], seq_all[scored]
    W = weight.detach().cpu().double()
    b = None if bias is None else bias.detach().cpu().double()
    N, H = h.shape
    V = W.shape[0]

    A = h.abs() @ W.abs().t()
    z = h @ W.t()
    if b is not None:
        A = A + b.abs()
        z = z + b
    # Masked entries (z = -inf: a -inf bias, or a -inf weight against a positive hidden value) come out of
    # every path exactly: -inf (IEEE sums and products), exp(-inf - finite shift) = 0, c tanh(-inf) = -c.
    # They get no dot-product term, and add exactly 0 to every sum of exponentials.
    masked = z == float("-inf")
    A = A.masked_fill(masked, 0.0)
    dS = gamma(a * (H + 1)) * A
    if softcap is not None:
        s = softcap * torch.tanh(z / softcap)
        # A cap under float32's smallest normal number is computed as 2^-126 (nash_fast.logprobs._effective_softcap):
        # c tanh(z / c) changes by less than |dc| when c does, so each logit moves by at most 2^-126 - c.
        tiny = 2.0**-125 if flushes_subnormals else 2.0**-149  # two roundings of <= 2^-126 or 2^-150 each
        dS = dS + 32 * u * s.abs() + tiny * softcap * (1 + z.abs().masked_fill(masked, 0.0)) + max(2.0**-126 - softcap, 0.0)
    else:
        s = z
    lse = torch.logsumexp(s, dim=1) if N else torch.zeros(0, dtype=torch.float64)
    # R over the entries that are not -inf (the others' exponentials are exactly 0, whatever their distance).
    R = (s - lse[:, None]).abs().masked_fill(s == float("-inf"), 0.0).amax(1) if N else lse
    dLSE = (dS.amax(1) if N else lse) + u * (4 * V + 32 + 16 * math.log(V) + 4 * R + 4 * lse.abs())
    rows = torch.arange(N)
    tok = s[rows, y] - lse
    dTok = dS[rows, y] + dLSE + u * tok.abs()

    counts = torch.bincount(seq, minlength=num_seqs).double()
    fwd = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq, dTok)
    fwd += gamma(counts) * torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq, tok.abs())
    if average:
        logp = torch.zeros(num_seqs, dtype=torch.float64).index_add(0, seq, tok) / counts.clamp_min(1)
        fwd = fwd / counts.clamp_min(1) + u * logp.abs()

    G = upstream.detach().cpu().double()
    g = G[seq] / counts[seq] if average else G[seq]
    dG = u * g.abs() if average else torch.zeros_like(g)
    p = torch.exp(s - lse[:, None])
    # p = 0 exactly where s = -inf (its relative error term would be 0 x inf).
    dP = torch.where(s == float("-inf"), 0.0, p * torch.expm1(dS + dLSE[:, None] + u * (s - lse[:, None]).abs() + 8 * u))
    q = -p
    q[rows, y] += 1.0
    if softcap is not None:
        t = s / softcap
        cap = 1 - t * t
        dCap = 2 * t.abs() * dS / softcap + 6 * u
    else:
        cap = torch.ones_like(s)
        dCap = torch.zeros_like(s)
    dz = g[:, None] * q * cap
    dDZ = (g.abs()[:, None] * q.abs() * dCap + g.abs()[:, None] * cap.abs() * (dP + u * q.abs())
           + dG[:, None] * q.abs() * cap.abs() + 3 * u * dz.abs())
    dDZq = dDZ + io(dz.abs() + dDZ) + eta if dz_rounded else dDZ

    d_bias = None
    if b is not None:
        err = dDZ.sum(0) + gamma(N) * dz.abs().sum(0)
        d_bias = err + io((dz.sum(0)).abs() + err) + eta
    err = dDZq @ W.abs() + (gamma(a * V) + r) * (dz.abs() @ W.abs())
    dh_scored = err + io((dz @ W).abs() + err) + eta
    d_hidden = torch.zeros_like(h_all)
    d_hidden[scored] = dh_scored
    err = dDZq.t() @ h.abs() + (gamma(a * N) + r) * (dz.abs().t() @ h.abs())
    d_weight = err + io((dz.t() @ h).abs() + err) + eta
    # A NaN bound is 0 x inf: a vacuous (infinite) error term times an exact zero factor, e.g. cap' = 0 against
    # dP = inf when the soft-cap term 32 u c is huge. The second-order terms make that product unbounded, not 0.
    vacuous = lambda x: None if x is None else torch.nan_to_num(x, nan=float("inf"))  # noqa: E731
    # The exact softmax of the scored tokens, its bound dP for the computed one, the token gradients g and cap':
    # what a caller needs to bound the gradient filter's dropped entries (tests/test_gradient_filter.py).
    return dict(forward=vacuous(fwd), d_hidden=vacuous(d_hidden.reshape(hidden.shape)), d_weight=vacuous(d_weight),
                d_bias=vacuous(d_bias), softmax=p, softmax_error=vacuous(dP), token_grad=g, cap=cap, scored=scored,
                scored_labels=y)
