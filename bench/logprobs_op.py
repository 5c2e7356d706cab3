"""Microbenchmark of the per-sequence log-prob op alone: naive PyTorch vs nash_fast (triton, torch).

    python bench/logprobs_op.py --n 16384 --h 4096 --v 128256 --out bench/results/logprobs_op.csv

Reports median ms (triton.testing.do_bench on CUDA), TFLOP/s and the fraction of the bf16 matmul
peak measured in the same run (2NHV forward, 8NHV forward+backward with recompute; N counts scored
tokens), peak memory above the inputs, and the relative error of log-probs and gradients against a
float64 reference (computed in token chunks, so it never holds float64 logits for all tokens).
The full peer comparison (torch.compile, Liger-Kernel, cut-cross-entropy) lives in bench/run.py.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import sys
import time

import torch

import nash_fast.logprobs as lp_mod
from nash_fast import sequence_logprobs


def make_problem(N, H, V, dtype, device, seed=0, mean_len=512):
    g = torch.Generator(device="cpu").manual_seed(seed)
    # A trained model's final-norm output: unit-variance channels with per-channel gains.
    gains = torch.empty(H).uniform_(0.5, 2.0, generator=g)
    hidden = (torch.randn(N, H, generator=g) * gains).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * 0.02).to(device=device, dtype=dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    lengths = []
    while sum(lengths) < N:
        lengths.append(int(torch.randint(mean_len // 4, 2 * mean_len, (1,), generator=g)))
    lengths[-1] -= sum(lengths) - N
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    # Each sequence's first 30% is its prompt: unscored.
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        labels[a : a + (b - a) * 3 // 10] = -100
    return hidden, weight, labels.to(device), cu.to(device)


def naive_sequence_logprobs(hidden, weight, labels, cu_seqlens):
    logits = hidden @ weight.t()
    logp = torch.log_softmax(logits.float(), dim=-1)
    valid = labels != -100
    tok = logp.gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * valid
    seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=hidden.device), cu_seqlens.diff())
    return torch.zeros(cu_seqlens.numel() - 1, device=hidden.device).index_add(0, seq, tok)


def reference_float64(hidden, weight, labels, cu_seqlens, upstream, chunk=1024):
    """float64 per-sequence log-probs and gradients, one token chunk at a time."""
    w = weight.double()
    seq = torch.repeat_interleave(torch.arange(cu_seqlens.numel() - 1, device=hidden.device), cu_seqlens.diff())
    out = torch.zeros(cu_seqlens.numel() - 1, dtype=torch.float64, device=hidden.device)
    d_hidden = torch.zeros(hidden.shape, dtype=torch.float64, device=hidden.device)
    d_weight = torch.zeros(weight.shape, dtype=torch.float64, device=hidden.device)
    for a in range(0, hidden.shape[0], chunk):
        h = hidden[a : a + chunk].double()
        y = labels[a : a + chunk]
        valid = y != -100
        logp = torch.log_softmax(h @ w.t(), dim=-1)
        tok = logp.gather(1, y.clamp(min=0)[:, None]).squeeze(1) * valid
        out.index_add_(0, seq[a : a + chunk], tok)
        g = upstream.double()[seq[a : a + chunk]] * valid
        dz = -logp.exp_() * g[:, None]
        dz[valid.nonzero().squeeze(1), y[valid]] += g[valid]
        d_hidden[a : a + chunk] = dz @ w
        d_weight += dz.t() @ h
    return out, d_hidden, d_weight


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_ms(fn, device):
    if device == "cuda":
        import triton.testing

        q = triton.testing.do_bench(fn, warmup=50, rep=300, quantiles=[0.5, 0.2, 0.8])
        return q[0], q[1], q[2]
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[1], times[0], times[2]


def matmul_peak_tflops(device, dtype):
    if device != "cuda":
        return float("nan")
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = bench_ms(lambda: a @ b, device)[0]
    return 2 * n**3 / ms / 1e9


def peak_mem_above(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16384)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="naive,triton,torch")
    ap.add_argument("--chunk-elements", type=int, default=None, help="override MAX_CHUNK_ELEMENTS (triton backward)")
    ap.add_argument("--no-check", action="store_true", help="skip the float64 comparison")
    ap.add_argument("--out", default=None, help="append rows to this CSV")
    args = ap.parse_args(argv)
    if args.chunk_elements:
        lp_mod.MAX_CHUNK_ELEMENTS = args.chunk_elements
    dtype = getattr(torch, args.dtype)
    device = args.device
    hidden, weight, labels, cu = make_problem(args.n, args.h, args.v, dtype, device)
    scored = int((labels != -100).sum())
    upstream = torch.randn(cu.numel() - 1, device=device)
    peak = matmul_peak_tflops(device, dtype)
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {gpu}  N={args.n} (scored {scored}) H={args.h} V={args.v} {args.dtype}  matmul peak {peak:.0f} TFLOP/s")

    ref = None
    if not args.no_check:
        ref = reference_float64(hidden, weight, labels, cu, upstream)

    fns = {
        "naive": lambda h, w: naive_sequence_logprobs(h, w, labels, cu),
        "triton": lambda h, w: sequence_logprobs(h, w, labels, cu_seqlens=cu, backend="triton"),
        "torch": lambda h, w: sequence_logprobs(h, w, labels, cu_seqlens=cu, backend="torch"),
    }
    rows = []
    for name in args.methods.split(","):
        f = fns[name]
        h = hidden.detach().requires_grad_(True)
        w = weight.detach().requires_grad_(True)

        def fwd_only():
            with torch.no_grad():
                return f(hidden, weight)

        def fwd_bwd():
            h.grad = w.grad = None
            out = f(h, w)
            out.backward(upstream)
            return out

        for mode, fn, flops in (("fwd_only", fwd_only, 2), ("fwd_bwd", fwd_bwd, 8)):
            try:
                ms, lo, hi = bench_ms(fn, device)
                mem = peak_mem_above(fn, device)
                err = ""
                if ref is not None:
                    out = fn()
                    err = f"logp {rel_err(out, ref[0]):.2e}"
                    if mode == "fwd_bwd":
                        err += f" dh {rel_err(h.grad, ref[1]):.2e} dw {rel_err(w.grad, ref[2]):.2e}"
                tflops = flops * scored * args.h * args.v / ms / 1e9
                status = "ok"
            except torch.cuda.OutOfMemoryError as e:  # record, do not crash the run
                ms = lo = hi = mem = tflops = float("nan")
                err, status = "", f"oom: {str(e).splitlines()[0][:80]}"
                torch.cuda.empty_cache()
            row = dict(
                date=datetime.date.today().isoformat(), gpu=gpu, torch=torch.__version__,
                method=name, mode=mode, N=args.n, scored=scored, H=args.h, V=args.v, dtype=args.dtype,
                ms=round(ms, 3), ms_p20=round(lo, 3), ms_p80=round(hi, 3), tflops=round(tflops, 1),
                frac_peak=round(tflops / peak, 3) if peak == peak else "", peak_tflops=round(peak, 1),
                peak_mem_gib=round(mem, 3), error=err, status=status,
            )
            rows.append(row)
            print(f"{name:>7} {mode:>8}  {ms:9.2f} ms  {tflops:7.1f} TFLOP/s  {row['frac_peak']}  mem {mem:.2f} GiB  {err} {status}")
            sys.stdout.flush()
    if args.out:
        new = not os.path.exists(args.out)
        with open(args.out, "a", newline="") as fh:
            wr = csv.DictWriter(fh, fieldnames=list(rows[0]))
            if new:
                wr.writeheader()
            wr.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
