"""Group "loss": preference losses straight from final hidden states, forward + backward.

The batch is P pairs = 2P sequences of equal length T = N / 2P (chosen rows first), so the same
tensors serve the packed layout (ours, TRL path) and Liger's padded [2P, T, H] layout without any
padding. The reference (and INPO's previous-iterate) log-probs are precomputed per pair, as in
self-play training where they are computed once per iteration; the timed step is the policy's
forward + backward through the loss.

  ours_sppo / ours_inpo / ours_ipo   nash_fast.FusedLinearPreferenceLoss (packed layout, backend auto)
  trl_sppo / trl_inpo / trl_ipo      TRL's path: logits = h @ W.T materialized, log_softmax (fp32),
                                     gather, per-sequence sum, then the loss formula written out
                                     (TRL's sppo_hard / ipo; INPO's from its paper)
  liger_dpo / liger_sppo_hard        Liger-Kernel LigerFusedLinearDPOLoss (chunked, torch.compile'd),
                                     loss_type sigmoid / sppo_hard, use_ref_model=False (Liger takes
                                     a reference model's hidden states, not precomputed log-probs;
                                     without it the reference term is 0 and its cost is not counted)

IPO uses per-token averaged log-probs (each sequence's own scored-token count), like TRL's ipo.
Errors: the loss and the gradients of hidden and weight against float64 (the loss formula applied
to float64 per-sequence log-probs; gradients through the chunked float64 reference).
FLOPs: 8 n_scored H V.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from common import (
    IGNORE_INDEX, PeakMemory, available_gib, free_memory, grad_rel_err, is_oom, make_inputs, max_rel_err,
    reference_logprobs, set_repo_on_path, short_error, sync, time_call,
)
from methods import naive_logprobs

LOSS_METHODS = ("ours_sppo", "ours_inpo", "ours_ipo", "trl_sppo", "trl_inpo", "trl_ipo", "liger_dpo", "liger_sppo_hard")
BETA = 0.1            # dpo / ipo / Liger; SPPO's eta = 1 / BETA (TRL's sppo_hard convention)
INPO_ETA, INPO_TAU = 10.0, 2.0
SEQ_LEN = 512         # tokens per sequence of the loss batch (32 at --quick)


def loss_formula(kind: str, lp: torch.Tensor, ctx: dict) -> torch.Tensor:
    """Mean over pairs of the per-pair loss, on per-sequence log-probs lp [2P] (chosen first)."""
    P = lp.shape[0] // 2
    pw, pl = lp[:P], lp[P:]
    rw, rl = ctx["ref_w"].to(lp.dtype), ctx["ref_l"].to(lp.dtype)
    if kind == "sppo":  # SPPO eq. 4.8 (TRL sppo_hard when winrate = 1)
        eta, p = 1.0 / BETA, ctx["winrate"].to(lp.dtype)
        return ((pw - rw - eta * (p - 0.5)) ** 2 + (pl - rl - eta * (0.5 - p)) ** 2).mean()
    if kind == "inpo":  # INPO eq. 8
        qw, ql = ctx["prev_w"].to(lp.dtype), ctx["prev_l"].to(lp.dtype)
        h = (pw - pl) - (INPO_TAU / INPO_ETA) * (rw - rl) - ((INPO_ETA - INPO_TAU) / INPO_ETA) * (qw - ql)
        return ((h - 1.0 / (2 * INPO_ETA)) ** 2).mean()
    if kind == "ipo":  # Azar et al.; TRL's ipo
        return (((pw - rw) - (pl - rl) - 1.0 / (2 * BETA)) ** 2).mean()
    if kind == "dpo_noref":  # Liger sigmoid, use_ref_model=False
        return -F.logsigmoid(BETA * (pw - pl)).mean()
    if kind == "sppo_hard_noref":  # Liger sppo_hard, use_ref_model=False
        return ((pw - 0.5 / BETA) ** 2 + (pl + 0.5 / BETA) ** 2).mean()
    raise ValueError(kind)


def _kind(method: str) -> str:
    return {"liger_dpo": "dpo_noref", "liger_sppo_hard": "sppo_hard_noref"}.get(method, method.split("_", 1)[1])


def _average(method: str) -> bool:
    return _kind(method) == "ipo"


def load(method: str, device):
    """(fn(view, ctx) -> scalar loss, None) or (None, reason)."""
    kind = _kind(method)
    try:
        if method.startswith("ours_"):
            set_repo_on_path()
            from nash_fast import FusedLinearPreferenceLoss

            hyper = {"sppo": dict(beta=BETA), "inpo": dict(eta=INPO_ETA, tau=INPO_TAU),
                     "ipo": dict(beta=BETA, average_log_prob=True)}[kind]
            modules = {}

            def fn(v, ctx):
                if v.softcap not in modules:
                    modules[v.softcap] = FusedLinearPreferenceLoss(kind, softcap=v.softcap, **hyper)
                module = modules[v.softcap]
                extra = {"sppo": dict(winrate=ctx["winrate"]),
                         "inpo": dict(prev_chosen_logps=ctx["prev_w"], prev_rejected_logps=ctx["prev_l"]),
                         "ipo": {}}[kind]
                loss, _metrics = module(v.weight, v.hidden, v.labels, cu_seqlens=v.cu_seqlens, role=ctx["role"],
                                        pair_index=ctx["pair_index"], ref_chosen_logps=ctx["ref_w"],
                                        ref_rejected_logps=ctx["ref_l"], **extra)
                return loss

            return fn, None
        if method.startswith("trl_"):
            def fn(v, ctx):
                lp = naive_logprobs(v.hidden, v.weight, v.labels, v.seq_id, v.num_seqs, v.softcap)
                if _average(method):
                    lp = lp / ctx["counts"]
                return loss_formula(kind, lp, ctx)

            return fn, None
        if method.startswith("liger_"):
            import os

            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                return None, "liger-kernel needs CUDA"
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            loss_type = "sigmoid" if method == "liger_dpo" else "sppo_hard"
            module = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=False,
                                             loss_type=loss_type)

            def fn(v, ctx):
                if v.softcap is not None:
                    raise NotImplementedError("LigerFusedLinearDPOLoss has no final-logit soft-cap")
                rows = 2 * ctx["pairs"]
                out = module(v.weight, v.hidden.view(rows, -1, v.hidden.shape[-1]), v.labels.view(rows, -1))
                return out[0] if isinstance(out, tuple) else out

            return fn, None
    except Exception as exc:  # noqa: BLE001 -- a peer that cannot load is a reported skip
        return None, f"import failed: {type(exc).__name__}: {exc}".replace("\n", " ")[:300]
    raise ValueError(f"unknown loss method {method!r}; choose from {LOSS_METHODS}")


def make_context(inp, P: int, device, seed: int) -> dict:
    gen = torch.Generator(device="cpu").manual_seed(seed + 3)
    counts = torch.bincount(inp.seq_id[inp.labels != IGNORE_INDEX], minlength=inp.num_seqs).clamp_min(1)
    # Reference / previous-iterate log-probs near the policy's (a policy a few steps from them).
    lp64 = reference_logprobs(inp)[0]
    base = lp64.float().cpu()
    ref = base + torch.randn(2 * P, generator=gen) * 2.0
    prev = base + torch.randn(2 * P, generator=gen) * 1.0
    ctx = dict(
        pairs=P,
        ref_w=ref[:P], ref_l=ref[P:], prev_w=prev[:P], prev_l=prev[P:],
        winrate=torch.rand(P, generator=gen) * 0.8 + 0.1,
        role=torch.cat([torch.zeros(P), torch.ones(P)]).long(),
        pair_index=torch.cat([torch.arange(P), torch.arange(P)]),
        counts=counts.float(),
    )
    ctx = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in ctx.items()}
    ctx["lp64"] = lp64
    return ctx


def reference(kind: str, inp, ctx: dict, average: bool):
    """float64 loss and the float32 reference gradients of hidden and weight."""
    lp = ctx["lp64"].detach().clone().requires_grad_(True)
    counts = ctx["counts"].double()
    value = loss_formula(kind, lp / counts if average else lp, ctx)
    (d_lp,) = torch.autograd.grad(value, lp)
    _, d_h, d_w = reference_logprobs(inp, d_lp)
    return value.detach(), d_h, d_w


def run(args, device, dtype, log, peak_tflops: float, deadline, shapes: dict, ns, methods):
    methods = methods or list(LOSS_METHODS)
    for m in methods:
        if m not in LOSS_METHODS:
            raise SystemExit(f"--loss-methods: unknown method {m!r}; choose from {LOSS_METHODS}")
    seq_len = 32 if args.quick else SEQ_LEN
    for shape_name, (H, V, softcap) in shapes.items():
        for N in ns:
            P = max(1, N // (2 * seq_len))
            T = N // (2 * P)
            n_used = 2 * P * T
            base = dict(shape=shape_name, H=H, V=V, N=n_used, n_seqs=2 * P, dtype=args.dtype, mode="fwd_bwd",
                        matmul_peak_tflops=peak_tflops, notes=f"{P} pairs x 2 x {T} tokens")
            if deadline.passed():
                for m in methods:
                    log.write("loss", method=m, status="skipped", reason=deadline.reason(), **base)
                continue
            try:
                inp = make_inputs(n_used, H, V, softcap, dtype, device, seed=args.seed, lengths=[T] * (2 * P))
                ctx = make_context(inp, P, device, args.seed)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                free_memory(device)
                for m in methods:
                    log.write("loss", method=m, status="skipped", reason=f"inputs do not fit: {short_error(exc)}", **base)
                continue
            base["n_scored"] = inp.n_scored
            refs = {}
            for method in methods:
                row = dict(base, method=method)
                fn, reason = load(method, device)
                if reason is not None:
                    log.write("loss", status="skipped", reason=reason, **row)
                    continue
                if deadline.passed():
                    log.write("loss", status="skipped", reason=deadline.reason(), **row)
                    continue
                if method.startswith("trl_"):
                    need = 16 * n_used * V / 2**30
                    have = available_gib(device)
                    if need > 0.95 * have:
                        log.write("loss", status="skipped",
                                  reason=f"would need ~{need:.1f} GiB for [N x V] logit buffers; {have:.1f} GiB free", **row)
                        continue
                try:
                    key = (_kind(method), _average(method))
                    if key not in refs:
                        refs[key] = reference(key[0], inp, ctx, key[1])
                    res = _run_case(fn, inp, ctx, refs[key], device, args.quick)
                except Exception as exc:  # noqa: BLE001 -- one failing case must not end the run
                    oom = is_oom(exc)
                    free_memory(device)
                    log.write("loss", status="skipped" if oom else "error",
                              reason=("out of memory: " if oom else "") + short_error(exc), **row)
                    continue
                tflops = 8 * inp.n_scored * H * V / (res["ms_median"] * 1e-3) / 1e12
                log.write("loss", status="ok", tflops=tflops, peak_fraction=tflops / peak_tflops,
                          tokens_per_s=n_used / (res["ms_median"] * 1e-3), **row, **res)
                free_memory(device)
            del inp, ctx, refs
            free_memory(device)


def _run_case(fn, inp, ctx, ref, device, quick: bool) -> dict:
    ref_loss, ref_dh, ref_dw = ref
    h = inp.hidden.detach().requires_grad_(True)
    w = inp.weight.detach().requires_grad_(True)
    view = dataclasses.replace(inp, hidden=h, weight=w)

    def call():
        fn(view, ctx).backward()

    call()  # warm-up: compile, autotune
    h.grad = w.grad = None
    sync(device)
    free_memory(device)
    with PeakMemory(device) as mem:
        loss = fn(view, ctx)
        loss.backward()
    loss = loss.detach().reshape(())
    if not torch.isfinite(loss):
        raise RuntimeError(f"non-finite loss {loss.item()}")
    if h.grad is None or w.grad is None:
        raise RuntimeError("backward produced no gradient for hidden or weight")
    res = {"mem_peak_gib": mem.gib}
    res["err_out_abs"], res["err_out_rel"] = max_rel_err(loss, ref_loss)
    res["err_grad_hidden_rel"] = grad_rel_err(h.grad, ref_dh)
    res["err_grad_weight_rel"] = grad_rel_err(w.grad, ref_dw)
    h.grad = w.grad = None
    free_memory(device)
    ms, p20, p80 = time_call(call, device, grad_to_none=(h, w), quick=quick)
    res.update(ms_median=ms, ms_p20=p20, ms_p80=p80)
    h.grad = w.grad = None
    return res
