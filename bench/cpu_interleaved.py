"""Forward+backward of per-sequence log-probs on the CPU, naive PyTorch against both nash-fast CPU backends,
interleaved (naive, torch, native, naive, ...) and each one's best of --repeats kept, so that load from other
processes on a shared machine falls on all three alike. bench/run.py measures one method after another;
this is the check behind backend="auto"'s choice on CPU (nash_fast/logprobs.py, _resolve_backend).

    python bench/cpu_interleaved.py --dtype bf16,fp16,fp32          # N=4096 in 3 sequences, H=1024, V=32000
    python bench/cpu_interleaved.py --dtype bf16 --roofline 5       # + native vs the matmul peak, in pairs

--roofline K: K rounds of (dense n=4096 matmul in the dtype, native no-grad forward, native forward+backward),
each timed best of --repeats, and the native rates as fractions of the peak measured in the same round
(2NHV no-grad, 8NHV forward+backward). On a host whose speed drifts between runs (this project's CPU machines:
the bf16 peak read 0.43-1.44 TFLOP/s on one day), a peak measured once at the start misstates every fraction.
"""

from __future__ import annotations

import argparse
import json
import time

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of  # noqa: E402

from nash_fast import sequence_logprobs  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16,fp16,fp32")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--roofline", type=int, default=0, metavar="K", help="rounds of native vs matmul peak")
    args = parser.parse_args()
    N, H, V = args.n, args.hidden, args.vocab
    for name in args.dtype.split(","):
        dtype = DTYPES[name]
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_(True)
        weight = (torch.randn(V, H, generator=g) * 0.02).to(dtype).requires_grad_(True)
        labels = torch.randint(0, V, (N,), generator=g)
        cu = torch.tensor([0, N // 3, 2 * N // 3, N], dtype=torch.int32)

        def naive():
            logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1).gather(1, labels[:, None]).squeeze(1)
            seq = torch.repeat_interleave(torch.arange(3), cu.diff())
            return torch.zeros(3).index_add(0, seq, logp)

        methods = {"naive": naive,
                   "torch": lambda: sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend="torch"),
                   "native": lambda: sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend="native")}
        best = {m: float("inf") for m in methods}
        for _ in range(args.repeats):
            for m, fn in methods.items():
                hidden.grad = weight.grad = None
                start = time.perf_counter()
                fn().sum().backward()
                best[m] = min(best[m], time.perf_counter() - start)
        print(json.dumps({"dtype": name, "N": N, "H": H, "V": V, "threads": torch.get_num_threads(),
                          "fwd_bwd_s": {m: round(s, 3) for m, s in best.items()},
                          "vs_naive": {m: round(s / best["naive"], 2) for m, s in best.items()}}), flush=True)
        if args.roofline:
            roofline(args, name, hidden, weight, labels, cu)


def roofline(args, name, hidden, weight, labels, cu) -> None:
    N, H, V, dtype = args.n, args.hidden, args.vocab, hidden.dtype
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(4096, 4096, generator=g).to(dtype) for _ in range(2))

    def no_grad_forward():
        with torch.no_grad():
            sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend="native")

    def forward_backward():
        hidden.grad = weight.grad = None
        sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend="native").sum().backward()

    a @ b
    for round_ in range(args.roofline):
        peak = 2 * 4096**3 / best_of(lambda: a @ b, args.repeats) / 1e12
        fwd = 2 * N * H * V / best_of(no_grad_forward, args.repeats) / 1e12
        fwd_bwd = 8 * N * H * V / best_of(forward_backward, args.repeats) / 1e12
        print(json.dumps({"dtype": name, "round": round_, "matmul_peak_tflops": round(peak, 3),
                          "native_fwd_only_tflops": round(fwd, 3), "fwd_only_peak_fraction": round(fwd / peak, 2),
                          "native_fwd_bwd_tflops": round(fwd_bwd, 3), "fwd_bwd_peak_fraction": round(fwd_bwd / peak, 2)}),
              flush=True)


if __name__ == "__main__":
    main()
