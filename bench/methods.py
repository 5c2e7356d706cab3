"""The per-sequence log-prob implementations under comparison, one function each.

Every method maps LogprobInputs to float32 per-sequence log-probs [S] (sum over scored tokens of
log p(label | hidden)), differentiable w.r.t. hidden and weight. Peers are imported lazily:
`load(name)` returns (fn, None) or (None, reason) so that a missing or broken peer becomes a
"skipped" row with its reason instead of disappearing.

  naive        logits = h @ W.T, log_softmax in fp32, gather, per-sequence sum (what TRL does)
  compile      torch.compile of naive
  liger        Liger-Kernel LigerFusedLinearCrossEntropyLoss(reduction="none") -> per-token
               losses -> per-sequence sums
  cce          cut-cross-entropy linear_cross_entropy(reduction="none") with its default gradient
               filtering (filter_eps="high"), then per-sequence sums
  cce_exact    the same with filter_eps=None (no gradient filtering: exact gradients)
  ours_triton  nash_fast.sequence_logprobs(backend="triton")
  ours_torch   nash_fast.sequence_logprobs(backend="torch")
  ours_native  nash_fast.sequence_logprobs(backend="native"): the C++ CPU kernels (csrc/)
"""

from __future__ import annotations

import torch

from common import IGNORE_INDEX, LogprobInputs, set_repo_on_path

METHODS = ("naive", "compile", "liger", "cce", "cce_exact", "ours_triton", "ours_torch", "ours_native")


def per_sequence_sum(token_values: torch.Tensor, inp: LogprobInputs) -> torch.Tensor:
    out = torch.zeros(inp.num_seqs, device=token_values.device, dtype=torch.float32)
    return out.index_add(0, inp.seq_id, token_values.float())


def naive_logprobs(hidden, weight, labels, seq_id, num_seqs: int, softcap):
    logits = (hidden @ weight.T).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    logp = torch.log_softmax(logits, dim=-1)
    valid = labels != IGNORE_INDEX
    tok = logp.gather(1, labels.clamp_min(0)[:, None]).squeeze(1)
    tok = torch.where(valid, tok, torch.zeros_like(tok))
    return torch.zeros(num_seqs, device=hidden.device, dtype=torch.float32).index_add(0, seq_id, tok)


def _naive(inp: LogprobInputs):
    return naive_logprobs(inp.hidden, inp.weight, inp.labels, inp.seq_id, inp.num_seqs, inp.softcap)


_compiled = None


def _compile(inp: LogprobInputs):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive_logprobs)
    return _compiled(inp.hidden, inp.weight, inp.labels, inp.seq_id, inp.num_seqs, inp.softcap)


def _load_liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    cache = {}

    def fn(inp: LogprobInputs):
        key = inp.softcap
        if key not in cache:
            kwargs = dict(reduction="none", ignore_index=IGNORE_INDEX)
            if inp.softcap is not None:
                kwargs["softcap"] = inp.softcap
            cache[key] = LigerFusedLinearCrossEntropyLoss(**kwargs)
        out = cache[key](inp.weight, inp.hidden, inp.labels)
        # Versions differ: a tensor, a (loss, z_loss) tuple, or a CrossEntropyOutput.
        if hasattr(out, "loss"):
            out = out.loss
        elif isinstance(out, tuple):
            out = out[0]
        return -per_sequence_sum(out, inp)

    return fn


def _load_cce(filter_eps):
    from cut_cross_entropy import linear_cross_entropy

    def fn(inp: LogprobInputs):
        kwargs = dict(ignore_index=IGNORE_INDEX, softcap=inp.softcap, reduction="none")
        if filter_eps != "default":
            kwargs["filter_eps"] = filter_eps
        tok_loss = linear_cross_entropy(inp.hidden, inp.weight, inp.labels, **kwargs)
        return -per_sequence_sum(tok_loss, inp)

    return fn


def _load_ours(backend):
    set_repo_on_path()
    from nash_fast import sequence_logprobs

    def fn(inp: LogprobInputs):
        return sequence_logprobs(inp.hidden, inp.weight, inp.labels, cu_seqlens=inp.cu_seqlens,
                                 ignore_index=IGNORE_INDEX, softcap=inp.softcap, backend=backend)

    return fn


def _triton_usable(device: torch.device, quick: bool = True):
    """Triton kernels need a GPU, or TRITON_INTERPRET=1 on CPU (a debugging interpreter: only --quick
    runs them there; timing it at real shapes would measure the interpreter, not the kernels)."""
    import os

    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need CUDA or TRITON_INTERPRET=1 on CPU"
    if not quick:
        return "Triton kernels have no CPU backend: the interpreter (TRITON_INTERPRET=1) only runs with --quick"
    return None


def _native_usable(device: torch.device):
    set_repo_on_path()
    from nash_fast.logprobs import native_status

    if device.type != "cpu":
        return "the native backend runs on CPUs (nash_fast._C)"
    ok, why = native_status()
    return None if ok else why


def load(name: str, device: torch.device, quick: bool = True):
    """(fn, None) when the method can run here, else (None, reason)."""
    try:
        if name == "naive":
            return _naive, None
        if name == "compile":
            return _compile, None
        if name == "liger":
            reason = _triton_usable(device, quick)
            return (None, "liger-kernel: " + reason) if reason else (_load_liger(), None)
        if name in ("cce", "cce_exact"):
            if device.type != "cuda":
                # Checked with cut-cross-entropy 25.1.1: its kernels fail under TRITON_INTERPRET=1
                # (InterpreterError on a None pointer argument), and its torch_compile fallback is a
                # different algorithm, so on CPU there is nothing faithful to measure.
                return None, "cut-cross-entropy: its Triton kernels need CUDA (they fail under TRITON_INTERPRET=1)"
            return _load_cce("default" if name == "cce" else None), None
        if name == "ours_triton":
            reason = _triton_usable(device, quick)
            return (None, reason) if reason else (_load_ours("triton"), None)
        if name == "ours_torch":
            return _load_ours("torch"), None
        if name == "ours_native":
            reason = _native_usable(device)
            return (None, reason) if reason else (_load_ours("native"), None)
    except Exception as exc:  # noqa: BLE001 -- any import failure of a peer is a reported skip
        return None, f"import failed: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    raise ValueError(f"unknown method {name!r}; choose from {METHODS}")
