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
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSSES = ("sppo", "inpo", "ipo", "dpo", "sr_dpo", "sr_ipo", "spce")
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


def _opt(default, help, **extra):
    return field(default=default, metadata=dict(help=help, **extra))


@dataclass
class TrainConfig:
    # ---------------------------------------------------------------- model
    model: str = _opt("tiny", "Policy to train: a Hugging Face hub name, a local directory (save_pretrained "
                      "layout), or 'tiny' for the project's random-init tiny Llama (no download).")
    tokenizer: str | None = _opt(None, "Tokenizer name or path (default: the model's; 'tiny' for the shipped tiny tokenizer).")
    ref_model: str | None = _opt(None, "Reference model pi_ref for the precompute pass (default: the initial policy, --model).")
    prev_model: str | None = _opt(None, "INPO only: the previous iterate pi_t (default: the reference, i.e. the first "
                                  "INPO iteration where pi_1 = pi_ref).")
    attn_implementation: str | None = _opt(None, "transformers attn_implementation for the models (default: the "
                                           "packing code's choice, flash_attention_2 on CUDA when installed).")
    trust_remote_code: bool = _opt(False, "Pass trust_remote_code=True to transformers when loading models.")
    # ---------------------------------------------------------------- data
    dataset: str = _opt("tiny", "Preference data: a local .jsonl/.json/.parquet file, a datasets hub name (from the "
                        "local datasets cache), or 'tiny' for the shipped nash_fast/data/files/prefs.jsonl.")
    dataset_config: str | None = _opt(None, "datasets configuration name (hub datasets only).")
    dataset_split: str = _opt("train", "datasets split to read (hub datasets and files alike).")
    columns: str = _opt("", "Column mapping 'field=column,...' from the trainer's fields (prompt, chosen, rejected, "
                        "preference, chosen_winrate, rejected_winrate, aug_prompt, responses, winrates) to the "
                        "dataset's column names, e.g. 'prompt=question,chosen=good,rejected=bad'.")
    max_length: int | None = _opt(None, "Longest allowed sequence (prompt + response) in tokens; a longer record is an "
                                  "error naming it (nothing is truncated). Default: no limit beyond --max-tokens.")
    chat_template: str = _opt("auto", "Render prompts with the tokenizer's chat template: auto (when it has one), on, off.",
                              choices=("auto", "on", "off"))
    default_preference: float | None = _opt(None, "P(chosen beats rejected) for records without a 'preference' "
                                            "column (SPPO pairwise / SPCE). 1.0 gives hard labels. Default: the "
                                            "column is required.")
    aug_prompt: str = _opt(SR_DPO_PROMPT, "Sr-DPO / Sr-IPO prompt p of the augmented query p + x for records "
                           "without an 'aug_prompt' column (default: the Sr-DPO paper's prompt).")
    # ---------------------------------------------------------------- loss
    loss: str = _opt("sppo", "Preference loss.", choices=LOSSES)
    beta: float | None = _opt(None, "Inverse temperature of dpo/ipo/spce/sr_dpo/sr_ipo (default 0.1).")
    eta: float | None = _opt(None, "SPPO's eta (default 10, i.e. 1/0.1) or INPO's eta (required for inpo).")
    tau: float | None = _opt(None, "INPO's KL weight to the reference, 0 <= tau < eta (required for inpo).")
    lam: float | None = _opt(None, "Sr-DPO / Sr-IPO refinement weight lambda (required for those).")
    average_log_prob: bool = _opt(False, "Average each sequence's log-prob over its response tokens instead of "
                                  "summing (common for IPO).")
    logprob_backend: str = _opt("auto", "sequence_logprobs backend: auto (triton on CUDA), torch, triton.",
                                choices=("auto", "torch", "triton"))
    # ---------------------------------------------------------------- optimization
    optimizer: str = _opt("adamw", "adamw, or rmsprop as in the SPPO paper.", choices=OPTIMIZERS)
    lr: float | None = _opt(None, f"Peak learning rate (default {DEFAULT_LR} as in the SPPO paper; "
                            f"{DEFAULT_TINY_LR} for --model tiny).")
    weight_decay: float = _opt(0.0, "Decoupled weight decay (adamw) or L2 penalty (rmsprop).")
    adam_beta1: float = _opt(0.9, "AdamW beta1.")
    adam_beta2: float = _opt(0.999, "AdamW beta2.")
    rmsprop_alpha: float = _opt(0.99, "RMSprop smoothing constant alpha.")
    optimizer_eps: float = _opt(1e-8, "Optimizer epsilon.")
    lr_scheduler: str = _opt("linear", "Decay after warmup: linear to 0, cosine to 0, or constant.", choices=SCHEDULERS)
    warmup_ratio: float = _opt(0.1, "Warmup steps as a fraction of the total optimizer steps (ignored when "
                               "--warmup-steps is given).")
    warmup_steps: int | None = _opt(None, "Linear warmup optimizer steps from 0 to --lr.")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.")
    # ---------------------------------------------------------------- batching
    max_tokens: int = _opt(1024, "Token budget of one packed micro-batch per process (all sequences of its pairs, "
                           "augmented ones included).")
    grad_accum: int = _opt(1, "Micro-batches accumulated per optimizer step on each process (DeepSpeed's "
                           "gradient_accumulation_steps).")
    shuffle: bool = _opt(True, "Shuffle the batches every epoch (deterministic from --seed and the epoch).")
    precompute_max_tokens: int | None = _opt(None, "Token budget of the precompute (no-grad) batches "
                                             "(default: 2 x --max-tokens).")
    # ---------------------------------------------------------------- precision and memory
    bf16: bool = _opt(False, "Train in bfloat16 (DeepSpeed bf16 mode, or autocast on the plain path).")
    gradient_checkpointing: bool = _opt(False, "Recompute the backbone's activations in backward.")
    device: str = _opt("auto", "auto (cuda when available), cpu or cuda.", choices=("auto", "cpu", "cuda"))
    cpu_threads: int | None = _opt(None, "torch intra-op threads (default: 1 for --model tiny on CPU, where per-op "
                                   "overhead dominates and more threads only contend with other processes; "
                                   "torch's own default otherwise).")
    # ---------------------------------------------------------------- DeepSpeed
    deepspeed: str | None = _opt(None, "DeepSpeed JSON config file; its 'auto' values are filled from these flags. "
                                 "Giving it (or --zero-stage) routes training through the DeepSpeed engine.")
    zero_stage: int | None = _opt(None, "Build a DeepSpeed config with this ZeRO stage (0, 1, 2 or 3) instead of "
                                  "a file.", choices=(0, 1, 2, 3))
    offload_optimizer: bool = _opt(False, "ZeRO: keep optimizer states in CPU memory (built config only).")
    offload_param: bool = _opt(False, "ZeRO-3: keep parameters in CPU memory (built config only).")
    # ---------------------------------------------------------------- run
    seed: int = _opt(42, "Seed of the data order and every RNG (the tiny model's weights are fixed).")
    output_dir: str = _opt("outputs/train", "Run directory: checkpoints/, metrics.jsonl, plots/, tensorboard/, "
                           "final/ (the save_pretrained model), precompute cache.")
    max_steps: int | None = _opt(None, "Optimizer steps to train (overrides --num-epochs).")
    num_epochs: float | None = _opt(None, f"Passes over the data when --max-steps is not given (fractions allowed; "
                                    f"default {DEFAULT_EPOCHS:g}, {DEFAULT_TINY_EPOCHS:g} for --dataset tiny).")
    save_steps: int = _opt(50, "Save a checkpoint every this many optimizer steps (0: only at the end).")
    save_total_limit: int = _opt(2, "Keep the last K checkpoints (older ones are deleted after a new one is complete).")
    resume: str = _opt("auto", "auto: continue from the newest complete checkpoint in --output-dir if there is one; "
                       "'--resume' alone or 'latest': same, but it is an error if there is none; a path: that "
                       "checkpoint directory; never: start fresh (deletes --output-dir's old checkpoints).")
    max_consecutive_bad_steps: int = _opt(5, "Stop the run after this many optimizer steps in a row skipped for a "
                                          "non-finite loss or gradient.")
    cache_dir: str | None = _opt(None, "Where precomputed reference log-probs are cached (default: "
                                 "OUTPUT_DIR/precompute).")
    tensorboard: bool = _opt(True, "Also log to OUTPUT_DIR/tensorboard when tensorboard is installed.")
    plot: bool = _opt(True, "Write PNG curves to OUTPUT_DIR/plots at the end (needs matplotlib).")
    progress_bar: bool = _opt(True, "Show a tqdm progress bar (rank 0).")

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
        """Type and range checks; a ValueError names the option (as its command-line flag)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            base, optional = _base_type(f.type)
            if value is None:
                if not optional:
                    raise ValueError(f"{flag(f.name)} must not be empty")
                continue
            if base is bool and not isinstance(value, bool):
                raise ValueError(f"{flag(f.name)} must be true or false, got {value!r}")
            if base is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{flag(f.name)} must be an integer, got {value!r}")
            if base is float:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise ValueError(f"{flag(f.name)} must be a finite number, got {value!r}")
                setattr(self, f.name, float(value))
            if base is str and not isinstance(value, str):
                raise ValueError(f"{flag(f.name)} must be a string, got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"{flag(f.name)} must be one of {', '.join(map(str, choices))}; got {value!r}")

        def positive(name, allow_zero=False):
            value = getattr(self, name)
            if value is not None and (value < 0 or (value == 0 and not allow_zero)):
                raise ValueError(f"{flag(name)} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")

        for name in ("lr", "max_tokens", "grad_accum", "max_steps", "num_epochs", "save_total_limit", "cpu_threads",
                     "max_consecutive_bad_steps", "precompute_max_tokens", "max_length", "optimizer_eps",
                     "beta", "eta"):
            positive(name)
        for name in ("weight_decay", "warmup_ratio", "warmup_steps", "max_grad_norm", "save_steps", "tau", "lam"):
            positive(name, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2", "rmsprop_alpha"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{flag(name)} must be in [0, 1), got {getattr(self, name)!r}")
        if self.warmup_ratio >= 1.0:
            raise ValueError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.default_preference is not None and not 0.0 <= self.default_preference <= 1.0:
            raise ValueError(f"--default-preference must be in [0, 1], got {self.default_preference!r}")

        # Hyperparameters a loss does not read are errors rather than silently ignored.
        reads = {"sppo": ("beta", "eta"), "inpo": ("eta", "tau"), "ipo": ("beta",), "dpo": ("beta",),
                 "sr_dpo": ("beta", "lam"), "sr_ipo": ("beta", "lam"), "spce": ("beta",)}[self.loss]
        for name in ("beta", "eta", "tau", "lam"):
            if getattr(self, name) is not None and name not in reads:
                raise ValueError(f"{flag(name)} is not used by --loss {self.loss} (it reads {', '.join(reads)})")
        if self.loss == "sppo" and self.beta is not None and self.eta is not None:
            raise ValueError("--beta and --eta both given for --loss sppo; give one (eta = 1 / beta)")
        if self.loss == "inpo":
            for name in ("eta", "tau"):
                if getattr(self, name) is None:
                    raise ValueError(f"--loss inpo needs {flag(name)}")
            if not self.tau < self.eta:
                raise ValueError(f"--tau must be smaller than --eta for --loss inpo, got tau={self.tau}, eta={self.eta}")
        if self.loss in ("sr_dpo", "sr_ipo") and self.lam is None:
            raise ValueError(f"--loss {self.loss} needs --lam")
        if self.prev_model is not None and self.loss != "inpo":
            raise ValueError(f"--prev-model is only used by --loss inpo, got --loss {self.loss}")
        if self.loss in ("sr_dpo", "sr_ipo") and not self.aug_prompt.strip():
            raise ValueError("--aug-prompt must not be empty for Sr-DPO / Sr-IPO")

        if self.deepspeed is not None and self.zero_stage is not None:
            raise ValueError("give --deepspeed (a config file) or --zero-stage (a built config), not both")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ValueError(f"--deepspeed: no such file {self.deepspeed!r}")
        if (self.offload_optimizer or self.offload_param) and self.zero_stage is None:
            raise ValueError("--offload-optimizer / --offload-param need --zero-stage (or put offload in the --deepspeed file)")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError(f"--offload-param needs --zero-stage 3, got {self.zero_stage}")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("--offload-optimizer needs --zero-stage 1, 2 or 3")
        if self.resume not in ("auto", "latest", "never") and not Path(self.resume).is_dir():
            raise ValueError(f"--resume must be auto, latest, never or a checkpoint directory; no directory {self.resume!r}")
        if not self.output_dir:
            raise ValueError("--output-dir must not be empty")
        self.column_mapping()
        return self


COLUMN_FIELDS = ("prompt", "chosen", "rejected", "preference", "chosen_winrate", "rejected_winrate",
                 "aug_prompt", "responses", "winrates")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation) -> tuple[type, bool]:
    """'int | None' -> (int, True); 'str' -> (str, False) (annotations are strings: __future__ annotations)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    optional = "None" in parts
    base = next(p for p in parts if p != "None")
    return {"int": int, "float": float, "str": str, "bool": bool}[base], optional


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _none_or(convert):
    def parse(text: str):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return convert(text)
    parse.__name__ = convert.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    """argparse parser generated from TrainConfig; options not given stay absent (so YAML values survive)."""
    parser = argparse.ArgumentParser(
        prog="python -m nash_fast.train",
        description="Train a causal LM on preference data with SPPO / INPO / IPO / DPO / Sr-DPO / Sr-IPO / SPCE, "
        "packed batches and the fused loss. Precedence: defaults < --config YAML < flags. With no arguments: "
        "the tiny model on the shipped data with SPPO on CPU. Multi-GPU: deepspeed --module nash_fast.train "
        "--zero-stage 2 ... (or torchrun -m nash_fast.train --zero-stage 2 ...).",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("--config", help="YAML file of options (keys are the option names with underscores).")
    for f in dataclasses.fields(TrainConfig):
        base, optional = _base_type(f.type)
        names = [flag(f.name)]
        if "_" in f.name:
            names.append("--" + f.name)  # --max_steps works too
        help_text = f.metadata["help"]
        if "default" not in help_text.lower():
            help_text += f" (default: {f.default!r})"
        if f.name == "resume":
            parser.add_argument(*names, dest=f.name, nargs="?", const="latest", metavar="auto|latest|never|PATH",
                                help=help_text)
        elif base is bool:
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=_parse_bool, metavar="BOOL",
                                help=help_text + "; '--" + f.name.replace("_", "-") + "' alone means true")
        else:
            convert = _none_or(base) if optional else base
            parser.add_argument(*names, dest=f.name, type=convert, choices=f.metadata.get("choices"),
                                metavar=base.__name__.upper() if "choices" not in f.metadata else None,
                                help=help_text)
    # The deepspeed launcher appends --local_rank=N; the trainer reads LOCAL_RANK from the environment.
    parser.add_argument("--local_rank", "--local-rank", dest="_local_rank", type=int, help=argparse.SUPPRESS)
    return parser


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Options from a YAML mapping; an unknown key is a ValueError naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config: no such file {str(path)!r}")
    with open(path) as f:
        data = yaml.safe_load(f)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option: value, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"--config {path}: unknown option {key!r}")
        options[name] = value
    return options


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """defaults < YAML (--config) < flags, validated."""
    namespace = vars(build_parser().parse_args(argv))
    namespace.pop("_local_rank", None)
    options = load_yaml(namespace.pop("config")) if "config" in namespace else {}
    options.update(namespace)
    return TrainConfig(**options).validate()


def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
