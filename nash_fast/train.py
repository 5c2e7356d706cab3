"""python -m nash_fast.train: a slim trainer for SPPO, INPO, IPO, DPO, Sr-DPO, Sr-IPO and SPCE.

    python -m nash_fast.train                                  # demo: tiny model, shipped data, SPPO, CPU
    python -m nash_fast.train --config run.yaml --max-steps 500 --output-dir runs/x
    deepspeed --num_gpus 8 --module nash_fast.train --zero-stage 2 --bf16 --model Qwen/Qwen2.5-0.5B-Instruct ...
    torchrun --nproc-per-node 8 -m nash_fast.train --zero-stage 3 ...

Every option is a field of nash_fast.config.TrainConfig (see --help). The run, top to bottom:

1. Data (nash_fast.data): rows from a jsonl/json/parquet file or a datasets name (loading.py), columns renamed
   by --columns, each row's format decided and checked (formats.py: TRL's standard / conversational,
   explicit / implicit prompt, SPPO groups; errors name the row and column) before any model is loaded,
   then tokenized (records.py: chat template or raw text; nothing truncated).
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
5. Output (OUTPUT_DIR): metrics.jsonl (one line per step), checkpoints/step-N/, final/
   (save_pretrained model + tokenizer), plots/*.png, tensorboard/ when tensorboard is installed.

Multi-process runs need DeepSpeed (--deepspeed FILE or --zero-stage N). One packed row is one micro-batch
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
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nash_fast.checkpoint import (
    checkpoint_name,
    is_complete,
    remove_checkpoints,
    save_checkpoint,
    write_json_atomic,
)
from nash_fast.config import TrainConfig, parse_config, to_dict
from nash_fast.rundir import hostname
from nash_fast.console import Console, is_terminal, library_bars_only_on_a_terminal

__all__ = ["main", "train", "load_records", "validate_records", "LossPlan", "micro_batch_loss"]

CONSOLE = Console()


def log(message: str) -> None:
    """A "[nash_fast] ..." line on stdout, printed through the progress bar while one is shown."""
    CONSOLE.log(message)


# =============================================================================================== data

def load_rows(cfg: TrainConfig) -> list[dict]:
    """Raw rows of --dataset (no model, no tokenizer): nash_fast.data.loading."""
    from nash_fast.data.loading import load_rows as load

    return load(cfg.dataset, split=cfg.dataset_split, config=cfg.dataset_config)


def validate_records(rows: Sequence[Any], cfg: TrainConfig) -> list[dict]:
    """Rename columns (--columns), decide each row's format and check what the loss needs
    (nash_fast.data.formats: TRL's standard / conversational, explicit / implicit prompt, SPPO groups).

    Errors name the row and the dataset's column. Returns the records in explicit form with canonical field
    names (other columns are kept unchanged)."""
    from nash_fast.data.formats import validate_records as validate

    return validate(rows, columns=cfg.column_mapping(), loss=cfg.loss, default_preference=cfg.default_preference,
                    aug_prompt=cfg.aug_prompt, source=f"--dataset {cfg.dataset}")


def load_records(cfg: TrainConfig) -> list[dict]:
    """load_rows + validate_records: the validated records of --dataset."""
    return validate_records(load_rows(cfg), cfg)


def tokenize(cfg: TrainConfig, tokenizer, records: list[dict]) -> list[dict]:
    from nash_fast.data import tokenize_records

    from nash_fast.data import apply_chat_template_option

    use_chat_template = apply_chat_template_option(tokenizer, cfg.chat_template)  # a given template is installed
    try:
        examples = tokenize_records(tokenizer, records, use_chat_template=use_chat_template, max_length=cfg.max_length)
    except ValueError as error:  # "record i: ..." is row i of --dataset
        message = str(error)
        if message.startswith("record "):
            message = f"--dataset {cfg.dataset}: row {message[len('record '):]}"
        raise ValueError(message) from None
    # Only the fields the collator and losses read travel with the examples.
    keep = ("prompt_ids", "chosen_ids", "rejected_ids", "aug_prompt_ids", "responses_ids", "responses_winrate", "preference")
    return [{k: e[k] for k in keep if k in e} for e in examples]


# =============================================================================================== models

def load_tokenizer(cfg: TrainConfig):
    name = cfg.tokenizer or cfg.model
    if name == "tiny":
        from nash_fast.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name, trust_remote_code=cfg.trust_remote_code)


def _attn_implementation(cfg: TrainConfig, device: torch.device) -> str | None:
    if cfg.attn_implementation is not None:
        return cfg.attn_implementation
    if device.type == "cuda":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
    return None


def load_model(name: str, cfg: TrainConfig, *, vocab_size: int, dtype: torch.dtype, device: torch.device):
    """A causal LM by hub name / local path, or the tiny random-init model (fixed weights)."""
    attn = _attn_implementation(cfg, device)
    if name == "tiny":
        from nash_fast.tiny import build_tiny_model

        # Always the same weights (seed 0), independent of --seed: "tiny" names one model, so a reference or
        # previous iterate given as "tiny" in another run is this very model.
        model = build_tiny_model(vocab_size, dtype=dtype, attn_implementation=attn)
    else:
        from transformers import AutoModelForCausalLM

        kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if attn is not None:
            kwargs["attn_implementation"] = attn
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        raise ValueError(f"model {name!r} has {model.get_input_embeddings().weight.shape[0]} embeddings, fewer than "
                         f"the tokenizer's {vocab_size} tokens")
    return model.to(device)


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
        from nash_fast.data import PackedPreferenceCollator

        return PackedPreferenceCollator(
            augment=self.augment, sequence_fields=self.sequence_fields, pair_fields=self.pair_fields, max_tokens=max_tokens
        )

    def loss_inputs(self, batch: dict, device) -> dict[str, torch.Tensor]:
        from nash_fast.data import split_by_role

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
    from nash_fast.fused_loss import FusedLinearPreferenceLoss

    hyper = {k: getattr(cfg, k) for k in ("beta", "eta", "tau", "lam") if getattr(cfg, k) is not None}
    return FusedLinearPreferenceLoss(cfg.loss, average_log_prob=cfg.average_log_prob, backend=cfg.logprob_backend, **hyper)


class PackedBackbone(torch.nn.Module):
    """The policy's backbone over one packed row -> final hidden states [T, H].

    This is the module DeepSpeed's engine wraps: the engine's forward must run every micro-batch (ZeRO
    counts micro-steps there; skipping it makes ZeRO-3 overwrite instead of accumulate gradients), while
    the LM head is applied by the fused loss, outside any module forward."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, batch: dict) -> torch.Tensor:
        from nash_fast.model import packed_hidden_states

        return packed_hidden_states(self.lm, batch)


def micro_batch_loss(model, batch: dict, loss_fn, plan: LossPlan, *, forward=None,
                     autocast_dtype: torch.dtype | None = None, backward=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and metrics of one packed micro-batch of the causal LM `model`.

    forward(batch) -> hidden [T, H] runs the backbone (default: packed_hidden_states(model, batch); the
    trainer passes the DeepSpeed engine). With backward given, backward(loss) runs while the LM-head weight
    is still gathered (ZeRO-3 needs forward and backward inside the gather)."""
    from nash_fast.model import head_logit_transform, gathered_lm_head, packed_hidden_states

    device = model.get_input_embeddings().weight.device
    autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                else contextlib.nullcontext())
    with autocast:
        hidden = forward(batch) if forward is not None else packed_hidden_states(model, batch)
    scale, softcap = head_logit_transform(model)
    if softcap is not None and loss_fn.softcap != softcap:
        loss_fn.softcap = softcap
    with gathered_lm_head(model) as (weight, bias):
        weight = weight.to(hidden.dtype) * scale if scale != 1.0 else weight.to(hidden.dtype)
        if bias is not None:
            bias = bias.to(hidden.dtype) * scale
        loss, metrics = loss_fn(weight, hidden, batch["labels"][0].to(device), bias=bias,
                                cu_seqlens=batch["cu_seqlens"].to(device), **plan.loss_inputs(batch, device))
        if backward is not None:
            backward(loss)
    return loss, metrics


# =============================================================================================== distributed

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owner: str = field(default_factory=lambda: f"{os.getpid()}@{hostname()}")  # rank 0's pid@host: names temporaries

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def agree_on_owner(self) -> None:
        """Every rank names shared temporaries after rank 0 (call once the device is set: NCCL needs it)."""
        if self.world_size > 1:
            owner = [self.owner]
            torch.distributed.broadcast_object_list(owner, src=0)
            self.owner = owner[0]

    def stop_requested(self) -> str | None:
        """The stop request (SIGINT / SIGTERM) of any rank, the same on every rank (a collective when W > 1)."""
        from nash_fast.interrupt import stop_requested

        mine = stop_requested()
        code = {None: 0.0, "SIGTERM": 1.0, "SIGINT": 2.0}.get(mine, 1.0)
        agreed = self.all_reduce(torch.tensor([code]), "max").item()
        return {0.0: None, 1.0: "SIGTERM", 2.0: "SIGINT"}[agreed]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce of a CPU tensor (through the GPU when the backend is NCCL, which has no CPU path)."""
        if self.world_size > 1:
            reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            if torch.distributed.get_backend() == "nccl":
                on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
                torch.distributed.all_reduce(on_device, op=reduce_op)
                tensor.copy_(on_device.cpu())
            else:
                torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor


def setup_distributed(cfg: TrainConfig) -> Dist:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not cfg.uses_deepspeed():
        if world_size > 1:
            raise ValueError(f"WORLD_SIZE={world_size}: multi-process training goes through DeepSpeed; add "
                             "--zero-stage 0|1|2|3 or --deepspeed FILE")
        return Dist()
    import deepspeed

    if not launched():
        _init_world_of_one()
    deepspeed.init_distributed()  # nccl on GPUs, gloo on CPU (DeepSpeed's accelerator picks)
    return Dist(torch.distributed.get_rank(), torch.distributed.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# What torchrun, the deepspeed launcher, accelerate (RANK ...) and MPI launchers (OMPI_*, PMI_*) put in the environment.
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")


def launched() -> bool:
    """True when a launcher started this process (it then owns rank discovery)."""
    return any(name in os.environ for name in _LAUNCHER_VARIABLES)


def _init_world_of_one() -> None:
    """A plain `python -m nash_fast.train --zero-stage N`: this process is the whole world.

    Without launcher variables deepspeed.init_distributed() would try MPI discovery (mpi4py). Instead the
    process group is created here, in-process (a HashStore: no port, no network), with the backend DeepSpeed's
    accelerator names, and the variables a one-process launch would set are filled in (DeepSpeed's engine reads
    LOCAL_RANK)."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    if not torch.distributed.is_initialized():
        from deepspeed.accelerator import get_accelerator

        torch.distributed.init_process_group(get_accelerator().communication_backend_name(),
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)


def select_device(cfg: TrainConfig, dist: Dist) -> torch.device:
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    torch.cuda.set_device(dist.local_rank)
    return torch.device("cuda", dist.local_rank)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config: --deepspeed FILE with its 'auto' values filled, or one built from the flags.

    One packed row is one micro-batch, so train_micro_batch_size_per_gpu is 1 and the token budget is
    --max-tokens."""
    derived = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": world_size * cfg.grad_accum,
        "gradient_clipping": cfg.max_grad_norm,
    }
    if cfg.deepspeed is not None:
        with open(cfg.deepspeed) as f:
            try:
                ds = json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"--deepspeed {cfg.deepspeed}: not valid JSON ({error})") from None
        for key, value in derived.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
            elif ds[key] != value:
                raise ValueError(
                    f"--deepspeed {cfg.deepspeed}: {key}={ds[key]!r} disagrees with the trainer's {value!r} "
                    f"(from --grad-accum / --max-grad-norm and {world_size} processes; micro-batches are one packed row); "
                    "set it to \"auto\""
                )
        for precision in ("bf16", "fp16"):
            if isinstance(ds.get(precision), dict) and ds[precision].get("enabled") == "auto":
                ds[precision]["enabled"] = cfg.bf16 if precision == "bf16" else False
        if cfg.bf16 and not ds.get("bf16", {}).get("enabled", False):
            ds["bf16"] = {**ds.get("bf16", {}), "enabled": True}
        if ds.get("fp16", {}).get("enabled", False):
            raise ValueError(f"--deepspeed {cfg.deepspeed}: fp16 is not supported by the trainer (use bf16)")
        if "optimizer" in ds or "scheduler" in ds:
            raise ValueError(f"--deepspeed {cfg.deepspeed}: remove its optimizer/scheduler sections; the trainer builds "
                             "them from --optimizer / --lr / --lr-scheduler")
        ds.setdefault("zero_allow_untested_optimizer", True)
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
        ds.setdefault("steps_per_print", 10**12)
        return ds
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if cfg.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        **derived,
        "bf16": {"enabled": cfg.bf16},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW / RMSprop
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


# =============================================================================================== optimization

def build_optimizer(cfg: TrainConfig, parameters) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(parameters, lr=cfg.resolved_lr(), betas=(cfg.adam_beta1, cfg.adam_beta2),
                                 eps=cfg.optimizer_eps, weight_decay=cfg.weight_decay)
    return torch.optim.RMSprop(parameters, lr=cfg.resolved_lr(), alpha=cfg.rmsprop_alpha, eps=cfg.optimizer_eps,
                               weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of --lr for optimizer step `step` (0-based): linear warmup from 0 over warmup_steps, then
    linear or cosine decay to 0 at total_steps, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# =============================================================================================== data stream

class BatchStream:
    """The run's endless sequence of global micro-batches: epoch 0's token-budget batches, then epoch 1's, ...
    Global micro-batch p is a list of example indices; epochs are shuffled with seed + epoch."""

    def __init__(self, sampler):
        self.sampler = sampler
        self._epochs: dict[int, list[list[int]]] = {}
        self._starts = [0]  # _starts[e] = global index of epoch e's first batch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epochs:
            self.sampler.set_epoch(epoch)
            self._epochs = {epoch: self.sampler.all_batches(), **{k: v for k, v in self._epochs.items() if k >= epoch - 1}}
        return self._epochs[epoch]

    def epoch_start(self, epoch: int) -> int:
        while len(self._starts) <= epoch:
            e = len(self._starts) - 1
            self._starts.append(self._starts[e] + len(self.epoch_batches(e)))
        return self._starts[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, index within the epoch) of global micro-batch `position`."""
        epoch = 0
        while self.epoch_start(epoch + 1) <= position:
            epoch += 1
        return epoch, position - self.epoch_start(epoch)

    def batch(self, position: int) -> list[int]:
        epoch, index = self.locate(position)
        return self.epoch_batches(epoch)[index]

    def micro_batches_for_epochs(self, num_epochs: float) -> int:
        whole = int(num_epochs)
        total = self.epoch_start(whole)
        fraction = num_epochs - whole
        if fraction > 0:
            total += math.ceil(fraction * len(self.epoch_batches(whole)))
        return total


# =============================================================================================== RNG state

def rng_state() -> dict:
    """Every RNG's state as plain JSON values (no pickle): Python's Mersenne Twister words, numpy's, torch's bytes."""
    version, words, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(words), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss),
                                                                 float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of rng_state(); ValueError if the structure is not one rng_state() writes (then nothing is set)."""
    _apply_rng_state(_parse_rng_state(state))


def _parse_rng_state(state: dict) -> tuple:
    try:
        version, words, gauss = state["python"]
        name, keys, pos, has_gauss, cached = state["numpy"]
        python = (int(version), tuple(int(w) for w in words), None if gauss is None else float(gauss))
        numpy_state = (str(name), np.array(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        torch_state = torch.tensor(state["torch"], dtype=torch.uint8)
        cuda = [torch.tensor(s, dtype=torch.uint8) for s in state.get("cuda", [])]
        if len(python[1]) != 625 or numpy_state[1].shape != (624,) or torch_state.shape != torch.get_rng_state().shape:
            raise ValueError("wrong state sizes")
        if not all(0 <= w < 2**32 for w in python[1][:624]) or not 0 <= python[1][624] <= 624 or not 0 <= pos <= 624:
            raise ValueError("values out of range")
    except (KeyError, TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise ValueError(f"not an RNG state written by nash_fast ({type(error).__name__}: {error})") from None
    return python, numpy_state, torch_state, cuda


def _apply_rng_state(parsed: tuple) -> None:
    python, numpy_state, torch_state, cuda = parsed
    random.setstate(python)
    np.random.set_state(numpy_state)
    torch.set_rng_state(torch_state)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# =============================================================================================== trainer

@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done (applied or skipped)
    position: int = 0  # global micro-batches consumed
    consecutive_bad: int = 0
    skipped_steps: int = 0
    tokens_seen: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Run:
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


def _save(run: Run) -> Path | None:
    """Atomic, digested checkpoint of the current step (no-op if one exists for it). Nothing in it needs
    unpickling: model / optimizer / scheduler tensors for torch.load(weights_only=True) (or DeepSpeed's engine
    files, loaded under the same rule), trainer state, RNG states and the metrics log as JSON."""
    final = run.checkpoint_root / checkpoint_name(run.state.step)
    if is_complete(final):
        return final
    rank = run.dist.rank

    def write(tmp: Path) -> None:
        if run.engine is not None:
            run.engine.save_checkpoint(str(tmp), tag="engine", client_state={}, save_latest=False)
        elif rank == 0:
            torch.save(run.model.state_dict(), tmp / "model.pt")
            torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
        if rank == 0:
            torch.save(run.scheduler.state_dict(), tmp / "scheduler.pt")
            write_json_atomic(tmp / "trainer_state.json", {
                **run.state.to_dict(), "world_size": run.dist.world_size, "grad_accum": run.cfg.grad_accum,
                # The data position: global micro-batch `position` is batch `batch_in_epoch` of epoch `epoch`,
                # whose order is a function of (sampler_seed + epoch); nothing else is random in the stream.
                "data": dict(zip(("epoch", "batch_in_epoch"), run.stream.locate(run.state.position)),
                             sampler_seed=run.cfg.seed),
                "total_steps": run.total_steps, "warmup_steps": run.warmup_steps, "config": to_dict(run.cfg),
            })
            with open(tmp / "metrics.jsonl", "w") as f:
                f.writelines(run.metrics_lines)
        write_json_atomic(tmp / f"rng_rank{rank}.json", rng_state())

    path = save_checkpoint(run.checkpoint_root, run.state.step, write, keep_last=run.cfg.save_total_limit,
                           rank=rank, barrier=run.dist.barrier, owner=run.dist.owner)
    if run.dist.is_main:
        log(f"saved checkpoint {path}")
    return path


# Options that may change between a run and its resumption (they do not change what is being trained).
_RESUMABLE_CHANGES = {"output_dir", "resume", "max_steps", "num_epochs", "save_steps", "save_total_limit",
                      "progress_bar", "plot", "tensorboard", "max_consecutive_bad_steps", "cache_dir",
                      "precompute_max_tokens", "device", "deepspeed", "zero_stage", "offload_optimizer",
                      "offload_param", "grad_accum", "gradient_checkpointing", "logprob_backend", "attn_implementation",
                      "allow_schedule_change"}


def _check_resumable(saved_config: dict, cfg: TrainConfig, path: Path) -> None:
    current = to_dict(cfg)
    changed = sorted(k for k in current if k not in _RESUMABLE_CHANGES and saved_config.get(k, current[k]) != current[k])
    if changed:
        details = ", ".join(f"--{k.replace('_', '-')} {saved_config.get(k)!r} -> {current[k]!r}" for k in changed)
        raise ValueError(f"checkpoint {path} belongs to a different run ({details}); use another --output-dir or "
                         "--resume never to start over")


def _check_schedule(saved: dict, run: Run, path: Path) -> None:
    """A checkpoint of a run with another length (--max-steps / --num-epochs) was trained with another learning-rate
    schedule whenever lr_factor depends on the total: resuming it silently would give neither the old run nor a
    straight run of the new length. Refused unless --allow-schedule-change."""
    cfg, step = run.cfg, saved["step"]
    old_total, old_warmup = saved["total_steps"], saved.get("warmup_steps", run.warmup_steps)
    if (old_total, old_warmup) == (run.total_steps, run.warmup_steps):
        return
    old = [lr_factor(s, total_steps=old_total, warmup_steps=old_warmup, schedule=cfg.lr_scheduler) for s in range(step)]
    new = [lr_factor(s, total_steps=run.total_steps, warmup_steps=run.warmup_steps, schedule=cfg.lr_scheduler)
           for s in range(step)]
    first = next((s for s in range(step) if old[s] != new[s]), None)
    if first is None:  # e.g. a constant schedule after a fixed warmup: the steps taken are those of the new run
        if run.dist.is_main:
            log(f"resuming {path} (a {old_total}-step run) as a {run.total_steps}-step run: the steps taken so far "
                "follow the same learning-rate schedule")
        return
    what = (f"checkpoint {path} was trained as a {old_total}-step run ({old_warmup} warmup steps, {cfg.lr_scheduler} "
            f"schedule); this run has {run.total_steps} steps ({run.warmup_steps} warmup), whose learning rate differs "
            f"from step {first + 1} on (x{new[first]:.4g} vs x{old[first]:.4g} of --lr)")
    if not cfg.allow_schedule_change:
        raise ValueError(f"{what}: resuming would match neither run. Pass --allow-schedule-change to continue with the "
                         "new schedule from here, keep the old --max-steps / --num-epochs, or --resume never")
    if run.dist.is_main:
        log(f"warning: {what}; continuing with the new schedule (--allow-schedule-change)")


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint read into memory, ready to apply (nothing applied yet)."""

    path: Path
    saved: dict
    rng: tuple | None
    metrics_lines: list[str]
    model: dict | None = None
    optimizer: dict | None = None
    scheduler: dict | None = None


def _read_json(path: Path, name: str):
    from nash_fast.checkpoint import CheckpointDamaged

    try:
        with open(path / name, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointDamaged(path, name, f"unreadable ({type(error).__name__}: {error})") from None


def _torch_load(path: Path, name: str, device) -> Any:
    from nash_fast.checkpoint import CheckpointDamaged

    try:
        return torch.load(path / name, map_location=device, weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError (zip), EOFError, ...
        raise CheckpointDamaged(path, name, f"cannot be loaded ({type(error).__name__}: "
                                f"{' '.join(str(error).split())[:200]})") from None


def _read_checkpoint(run: Run, path: Path, verify: bool = True) -> LoadedCheckpoint:
    """Verify every file's SHA-256 against the manifest, then read it (weights_only / JSON) without applying it.
    CheckpointDamaged names the file that fails. verify=False: rank 0 has verified it (the files are read the
    same weights_only way)."""
    from nash_fast.checkpoint import CheckpointDamaged, _read_manifest, verify_checkpoint

    manifest = verify_checkpoint(path) if verify else _read_manifest(path)
    saved = _read_json(path, "trainer_state.json")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int) for k in TrainerState().to_dict()) \
            or not isinstance(saved.get("total_steps"), int) or saved["step"] != manifest["step"]:
        raise CheckpointDamaged(path, "trainer_state.json", "does not hold this checkpoint's trainer state")
    _check_resumable(saved.get("config", {}), run.cfg, path)  # another run's checkpoint: an error, not damage
    rng_name = f"rng_rank{run.dist.rank}.json"
    rng = _read_json(path, rng_name) if (path / rng_name).is_file() else None  # absent: more processes than saved
    try:
        lines = (path / "metrics.jsonl").read_bytes().decode("utf-8").splitlines(keepends=True)
        steps = [json.loads(line)["step"] for line in lines]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointDamaged(path, "metrics.jsonl", f"unreadable ({type(error).__name__}: {error})") from None
    if steps != list(range(1, saved["step"] + 1)):
        raise CheckpointDamaged(path, "metrics.jsonl", f"does not hold steps up to {saved['step']}")
    loaded = LoadedCheckpoint(path, saved, rng, lines)
    if run.engine is not None:
        if not (path / "engine").is_dir():
            raise ValueError(f"checkpoint {path} was not written by a DeepSpeed run; resume it without --deepspeed/--zero-stage")
        _check_deepspeed_files(path)
    else:
        if not (path / "model.pt").is_file():
            raise ValueError(f"checkpoint {path} was written by a DeepSpeed run; resume it with the same --deepspeed/--zero-stage")
        loaded.model = _torch_load(path, "model.pt", run.device)
        loaded.optimizer = _torch_load(path, "optimizer.pt", run.device)
    loaded.scheduler = _torch_load(path, "scheduler.pt", "cpu")
    if rng is not None:
        try:
            loaded.rng = _parse_rng_state(rng)
        except ValueError as error:
            raise CheckpointDamaged(path, rng_name, str(error)) from None
    return loaded


# DeepSpeed's engine files (ZeRO 0-3, fp32 / bf16) hold these classes besides tensors and plain containers. They are
# data holders (an IntEnum, a dataclass, the loss scaler's attributes): rebuilding them runs no code from the file.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.utils.tensor_fragment.fragment_address",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.runtime.fp16.loss_scaler.LossScaler")


def _deepspeed_safe_globals() -> list:
    import importlib

    objects = []
    for name in DEEPSPEED_SAFE_GLOBALS:
        module, _, attribute = name.rpartition(".")
        try:
            objects.append(getattr(importlib.import_module(module), attribute))
        except (ImportError, AttributeError):  # another DeepSpeed version: that name cannot occur then
            pass
    return objects


def _check_deepspeed_files(path: Path) -> None:
    """Every pickle-based file of a DeepSpeed checkpoint may reference only tensors, plain containers and
    DEEPSPEED_SAFE_GLOBALS; anything else (e.g. os.system) is refused before DeepSpeed ever sees the file."""
    from nash_fast.checkpoint import CheckpointDamaged

    for file in sorted((path / "engine").rglob("*")):
        if not file.is_file() or file.suffix not in (".pt", ".pth", ".bin", ".ckpt"):
            continue
        name = str(file.relative_to(path))
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
        except Exception as error:
            raise CheckpointDamaged(path, name, f"cannot be read ({type(error).__name__}: {error})") from None
        unexpected = sorted(set(unsafe) - set(DEEPSPEED_SAFE_GLOBALS))
        if unexpected:
            raise CheckpointDamaged(path, name, f"would unpickle {', '.join(unexpected)} (not a DeepSpeed checkpoint "
                                    "type); refused")


@contextlib.contextmanager
def _weights_only_torch_load():
    """DeepSpeed's engine loader calls torch.load(weights_only=False); inside this block every torch.load is
    weights_only=True with DEEPSPEED_SAFE_GLOBALS allowed, so no file can run code while it loads."""
    real = torch.load
    allowed = _deepspeed_safe_globals()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real


def _apply_checkpoint(run: Run, loaded: LoadedCheckpoint) -> None:
    path, saved = loaded.path, loaded.saved
    if run.engine is not None:
        with _weights_only_torch_load():
            load_path, _ = run.engine.load_checkpoint(str(path), tag="engine", load_optimizer_states=True,
                                                      load_lr_scheduler_states=False)
        if load_path is None:
            raise ValueError(f"DeepSpeed could not load checkpoint {path}")
    else:
        run.model.load_state_dict(loaded.model)
        run.optimizer.load_state_dict(loaded.optimizer)
    run.scheduler.load_state_dict(loaded.scheduler)
    run.state = TrainerState(**{k: saved[k] for k in TrainerState().to_dict()})
    if loaded.rng is not None:
        _apply_rng_state(loaded.rng)
    run.metrics_lines = list(loaded.metrics_lines)
    if saved.get("world_size") != run.dist.world_size or saved.get("grad_accum") != run.cfg.grad_accum:
        if run.dist.is_main:
            log(f"warning: resuming a run of {saved.get('world_size')} processes x grad_accum {saved.get('grad_accum')} "
                f"with {run.dist.world_size} x {run.cfg.grad_accum}: the data position carries over, the batches per step change")


def _resume(run: Run) -> Path | None:
    """Load the checkpoint --resume names, or the newest one that passes verification and loads (auto / latest):
    a damaged one is skipped with a warning naming the file, and removed (it can never be loaded). Returns the
    checkpoint used, or None for a fresh start. Every rank loads the same one (rank 0 decides)."""
    from nash_fast.checkpoint import CheckpointDamaged, list_checkpoints, remove_incomplete_checkpoints

    cfg, dist = run.cfg, run.dist
    if cfg.resume == "never":
        return None
    if cfg.resume not in ("auto", "latest"):
        path = Path(cfg.resume)
        try:
            loaded = _read_checkpoint(run, path)
        except CheckpointDamaged as error:
            raise ValueError(f"--resume {path}: {error.file}: {error.reason}") from None
        _check_schedule(loaded.saved, run, path)
        _apply_checkpoint(run, loaded)
        return path
    candidates = [p for _, p in reversed(list_checkpoints(run.checkpoint_root))]
    chosen, loaded = -1, None
    if dist.is_main:
        for index, path in enumerate(candidates):
            try:
                loaded = _read_checkpoint(run, path)
            except CheckpointDamaged as error:
                log(f"warning: skipping checkpoint {path}: {error.file}: {error.reason}")
                from nash_fast.rundir import remove_tree

                remove_tree(path)
                continue
            chosen = index
            break
        remove_incomplete_checkpoints(run.checkpoint_root, log=log)
    chosen = int(dist.all_reduce(torch.tensor([float(chosen if dist.is_main else -1)]), "max").item())
    if chosen < 0:
        if cfg.resume == "latest":
            raise ValueError(f"--resume: no complete checkpoint under {run.checkpoint_root}")
        return None
    path = candidates[chosen]
    if not dist.is_main:
        loaded = _read_checkpoint(run, path, verify=False)  # rank 0 verified it: one pass over the files
    _check_schedule(loaded.saved, run, path)
    _apply_checkpoint(run, loaded)
    return path


class MetricsLog:
    """OUTPUT/metrics.jsonl (one JSON line per step) and TensorBoard when installed; rank 0 only.

    On resume the file is rebuilt from the checkpoint's own copy of the log (verified with the checkpoint),
    whatever state the file is in: lines cut mid-way, bytes that are not UTF-8, another run's lines, or a
    directory in its place (moved aside, with a warning). Lines after the checkpoint describe steps that will be
    redone and are dropped."""

    def __init__(self, output_dir: Path, enabled: bool, tensorboard: bool, lines: list[str]):
        self.path = output_dir / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        self.lines = lines  # the run's list (Run.metrics_lines): appended to here, saved with every checkpoint
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        self._rebuild()
        self.file = open(self.path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(output_dir / "tensorboard"))
            except ImportError:
                self.writer = None

    def _rebuild(self) -> None:
        from nash_fast.rundir import temporary_path

        if self.path.is_dir() or (self.path.exists() and not self.path.is_file()):
            aside = self.path.with_name(f"metrics.jsonl.moved-aside-{time.strftime('%Y%m%d-%H%M%S')}")
            os.rename(self.path, aside)
            log(f"warning: {self.path} was not a file; moved it to {aside}")
        elif self.path.is_file():
            damaged = _damaged_lines(self.path)
            if damaged:
                log(f"warning: {self.path}: line(s) {', '.join(map(str, damaged[:5]))} damaged (cut, not UTF-8 or not "
                    f"JSON); rebuilt the log{' from the checkpoint' if self.lines else ''}")
        tmp = temporary_path(self.path)
        with open(tmp, "w") as f:
            f.writelines(self.lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        from nash_fast.rundir import done

        done(tmp)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(record) + "\n"
        self.lines.append(line)
        self.file.write(line)
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None and math.isfinite(value):
                    self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _damaged_lines(path: Path) -> list[int]:
    """1-based numbers of the lines of a metrics file that are not a UTF-8 JSON record with a step."""
    damaged = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                if not raw.endswith(b"\n") or not isinstance(json.loads(raw.decode("utf-8"))["step"], int):
                    damaged.append(number)
            except (ValueError, KeyError, TypeError):
                damaged.append(number)
    return damaged


_METRIC_KEYS = ("loss", "chosen_logratio", "rejected_logratio", "reward_accuracy", "reward_margin", "logratio")


def _train_step(run: Run) -> dict:
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


def _install_zero0_guard(run: Run) -> None:
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
    from nash_fast.interrupt import stop_signals

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
    from nash_fast.rundir import RunLock

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


def _stopped(signal_name: str, where: str, run: Run | None, checkpoint: Path | None, dist: Dist, output_dir: Path,
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
    from nash_fast.interrupt import Interrupted
    from nash_fast.rundir import remove_dead_temporaries

    if cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads)
    elif cfg.model == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)
    output_dir = Path(cfg.output_dir)
    if dist.is_main:  # leftovers of a killed run (.tmp-final, metrics.jsonl.tmp, ...); checkpoints/ in _resume
        remove_dead_temporaries(output_dir, locked=True, log=log)
    seed_everything(cfg.seed)

    # 1. data: schema before any model
    records = load_records(cfg)
    tokenizer = load_tokenizer(cfg)
    examples = tokenize(cfg, tokenizer, records)
    plan = LossPlan.for_config(cfg, examples)
    from nash_fast.data import TokenBudgetBatchSampler, example_sequence_lengths

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
    try:
        _precompute(cfg, dist, device, dtype, vocab_size, examples, plan)
    except Interrupted as stop:
        return _stopped(stop.signal_name, f"during precompute ({stop})", None, None, dist, output_dir)

    # 3. policy, optimizer, schedule, engine
    model = load_model(cfg.model, cfg, vocab_size=vocab_size,
                       dtype=dtype if cfg.uses_deepspeed() else torch.float32, device=device)
    if cfg.gradient_checkpointing:
        from nash_fast.model import enable_activation_checkpointing

        enable_activation_checkpointing(model)
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
    run = Run(cfg, dist, device, model, optimizer, scheduler, engine, build_loss_fn(cfg), plan, plan.collator(),
              examples, stream, sampler, total_steps, warmup, forward=engine if engine is not None else PackedBackbone(model))
    if engine is not None and engine.zero_optimization_stage() == 0 and not cfg.bf16:
        _install_zero0_guard(run)

    # 4. resume: the newest checkpoint that verifies and loads (older ones if the newest is damaged)
    if cfg.resume == "never" and dist.is_main:
        remove_checkpoints(run.checkpoint_root)
    dist.barrier()
    resume_from = _resume(run)
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
                    from nash_fast.cli import RunFailed

                    raise RunFailed(
                        f"{run.state.consecutive_bad} optimizer steps in a row were skipped for a non-finite loss or "
                        f"gradient (last at step {run.state.step}, see {metrics_log.path}); stopping "
                        f"(--max-consecutive-bad-steps {cfg.max_consecutive_bad_steps})"
                    )
                signal_name = dist.stop_requested() if run.state.step < total_steps else None  # the last step: finish
                if signal_name:
                    checkpoint = _save(run)
                    break
                if cfg.save_steps and run.state.step % cfg.save_steps == 0 and run.state.step < total_steps:
                    _save(run)
    finally:
        metrics_log.close()
    if signal_name:
        return _stopped(signal_name, f"after step {run.state.step}", run, checkpoint, dist, output_dir,
                        {"last": record, "skipped_steps": run.state.skipped_steps})

    if run.state.step > 0 and run.state.skipped_steps == run.state.step:
        from nash_fast.cli import RunFailed

        raise RunFailed(f"all {run.state.step} optimizer steps were skipped for a non-finite loss or gradient (see "
                        f"{metrics_log.path}); the model never changed, so no final model is written")
    summary = {"output_dir": str(output_dir), "metrics": str(metrics_log.path), "steps": run.state.step,
               "loss_start_end": _loss_start_end(metrics_log.path) if dist.is_main else None,
               "skipped_steps": run.state.skipped_steps, "last": record, "stopped_by_signal": False}
    # A stop requested from here on changes nothing: the final checkpoint and model are what remains to do.
    _save(run)
    summary["model"] = str(_save_final_model(run, tokenizer))
    if dist.is_main:
        summary["plots"] = _plots(cfg, output_dir)
        _print_summary(summary)
    dist.barrier()
    return summary


def _precompute(cfg, dist, device, dtype, vocab_size, examples, plan) -> None:
    from nash_fast.precompute import attach_logprobs, cached_sequence_logprobs

    cache_dir = Path(cfg.cache_dir or Path(cfg.output_dir) / "precompute")
    settings = {"dtype": str(dtype), "attn": cfg.attn_implementation, "backend": cfg.logprob_backend}
    common = dict(cache_dir=cache_dir, augment=plan.augment, average=cfg.average_log_prob,
                  max_tokens=cfg.precompute_max_tokens or 2 * cfg.max_tokens, backend=cfg.logprob_backend,
                  settings=settings, rank=dist.rank, world_size=dist.world_size, barrier=dist.barrier,
                  # precompute's tqdm bar only on a terminal: in a log file it is one line of carriage returns
                  progress=cfg.progress_bar and is_terminal(sys.stderr), log=log if dist.is_main else (lambda m: None),
                  stop=dist.stop_requested, locked=_inside(cache_dir, Path(cfg.output_dir)))
    ref_name = cfg.ref_model or cfg.model

    def loader(name):
        return lambda: load_model(name, cfg, vocab_size=vocab_size, dtype=dtype, device=device)

    ref, _ = cached_sequence_logprobs("ref", ref_name, loader(ref_name), examples, **common)
    attach_logprobs(examples, ref, "ref_logps", augment=plan.augment)
    if cfg.loss == "inpo":
        if cfg.prev_model is None:  # first INPO iteration: pi_1 = pi_ref
            prev = ref
        else:
            prev, _ = cached_sequence_logprobs("prev", cfg.prev_model, loader(cfg.prev_model), examples, **common)
        attach_logprobs(examples, prev, "prev_logps", augment=plan.augment)
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def _save_final_model(run: Run, tokenizer) -> Path:
    """save_pretrained (+ tokenizer) into OUTPUT/final, written aside and renamed."""
    from nash_fast.rundir import done, remove_tree, temporary_path

    final = run.output_dir / "final"
    state_dict = None
    if run.engine is not None and run.engine.zero_optimization_stage() == 3:
        state_dict = run.engine._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
        if state_dict is not None:  # keys of the PackedBackbone wrapper: lm.<name>
            state_dict = {k[len("lm."):]: v for k, v in state_dict.items()}
    if run.dist.is_main:
        tmp = temporary_path(final)
        run.model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        from nash_fast.checkpoint import fsync_tree

        fsync_tree(tmp)
        if final.exists():
            remove_tree(final)  # renamed aside first: a kill -9 here leaves no half-deleted final/
        os.rename(tmp, final)
        done(tmp)
    run.dist.barrier()
    return final


def _plots(cfg: TrainConfig, output_dir: Path) -> str:
    if not cfg.plot:
        return "disabled (--plot false)"
    from nash_fast.plot import MatplotlibMissing, plot_metrics

    try:
        paths = plot_metrics(output_dir)
    except MatplotlibMissing as error:
        return str(error)
    return str(paths[0].parent) if paths else "no metrics to plot"


def _loss_start_end(path: Path) -> tuple[float, float] | None:
    """Mean loss of the first and of the last tenth of the steps (per-step losses of small batches are noisy)."""
    from nash_fast.plot import read_metrics

    losses = [r["loss"] for r in read_metrics(path) if isinstance(r.get("loss"), (int, float))]
    if not losses:
        return None
    window = max(1, len(losses) // 10)
    return sum(losses[:window]) / window, sum(losses[-window:]) / window


def _print_summary(summary: dict) -> None:
    start_end = summary.get("loss_start_end")
    trend = "" if start_end is None else f", mean loss {start_end[0]:.4g} (first 10% of steps) -> {start_end[1]:.4g} (last 10%)"
    print(
        "\n".join([
            "",
            f"[nash_fast] done: {summary['steps']} steps ({summary['skipped_steps']} skipped){trend}",
            f"  metrics: {summary['metrics']}",
            f"  plots:   {summary['plots']}",
            f"  model:   {summary['model']}  (transformers.AutoModelForCausalLM.from_pretrained)",
        ]),
        flush=True,
    )


PROG = "python -m nash_fast.train"


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: one line per user error (exit 2), traceback only for bugs or with --debug (nash_fast.cli);
    after a SIGTERM / SIGINT stop, exit status 0 / 130."""
    from nash_fast.cli import run_cli

    return run_cli(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    global _COMMAND
    import shlex

    from nash_fast.interrupt import exit_status, mark_finished

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
    from nash_fast.interrupt import exit_with

    exit_with(main())
