"""python -m nash_fast.train: a slim trainer for SPPO, INPO, IPO, DPO, Sr-DPO, Sr-IPO and SPCE.

    python -m nash_fast.train                                  # demo: tiny model, shipped data, SPPO, CPU
    python -m nash_fast.train --config run.yaml --max-steps 500 --output-dir runs/x
    deepspeed --num_gpus 8 --module nash_fast.train --zero-stage 2 --bf16 --model Qwen/Qwen2.5-0.5B-Instruct ...
    torchrun --nproc-per-node 8 -m nash_fast.train --zero-stage 3 ...

Every option is a field of nash_fast.config.TrainConfig (see --help). The run, top to bottom:

1. Data (nash_fast.data; the trainer's entry is data/dataset.py): rows from a jsonl/json/parquet file or a
   datasets name (loading.py), columns renamed by --columns, each row's format decided and checked (formats.py:
   TRL's standard / conversational, explicit / implicit prompt, SPPO groups; errors name the row and column)
   before any model is loaded, then tokenized (records.py: chat template or raw text; nothing truncated).
2. Precompute (nash_fast.precompute): reference log-probs of every sequence (INPO: also the previous
   iterate's; Sr-DPO/Sr-IPO: also the reference's on the augmented query p + x), forward-only, cached
   on disk by model and data fingerprint. The frozen models are released before training.
3. Training: an endless stream of packed token-budget micro-batches (TokenBudgetBatchSampler,
   epoch e shuffled with seed + e); optimizer step s consumes global micro-batches
   [s * W * G, (s + 1) * W * G) (W processes, G = --grad-accum), process r taking every W-th one, so a
   run's data and updates depend on the global batch only. Each micro-batch: backbone forward over the
   packed row (nash_fast.model.packed_hidden_states), FusedLinearPreferenceLoss on the LM-head weight
   (gathered under ZeRO-3), backward. With --deepspeed / --zero-stage the DeepSpeed engine does
   backward and step; otherwise a plain torch optimizer does, in the same loop.
4. Faults: a non-finite loss or gradient norm skips the optimizer step (logged with "skipped" in
   metrics.jsonl); --max-consecutive-bad-steps in a row stop the run. The run holds OUTPUT_DIR's lock
   (nash_fast.rundir) throughout. SIGINT / SIGTERM (nash_fast.interrupt) stop it at the next safe point (after
   the current step, which is checkpointed; after a precompute batch; after a model load), print how to
   resume, exit 130 / 0. Checkpoints are atomic and digested (nash_fast.checkpoint), so a kill -9 loses at
   most the steps since the last one; rerunning with the same --output-dir resumes from the newest one that
   verifies and loads (a damaged one is skipped, naming the file), RNG states and metrics log included.
5. Output (OUTPUT_DIR): metrics.jsonl (one line per step; nash_fast.metrics), checkpoints/step-N/, final/
   (save_pretrained model + tokenizer), plots/*.png, tensorboard/ when tensorboard is installed.

With --lora-r the policy is the base with PEFT LoRA adapters (nash_fast.adapters, hooks marked "adapters
hook"): it is loaded before the precompute pass, whose reference is its base with the adapters disabled;
checkpoints hold the adapters; final/ is a PEFT adapter directory (+ merged/ with --merge-adapters).

Multi-process runs need DeepSpeed (--deepspeed FILE or --zero-stage N; nash_fast.distributed: the process group, a
world of one without a launcher, the DeepSpeed config). One packed row is one micro-batch
(train_micro_batch_size_per_gpu = 1; its size is --max-tokens), the global batch is W x --grad-accum rows.
DeepSpeed runs on CPU too (gloo backend, torch optimizers): tests/test_train.py checks that 2 CPU processes
with ZeRO-2 match 1 process with twice the accumulation, and that a resumed 2-process run is bitwise the
uninterrupted one. The backbone runs through the engine's forward (ZeRO counts micro-steps there), the LM
head weight is gathered around the fused loss and its backward (nash_fast.model.gathered_lm_head), and a
non-finite loss on any rank becomes a non-finite gradient everywhere so ZeRO's overflow check skips the step
on all ranks. The precompute pass loads each frozen model whole on every process (no ZeRO-3 partitioning).
"""

from __future__ import annotations

if __name__ == "__main__":  # a Ctrl-C / SIGTERM while torch & co. import: one line, no traceback
    from nash_fast.interrupt import exit_quietly_on_signals

    exit_quietly_on_signals("python -m nash_fast.train")

import contextlib
import importlib.util
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from nash_fast import rundir
from nash_fast.adapters import load_policy, model_load_kwargs, save_final
from nash_fast.checkpoint import remove_checkpoints
from nash_fast.cli import RunFailed, run_cli
from nash_fast.config import TrainConfig, parse_config
from nash_fast.console import Console, is_terminal, library_bars_only_on_a_terminal, log
from nash_fast.data import PackedPreferenceCollator, TokenBudgetBatchSampler, example_sequence_lengths, split_by_role
from nash_fast.data.dataset import load_records, load_rows, tokenize, validate_records  # noqa: F401 (load_rows: API)
from nash_fast.data.sampler import BatchStream
from nash_fast.distributed import Dist, deepspeed_config, select_device, setup_distributed
from nash_fast.fused_loss import FusedLinearPreferenceLoss
from nash_fast.interrupt import Interrupted, exit_status, exit_with, mark_finished, stop_signals
from nash_fast.metrics import MetricsLog, loss_start_end, print_summary, write_plots
from nash_fast.model import (
    compile_decoder_layers,
    enable_activation_checkpointing,
    gathered_lm_head,
    head_logit_transform,
    packed_hidden_states,
)
from nash_fast.optimization import build_optimizer, lr_factor
from nash_fast.precompute import attach_logprobs, cached_sequence_logprobs
from nash_fast.pretrained import resolve_model
from nash_fast.resume import TrainerState, resume_run, save_run_checkpoint, seed_everything
from nash_fast.rundir import RunLock, remove_dead_temporaries
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer

__all__ = ["main", "train", "load_records", "validate_records", "LossPlan", "micro_batch_loss"]


# =============================================================================================== models

def load_tokenizer(cfg: TrainConfig):
    name = cfg.tokenizer or cfg.model
    if name == "tiny":
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    option = "--tokenizer" if cfg.tokenizer else "--model"
    path = resolve_model(name, gguf_file=cfg.gguf_file, option=option, log=log)
    return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)


def _attn_implementation(cfg: TrainConfig, device: torch.device) -> str | None:
    if cfg.attn_implementation is not None:
        return cfg.attn_implementation
    if device.type == "cuda":
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return None


def _model_option(name: str, cfg: TrainConfig) -> str:
    """The flag that named `name`, for messages."""
    return next((f"--{o.replace('_', '-')}" for o in ("model", "ref_model", "prev_model") if getattr(cfg, o) == name),
                "--model")


def load_model(name: str, cfg: TrainConfig, *, vocab_size: int, dtype: torch.dtype, device: torch.device,
               quantize: bool = False):
    """A causal LM by hub name / local path, or the tiny random-init model (fixed weights). quantize: load it
    4-/8-bit as --load-in-4bit / --load-in-8bit ask (the LoRA policy's base)."""
    attn = _attn_implementation(cfg, device)
    placed = False  # a quantized model is placed by the loader and cannot be moved
    if name == "tiny":
        # Always the same weights (seed 0), independent of --seed: "tiny" names one model, so a reference or
        # previous iterate given as "tiny" in another run is this very model.
        model = build_tiny_model(vocab_size, dtype=dtype, attn_implementation=attn)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if attn is not None:
            kwargs["attn_implementation"] = attn
        if quantize:  # adapters hook: QLoRA's bitsandbytes config (nash_fast.adapters)
            kwargs.update(model_load_kwargs(cfg, device))
            placed = "device_map" in kwargs
        # A GGUF file is loaded from its dequantized cache directory (float32; `dtype` casts as for any model).
        path = resolve_model(name, gguf_file=cfg.gguf_file, option=_model_option(name, cfg), log=log)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        raise ValueError(f"model {name!r} has {model.get_input_embeddings().weight.shape[0]} embeddings, fewer than "
                         f"the tokenizer's {vocab_size} tokens")
    return model if placed else model.to(device)


# =============================================================================================== loss

@dataclass
class LossPlan:
    """What the collator carries and how a batch maps to FusedLinearPreferenceLoss's inputs."""

    loss: str
    groups: bool  # SPPO all-responses form (K-response records)
    augment: bool  # Sr-DPO / Sr-IPO: pack the p + x sequences too
    sequence_fields: tuple[str, ...] = ()
    pair_fields: tuple[str, ...] = ()

    @classmethod
    def for_config(cls, cfg: TrainConfig, examples: Sequence[dict]) -> "LossPlan":
        groups = "responses_ids" in examples[0]
        augment = cfg.loss in ("sr_dpo", "sr_ipo")
        sequence_fields = ("ref_logps",) + (("prev_logps",) if cfg.loss == "inpo" else ()) + (("winrate",) if groups else ())
        pair_fields = ("preference",) if cfg.loss in ("sppo", "spce") and not groups else ()
        return cls(cfg.loss, groups, augment, sequence_fields, pair_fields)

    def collator(self, max_tokens: int | None = None):
        return PackedPreferenceCollator(
            augment=self.augment, sequence_fields=self.sequence_fields, pair_fields=self.pair_fields, max_tokens=max_tokens
        )

    def loss_inputs(self, batch: dict, device) -> dict[str, torch.Tensor]:
        if self.groups:
            return {"ref_logps": batch["ref_logps"].to(device), "winrate": batch["winrate"].to(device),
                    "pair_index": batch["pair_index"].to(device)}
        ref = split_by_role(batch["ref_logps"], batch)
        inputs = {"ref_chosen_logps": ref["chosen"], "ref_rejected_logps": ref["rejected"]}
        if self.augment:
            inputs.update(aug_ref_chosen_logps=ref["aug_chosen"], aug_ref_rejected_logps=ref["aug_rejected"])
        if self.loss == "inpo":
            prev = split_by_role(batch["prev_logps"], batch)
            inputs.update(prev_chosen_logps=prev["chosen"], prev_rejected_logps=prev["rejected"])
        if self.loss == "sppo":
            inputs["winrate"] = batch["preference"]
        if self.loss == "spce":
            inputs["target_prob"] = batch["preference"]
        inputs = {k: v.to(device) for k, v in inputs.items()}
        inputs.update(role=batch["role"].to(device), pair_index=batch["pair_index"].to(device))
        return inputs


def build_loss_fn(cfg: TrainConfig):
    hyper = {k: getattr(cfg, k) for k in ("beta", "eta", "tau", "lam", "label_smoothing", "discopop_tau")
             if getattr(cfg, k) is not None}
    options = dict(average_log_prob=cfg.average_log_prob, backend=cfg.logprob_backend,
                   filter_eps=cfg.logprob_filter_eps_value())
    if cfg.loss_types():  # TRL's loss types: one, or TRL's loss_type list with loss_weights
        hyper.update(loss_weights=cfg.loss_weight_values(), bco_running_mean=cfg.bco_running_mean)
        return FusedLinearPreferenceLoss(list(cfg.loss_types()), **options, **hyper)
    return FusedLinearPreferenceLoss(cfg.loss, **options, **hyper)


class PackedBackbone(torch.nn.Module):
    """The policy's backbone over one packed row -> final hidden states [T, H].

    This is the module DeepSpeed's engine wraps: the engine's forward must run every micro-batch (ZeRO
    counts micro-steps there; skipping it makes ZeRO-3 overwrite instead of accumulate gradients), while
    the LM head is applied by the fused loss, outside any module forward."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict) -> torch.Tensor:
        return packed_hidden_states(self.lm, batch)


def micro_batch_loss(model, batch: dict, loss_fn, plan: LossPlan, *, forward=None,
                     autocast_dtype: torch.dtype | None = None, backward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics of one packed micro-batch of the causal LM `model`.

    forward(batch) -> hidden [T, H] runs the backbone (default: packed_hidden_states(model, batch); the
    trainer passes the DeepSpeed engine). With backward given, backward(loss) runs while the LM-head weight
    is still gathered (ZeRO-3 needs forward and backward inside the gather)."""
    device = model.get_input_embeddings().weight.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        hidden = forward(batch) if forward is not None else packed_hidden_states(model, batch)
    scale, softcap = head_logit_transform(model)
    if softcap is not None and loss_fn.softcap != softcap:
        loss_fn.softcap = softcap
    if autocast_dtype is not None:
        # The LM head is a Linear, which autocast runs in autocast_dtype; the final RMSNorm hands back the fp32
        # residual stream's dtype, so without this cast the fused head would run its fp32 kernels (3-4x the
        # time on a CPU with bf16 matrix instructions).
        hidden = hidden.to(autocast_dtype)
    with gathered_lm_head(model) as (weight, bias):
        weight = weight.to(hidden.dtype) * scale if scale != 1.0 else weight.to(hidden.dtype)
        if bias is not None:
            bias = bias.to(hidden.dtype) * scale
        loss, metrics = loss_fn(weight, hidden, batch["labels"][0].to(device), bias=bias,
                                cu_seqlens=batch["cu_seqlens"].to(device), **plan.loss_inputs(batch, device))
        if backward is not None:
            backward(loss)
    return loss, metrics


# =============================================================================================== trainer

@dataclass
class TrainRun:
    """Everything the loop touches."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    model: torch.nn.Module  # the HF model (engine.module under DeepSpeed)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    engine: Any
    loss_fn: Any
    plan: LossPlan
    collate: Any
    examples: list[dict]
    stream: BatchStream
    sampler: Any
    total_steps: int
    warmup_steps: int
    forward: Any = None  # batch -> hidden states: the DeepSpeed engine, or the plain PackedBackbone
    adapters: Any = None  # nash_fast.adapters.Adapters with --lora-r (model is then the base with LoRA layers)
    zero0_skipped: bool = False
    stage0_grad_norm: float | None = None
    state: TrainerState = field(default_factory=TrainerState)
    metrics_lines: list[str] = field(default_factory=list)  # metrics.jsonl so far (rank 0), saved in each checkpoint

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.output_dir / "checkpoints"


_METRIC_KEYS = ("loss", "chosen_logratio", "rejected_logratio", "reward_accuracy", "reward_margin", "logratio")


def _train_step(run: TrainRun) -> dict:
    """One optimizer step over W x G global micro-batches; returns its metrics record."""
    cfg, dist, state = run.cfg, run.dist, run.state
    start = time.perf_counter()
    per_step = dist.world_size * cfg.grad_accum
    autocast_dtype = torch.bfloat16 if cfg.bf16 and run.engine is None else None
    sums = torch.zeros(len(_METRIC_KEYS) + 4, dtype=torch.float64)  # metrics..., tokens, padding, count, bad
    has_key = torch.zeros(len(_METRIC_KEYS), dtype=torch.float64)
    for j in range(cfg.grad_accum):
        indices = run.stream.batch(state.position + j * dist.world_size + dist.rank)
        batch = run.collate([run.examples[i] for i in indices])
        bad = [False]

        def backward(loss):
            if not bool(torch.isfinite(loss.detach())):
                bad[0] = True
                if run.engine is None:
                    return  # skip its backward; the step is skipped below
                loss = loss * float("nan")  # make every gradient non-finite so DeepSpeed skips the step everywhere
            if run.engine is not None:
                run.engine.backward(loss)
            else:
                (loss / cfg.grad_accum).backward()

        loss, metrics = micro_batch_loss(run.model, batch, run.loss_fn, run.plan, forward=run.forward,
                                         autocast_dtype=autocast_dtype, backward=backward)
        if run.engine is not None:
            if j == cfg.grad_accum - 1 and run.engine.zero_optimization_stage() == 0:
                # Stage 0 keeps full, already all-reduced gradients in p.grad; DeepSpeed reports no norm for it.
                grads = [p.grad.float().norm() for p in run.model.parameters() if p.grad is not None]
                run.stage0_grad_norm = float(torch.stack(grads).norm()) if grads else None
            run.engine.step()  # applies the update at the accumulation boundary only
        metrics = {**metrics, "loss": loss.detach()}  # the value that was back-propagated
        for k, key in enumerate(_METRIC_KEYS):
            if key in metrics:
                sums[k] += float(metrics[key])
                has_key[k] = 1
        stats = run.sampler.batch_stats(indices)
        sums[-4] += stats["tokens"]
        sums[-3] += stats["padding_fraction"]
        sums[-2] += 1
        sums[-1] += float(bad[0])
    dist.all_reduce(sums)

    grad_norm = None
    if run.engine is not None:
        # engine.step() above ran the optimizer at the boundary; a ZeRO / bf16 optimizer skips a non-finite
        # gradient by itself (overflow). The plain fp32 stage-0 optimizer does not: _install_zero0_guard's
        # pre-step hook drops such gradients and records the skip.
        norm = run.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else run.stage0_grad_norm
        run.stage0_grad_norm = None
        applied = getattr(run.engine, "_step_applied", True) and not run.zero0_skipped
        run.zero0_skipped = False
    else:
        params = [p for p in run.model.parameters() if p.requires_grad]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        if sums[-1] > 0:
            applied = False
        else:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            applied = math.isfinite(grad_norm)
        if applied:
            run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
    if sums[-1] > 0:
        applied = False
    lr = run.scheduler.get_last_lr()[0]
    if applied:
        run.scheduler.step()
        state.consecutive_bad = 0
    else:
        state.consecutive_bad += 1
        state.skipped_steps += 1
    # A step belongs to the epoch of its first micro-batch: the last step of a run may reach past the last
    # epoch's end (total_steps rounds up to whole steps), its first micro-batch never does.
    epoch = run.stream.locate(state.position)[0]
    state.step += 1
    state.position += per_step
    tokens = int(sums[-4])
    state.tokens_seen += tokens
    elapsed = time.perf_counter() - start
    count = float(sums[-2])
    record: dict[str, Any] = {"step": state.step}
    for k, key in enumerate(_METRIC_KEYS):
        if has_key[k]:  # the same on every rank: the keys depend on the loss form only
            value = float(sums[k]) / count
            record[key] = value if math.isfinite(value) else None
    record.update(
        lr=lr, tokens=tokens, tokens_per_s=tokens / elapsed if elapsed > 0 else None, grad_norm=grad_norm,
        padding_fraction=float(sums[-3]) / count, epoch=epoch,
        step_time_s=elapsed, skipped=not applied,
    )
    if not applied:
        record["skip_reason"] = "non-finite loss" if sums[-1] > 0 else "non-finite gradient"
    # metrics.jsonl stays strict JSON (no NaN / Infinity tokens): a non-finite value is written as null.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _install_zero0_guard(run: TrainRun) -> None:
    """Plain DeepSpeed stage 0 in fp32 applies whatever gradient it has; drop a non-finite one before the
    optimizer sees it (torch optimizers skip parameters without gradients), so that step is skipped too."""
    def pre_step(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        if not bool(finite):
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
            run.zero0_skipped = True

    run.optimizer.register_step_pre_hook(pre_step)


def train(cfg: TrainConfig) -> dict:
    """Run training per cfg; returns a summary (paths, steps, last metrics).

    SIGINT / SIGTERM (nash_fast.interrupt) stop the run at the next safe point: after the current optimizer step
    (which is then checkpointed), after a precompute shard, or after a model load. The summary then has
    stopped_by_signal True, signal 'SIGINT' / 'SIGTERM' and the checkpoint to resume from."""
    threads = torch.get_num_threads()
    try:
        with stop_signals("nash_fast"), library_bars_only_on_a_terminal():
            return _train(cfg)
    finally:
        torch.set_num_threads(threads)  # train() may run inside a larger program (selfplay, tests)


# How to rerun this run (set by main(); library callers rerun train() with the same config).
_COMMAND: str | None = None


def _lock_output_dir(cfg: TrainConfig, dist: Dist):
    """Rank 0 locks --output-dir for the run's life (nash_fast.rundir); every rank fails if it cannot."""
    lock, error = None, None
    if dist.is_main:
        try:
            lock = RunLock(cfg.output_dir, log=log).acquire()
        except (ValueError, OSError) as caught:
            error = caught
    failed = dist.all_reduce(torch.tensor([float(error is not None)]), "max").item() > 0
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"--output-dir {cfg.output_dir}: rank 0 could not lock it (see rank 0's message)")
    return lock


def _train(cfg: TrainConfig) -> dict:
    dist = setup_distributed(cfg)
    device = select_device(cfg, dist)
    dist.agree_on_owner()
    lock = _lock_output_dir(cfg, dist)
    try:
        return _locked_train(cfg, dist, device)
    finally:
        if lock is not None:
            lock.release()


def _stopped(signal_name: str, where: str, run: TrainRun | None, checkpoint: Path | None, dist: Dist, output_dir: Path,
             extra: dict | None = None) -> dict:
    """The summary of a run stopped by a signal, after printing where and how to resume."""
    if dist.is_main:
        saved = (f"checkpoint {checkpoint} (step {run.state.step} of {run.total_steps})" if checkpoint is not None
                 else "no new checkpoint (no optimizer step since the last one)")
        command = _COMMAND or "the same command (train() with the same config)"
        log(f"{signal_name}: stopped {where}; {saved}. Resume with {command}: it continues from the newest "
            f"checkpoint in {output_dir / 'checkpoints'}")
    return {"output_dir": str(output_dir), "metrics": str(output_dir / "metrics.jsonl"),
            "steps": run.state.step if run is not None else 0, "stopped_by_signal": True, "signal": signal_name,
            "checkpoint": None if checkpoint is None else str(checkpoint), **(extra or {})}


def _locked_train(cfg: TrainConfig, dist: Dist, device: torch.device) -> dict:
    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    elif cfg.model == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)
    output_dir = Path(cfg.output_dir)
    if dist.is_main:  # leftovers of a killed run (.tmp-final, metrics.jsonl.tmp, ...); checkpoints/ in resume_run
        remove_dead_temporaries(output_dir, locked=True, log=log)
    seed_everything(cfg.seed)

    # 1. data: schema before any model
    records = load_records(cfg)
    tokenizer = load_tokenizer(cfg)
    examples = tokenize(cfg, tokenizer, records)
    plan = LossPlan.for_config(cfg, examples)
    lengths = [example_sequence_lengths(e, i, augment=plan.augment) for i, e in enumerate(examples)]
    try:
        sampler = TokenBudgetBatchSampler(lengths, cfg.max_tokens, shuffle=cfg.shuffle, seed=cfg.seed)
    except ValueError as error:  # an example (= dataset row, same order) longer than the budget
        raise ValueError(f"--max-tokens {cfg.max_tokens}: {error}".replace("example ", "row ", 1)) from None
    stream = BatchStream(sampler)
    per_step = dist.world_size * cfg.grad_accum
    total_steps = cfg.max_steps or max(1, math.ceil(stream.micro_batches_for_epochs(cfg.resolved_epochs()) / per_step))
    if dist.is_main:
        log(f"{len(examples)} {'groups' if plan.groups else 'pairs'} from {cfg.dataset}; {len(stream.epoch_batches(0))} "
            f"micro-batches of <= {cfg.max_tokens} tokens per epoch; {total_steps} steps of {per_step} micro-batches")
    signal_name = dist.stop_requested()
    if signal_name:
        return _stopped(signal_name, "before training (data loaded)", None, None, dist, output_dir)

    # 2. precompute with the frozen models, released afterwards; completed shards survive a stop
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    vocab_size = len(tokenizer)
    policy_dtype = dtype if cfg.uses_deepspeed() else torch.float32
    lora = None
    if cfg.lora_r is not None:  # adapters hook: base + LoRA loaded first; the reference is its base (nash_fast.adapters)
        lora = load_policy(cfg, lambda: load_model(cfg.model, cfg, vocab_size=vocab_size, dtype=policy_dtype,
                                                   device=device, quantize=True))
        if cfg.torch_compile:  # before its adapters-disabled reference pass, like every frozen model (_precompute)
            compile_decoder_layers(lora.model)
        trainable, total = lora.parameter_counts()
        if dist.is_main:
            log(f"LoRA r={cfg.lora_r}: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3g}%)")
    try:
        _precompute(cfg, dist, device, dtype, vocab_size, examples, plan, lora=lora)
    except Interrupted as stop:
        return _stopped(stop.signal_name, f"during precompute ({stop})", None, None, dist, output_dir)

    # 3. policy, optimizer, schedule, engine
    model = lora.model if lora is not None else load_model(cfg.model, cfg, vocab_size=vocab_size, dtype=policy_dtype,
                                                           device=device)
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.torch_compile:
        compile_decoder_layers(model)
    model.config.use_cache = False
    model.train()
    optimizer = build_optimizer(cfg, model.parameters())
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps=total_steps, warmup_steps=warmup, schedule=cfg.lr_scheduler))
    engine = None
    if cfg.uses_deepspeed():
        import deepspeed

        engine, optimizer, _, _ = deepspeed.initialize(model=PackedBackbone(model), optimizer=optimizer,
                                                       config=deepspeed_config(cfg, dist.world_size))
        model = engine.module.lm
        # The scheduler stays on the client optimizer: DeepSpeed's wrapper steps it with the same param-group
        # dicts, and we step the schedule ourselves only for applied (not skipped) steps.
    run = TrainRun(cfg, dist, device, model, optimizer, scheduler, engine, build_loss_fn(cfg), plan, plan.collator(),
              examples, stream, sampler, total_steps, warmup, forward=engine if engine is not None else PackedBackbone(model),
              adapters=lora)
    if engine is not None and engine.zero_optimization_stage() == 0 and not cfg.bf16:
        _install_zero0_guard(run)

    # 4. resume: the newest checkpoint that verifies and loads (older ones if the newest is damaged)
    if cfg.resume == "never" and dist.is_main:
        remove_checkpoints(run.checkpoint_root)
    dist.barrier()
    resume_from = resume_run(run)
    if resume_from is not None and dist.is_main:
        log(f"resumed from {resume_from} at step {run.state.step}")
    signal_name = dist.stop_requested()
    if signal_name:
        return _stopped(signal_name, "before the first step", run, None, dist, output_dir)
    metrics_log = MetricsLog(output_dir, dist.is_main, cfg.tensorboard, run.metrics_lines)
    signal_name = checkpoint = None

    # 5. loop: a bar on a terminal, plain progress lines in a log (nash_fast.console)
    console = Console(enabled=dist.is_main)
    record: dict = {}
    try:
        with console.progress(total=total_steps, initial=run.state.step, desc=cfg.loss, show=cfg.progress_bar) as progress:
            while run.state.step < total_steps:
                record = _train_step(run)
                metrics_log.write(record)
                progress.update(run.state.step, loss=record.get("loss"), tokens=record["tokens"],
                                tokens_per_s=record["tokens_per_s"])
                if run.state.consecutive_bad >= cfg.max_consecutive_bad_steps:
                    raise RunFailed(
                        f"{run.state.consecutive_bad} optimizer steps in a row were skipped for a non-finite loss or "
                        f"gradient (last at step {run.state.step}, see {metrics_log.path}); stopping "
                        f"(--max-consecutive-bad-steps {cfg.max_consecutive_bad_steps})"
                    )
                signal_name = dist.stop_requested() if run.state.step < total_steps else None  # the last step: finish
                if signal_name:
                    checkpoint = save_run_checkpoint(run)
                    break
                if cfg.save_steps and run.state.step % cfg.save_steps == 0 and run.state.step < total_steps:
                    save_run_checkpoint(run)
    finally:
        metrics_log.close()
    if signal_name:
        return _stopped(signal_name, f"after step {run.state.step}", run, checkpoint, dist, output_dir,
                        {"last": record, "skipped_steps": run.state.skipped_steps})

    if run.state.step > 0 and run.state.skipped_steps == run.state.step:
        raise RunFailed(f"all {run.state.step} optimizer steps were skipped for a non-finite loss or gradient (see "
                        f"{metrics_log.path}); the model never changed, so no final model is written")
    summary = {"output_dir": str(output_dir), "metrics": str(metrics_log.path), "steps": run.state.step,
               "loss_start_end": loss_start_end(metrics_log.path) if dist.is_main else None,
               "skipped_steps": run.state.skipped_steps, "last": record, "stopped_by_signal": False}
    # A stop requested from here on changes nothing: the final checkpoint and model are what remains to do.
    save_run_checkpoint(run)
    summary["model"] = str(_save_final_model(run, tokenizer))
    if run.adapters is not None:  # adapters hook: final/ is a PEFT adapter directory
        summary["model_kind"] = "a PEFT adapter: peft.AutoPeftModelForCausalLM.from_pretrained"
        if cfg.merge_adapters:
            summary["merged_model"] = str(output_dir / "merged")
    if dist.is_main:
        summary["plots"] = write_plots(cfg, output_dir)
        print_summary(summary)
    dist.barrier()
    return summary


def _precompute(cfg, dist, device, dtype, vocab_size, examples, plan, lora=None) -> None:
    cache_dir = Path(cfg.cache_dir or Path(cfg.output_dir) / "precompute")
    # The plain --bf16 path trains an fp32 policy under bf16 autocast: the frozen models run the same way, so the
    # reference's log-probs are the policy's at step 0 (a bf16-weight reference is off by ~0.01-0.03 nat per
    # sequence on SmolLM2: a bias in every log-ratio). DeepSpeed's bf16 keeps bf16 weights: so do its references.
    autocast_dtype = torch.bfloat16 if cfg.bf16 and not cfg.uses_deepspeed() else None
    if autocast_dtype is not None:
        dtype = torch.float32
    settings = {"dtype": str(dtype), "attn": cfg.attn_implementation, "backend": cfg.logprob_backend,
                **({"autocast": str(autocast_dtype)} if autocast_dtype is not None else {}),
                **({"torch_compile": True} if cfg.torch_compile else {})}
    common = dict(cache_dir=cache_dir, augment=plan.augment, average=cfg.average_log_prob,
                  max_tokens=cfg.precompute_max_tokens or 2 * cfg.max_tokens, backend=cfg.logprob_backend,
                  settings=settings, rank=dist.rank, world_size=dist.world_size, barrier=dist.barrier,
                  # precompute's tqdm bar only on a terminal: in a log file it is one line of carriage returns
                  progress=cfg.progress_bar and is_terminal(sys.stderr), log=log if dist.is_main else (lambda m: None),
                  stop=dist.stop_requested, locked=_inside(cache_dir, Path(cfg.output_dir)),
                  autocast_dtype=autocast_dtype)
    ref_name = cfg.ref_model or cfg.model

    def loader(name):
        def load():
            model = load_model(name, cfg, vocab_size=vocab_size, dtype=dtype, device=device)
            if cfg.torch_compile:  # compiled layers round differently from eager ones (~0.1 nat per sequence on
                compile_decoder_layers(model)  # SmolLM2 in bf16): the reference runs as the policy will
            return model
        return load

    def logprobs(label, option, name):
        if lora is not None:  # adapters hook: the policy with adapters disabled / on, or a model of its own
            return lora.cached_logprobs(label, option, examples, cached_sequence_logprobs, common, loader)
        return cached_sequence_logprobs(label, name, loader(name), examples, **common)

    ref, _ = logprobs("ref", cfg.ref_model, ref_name)
    attach_logprobs(examples, ref, "ref_logps", augment=plan.augment)
    if cfg.loss == "inpo":
        if cfg.prev_model is None:  # first INPO iteration: pi_1 = pi_ref
            prev = ref
        else:
            prev, _ = logprobs("prev", cfg.prev_model, cfg.prev_model)
        attach_logprobs(examples, prev, "prev_logps", augment=plan.augment)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _save_final_model(run: TrainRun, tokenizer) -> Path:
    """save_pretrained (+ tokenizer) into OUTPUT/final, written aside and renamed."""
    if run.adapters is not None:  # adapters hook: final/ is a PEFT adapter directory (+ merged/, nash_fast.adapters)
        cfg = run.cfg
        return save_final(run, tokenizer, run.adapters, lambda: load_model(
            cfg.model, cfg, vocab_size=len(tokenizer), dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
            device=torch.device("cpu")))
    final = run.output_dir / "final"
    state_dict = None
    if run.engine is not None and run.engine.zero_optimization_stage() == 3:
        state_dict = run.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        if state_dict is not None:  # keys of the PackedBackbone wrapper: lm.<name>
            state_dict = {k[len("lm."):]: v for k, v in state_dict.items()}
    if run.dist.is_main:
        with rundir.atomic_directory(final) as tmp:  # an older final/ is replaced
            run.model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    run.dist.barrier()
    return final


PROG = "python -m nash_fast.train"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: one line per user error (exit 2), traceback only for bugs or with --debug (nash_fast.cli);
    after a SIGTERM / SIGINT stop, exit status 0 / 130."""
    return run_cli(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    global _COMMAND
    shown, skip = [], False
    for arg in argv:  # the deepspeed launcher's --local_rank is not the user's
        if skip or arg.startswith(("--local_rank", "--local-rank")):
            skip = not skip and "=" not in arg and arg.startswith("--local")
            continue
        shown.append(arg)
    _COMMAND = shlex.join([*PROG.split(), *shown])
    cfg = parse_config(argv)
    summary = train(cfg)
    if summary.get("stopped_by_signal"):
        return exit_status(summary["signal"])
    mark_finished()
    return 0


if __name__ == "__main__":
    exit_with(main())
