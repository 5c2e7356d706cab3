"""Full fine-tuning vs LoRA: peak memory and tokens/s of one training step, and the frozen head's d_weight saving.

    python bench/lora.py --out bench/results/lora_cpu.csv                 # Qwen2-0.5B-shaped, fp32, CPU
    python bench/lora.py --quick                                          # 2-layer hidden-128 smoke (seconds)
    python bench/lora.py --device cuda --dtype bfloat16 --out bench/results/lora_gpu.csv

The model is built from Qwen2-0.5B's published architecture (random init, nothing downloaded: 24 layers, hidden
896, GQA 14/2 heads, MLP 4864, vocabulary 151936, tied embeddings; 494M parameters). One training step is what
python -m nash_fast.train does for one packed micro-batch: packed backbone forward (nash_fast.model), the fused
SPPO loss on the LM head (nash_fast.train.micro_batch_loss), backward, AdamW step, zero_grad. Modes, each in a
fresh subprocess (no allocator state carried over):

  full           every weight trainable (AdamW states for all 494M parameters)
  lora           nash_fast.adapters on every attention and MLP linear layer (--lora-r, alpha 2r, no dropout),
                 the LM head / embeddings frozen
  head_trainable the fused LM-head op alone (nash_fast.sequence_logprobs, forward + backward) with N scored tokens
                 of hidden size H against the [V, H] head, the head requiring grad: d_hidden and d_weight
  head_frozen    the same with a frozen head (the LoRA path): d_hidden only; no [V, H] d_weight buffer
                 (V H 4 bytes in fp32) and 2 N H V fewer FLOPs

tokens_per_s: real tokens of the packed row per second of the fastest of --repeats timed steps (after --warmup
steps, which also allocate the optimizer states); cpu_seconds: the least CPU time (user + system, all threads) the
process spent on one timed step: on a shared machine it tracks the work done better than wall time does. peak_rss_mb: the process's resident high-water mark (VmHWM)
over the whole run (weights, gradients, optimizer states, activations: what the machine must hold);
step_peak_delta_mb: VmHWM growth during the timed steps above the resident memory just before them (reset via
/proc/self/clear_refs): the step's transient memory. On CUDA: torch.cuda.max_memory_allocated and its growth.
The CPU numbers come from a shared 2-core machine (other processes run beside it): times are the fastest pass.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODELS = {
    "qwen2-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True, rms_norm_eps=1e-6),
    "qwen2-tiny": dict(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
MODES = ("full", "lora", "head_trainable", "head_frozen")
COLUMNS = ["date", "device", "cpu_or_gpu", "threads", "model", "mode", "dtype", "tokens", "scored_tokens",
           "trainable_params", "total_params", "step_seconds", "cpu_seconds", "tokens_per_s", "peak_rss_mb", "step_peak_delta_mb",
           "d_weight_bytes", "d_weight_gflop", "note", "torch", "transformers", "peft", "commit"]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _trim():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def build_model(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**MODELS[args.model], max_position_embeddings=32768)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).to(dtype=getattr(torch, args.dtype), device=args.device)


def make_batch(args, vocab: int):
    """Preference pairs of random tokens (prompt 96, responses 80 and 64 tokens; a quarter with --quick) packed into one
    row of at most --max-tokens tokens, with reference log-probs and SPPO win rates."""
    from nash_fast.data import PackedPreferenceCollator

    gen = torch.Generator().manual_seed(1)
    p, c, r = (24, 20, 16) if args.quick else (96, 80, 64)
    examples, total = [], 0
    while total + 2 * p + c + r <= args.max_tokens:
        ids = lambda n: torch.randint(3, vocab, (n,), generator=gen).tolist()  # noqa: E731
        examples.append(dict(prompt_ids=ids(p), chosen_ids=ids(c), rejected_ids=ids(r), chosen_ref_logps=-400.0,
                             rejected_ref_logps=-400.0, preference=0.7))
        total += 2 * p + c + r
    collate = PackedPreferenceCollator(sequence_fields=("ref_logps",), pair_fields=("preference",))
    return collate(examples), total


def train_step_worker(args) -> dict:
    import nash_fast.train as trainer
    from nash_fast.config import parse_config

    cfg = parse_config(["--loss", "sppo", "--logprob-backend", args.backend]
                       + (["--lora-r", str(args.lora_r), "--lora-dropout", "0"] if args.mode == "lora" else []))
    model = build_model(args)
    if args.mode == "lora":
        from nash_fast.adapters import attach

        model = attach(cfg, model).model
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    batch, tokens = make_batch(args, model.config.vocab_size)
    plan = trainer.LossPlan("sppo", groups=False, augment=False, sequence_fields=("ref_logps",),
                            pair_fields=("preference",))
    loss_fn = trainer.build_loss_fn(cfg)

    def step():
        trainer.micro_batch_loss(model, batch, loss_fn, plan, backward=lambda loss: loss.backward())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times, delta = _timed(args, step)
    scored = int((batch["labels"] != -100).sum())
    return dict(tokens=tokens, scored_tokens=scored, trainable_params=sum(p.numel() for p in params),
                total_params=sum(p.numel() for p in model.parameters()), step_seconds=min(times),
                tokens_per_s=tokens / min(times), step_peak_delta_mb=delta)


def _timed(args, fn):
    """(seconds of each of --repeats calls, peak memory growth in MB during them)."""
    if args.device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _trim()
        PEAK_BEFORE[0] = _status_kb("VmHWM") * 1024  # setup and warmup (the reset below forgets it)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS") * 1024
    times, cpu_times = [], []
    for _ in range(args.repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    CPU_SECONDS[0] = min(cpu_times)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _status_kb("VmHWM") * 1024
    return times, (peak - base) / 2**20


def head_worker(args) -> dict:
    """The fused LM-head op alone, as the trainer calls it (sequence_logprobs forward + backward)."""
    from nash_fast import sequence_logprobs

    shape = MODELS[args.model]
    H, V = shape["hidden_size"], shape["vocab_size"]
    N = args.max_tokens
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(2)
    hidden = (torch.randn(N, H, generator=gen) / math.sqrt(H)).to(dtype=dtype, device=args.device).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.02).to(dtype=dtype, device=args.device)
    weight.requires_grad_(args.mode == "head_trainable")
    labels = torch.randint(0, V, (N,), generator=gen).to(args.device)
    cu_seqlens = torch.tensor([0, N // 2, N], dtype=torch.int32, device=args.device)

    def step():
        sequence_logprobs(hidden, weight, labels, cu_seqlens=cu_seqlens, backend=args.backend).sum().backward()
        hidden.grad = None
        weight.grad = None

    for _ in range(args.warmup):
        step()
    times, delta = _timed(args, step)
    return dict(tokens=N, scored_tokens=N, trainable_params=V * H if weight.requires_grad else 0, total_params=V * H,
                step_seconds=min(times), tokens_per_s=N / min(times), step_peak_delta_mb=delta,
                d_weight_bytes=V * H * dtype.itemsize if weight.requires_grad else 0,
                d_weight_gflop=2 * N * H * V / 1e9 if weight.requires_grad else 0)


def worker(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = head_worker(args) if args.mode.startswith("head") else train_step_worker(args)
    result["cpu_seconds"] = CPU_SECONDS[0]
    if args.device == "cuda":
        result["peak_rss_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        # the whole run: the high-water mark of setup + warmup, or of the timed steps when higher
        result["peak_rss_mb"] = max(_status_kb("VmHWM") * 1024, PEAK_BEFORE[0]) / 2**20
    print("RESULT " + json.dumps(result), flush=True)


PEAK_BEFORE = [0]  # VmHWM (bytes) before _timed reset it
CPU_SECONDS = [float("nan")]  # the least process CPU time (all threads) of one timed step


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny 2-layer model, 256 tokens (a smoke test)")
    ap.add_argument("--model", choices=sorted(MODELS), default=None)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--max-tokens", type=int, default=None, help="tokens of the packed row (default 1024; 256 quick)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--backend", default="auto", help="sequence_logprobs backend")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--note", default="", help="free text for the CSV (e.g. 'shared machine')")
    ap.add_argument("--out", default=None, help="append rows to this CSV")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per mode subprocess")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or ("qwen2-tiny" if args.quick else "qwen2-0.5b")
    args.max_tokens = args.max_tokens or (256 if args.quick else 1024)
    if args.worker:
        args.mode = args.worker
        worker(args)
        return 0
    from common import cpu_description, git_commit, package_version

    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name() if args.device == "cuda" else cpu_description()
    commit = git_commit()
    rows = []
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, "--worker", mode] + [
            a for a in sys.argv[1:] if a not in ("--quick",)] + (["--quick"] if args.quick else [])
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{mode}: timed out after {args.timeout:.0f} s", flush=True)
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{mode}: failed (exit {done.returncode}): {done.stderr[-2000:]}", flush=True)
            continue
        result = json.loads(lines[-1][len("RESULT "):])
        row = {c: "" for c in COLUMNS}
        row.update(date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), device=args.device,
                   cpu_or_gpu=where, threads=args.threads or torch.get_num_threads(), model=args.model, mode=mode,
                   dtype=args.dtype, note=args.note, torch=torch.__version__, transformers=package_version("transformers"),
                   peft=package_version("peft"), commit=commit)
        for key, value in result.items():
            row[key] = f"{value:.6g}" if isinstance(value, float) else value
        rows.append(row)
        print(" ".join(f"{k}={row[k]}" for k in ("mode", "tokens", "trainable_params", "step_seconds", "cpu_seconds",
                                                  "tokens_per_s",
                                                  "peak_rss_mb", "step_peak_delta_mb", "d_weight_bytes",
                                                  "d_weight_gflop")), flush=True)
    if args.out and rows:
        path = Path(args.out)
        new = not path.exists() or path.stat().st_size == 0
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
    return 0 if len(rows) == len(args.modes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
