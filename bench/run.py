"""nash-fast benchmarks against the peers, one command:

    python bench/run.py                                   # full set on the GPU -> bench/results/*.csv
    python bench/run.py --device cpu --quick --out DIR    # every benchmark on tiny shapes (CI smoke test)
    python bench/run.py --only logprobs --shapes llama3-8b --n 16384 --methods naive,ours_triton
    python bench/run.py --device cpu --only logprobs --dtype bf16,fp32   # CPU shapes, ours_native vs peers

Groups (--only): logprobs (per-sequence log-probs: fwd, fwd_bwd, fwd_only for naive, compile,
liger, cce, cce_exact, ours_triton, ours_torch, ours_native), loss (preference losses from hidden states:
FusedLinearPreferenceLoss sppo/inpo/ipo vs TRL's materialized-logits path and Liger's chunked DPO),
e2e (one training step of a Qwen2-0.5B-like model: packed + fused loss vs padded + materialized
logits). Every group first measures the bf16 matmul peak of the device (the roofline of every
TFLOP/s figure) and appends one row per case to DIR/<group>.csv; a case that cannot run is a
row with status=skipped and the reason. See bench/README.md.

On --device cpu, TRITON_INTERPRET=1 is set (unless already set) before Triton is imported, so the
Triton kernels (ours, and the peers' where they run under the interpreter) are exercised too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

GROUPS = ("logprobs", "loss", "e2e")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repetitions (smoke test)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"), help="CSV directory")
    p.add_argument("--only", default=",".join(GROUPS), help=f"comma list of groups: {','.join(GROUPS)}")
    p.add_argument("--shapes", default=None, help="comma list of shape names (default: all of the mode)")
    p.add_argument("--n", default=None, help="comma list of token counts N")
    p.add_argument("--methods", default=None, help="comma list of log-prob methods (group logprobs)")
    p.add_argument("--modes", default="fwd,fwd_bwd,fwd_only", help="comma list of modes (group logprobs)")
    p.add_argument("--loss-methods", default=None, help="comma list of loss-level methods (group loss)")
    p.add_argument("--e2e-methods", default=None, help="comma list of end-to-end methods (group e2e)")
    p.add_argument("--e2e-tokens", type=int, default=None, help="token budget of the e2e batch")
    p.add_argument("--dtype", default="bf16", help="comma list, e.g. bf16,fp32 (each with its own matmul peak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=None,
                   help="unix time after which no new case starts (the rest are written as skipped)")
    p.add_argument("--budget-s", type=float, default=None, help="like --deadline, in seconds from now")
    return p.parse_args(argv)


def _split(text):
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))

    import torch

    import bench_e2e
    import bench_logprobs
    import bench_loss
    import methods as M
    from common import (
        CPU_N_TOKENS, CPU_SHAPES, N_TOKENS, QUICK_DEFAULT_SHAPES, QUICK_N_TOKENS, QUICK_SHAPES, SHAPES, CsvLog, Deadline,
        dtype_from_name, environment, matmul_peak_tflops,
    )

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    dtypes = [(name, dtype_from_name(name)) for name in _split(args.dtype)]
    groups = _split(args.only)
    for g in groups:
        if g not in GROUPS:
            raise SystemExit(f"--only: unknown group {g!r}; choose from {GROUPS}")
    on_cpu = device.type == "cpu"
    table = QUICK_SHAPES if args.quick else {**SHAPES, **CPU_SHAPES}
    names = _split(args.shapes) or list(QUICK_DEFAULT_SHAPES if args.quick else CPU_SHAPES if on_cpu else SHAPES)
    for name in names:
        if name not in table:
            raise SystemExit(f"--shapes: unknown shape {name!r}; choose from {list(table)}")
    shapes = {name: table[name] for name in names}
    ns = [int(n) for n in _split(args.n)] if args.n else list(
        QUICK_N_TOKENS if args.quick else CPU_N_TOKENS if on_cpu else N_TOKENS)
    methods = _split(args.methods) or list(M.METHODS)
    for m in methods:
        if m not in M.METHODS:
            raise SystemExit(f"--methods: unknown method {m!r}; choose from {M.METHODS}")
    modes = _split(args.modes)
    for m in modes:
        if m not in bench_logprobs.MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; choose from {bench_logprobs.MODES}")
    deadline = Deadline(args.deadline if args.budget_s is None else time.time() + args.budget_s)

    env = environment(device)
    log = CsvLog(Path(args.out), env)
    print(f"nash-fast bench: {env['gpu']} torch {env['torch']} triton {env['triton']} "
          f"liger {env['liger_kernel']} cce {env['cut_cross_entropy']} -> {args.out}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for dtype_name, dtype in dtypes:
        args.dtype = dtype_name  # the groups write it into their rows
        if deadline.passed():  # nothing will run: write the skipped rows without measuring anything
            peak = float("nan")
        else:
            peak = matmul_peak_tflops(device, dtype, quick=args.quick)
            print(f"matmul peak ({dtype_name}): {peak:.3f} TFLOP/s", flush=True)
        if "logprobs" in groups:
            bench_logprobs.run(args, device, dtype, log, peak, deadline, shapes, ns, methods, modes)
        if "loss" in groups:
            bench_loss.run(args, device, dtype, log, peak, deadline, shapes, ns, _split(args.loss_methods))
        if "e2e" in groups:
            bench_e2e.run(args, device, dtype, log, peak, deadline, _split(args.e2e_methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
