"""Where one nash-fast training step's time goes on a real model, by part, and its model-FLOPs utilization.

    python bench/profile_step.py                              # SmolLM2-135M-Instruct, fp32 and bf16
    python bench/profile_step.py --dtypes bf16 --steps 6 --max-tokens 2048
    python bench/profile_step.py --quick                      # tiny random Llama (smoke test)

Runs the real trainer (python -m nash_fast.train, plain path, shipped pairs as conversational records, SPPO
sppo_hard, AdamW) in a fresh process per dtype, and instruments its optimizer steps after --warmup:
  * forward and backward wall time of the decoder's parts, from module hooks (forward pre/post hooks; backward
    pre-hooks and full backward hooks: the CPU autograd engine runs one node at a time on the calling thread,
    so the time between a module's two backward hooks is its backward): embedding, attention projections
    (q/k/v/o), attention core (nash_fast.attention.varlen_attention_forward, the per-sequence sdpa; its backward
    timed by identity markers on its inputs and output), MLP (gate/up/down + SiLU), RMSNorms, the rotary table
    (applying rotary to q and k, the residual adds and reshapes fall in "other");
  * LM head and loss: FusedLinearPreferenceLoss's forward, and its backward (from the start of backward until
    the final norm's backward begins, i.e. until d_hidden is ready);
  * optimizer (gradient clipping + AdamW step + zero_grad), collation (the packing collator);
  * other: the step's wall time minus all of the above (residual adds, hooks, the trainer's Python, metrics).
Model FLOPs per step (as the model needs them, no padding, no recomputation):
    6 * P_layers * T                        every decoder matmul (P_layers: parameters of the decoder layers,
                                            norms included, embedding excluded), forward + both gradients
  + 6 * H * V * T_scored                    the LM head on scored tokens only (tied: the embedding's matmul)
  + 6 * 2 * L * D_attn * sum_i T_i^2 / 2    causal attention (QK^T and PV, 2 * T_i^2 * D_attn FLOPs each, half
                                            under the causal mask, x3 for forward + backward)
MFU = model FLOPs / step time, against a dense matmul of the same dtype (--peak-n cubed, best of 3) timed in
the same process right before the instrumented steps. Hooks add a little time (reported step times are with
them); bench/vs_trl.py measures tokens/s without hooks. One JSON line per dtype goes to
--out/profile_step_cpu.jsonl.
"""

from __future__ import annotations

import argparse
import json
import warnings
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from common import cpu_description, git_commit, package_version  # noqa: E402
from vs_trl import BETA, tiny_model, write_pairs  # noqa: E402

PARTS = ("embedding", "attention_proj", "attention_core", "mlp", "norms", "rotary", "lm_head_loss", "optimizer",
         "collation", "other")


def matmul_peak(dtype, n: int, repeats: int = 3) -> float:
    import torch

    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class PartTimer:
    """Forward / backward wall time of module groups, from hooks."""

    def __init__(self):
        self.seconds = defaultdict(float)
        self.enabled = False
        self._open: dict[tuple[int, str], float] = {}
        self.handles = []

    def watch(self, module, part: str) -> None:
        key_f, key_b = (id(module), "f"), (id(module), "b")

        def fwd_pre(mod, args, kwargs=None):
            if self.enabled:
                self._open[key_f] = time.perf_counter()

        def fwd_post(mod, args, output):
            if self.enabled and key_f in self._open:
                self.seconds[part] += time.perf_counter() - self._open.pop(key_f)

        def bwd_pre(mod, grad_output):
            if self.enabled:
                self._open[key_b] = time.perf_counter()

        def bwd_post(mod, grad_input, grad_output):
            if self.enabled and key_b in self._open:
                self.seconds[part] += time.perf_counter() - self._open.pop(key_b)

        self.handles += [module.register_forward_pre_hook(fwd_pre), module.register_forward_hook(fwd_post),
                         module.register_full_backward_pre_hook(bwd_pre), module.register_full_backward_hook(bwd_post)]


def timed_attention(timer: PartTimer, attention):
    """`attention` (nash_fast.attention.varlen_attention_forward) with its forward timed and its backward timed by
    identity markers: the output's marker fires when d_out arrives (attention backward starts), the inputs'
    markers when d_query / d_key / d_value are ready (the last of them ends it)."""
    import torch

    spans: list[list[float]] = []

    class Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, span, is_output):
            ctx.span, ctx.is_output = span, is_output
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            now = time.perf_counter()
            if ctx.is_output:
                ctx.span[0] = now
            else:
                ctx.span[1] = max(ctx.span[1], now)
            return grad, None, None

    def wrapper(module, query, key, value, attention_mask, **kwargs):
        if not timer.enabled or not torch.is_grad_enabled():
            return attention(module, query, key, value, attention_mask, **kwargs)
        span = [0.0, 0.0]
        spans.append(span)
        query, key, value = (Mark.apply(t, span, False) for t in (query, key, value))
        start = time.perf_counter()
        output, weights = attention(module, query, key, value, attention_mask, **kwargs)
        timer.seconds["attention_core"] += time.perf_counter() - start
        return Mark.apply(output, span, True), weights

    def backward_seconds() -> float:
        total = sum(end - begin for begin, end in spans if end > begin > 0)
        spans.clear()
        return total

    return wrapper, backward_seconds


def worker(args) -> dict:
    import torch

    import nash_fast.train as train
    from nash_fast.model import backbone

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    timer = PartTimer()
    totals = defaultdict(float)
    state = {"steps": 0, "tokens": 0, "scored": 0, "sum_sq": 0, "installed": False, "backward_start": None}
    facts = {}
    original_step = train._train_step

    def timed(part, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                if timer.enabled:
                    totals[part] += time.perf_counter() - start
        return wrapper

    def install(run) -> None:
        model = run.model
        decoder = backbone(model)
        layers = decoder.layers
        import nash_fast.attention as attention_module

        wrapped, state["attention_backward"] = timed_attention(timer, attention_module.varlen_attention_forward)
        attention_module.varlen_attention_forward = wrapped
        for layer in layers:
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                timer.watch(getattr(layer.self_attn, name), "attention_proj")
            timer.watch(layer.mlp, "mlp")
            timer.watch(layer.input_layernorm, "norms")
            timer.watch(layer.post_attention_layernorm, "norms")
        timer.watch(decoder.norm, "norms")
        timer.watch(decoder.embed_tokens, "embedding")
        timer.watch(decoder.rotary_emb, "rotary")

        def final_norm_backward_starts(mod, grad_output):  # d_hidden is ready: the head's backward is over
            if timer.enabled and state["backward_start"] is not None:
                totals["lm_head_loss_bwd"] += time.perf_counter() - state["backward_start"]
                state["backward_start"] = None
        timer.handles.append(decoder.norm.register_full_backward_pre_hook(final_norm_backward_starts))
        loss_fn = run.loss_fn

        def loss_call(*a, **k):
            start = time.perf_counter()
            loss, metrics = loss_fn(*a, **k)
            if timer.enabled:
                totals["lm_head_loss_fwd"] += time.perf_counter() - start
                labels = a[2]
                state["scored"] += int((labels != -100).sum())
            loss.register_hook(lambda g: state.__setitem__("backward_start", time.perf_counter()) or g)
            return loss, metrics
        run.loss_fn = loss_call
        collate = run.collate

        def collate_call(examples):
            start = time.perf_counter()
            batch = collate(examples)
            if timer.enabled:
                totals["collation"] += time.perf_counter() - start
                lengths = batch["cu_seqlens"].diff()
                state["tokens"] += int(lengths.sum())
                state["sum_sq"] += int((lengths.double() ** 2).sum())
            return batch
        run.collate = collate_call
        run.optimizer.step = timed("optimizer", run.optimizer.step)
        run.optimizer.zero_grad = timed("optimizer", run.optimizer.zero_grad)
        clip = torch.nn.utils.clip_grad_norm_
        torch.nn.utils.clip_grad_norm_ = timed("optimizer", clip)
        config = model.config
        layer_params = sum(p.numel() for p in layers.parameters()) + decoder.norm.weight.numel()
        facts.update(layers=config.num_hidden_layers, hidden=config.hidden_size, vocab=config.vocab_size,
                     attn_dim=config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads),
                     layer_params=layer_params, parameters=sum(p.numel() for p in model.parameters()))
        facts["matmul_peak_flops"] = matmul_peak(dtype, args.peak_n)

    def step(run):
        if not state["installed"]:
            install(run)
            state["installed"] = True
        counting = run.state.step >= args.warmup
        timer.enabled = counting
        start = time.perf_counter()
        record = original_step(run)
        if counting:
            totals["step"] += time.perf_counter() - start
            totals["attention_core_bwd"] += state["attention_backward"]()
            state["steps"] += 1
        timer.enabled = False
        return record

    train._train_step = step
    # Our hooks on the embedding (whose input ids need no gradient) and the wrapped optimizer.step are expected.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Seems like `optimizer.step\\(\\)` has been overridden")
    with tempfile.TemporaryDirectory() as out:
        argv = ["--model", args.model, "--dataset", args.data, "--loss", "sppo_hard", "--beta", str(BETA),
                "--lr", "1e-6", "--optimizer", "adamw", "--weight-decay", "0", "--lr-scheduler", "linear",
                "--warmup-steps", "0", "--max-grad-norm", "1.0", "--max-tokens", str(args.max_tokens),
                "--max-steps", str(args.warmup + args.steps), "--cpu-threads", str(args.threads), "--device", "cpu",
                "--output-dir", out, "--save-steps", "0", "--no-progress-bar", "--no-plot", "--seed", "0",
                "--resume", "never", *(["--bf16"] if args.dtype == "bf16" else [])]
        if train.main(argv) != 0:
            raise SystemExit("nash_fast.train failed")
    n = state["steps"]
    sec = {k: v / n for k, v in timer.seconds.items()}
    tot = {k: v / n for k, v in totals.items()}
    parts = {
        "embedding": sec.get("embedding", 0.0),
        "attention_proj": sec.get("attention_proj", 0.0),
        "attention_core": sec.get("attention_core", 0.0) + tot.get("attention_core_bwd", 0.0),
        "mlp": sec.get("mlp", 0.0),
        "norms": sec.get("norms", 0.0),
        "rotary": sec.get("rotary", 0.0),
        "lm_head_loss": tot.get("lm_head_loss_fwd", 0.0) + tot.get("lm_head_loss_bwd", 0.0),
        "optimizer": tot.get("optimizer", 0.0),
        "collation": tot.get("collation", 0.0),
    }
    parts["other"] = tot["step"] - sum(parts.values())
    tokens, scored, sum_sq = state["tokens"] / n, state["scored"] / n, state["sum_sq"] / n
    flops = dict(layers=6 * facts["layer_params"] * tokens, lm_head=6 * facts["hidden"] * facts["vocab"] * scored,
                 attention=6 * 2 * facts["layers"] * facts["attn_dim"] * sum_sq / 2)
    model_flops = sum(flops.values())
    return dict(dtype=args.dtype, steps=n, tokens_per_step=tokens, scored_per_step=scored, step_s=tot["step"],
                tokens_per_s=tokens / tot["step"], parts_s=parts, parts_fraction={k: v / tot["step"] for k, v in parts.items()},
                lm_head_loss_fwd_s=tot.get("lm_head_loss_fwd", 0.0), lm_head_loss_bwd_s=tot.get("lm_head_loss_bwd", 0.0),
                model_flops_per_step=model_flops, flops_by_kind=flops, model_flops_per_s=model_flops / tot["step"],
                mfu=model_flops / tot["step"] / facts["matmul_peak_flops"],
                six_p_t_flops_per_s=6 * facts["parameters"] * tokens / tot["step"], **facts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=4, help="instrumented optimizer steps")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        Path(args.result).write_text(json.dumps(worker(args)))
        return
    from nash_fast.pretrained import resolve_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nash_fast_profile_") as tmp:
        tmp = Path(tmp)
        if args.quick:
            args.pairs, args.max_tokens, args.steps, args.peak_n = 16, 512, 2, 256
            model = str(tiny_model(tmp / "tiny_model"))
        else:
            model = resolve_model(args.model)
        data = tmp / "pairs.jsonl"
        write_pairs(data, args.pairs)
        for dtype in args.dtypes.split(","):
            result = tmp / f"{dtype}.json"
            command = [sys.executable, __file__, "--worker", "--model", model, "--data", str(data), "--dtype", dtype,
                       "--result", str(result), "--max-tokens", str(args.max_tokens), "--steps", str(args.steps),
                       "--warmup", str(args.warmup), "--threads", str(args.threads), "--peak-n", str(args.peak_n)]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            proc = subprocess.run(command, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"profile {dtype} failed (exit {proc.returncode})")
            r = json.loads(result.read_text())
            r.update(date=time.strftime("%Y-%m-%d %H:%M"), device=cpu_description(), model=args.model if not args.quick
                     else "tiny-llama", threads=args.threads, torch=package_version("torch"), commit=git_commit())
            with open(out / "profile_step_cpu.jsonl", "a") as f:
                f.write(json.dumps(r) + "\n")
            print(f"{dtype}: {r['tokens_per_step']:.0f} tokens/step, {r['step_s']:.2f} s/step, {r['tokens_per_s']:.0f} "
                  f"tokens/s, model {r['model_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['mfu']:.0f}% of the {dtype} "
                  f"matmul peak {r['matmul_peak_flops'] / 1e9:.0f} GFLOP/s ({r['device']})")
            for part in PARTS:
                print(f"    {part:15s} {r['parts_s'][part]:7.3f} s  {100 * r['parts_fraction'][part]:5.1f}%")


if __name__ == "__main__":
    main()
