"""The whole training step on a real model: nash-fast's trainer against TRL's DPOTrainer, same pairs, same model.

    python bench/vs_trl.py                                   # SmolLM2-135M-Instruct, fp32 and bf16, 1 round
    python bench/vs_trl.py --dtypes bf16 --rounds 2          # nash, trl, nash, trl in fresh processes
    python bench/vs_trl.py --quick --out /tmp/vs_trl         # a tiny Llama with SmolLM2's tokenizer (smoke test)

Both sides train the same policy (SmolLM2-135M-Instruct, dequantized by nash_fast.pretrained) on the first
--pairs rows of the shipped preference file (nash_fast/data/files/prefs.jsonl, written once as TRL's
conversational prompt / chosen / rejected records, so both apply the model's ChatML template), with the same
loss (TRL's `sppo_hard`, beta 0.1: (Delta_w - 1/(2 beta))^2 + (Delta_l + 1/(2 beta))^2; nash-fast's
`--loss sppo_hard` is the same formula), reference log-probs precomputed once, AdamW (lr --lr, betas 0.9/0.999,
eps 1e-8, weight decay 0), linear schedule without warm-up, gradient clipping at 1.0, no gradient checkpointing,
--threads intra-op threads, and the same number of optimizer steps (--pairs / --batch-pairs):
  trl    DPOTrainer as its users run it: --batch-pairs pairs a step, padded to the batch's longest sequence
         (its defaults: per-device batch, right padding, `precompute_ref_log_probs=True`); bf16 = TrainingArguments'
         bf16=True (autocast on the CPU), fp32 weights and optimizer either way.
  nash+compile  the same with --torch-compile (its one compile falls in the warm-up steps; wall_s has it)
  nash   python -m nash_fast.train: packed token-budget micro-batches, --max-tokens chosen so an epoch holds the
         same number of optimizer steps as TRL's (the budget is the mean tokens per TRL step times 1.1, so the
         packer's last, partial batch is not an extra step); bf16 = --bf16 (its plain path).
Each side runs in a fresh process (one after the other, alternating over --rounds so slow drift of a shared
host falls on both) and reports:
  tokens_per_s     real (non-padding) tokens per second of the optimizer steps after --warmup steps
                   (forward, backward, optimizer step, collation; both sides count prompt + response tokens of
                   both sequences of every pair, so the same data gives the same token count)
  peak_rss_gb      the process's peak resident memory (ru_maxrss): model, reference pass, training, everything
  ref_pass_s       seconds of the reference-log-prob pass over the pairs
  step1_loss       the first optimizer step's loss (the policy is the reference there, so both are
                   (1/(2 beta))^2 * 2 = 50 up to rounding; they must agree)
Results append to --out/vs_trl_cpu.csv (device, versions, commit); the table in docs/benchmarks.md is `--markdown`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import cpu_description, git_commit, package_version  # noqa: E402

PREFS = ROOT / "nash_fast" / "data" / "files" / "prefs.jsonl"
BETA = 0.1
COLUMNS = ["date", "device", "model", "framework", "dtype", "round", "threads", "pairs", "batch_pairs", "steps",
           "warmup_steps", "max_tokens", "real_tokens", "timed_tokens", "timed_s", "tokens_per_s", "padding_fraction",
           "peak_rss_gb", "ref_pass_s", "step1_loss", "last_loss", "wall_s", "torch", "transformers", "trl",
           "nash_fast_commit"]


# ----------------------------------------------------------------------------- shared set-up

def write_pairs(path: Path, pairs: int) -> None:
    """The first `pairs` rows of the shipped file as TRL's conversational records (both trainers read this)."""
    rows = [json.loads(line) for line in PREFS.read_text().splitlines() if line.strip()][:pairs]
    if len(rows) < pairs:
        raise ValueError(f"--pairs {pairs}: the shipped file has only {len(rows)} rows")
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                "rejected": [{"role": "assistant", "content": r["rejected"]}]}) + "\n")


def tiny_model(directory: Path) -> Path:
    """--quick: a 2-layer Llama with SmolLM2's tokenizer and chat template (random weights, saved once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from nash_fast.pretrained import resolve_model

    if (directory / "config.json").exists():
        return directory
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def timed_rate(records: list[dict], warmup: int) -> tuple[int, float]:
    """(tokens, seconds) of the steps after the first `warmup` ones."""
    timed = records[warmup:] if len(records) > warmup else records[-1:]
    return sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)


# ----------------------------------------------------------------------------- workers (fresh processes)

def nash_worker(args) -> dict:
    import nash_fast.train as train

    ref_seconds = [0.0]
    precompute = train._precompute

    def timed_precompute(*a, **k):
        start = time.perf_counter()
        try:
            return precompute(*a, **k)
        finally:
            ref_seconds[0] += time.perf_counter() - start

    train._precompute = timed_precompute
    out = Path(args.work) / "nash_out"
    argv = ["--model", args.model, "--dataset", args.data, "--loss", "sppo_hard", "--beta", str(BETA),
            "--lr", str(args.lr), "--optimizer", "adamw", "--weight-decay", "0", "--adam-beta1", "0.9",
            "--adam-beta2", "0.999", "--optimizer-eps", "1e-8", "--lr-scheduler", "linear", "--warmup-steps", "0",
            "--max-grad-norm", "1.0", "--max-tokens", str(args.max_tokens), "--max-steps", str(args.steps),
            "--max-length", str(args.max_length), "--cpu-threads", str(args.threads), "--device", "cpu",
            "--output-dir", str(out), "--save-steps", "0", "--no-progress-bar", "--no-plot", "--seed", "0",
            "--resume", "never", *(["--bf16"] if args.dtype == "bf16" else []), *args.nash_flags.split()]
    start = time.perf_counter()
    rc = train.main(argv)
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"nash_fast.train exited {rc}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [{"tokens": r["tokens"], "seconds": r["step_time_s"]} for r in records]
    tokens, seconds = timed_rate(steps, args.warmup)
    return dict(steps=len(records), real_tokens=sum(r["tokens"] for r in records), timed_tokens=tokens, timed_s=seconds,
                padding_fraction=sum(r["padding_fraction"] for r in records) / len(records),
                peak_rss_gb=peak_rss_gb(), ref_pass_s=ref_seconds[0], step1_loss=records[0]["loss"],
                last_loss=records[-1]["loss"], wall_s=wall)


def trl_worker(args) -> dict:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ref_seconds = [0.0]
    steps: list[dict] = []
    pending = {"tokens": 0, "padded": 0}

    class TimedDPOTrainer(DPOTrainer):
        def _precompute_ref_logps(self, *a, **k):
            start = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*a, **k)
            finally:
                ref_seconds[0] += time.perf_counter() - start

        def training_step(self, model, inputs, *a, **k):
            pending["tokens"] += int(inputs["attention_mask"].sum())
            pending["padded"] += int(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, *a, **k)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            steps.append({"tokens": pending["tokens"], "padded": pending["padded"],
                          "seconds": time.perf_counter() - self.start})
            pending.update(tokens=0, padded=0)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = load_dataset("json", data_files=args.data, split="train", cache_dir=str(Path(args.work) / "hf_cache"))
    config = DPOConfig(
        output_dir=str(Path(args.work) / "trl_out"), loss_type="sppo_hard", beta=BETA, precompute_ref_log_probs=True,
        per_device_train_batch_size=args.batch_pairs, learning_rate=args.lr, optim="adamw_torch", weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=1.0, max_length=args.max_length, max_steps=args.steps, gradient_checkpointing=False,
        bf16=args.dtype == "bf16", use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", seed=0,
        dataloader_num_workers=0, disable_tqdm=True)
    start = time.perf_counter()
    trainer = TimedDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    tokens, seconds = timed_rate(steps, args.warmup)
    return dict(steps=len(steps), real_tokens=sum(s["tokens"] for s in steps), timed_tokens=tokens, timed_s=seconds,
                padding_fraction=1 - sum(s["tokens"] for s in steps) / max(1, sum(s["padded"] for s in steps)),
                peak_rss_gb=peak_rss_gb(), ref_pass_s=ref_seconds[0], step1_loss=losses[0], last_loss=losses[-1],
                wall_s=wall)


# ----------------------------------------------------------------------------- driver

def nash_budget(model: str, data: str, pairs: int, batch_pairs: int, max_length: int) -> int:
    """--max-tokens for nash-fast: 1.1 x the mean real tokens of one TRL step (batch_pairs pairs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    total = 0
    for line in Path(data).read_text().splitlines():
        r = json.loads(line)
        for side in ("chosen", "rejected"):
            ids = tokenizer.apply_chat_template(r["prompt"] + r[side], tokenize=True, return_dict=False)
            total += min(len(ids), max_length)
    return max(max_length, math.ceil(1.1 * total / (pairs / batch_pairs)))


def markdown(path: Path) -> str:
    rows = list(csv.DictReader(open(path)))
    out = ["| dtype | framework | real tokens/s | peak RSS (GB) | reference pass (s) | step-1 loss | device |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dtype']} | {r['framework']} | {float(r['tokens_per_s']):.0f} | {float(r['peak_rss_gb']):.2f} | "
                   f"{float(r['ref_pass_s']):.0f} | {float(r['step1_loss']):.4f} | {r['device']} |")
    for dtype in sorted({r["dtype"] for r in rows}):
        best = {fw: max((float(r["tokens_per_s"]) for r in rows if r["dtype"] == dtype and r["framework"] == fw), default=0)
                for fw in ("nash", "nash+compile", "trl")}
        mem = {fw: min((float(r["peak_rss_gb"]) for r in rows if r["dtype"] == dtype and r["framework"] == fw),
                       default=float("nan")) for fw in ("nash", "nash+compile", "trl")}
        for fw in ("nash", "nash+compile"):
            if best["trl"] > 0 and best[fw] > 0:
                out.append(f"\n{dtype}: {fw} {best[fw] / best['trl']:.2f}x TRL's tokens/s at "
                           f"{mem[fw] / mem['trl']:.2f}x its peak memory (best of rounds)")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--frameworks", default="nash,trl",
                        help="comma list of nash, trl and nash+compile (nash with --torch-compile)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--batch-pairs", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2, help="optimizer steps left out of tokens/s")
    parser.add_argument("--quick", action="store_true", help="tiny random Llama, 16 pairs (smoke test)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--markdown", action="store_true", help="print the docs/benchmarks.md table of --out's CSV and exit")
    # worker mode (internal)
    parser.add_argument("--worker", choices=("nash", "trl"), help=argparse.SUPPRESS)
    for name in ("--data", "--work", "--dtype", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--nash-flags", default="", help=argparse.SUPPRESS)
    parser.add_argument("--max-tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out)
    csv_path = out / "vs_trl_cpu.csv"
    if args.markdown:
        print(markdown(csv_path))
        return
    if args.worker:
        result = (nash_worker if args.worker == "nash" else trl_worker)(args)
        Path(args.result).write_text(json.dumps(result))
        return

    from nash_fast.pretrained import resolve_model

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nash_fast_vs_trl_") as tmp:
        tmp = Path(tmp)
        if args.quick:
            args.pairs, args.batch_pairs, args.max_length = 16, 4, 256
            model = str(tiny_model(tmp / "tiny_model"))
        else:
            model = resolve_model(args.model)
        data = tmp / "pairs.jsonl"
        write_pairs(data, args.pairs)
        steps = math.ceil(args.pairs / args.batch_pairs)
        max_tokens = nash_budget(model, str(data), args.pairs, args.batch_pairs, args.max_length)
        env = dict(cpu=cpu_description(), torch=package_version("torch"), transformers=package_version("transformers"),
                   trl=package_version("trl"), commit=git_commit())
        print(f"{env['cpu']}; {args.pairs} pairs, {steps} steps; nash --max-tokens {max_tokens}", flush=True)
        for round_ in range(args.rounds):
            for dtype in args.dtypes.split(","):
                for framework in args.frameworks.split(","):
                    work = tmp / f"{framework}-{dtype}-{round_}"
                    work.mkdir()
                    result_path = work / "result.json"
                    worker, flags = ("nash", "--torch-compile") if framework == "nash+compile" else (framework, "")
                    command = [sys.executable, __file__, "--worker", worker, f"--nash-flags={flags}", "--model", model, "--data", str(data),
                               "--work", str(work), "--dtype", dtype, "--result", str(result_path), "--steps", str(steps),
                               "--max-tokens", str(max_tokens), "--max-length", str(args.max_length), "--lr", str(args.lr),
                               "--threads", str(args.threads), "--warmup", str(args.warmup),
                               "--batch-pairs", str(args.batch_pairs)]
                    environ = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
                               "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
                    proc = subprocess.run(command, env=environ, capture_output=True, text=True)
                    if proc.returncode != 0:
                        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                        raise SystemExit(f"{framework} {dtype} failed (exit {proc.returncode})")
                    r = json.loads(result_path.read_text())
                    row = dict(date=time.strftime("%Y-%m-%d %H:%M"), device=env["cpu"], model=args.model if not args.quick
                               else "tiny-llama", framework=framework, dtype=dtype, round=round_, threads=args.threads,
                               pairs=args.pairs, batch_pairs=args.batch_pairs, warmup_steps=args.warmup,
                               max_tokens=max_tokens if worker == "nash" else "", **r,
                               tokens_per_s=r["timed_tokens"] / r["timed_s"], torch=env["torch"],
                               transformers=env["transformers"], trl=env["trl"], nash_fast_commit=env["commit"])
                    new = not csv_path.exists()
                    with open(csv_path, "a", newline="") as f:
                        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                        if new:
                            writer.writeheader()
                        writer.writerow(row)
                    print(f"{framework:5s} {dtype}: {row['tokens_per_s']:.1f} real tokens/s, peak RSS "
                          f"{r['peak_rss_gb']:.2f} GB, reference pass {r['ref_pass_s']:.1f} s, step-1 loss "
                          f"{r['step1_loss']:.4f}, {r['steps']} steps, padding {r['padding_fraction']:.2f}", flush=True)


if __name__ == "__main__":
    main()
