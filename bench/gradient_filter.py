"""Gradient filtering (sequence_logprobs's filter_eps) on a real model's hidden states: how much of d_z is
negligible, what filtering costs in gradient error, and what it saves in native backward time.

    python bench/gradient_filter.py                       # N=2048 tokens, bf16 + fp32, 1 and 2 threads
    taskset -c 1 python bench/gradient_filter.py --threads 1 && \
      python bench/gradient_filter.py --threads 2 --sections time,matmul --append    # as recorded
    python bench/gradient_filter.py --tokens 512 --repeats 2 --threads 1   # quick

Inputs: SmolLM2-135M-Instruct (nash_fast.pretrained.resolve_model("smollm2-135m-instruct"): tied embeddings,
V = 49152, H = 576) in float32 runs the shipped pairs (nash_fast/data/files/prefs.jsonl, chat template) one
sequence at a time; the final hidden states of the response tokens (labels != -100) are kept, N of them, with
their labels, and the LM head's weight (cached under $NASH_FAST_CACHE/bench/). The upstream gradient is 1 per
token (d sum_i logp_i), so d_z_iv = onehot - p_iv.

Three measurements, one CSV (bench/results/gradient_filter_cpu.csv, long format: one quantity per row):
  share    fraction of d_z entries with |onehot - p| < eps, and of [rows x tokens] blocks whose entries all are
           (no label inside), for the native tile (128 x 64), the native filter block (16 x 64: FILTER_ROWS x
           BLOCK_T, what the kernel skips) and others; "sorted" = vocabulary reordered by mean logit first, as
           cut-cross-entropy does by default (the kernel does not sort).
  error    d_hidden and d_weight of the native backend (bf16 and fp32 inputs, filter off and at each eps) against a
           float64 materialized reference on the same inputs: max |err| / max |ref| and ||err||_F / ||ref||_F,
           and the same two numbers for ref rounded to bf16 (the "bf16 rounding" yardstick: filtering is harmless
           in bf16 when it stays below it).
  time     the native backward operator alone (recompute + d_z + both gradient GEMMs), best of --repeats, per
           dtype, thread count and eps; fp32 runs on MKL without filtering and on oneDNN's brgemm with it (MKL's
           one sgemm per slice has no blocks to skip), so fp32 also gets brgemm unfiltered (NASH_FAST_CPU_MKL=0).
  matmul   (--precision) float32 matmul precision: native fp32 forward+backward at "highest" and "medium" (bf16
           products) and torch.mm's bf16 vs fp32 rate here, the basis of "high" staying exact (bf16x3 is three
           bf16 products per fp32 one).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, cpu_description, git_commit  # noqa: E402

from nash_fast import sequence_logprobs  # noqa: E402
from nash_fast.logprobs import NATIVE_CHUNK_ELEMENTS, native_status, resolve_filter_eps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
BLOCKS = [(128, 64), (16, 64), (32, 64), (128, 16), (16, 16)]  # (vocabulary rows, tokens)


def cache_dir() -> Path:
    root = os.environ.get("NASH_FAST_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "nash_fast"
    return base / "bench"


def real_hidden(n_tokens: int) -> dict:
    """{hidden [N, H] fp32, labels [N], weight [V, H] fp32} from SmolLM2-135M-Instruct on the shipped pairs."""
    path = cache_dir() / f"gradient_filter_hidden_{n_tokens}.pt"
    if path.exists():
        return torch.load(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nash_fast.data import PackedPreferenceCollator
    from nash_fast.data.records import tokenize_pair
    from nash_fast.pretrained import resolve_model

    model_dir = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = [json.loads(line) for line in (ROOT / "nash_fast/data/files/prefs.jsonl").read_text().splitlines()]
    hidden, labels, got = [], [], 0
    with torch.no_grad():
        for start in range(0, len(rows), 16):
            batch = PackedPreferenceCollator()([tokenize_pair(tokenizer, r) for r in rows[start:start + 16]])
            ids, y, cu = batch["input_ids"][0], batch["labels"][0], batch["cu_seqlens"].tolist()
            for a, b in zip(cu[:-1], cu[1:]):
                h = model(input_ids=ids[a:b][None], use_cache=False, output_hidden_states=True).hidden_states[-1][0]
                keep = y[a:b] != -100
                hidden.append(h[keep])
                labels.append(y[a:b][keep])
                got += int(keep.sum())
            if got >= n_tokens:
                break
    out = dict(hidden=torch.cat(hidden)[:n_tokens].contiguous(), labels=torch.cat(labels)[:n_tokens].contiguous(),
               weight=model.get_output_embeddings().weight.detach().contiguous())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def probabilities(h: torch.Tensor, w: torch.Tensor, chunk: int = 256):
    """Yields (start, p [chunk, V] float64) of softmax(h w^T) over token chunks."""
    wd = w.double()
    for i0 in range(0, h.shape[0], chunk):
        yield i0, torch.softmax(h[i0:i0 + chunk].double() @ wd.t(), dim=-1)


def shares(h, w, y, eps_values, rows):
    """Fractions of negligible d_z entries and blocks (module docstring)."""
    N, V = h.shape[0], w.shape[0]
    mean_logit = torch.zeros(V, dtype=torch.float64)
    for i0 in range(0, N, 256):
        mean_logit += (h[i0:i0 + 256].double() @ w.double().t()).sum(0)
    order = mean_logit.argsort(descending=True)  # cut-cross-entropy's default vocabulary order
    for eps in eps_values:
        entries = 0
        blocks = {(bv, bt, s): [0, 0] for bv, bt in BLOCKS for s in ("natural", "sorted")}
        for i0, p in probabilities(h, w, chunk=256):
            n = p.shape[0]
            yy = y[i0:i0 + n]
            p[torch.arange(n), yy] = 1.0  # a label entry is never negligible (|1 - p| is not small)
            neg = p < eps
            entries += int(neg.sum())
            for (bv, bt, s), acc in blocks.items():
                m = neg if s == "natural" else neg[:, order]
                nt = n // bt * bt
                if nt == 0:
                    continue
                Vp = -(-V // bv) * bv
                pad = torch.ones(nt, Vp, dtype=torch.bool)
                pad[:, :V] = m[:nt]
                t = pad.reshape(nt // bt, bt, Vp // bv, bv).all(3).all(1)
                acc[0] += int(t.sum())
                acc[1] += t.numel()
        rows.append(dict(section="share", dtype="fp64", threads="", eps=eps, quantity="entries_negligible",
                         value=entries / (N * V)))
        for (bv, bt, s), (k, total) in blocks.items():
            rows.append(dict(section="share", dtype="fp64", threads="", eps=eps,
                             quantity=f"blocks_{bv}x{bt}_{s}_negligible", value=k / max(total, 1)))
        print(f"eps {eps:.3g}: entries {entries / (N * V):.4f}  " + "  ".join(
            f"{bv}x{bt}/{s[0]} {k / max(t, 1):.3f}" for (bv, bt, s), (k, t) in blocks.items()), flush=True)


def reference_grads(h, w, y):
    """float64 d_hidden [N, H], d_weight [V, H] of sum_i log softmax(h_i w^T)_{y_i} (materialized, in chunks)."""
    hd, wd = h.double(), w.double()
    dh = torch.empty_like(hd)
    dw = torch.zeros_like(wd)
    for i0, p in probabilities(h, w):
        n = p.shape[0]
        dz = -p
        dz[torch.arange(n), y[i0:i0 + n]] += 1.0
        dh[i0:i0 + n] = dz @ wd
        dw += dz.t() @ hd[i0:i0 + n]
    return dh, dw


def native_backward(h, w, y, lse, eps, precision="highest"):
    g = torch.ones(h.shape[0])
    dh, dw, _ = torch.ops.nash_fast.token_logprobs_backward(h, w, None, y, None, lse, g, True, True, False,
                                                            NATIVE_CHUNK_ELEMENTS, eps or 0.0, precision)
    return dh, dw


def errors(h32, w32, y, eps_values, rows):
    for name, dtype in DTYPES.items():
        h, w = h32.to(dtype), w32.to(dtype)
        ref_h, ref_w = reference_grads(h, w, y)
        _, lse = torch.ops.nash_fast.token_logprobs_forward(h, w, None, y, None)

        def record(label, eps, gh, gw):
            for gname, ours, ref in (("d_hidden", gh, ref_h), ("d_weight", gw, ref_w)):
                err = ours.double() - ref
                rows.append(dict(section="error", dtype=name, threads="", eps=eps, quantity=f"{gname}_{label}_maxrel",
                                 value=(err.abs().max() / ref.abs().max()).item()))
                rows.append(dict(section="error", dtype=name, threads="", eps=eps, quantity=f"{gname}_{label}_frobrel",
                                 value=(err.norm() / ref.norm()).item()))
            print(f"{name} {label} eps={eps}: " + "  ".join(f"{r['quantity']}={r['value']:.3g}" for r in rows[-4:]),
                  flush=True)

        record("bf16_rounding_of_exact", 0.0, ref_h.to(torch.bfloat16), ref_w.to(torch.bfloat16))
        for eps in [0.0] + eps_values:
            gh, gw = native_backward(h, w, y, lse, eps)
            record("native", eps, gh, gw)
        del ref_h, ref_w


def timings(h32, w32, y, eps_values, threads_list, repeats, rows):
    saved = torch.get_num_threads()
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for name, dtype in DTYPES.items():
                h, w = h32.to(dtype), w32.to(dtype)
                _, lse = torch.ops.nash_fast.token_logprobs_forward(h, w, None, y, None)
                configs = [(0.0, None)] + [(eps, None) for eps in eps_values]
                if dtype == torch.float32:
                    configs.insert(1, (0.0, "0"))  # brgemm unfiltered: the baseline of the filtered fp32 path
                base = None
                for eps, mkl in configs:
                    old = os.environ.get("NASH_FAST_CPU_MKL")
                    if mkl is not None:
                        os.environ["NASH_FAST_CPU_MKL"] = mkl
                    try:
                        gemm = torch.ops.nash_fast.cpu_gemm(dtype) if eps == 0 else (
                            "brgemm" if dtype == torch.float32 else torch.ops.nash_fast.cpu_gemm(dtype))
                        seconds = best_of(lambda: native_backward(h, w, y, lse, eps), repeats, warmup=True)
                    finally:
                        if mkl is not None:
                            if old is None:
                                os.environ.pop("NASH_FAST_CPU_MKL")
                            else:
                                os.environ["NASH_FAST_CPU_MKL"] = old
                    base = seconds if base is None else base
                    rows.append(dict(section="time", dtype=name, threads=threads, eps=eps,
                                     quantity=f"backward_s_{gemm}", value=seconds))
                    rows.append(dict(section="time", dtype=name, threads=threads, eps=eps,
                                     quantity=f"speedup_vs_unfiltered_default_{gemm}", value=base / seconds))
                    print(f"time {name} threads={threads} eps={eps:.3g} gemm={gemm}: {seconds:.3f} s "
                          f"(x{base / seconds:.2f} vs unfiltered default)", flush=True)
    finally:
        torch.set_num_threads(saved)


def precision_rows(h32, w32, y, threads_list, repeats, rows):
    """float32 matmul precision: native fp32 forward+backward at highest / medium, and bf16 vs fp32 GEMM rates."""
    saved = torch.get_num_threads()
    ref_h, ref_w = reference_grads(h32, w32, y)
    try:
        for threads in threads_list:
            torch.set_num_threads(threads)
            for precision in ("highest", "high", "medium"):
                def step():
                    logp, lse = torch.ops.nash_fast.token_logprobs_forward(h32, w32, None, y, None, precision)
                    return native_backward(h32, w32, y, lse, 0.0, precision)
                seconds = best_of(step, repeats, warmup=True)
                rows.append(dict(section="matmul", dtype="fp32", threads=threads, eps="",
                                 quantity=f"fwd_bwd_s_precision_{precision}", value=seconds))
                gh, gw = step()
                rows.append(dict(section="matmul", dtype="fp32", threads=threads, eps="",
                                 quantity=f"d_weight_frobrel_precision_{precision}",
                                 value=((gw.double() - ref_w).norm() / ref_w.norm()).item()))
                print(f"matmul threads={threads} {precision}: {seconds:.3f} s, d_weight rel err "
                      f"{rows[-1]['value']:.3g}", flush=True)
            n = 2048
            a32, b32 = torch.randn(n, n), torch.randn(n, n)
            for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                a, b = a32.to(dtype), b32.to(dtype)
                seconds = best_of(lambda: torch.mm(a, b), repeats, warmup=True)
                rows.append(dict(section="matmul", dtype=dname, threads=threads, eps="",
                                 quantity="torch_mm_2048_tflops", value=2 * n**3 / seconds / 1e12))
                print(f"torch.mm {dname} threads={threads}: {2 * n**3 / seconds / 1e12:.3f} TFLOP/s", flush=True)
    finally:
        torch.set_num_threads(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--eps", default="1e-3,auto-bf16,6.103515625e-05,1.52587890625e-05,high-bf16,auto-fp32",
                        help="eps values: numbers, or <auto|high>-<bf16|fp32> (filter_eps's named values)")
    parser.add_argument("--sections", default="share,error,time,matmul")
    parser.add_argument("--out", default=str(ROOT / "bench/results/gradient_filter_cpu.csv"))
    parser.add_argument("--append", action="store_true", help="add the rows to --out (e.g. a 2-thread run on more cores)")
    args = parser.parse_args()
    eps_values = []
    for item in args.eps.split(","):
        name, _, dtype = item.partition("-")
        eps_values.append(resolve_filter_eps(name, DTYPES[dtype]) if name in ("auto", "high") else float(item))
    threads_list = [int(t) for t in args.threads.split(",")]
    sections = args.sections.split(",")

    ok, why = native_status()  # loads nash_fast._C (the operators below)
    if not ok:
        raise SystemExit(f"the native backend is needed: {why}")
    data = real_hidden(args.tokens)
    h32, y, w32 = data["hidden"], data["labels"], data["weight"]
    print(f"{h32.shape[0]} tokens, H={h32.shape[1]}, V={w32.shape[0]}; {cpu_description()}", flush=True)
    rows: list[dict] = []
    if "share" in sections:
        shares(h32, w32, y, eps_values + [2.0**-20, 2.0**-7], rows)
    if "error" in sections:
        errors(h32, w32, y, eps_values, rows)
    if "time" in sections:
        timings(h32, w32, y, eps_values, threads_list, args.repeats, rows)
    if "matmul" in sections:
        precision_rows(h32, w32, y, threads_list, args.repeats, rows)

    env = dict(cpu=cpu_description(), torch=torch.__version__, commit=git_commit(), N=h32.shape[0], H=h32.shape[1],
               V=w32.shape[0], model="SmolLM2-135M-Instruct", date=time.strftime("%Y-%m-%dT%H:%M:%S"))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = list(env) + ["section", "dtype", "threads", "eps", "quantity", "value"]
    append = args.append and out.exists()
    with out.open("a" if append else "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        if not append:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
