"""Group "logprobs": per-sequence log-probs from hidden states and the LM head, three modes:

  fwd       forward with inputs that require grad (what a training step's forward costs,
            including what the method saves for backward)
  fwd_bwd   forward + backward of sum_s g_s * logp_s (g random per sequence, like a loss gradient)
  fwd_only  forward under torch.no_grad() (reference / previous-iterate / augmented passes)

One row per (shape, N, method, mode) in DIR/logprobs.csv. FLOPs: 2 n_scored H V (fwd, fwd_only),
8 n_scored H V (fwd_bwd, with recompute); see common.py.
"""

from __future__ import annotations

import dataclasses

import torch

import methods as M
from common import (
    GiB, PeakMemory, available_gib, free_memory, grad_rel_err, is_oom, make_inputs, matmul_peak_tflops,
    max_rel_err, reference_logprobs, short_error, sync, time_call,
)

MODES = ("fwd", "fwd_bwd", "fwd_only")
FLOPS_PER_TOKEN_HV = {"fwd": 2, "fwd_bwd": 8, "fwd_only": 2}
# Bytes per logit (N x V element) that a materialising method needs beyond its inputs, used to
# skip a case that cannot fit before trying it. naive: bf16 logits + fp32 copy + fp32 log_softmax
# (+ fp32 and bf16 logit gradients in backward). compile: a lower bound (fused elementwise work).
_LOGIT_BYTES = {
    "naive": {"fwd": 10, "fwd_bwd": 16, "fwd_only": 10},
    "compile": {"fwd": 4, "fwd_bwd": 8, "fwd_only": 4},
}


def _estimate_gib(method: str, mode: str, N: int, V: int) -> float:
    per = _LOGIT_BYTES.get(method, {}).get(mode, 0)
    return per * N * V / GiB


def run_case(fn, inp, mode: str, grad_seq, ref, device, quick: bool) -> dict:
    """Warm up (compile, autotune), measure one call's peak memory and errors, then time it."""
    ref_lp, ref_dh, ref_dw = ref
    needs_grad = mode != "fwd_only"
    h = inp.hidden.detach().requires_grad_(needs_grad)
    w = inp.weight.detach().requires_grad_(needs_grad)
    view = dataclasses.replace(inp, hidden=h, weight=w)

    if mode == "fwd_only":
        def call():
            with torch.no_grad():
                return fn(view)
    elif mode == "fwd":
        def call():
            return fn(view)
    else:
        def call():
            fn(view).backward(grad_seq)

    call()
    h.grad = w.grad = None
    sync(device)
    free_memory(device)

    result = {}
    with PeakMemory(device) as mem:
        out = fn(view) if mode != "fwd_only" else call()
        if mode == "fwd_bwd":
            out.backward(grad_seq)
    result["mem_peak_gib"] = mem.gib
    out = out.detach()
    if ref_lp is not None:
        if out.shape != ref_lp.shape or not torch.isfinite(out).all():
            raise RuntimeError(f"bad output: shape {tuple(out.shape)} (want {tuple(ref_lp.shape)}), "
                               f"finite={bool(torch.isfinite(out).all())}")
        result["err_out_abs"], result["err_out_rel"] = max_rel_err(out, ref_lp)
        if mode == "fwd_bwd" and ref_dh is not None:
            if h.grad is None or w.grad is None:
                raise RuntimeError("backward produced no gradient for hidden or weight")
            result["err_grad_hidden_rel"] = grad_rel_err(h.grad, ref_dh)
            result["err_grad_weight_rel"] = grad_rel_err(w.grad, ref_dw)
    del out
    h.grad = w.grad = None
    free_memory(device)

    ms, p20, p80 = time_call(call, device, grad_to_none=(h, w) if needs_grad else (), quick=quick)
    result.update(ms_median=ms, ms_p20=p20, ms_p80=p80)
    h.grad = w.grad = None
    return result


def run(args, device, dtype, log, peak_tflops: float, deadline, shapes: dict, ns, methods, modes):
    for shape_name, (H, V, softcap) in shapes.items():
        for N in ns:
            base = dict(shape=shape_name, H=H, V=V, N=N, dtype=args.dtype, matmul_peak_tflops=peak_tflops)

            def skip_all(reason, **extra):
                for m in methods:
                    for mode in modes:
                        log.write("logprobs", method=m, mode=mode, status="skipped", reason=reason, **base, **extra)

            if deadline.passed():
                skip_all(deadline.reason())
                continue
            try:
                inp = make_inputs(N, H, V, softcap, dtype, device, seed=args.seed)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                free_memory(device)
                skip_all(f"inputs do not fit: {short_error(exc)}")
                continue
            base.update(n_scored=inp.n_scored, n_seqs=inp.num_seqs)
            grad_seq = torch.randn(inp.num_seqs, device=device,
                                   generator=torch.Generator(device=device).manual_seed(args.seed + 2))
            note = ""
            try:
                ref = reference_logprobs(inp, grad_seq if "fwd_bwd" in modes else None)
            except Exception as exc:  # noqa: BLE001
                if not is_oom(exc):
                    raise
                free_memory(device)
                ref, note = (None, None, None), "float64 reference did not fit: errors not measured"
            free_memory(device)

            for method in methods:
                fn, reason = M.load(method, device, quick=args.quick)
                for mode in modes:
                    row = dict(base, method=method, mode=mode, notes=note)
                    if reason is not None:
                        log.write("logprobs", status="skipped", reason=reason, **row)
                        continue
                    if deadline.passed():
                        log.write("logprobs", status="skipped", reason=deadline.reason(), **row)
                        continue
                    need = _estimate_gib(method, mode, N, V)
                    have = available_gib(device)
                    if need > 0.95 * have:
                        log.write("logprobs", status="skipped",
                                  reason=f"would need ~{need:.1f} GiB for [N x V] logit buffers; {have:.1f} GiB free",
                                  **row)
                        continue
                    try:
                        res = run_case(fn, inp, mode, grad_seq, ref, device, args.quick)
                    except Exception as exc:  # noqa: BLE001 -- one failing case must not end the run
                        oom = is_oom(exc)
                        free_memory(device)
                        log.write("logprobs", status="skipped" if oom else "error",
                                  reason=("out of memory: " if oom else "") + short_error(exc), **row)
                        continue
                    flops = FLOPS_PER_TOKEN_HV[mode] * inp.n_scored * H * V
                    tflops = flops / (res["ms_median"] * 1e-3) / 1e12
                    # A shared CPU host's speed drifts within a run (the bf16 peak read 0.43-1.70 TFLOP/s on
                    # one evening): there the roofline is measured again next to each case.
                    case_peak = matmul_peak_tflops(device, dtype, quick=args.quick) if device.type == "cpu" else peak_tflops
                    row["matmul_peak_tflops"] = case_peak
                    log.write("logprobs", status="ok", tflops=tflops, peak_fraction=tflops / case_peak,
                              tokens_per_s=N / (res["ms_median"] * 1e-3), **row, **res)
                    free_memory(device)
            del inp, ref, grad_seq
            free_memory(device)
