"""Padded vs packed forward+backward of per-sequence log-probs on a realistic preference length distribution.

    python bench/packing.py --device cpu --quick --out bench/results/packing_cpu.csv
    python bench/packing.py --device cuda --out bench/results/packing_gpu.csv      # Qwen2-0.5B-like, bf16

Both modes see the same pairs, drawn from bench/data/preference_lengths.json (a synthetic UltraFeedback-like
histogram; see bench/data/make_length_histogram.py for where its numbers come from) with random token ids,
grouped by nash_fast.data.TokenBudgetBatchSampler (max_tokens real tokens per batch):

  padded  every sequence of the batch right-padded to the longest, backbone with a 2-D attention mask, then
          nash_fast.sequence_logprobs on the padded rows (so only the layout differs, not the LM-head op)
  packed  nash_fast.data.PackedPreferenceCollator + nash_fast.model.packed_sequence_logprobs (one row, no
          padding; flash-attn varlen on CUDA when installed, else the per-sequence varlen sdpa fallback,
          O(sum of L_i^2))
  packed_mask  the same with attention="mask": the old dense block-diagonal causal mask over the whole row,
          O(T^2) (not run under flash_attention_2, which takes no dense mask)

Loss = -mean of the per-sequence log-probs, then backward. Reported per mode: real (non-pad) tokens per
second, computed tokens (with padding), padding fraction, and peak memory: on CUDA the max allocated during
the timed steps minus what was allocated before them; on CPU the peak RSS growth of a fresh process per mode
(coarse). Each mode runs in its own subprocess so neither inherits the other's allocator state. The timed
batches are run --repeats times and the fastest pass is reported, so load from other processes on a shared
machine inflates the numbers less.
--quick (CPU) shrinks lengths by --length-scale 1/8, uses a 2-layer, hidden-128 Qwen2 config, one intra-op
thread (--threads 1: on a small shared box, oversubscribed threads made timings swing 10x) and 3 repeats.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HISTOGRAM = ROOT / "bench" / "data" / "preference_lengths.json"

MODELS = {
    # Qwen2-0.5B's published architecture (random init here): 24 layers, hidden 896, GQA 14/2, vocab 151936.
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, rope_theta=1e6, tie_word_embeddings=True,
                       max_position_embeddings=32768),
    "qwen2-tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=2048, tie_word_embeddings=True, max_position_embeddings=8192),
}

COLUMNS = ["date", "device", "gpu", "model", "mode", "attn_implementation", "dtype", "max_tokens", "length_scale",
           "batches", "repeats", "threads", "pairs", "sequences", "real_tokens", "computed_tokens", "padding_fraction", "seconds",
           "real_tokens_per_s", "peak_mem_mb", "mem_kind", "torch", "transformers", "commit"]


def sample_pairs(n: int, scale: float, seed: int) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token lengths drawn from the shipped histogram (uniform within a bin)."""
    data = json.loads(HISTOGRAM.read_text())
    edges = np.array(data["bin_edges"])
    rng = np.random.default_rng(seed)

    def draw(counts):
        p = np.array(counts, dtype=float) / sum(counts)
        bins = rng.choice(len(counts), size=n, p=p)
        lengths = rng.integers(edges[bins], edges[bins + 1])  # [lo, hi)
        return np.maximum(1, np.round(lengths * scale)).astype(int)

    prompt, chosen, rejected = draw(data["prompt"]), draw(data["chosen"]), draw(data["rejected"])
    return list(zip(prompt.tolist(), chosen.tolist(), rejected.tolist()))


def make_batches(args, vocab_size: int) -> list[list[dict]]:
    from nash_fast.data import TokenBudgetBatchSampler

    pairs = [p for p in sample_pairs(args.pool, args.length_scale, args.seed) if p[0] + max(p[1:]) <= args.max_tokens // 2]
    generator = torch.Generator().manual_seed(args.seed)
    examples = [
        {"prompt_ids": torch.randint(3, vocab_size, (p,), generator=generator).tolist(),
         "chosen_ids": torch.randint(3, vocab_size, (c,), generator=generator).tolist(),
         "rejected_ids": torch.randint(3, vocab_size, (r,), generator=generator).tolist()}
        for p, c, r in pairs
    ]
    sampler = TokenBudgetBatchSampler([[p + c, p + r] for p, c, r in pairs], args.max_tokens, seed=args.seed)
    batches = sampler.all_batches()[: args.warmup + args.batches]
    if len(batches) < args.warmup + args.batches:
        raise SystemExit(f"only {len(batches)} batches from --pool {args.pool}; raise --pool")
    return [[examples[i] for i in batch] for batch in batches]


def padded_step(model, examples, device):
    from nash_fast import sequence_logprobs
    from nash_fast.model import head_logit_transform, backbone

    sequences = [(e["prompt_ids"], e[k]) for e in examples for k in ("chosen_ids", "rejected_ids")]
    width = max(len(p) + len(r) for p, r in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    mask = torch.zeros(len(sequences), width, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (p, r) in enumerate(sequences):
        n = len(p) + len(r)
        ids[row, :n] = torch.tensor(p + r)
        mask[row, :n] = 1
        labels[row, len(p) - 1 : n - 1] = torch.tensor(r)
    hidden = backbone(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).last_hidden_state
    scale, softcap = head_logit_transform(model)
    head = model.get_output_embeddings()
    logps = sequence_logprobs(hidden, head.weight, labels.to(device), bias=head.bias, softcap=softcap)
    (-logps.mean()).backward()
    return len(sequences), int(mask.sum()), ids.numel()


def packed_step(model, examples, device, attention="auto"):
    from nash_fast.data import PackedPreferenceCollator
    from nash_fast.model import packed_sequence_logprobs

    batch = PackedPreferenceCollator()(examples)
    logps = packed_sequence_logprobs(model, batch, attention=attention)
    (-logps.mean()).backward()
    tokens = batch["input_ids"].shape[1]
    return logps.numel(), tokens, tokens


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM, this address space's high-water mark (ru_maxrss would also count the parent's resident size at
    the fork, which Linux carries across execve)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    """VmHWM back to the current resident size (Linux >= 4.0), so the peak is the timed steps' alone."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_attn(args) -> str:
    if args.attn != "auto":
        return args.attn
    if args.device == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def build_model(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    attn = build_attn(args)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model not in MODELS:  # a pretrained model: directory, hub name, GGUF file or smollm2-135m-instruct
        from transformers import AutoModelForCausalLM

        from nash_fast.pretrained import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=dtype, attn_implementation=attn)
        return model.to(args.device).train(), attn
    config = Qwen2Config(**MODELS[args.model])
    config._attn_implementation = attn
    torch.manual_seed(args.seed)
    model = Qwen2ForCausalLM(config).to(device=args.device, dtype=dtype).train()
    return model, attn


def worker(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, attn = build_model(args)
    batches = make_batches(args, model.config.vocab_size)
    step = {"padded": padded_step, "packed": packed_step,
            "packed_mask": lambda *a: packed_step(*a, attention="mask")}[args.worker]
    device = torch.device(args.device)
    for examples in batches[: args.warmup]:
        step(model, examples, device)
        model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _reset_peak_rss()
        base = _rss_mb()
    seconds = float("inf")
    for _ in range(args.repeats):
        sequences = real = computed = 0
        start = time.perf_counter()
        for examples in batches[args.warmup :]:
            s, r, c = step(model, examples, device)
            model.zero_grad(set_to_none=True)
            sequences, real, computed = sequences + s, real + r, computed + c
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = min(seconds, time.perf_counter() - start)
    if device.type == "cuda":
        peak, kind = (torch.cuda.max_memory_allocated() - base) / 2**20, "cuda_max_allocated_delta"
    else:
        peak, kind = _peak_rss_mb() - base, "cpu_peak_rss_delta"
    return {
        "mode": args.worker, "attn_implementation": attn, "batches": args.batches, "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "pairs": sum(len(b) for b in batches[args.warmup :]), "sequences": sequences, "real_tokens": real,
        "computed_tokens": computed, "padding_fraction": round(1 - real / computed, 4), "seconds": round(seconds, 3),
        "real_tokens_per_s": round(real / seconds, 1), "peak_mem_mb": round(peak, 1), "mem_kind": kind,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="small CPU-sized run (tiny model, lengths x 1/8)")
    ap.add_argument("--model", default=None, help=f"{', '.join(sorted(MODELS))} (random init), or a pretrained "
                    "model: a Hugging Face directory or hub name, a GGUF file, smollm2-135m-instruct")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    ap.add_argument("--attn", default="auto", help="attn_implementation for both modes (auto: flash_attention_2 "
                    "on CUDA when flash-attn is installed, else sdpa)")
    ap.add_argument("--max-tokens", type=int, default=None, help="real tokens per batch")
    ap.add_argument("--length-scale", type=float, default=None)
    ap.add_argument("--batches", type=int, default=None, help="timed batches")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None, help="timed passes over the batches; the fastest is kept")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--pool", type=int, default=4000, help="pairs drawn before batching")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="padded,packed,packed_mask",
                    help="comma-separated subset of padded, packed, packed_mask (dropped under flash_attention_2)")
    ap.add_argument("--out", default=None, help="append rows to this CSV")
    ap.add_argument("--worker", choices=["padded", "packed", "packed_mask"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    quick = args.quick
    defaults = dict(model="qwen2-tiny" if quick else "qwen2-0.5b", dtype="float32" if args.device == "cpu" else "bfloat16",
                    max_tokens=2048 if quick else 8192, length_scale=0.125 if quick else 1.0,
                    batches=3 if quick else 10, warmup=1 if quick else 3, repeats=3 if quick else 1,
                    threads=1 if quick else 0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")

    if args.worker:
        print(json.dumps(worker(args)))
        return

    modes = args.modes.split(",")
    unknown = set(modes) - {"padded", "packed", "packed_mask"}
    if unknown:
        raise SystemExit(f"--modes: unknown {sorted(unknown)}")
    if "packed_mask" in modes and "flash" in build_attn(args):
        modes.remove("packed_mask")  # flash-attn takes no dense mask
    rows = []
    for mode in modes:
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode]
        for key in ("device", "model", "dtype", "attn", "max_tokens", "length_scale", "batches", "warmup", "repeats",
                    "threads", "pool", "seed"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{mode} worker failed:\n{done.stderr[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))

    import transformers

    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "", "model": args.model, "dtype": args.dtype,
        "max_tokens": args.max_tokens, "length_scale": args.length_scale, "torch": torch.__version__,
        "transformers": transformers.__version__, "commit": commit or "unknown",
    }
    rows = [{**common, **row} for row in rows]
    print(f"{'mode':11} {'real tok/s':>11} {'padding':>8} {'peak MB':>9}  ({rows[0]['mem_kind']})")
    for row in rows:
        print(f"{row['mode']:11} {row['real_tokens_per_s']:>11.0f} {row['padding_fraction']:>8.1%} "
              f"{row['peak_mem_mb']:>9.0f}")
    by_mode = {row["mode"]: row for row in rows}
    for packed in ("packed", "packed_mask"):
        if {"padded", packed} <= set(by_mode):
            speedup = by_mode[packed]["real_tokens_per_s"] / by_mode["padded"]["real_tokens_per_s"]
            print(f"{packed} / padded throughput: {speedup:.2f}x")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        new = not out.exists()
        with out.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
