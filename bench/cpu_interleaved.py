"""Forward+backward of per-sequence log-probs on the CPU, naive PyTorch against both nash-fast CPU backends,
interleaved (naive, torch, native, naive, ...) and each one's best of --repeats kept, so that load from other
processes on a shared machine falls on all three alike. bench/run.py measures one method after another;
this is the check behind backend="auto"'s choice on CPU (nash_fast/logprobs.py, _NATIVE_AUTO_DTYPES).

    python bench/cpu_interleaved.py --dtype bf16,fp16,fp32          # N=4096 in 3 sequences, H=1024, V=32000
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nash_fast import sequence_logprobs

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="bf16,fp16,fp32")
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
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
                          "vs_naive": {m: round(s / best["naive"], 2) for m, s in best.items()}}))


if __name__ == "__main__":
    main()
