"""Independent references that materialize the logits (for tests only)."""

import torch


def reference_sequence_logprobs(hidden, weight, labels, cu_seqlens=None, *, ignore_index=-100, average=False,
                                bias=None, softcap=None, dtype=torch.float64):
    """Plain PyTorch in `dtype`: logits = hidden @ weight.T (+ bias), log_softmax, gather, per-sequence sum.

    dtype=float64 is the ground truth; dtype=hidden.dtype is the "plain same-dtype implementation"
    whose error sets the tolerance.
    """
    h = hidden.reshape(-1, hidden.shape[-1]).to(dtype)
    w = weight.to(dtype)
    logits = h @ w.t()
    if bias is not None:
        logits = logits + bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    y = labels.reshape(-1)
    valid = y != ignore_index
    tok = torch.where(valid, logp.gather(1, y.clamp(min=0)[:, None]).squeeze(1), torch.zeros((), dtype=dtype))
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
