"""LoRA / QLoRA adapters (PEFT) as a path of `python -m nash_fast.train` and of self-play.

    python -m nash_fast.train --lora-r 16                        # LoRA on every attention and MLP linear layer
    python -m nash_fast.train --lora-r 16 --lora-target-modules q_proj,v_proj --merge-adapters
    python -m nash_fast.train --lora-r 64 --load-in-4bit --bf16 --model ...   # QLoRA (CUDA, bitsandbytes)

The policy is base + adapters: the base's weights are frozen, only the LoRA matrices (and modules named for full
training: lm_head / embed_tokens in --lora-target-modules) get gradients. With LoRA (Hu et al. 2021, eq. 3) a
linear layer computes

    h = W0 x + (alpha / r) * B A dropout(x),      A: [r, in] (Kaiming-uniform), B: [out, r] (zeros)

so a fresh adapter starts exactly at the base. What the trainer does differently with --lora-r (each a hook in
nash_fast.train, nash_fast.config or nash_fast.selfplay that calls this module):

- Loading: the base is loaded (4-bit NF4 / 8-bit through bitsandbytes with --load-in-4bit / --load-in-8bit,
  CUDA only) and wrapped by peft.get_peft_model (the adapter's init drawn from --seed), or by
  PeftModel.from_pretrained(--init-adapter, is_trainable=True) to continue an adapter. The trainer keeps driving
  the transformers model inside the wrapper (the LoRA layers are injected in place), so the packed forward, the
  fused loss, gradient checkpointing and DeepSpeed see an ordinary causal LM whose LM head is frozen.
- Frozen LM head: FusedLinearPreferenceLoss / sequence_logprobs get a weight that does not require grad, so
  their backward computes d_hidden only: no [V, H] d_weight buffer (V * H * 4 bytes in fp32) and 2 N H V fewer
  FLOPs per micro-batch of N scored tokens (bench/lora.py measures it).
- Reference: the precompute pass runs on the policy itself, before training, in eval mode under
  peft_model.disable_adapter(): the base model, bitwise (a disabled LoRA layer calls its base layer only),
  quantized exactly as the policy's base under QLoRA, without loading a second copy. Which model a pass uses:
      --ref-model / --prev-model not given      the initial policy: the base (adapters disabled), or
                                                base + --init-adapter (adapters enabled) when one is given
      equal to --model                          the base, adapters disabled
      equal to --init-adapter                   base + that adapter (the initial policy)
      anything else                             loaded on its own, as without adapters
  (--prev-model not given keeps the trainer's rule: INPO's first iterate is the reference.)
- Checkpoints: model.pt holds the trainable tensors only (the adapters), by parameter name, beside the
  optimizer, scheduler, RNG and trainer state; DeepSpeed's engine files exclude the frozen parameters. Both
  under the SHA-256 manifest of nash_fast.checkpoint, read back weights_only; resume is bitwise.
- Output: OUTPUT_DIR/final/ is a PEFT adapter directory (adapter_config.json, adapter_model.safetensors, and
  the tokenizer): peft.AutoPeftModelForCausalLM.from_pretrained or PeftModel.from_pretrained(base, final).
  --merge-adapters also writes OUTPUT_DIR/merged/: the base reloaded unquantized in the training dtype, the
  adapter applied and merged (W0 + alpha / r * B A), save_pretrained with the tokenizer, for
  AutoModelForCausalLM.from_pretrained and vLLM.
- Self-play (--lora-r on python -m nash_fast.selfplay): every iteration trains with --merge-adapters and
  generates from the merged weights. --lora-iterations fresh (default) trains a new adapter on the merged
  pi_t each iteration (the reference of SPPO and INPO's previous iterate are that base, adapters disabled);
  continue keeps one adapter on pi_1 and trains it further (--init-adapter = the previous iteration's final/;
  SPPO's reference pi_t and INPO's previous iterate are base + that adapter, INPO's reference pi_1 the base).

PEFT and bitsandbytes are optional extras (pip install 'nash-fast[peft]', 'nash-fast[qlora]'), imported only
when adapters are asked for; a missing one is a one-line error naming the extra.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable, Iterator

import torch

from nash_fast import rundir
from nash_fast.checkpoint import CheckpointDamaged
from nash_fast.config import ADAPTER_FILES, FULLY_TRAINED_MODULES, PEFT_EXTRA

__all__ = ["enabled", "require_peft", "model_load_kwargs", "Adapters", "attach",
           "FULLY_TRAINED_MODULES", "selfplay_train_arguments", "selfplay_policy", "selfplay_problems"]


def enabled(cfg) -> bool:
    """True when the run trains adapters (--lora-r given)."""
    return getattr(cfg, "lora_r", None) is not None


def require_peft(option: str = "--lora-r"):
    """The peft module, or a one-line ValueError naming the extra."""
    try:
        import peft
    except ImportError:
        raise ValueError(f"{option} needs PEFT, an optional extra: {PEFT_EXTRA} (or pip install peft)") from None
    return peft


def target_modules(cfg) -> tuple[str | list[str], list[str]]:
    """(LoRA targets, modules trained in full) from --lora-target-modules: 'all-linear' is PEFT's every linear
    layer but the output layer (i.e. attention and MLP); lm_head / embed_tokens named there are trained in full."""
    names = [n.strip() for n in cfg.lora_target_modules.split(",") if n.strip()]
    full = [n for n in names if n in FULLY_TRAINED_MODULES]
    adapted = [n for n in names if n not in FULLY_TRAINED_MODULES]
    if adapted == ["all-linear"]:
        return "all-linear", full
    return adapted, full


def model_load_kwargs(cfg, device: torch.device) -> dict:
    """Extra AutoModelForCausalLM.from_pretrained arguments: bitsandbytes quantization for QLoRA (placed on
    `device` by the loader: a quantized model cannot be moved afterwards); {} otherwise."""
    if not (enabled(cfg) and (cfg.load_in_4bit or cfg.load_in_8bit)):
        return {}
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        compute = torch.bfloat16 if cfg.bf16 else torch.float32
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=compute)
    else:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": quantization, "device_map": {"": device}}


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _file_digests(directory: str | os.PathLike) -> dict[str, str]:
    directory = Path(directory)
    return {name: rundir.sha256_file(directory / name) for name in ADAPTER_FILES if (directory / name).is_file()}


class Adapters:
    """The policy's PEFT wrapper and what the trainer asks of it. `model` is the transformers model inside the
    wrapper (LoRA layers injected in place), the one the trainer drives."""

    def __init__(self, cfg, peft_model):
        self.cfg = cfg
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()

    # ------------------------------------------------------------------ parameters
    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameter counts (ZeRO-3 shards counted at their full size)."""
        def size(p):
            return getattr(p, "ds_numel", p.numel())

        return (sum(size(p) for _, p in self.trainable()), sum(size(p) for p in self.model.parameters()))

    # ------------------------------------------------------------------ reference and previous iterate
    @contextlib.contextmanager
    def reference(self, adapters_on: bool) -> Iterator[torch.nn.Module]:
        """The policy as a frozen scorer: eval mode (no dropout), adapters disabled unless adapters_on."""
        context = contextlib.nullcontext() if adapters_on else self.peft_model.disable_adapter()
        was_training = self.model.training
        self.model.eval()
        try:
            with context:
                yield self.model
        finally:
            self.model.train(was_training)

    def source(self, option: str | None) -> bool | None:
        """How a precompute pass named by --ref-model / --prev-model value `option` is computed on the policy:
        False = adapters disabled (the base), True = adapters on (base + --init-adapter), None = not the policy
        (a model loaded on its own)."""
        cfg = self.cfg
        if option is None:
            return cfg.init_adapter is not None
        if option == cfg.model:
            return False
        if cfg.init_adapter is not None and _same_path(option, cfg.init_adapter):
            return True
        return None

    def cached_logprobs(self, label: str, option: str | None, examples, cached_sequence_logprobs, common: dict,
                        load_separately: Callable[[str], Callable[[], torch.nn.Module]]):
        """cached_sequence_logprobs for pass `label` (ref / prev) named by `option` (see source())."""
        adapters_on = self.source(option)
        if adapters_on is None:
            return cached_sequence_logprobs(label, option, load_separately(option), examples, **common)
        settings = dict(common.get("settings") or {}, policy_dtype=str(next(self.model.parameters()).dtype),
                        quantized=is_quantized(self.model),
                        adapters=_file_digests(self.cfg.init_adapter) if adapters_on else "disabled")
        with self.reference(adapters_on) as scorer:
            return cached_sequence_logprobs(label, self.cfg.model, lambda: scorer, examples,
                                            **{**common, "settings": settings})

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by parameter name (the adapters and any fully trained module): all a checkpoint
        needs, the frozen base being --model."""
        return {name: p.detach() for name, p in self.trainable()}

    def load_checkpoint_state(self, state: dict, path) -> None:
        """Copy checkpoint_state() tensors back (bitwise); the names and shapes must be exactly this policy's."""
        params = dict(self.trainable())
        if not isinstance(state, dict) or set(state) != set(params):
            missing, extra = sorted(set(params) - set(state or {})), sorted(set(state or {}) - set(params))
            raise CheckpointDamaged(path, "model.pt", f"does not hold this run's adapters (missing {missing[:3]}, "
                                    f"unexpected {extra[:3]})")
        for name, p in params.items():
            if not isinstance(state[name], torch.Tensor) or state[name].shape != p.shape:
                raise CheckpointDamaged(path, "model.pt", f"{name}: shape {getattr(state[name], 'shape', None)}, "
                                        f"the adapter has {tuple(p.shape)}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state[name])

    # ------------------------------------------------------------------ output
    def save_adapter(self, directory: Path) -> None:
        """PEFT adapter directory (ZeRO-3: the trainable shards gathered first; call on every rank, rank 0 writes
        when is_main)."""
        params = [p for _, p in self.trainable()]
        gather = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            if directory is not None:
                self.peft_model.save_pretrained(str(directory), safe_serialization=True)


def _same_path(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def attach(cfg, model) -> Adapters:
    """Wrap the loaded base `model` with adapters per cfg: a new LoRA adapter (init drawn from --seed, whatever
    the RNG's state) or --init-adapter continued (is_trainable=True). Freezes everything else."""
    peft = require_peft()
    if is_quantized(model):
        model = peft.prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(cfg.seed)
        if cfg.init_adapter is not None:
            saved = json.loads((Path(cfg.init_adapter) / ADAPTER_FILES[0]).read_text())
            if saved.get("r") != cfg.lora_r:
                raise ValueError(f"--init-adapter {cfg.init_adapter} has rank r={saved.get('r')}; --lora-r is "
                                 f"{cfg.lora_r} (give the adapter's rank)")
            peft_model = peft.PeftModel.from_pretrained(model, cfg.init_adapter, is_trainable=True)
        else:
            targets, full = target_modules(cfg)
            config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha if cfg.lora_alpha is not None else 2 * cfg.lora_r,
                                     lora_dropout=cfg.lora_dropout, target_modules=targets,
                                     modules_to_save=full or None, bias="none", task_type="CAUSAL_LM")
            try:
                peft_model = peft.get_peft_model(model, config)
            except ValueError as error:  # e.g. a target module name the model does not have
                raise ValueError(f"--lora-target-modules {cfg.lora_target_modules}: {error}") from None
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise ValueError(f"--lora-target-modules {cfg.lora_target_modules}: no trainable parameter")
    return Adapters(cfg, peft_model)


def load_policy(cfg, load_base: Callable[[], torch.nn.Module]) -> Adapters:
    """The base (load_base()) with its adapters attached."""
    return attach(cfg, load_base())


def merge(cfg, adapter_dir: Path, target: Path, tokenizer, load_base: Callable[[], torch.nn.Module]) -> None:
    """Write target/: base (reloaded unquantized) + the adapter in adapter_dir, merged, save_pretrained + tokenizer."""
    peft = require_peft()
    base = load_base()
    merged = peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    tokenizer.save_pretrained(str(target))


def save_final(run, tokenizer, adapters: Adapters, load_base: Callable[[], torch.nn.Module]) -> Path:
    """OUTPUT/final (PEFT adapter directory + tokenizer) and with --merge-adapters OUTPUT/merged, each written aside
    and renamed into place (nash_fast.rundir.atomic_directory: an older one is replaced)."""
    final = run.output_dir / "final"
    if not run.dist.is_main:
        adapters.save_adapter(None)  # a collective under ZeRO-3: every rank takes part, rank 0 writes
    else:
        with rundir.atomic_directory(final) as tmp:
            adapters.save_adapter(tmp)
            tokenizer.save_pretrained(str(tmp))
        if run.cfg.merge_adapters:
            with rundir.atomic_directory(run.output_dir / "merged") as tmp:
                merge(run.cfg, final, tmp, tokenizer, load_base)
    run.dist.barrier()
    return final


# =============================================================================================== self-play

LORA_ITERATIONS = ("fresh", "continue")


def selfplay_policy(run, t: int) -> str | None:
    """pi_t's weights for generation and evaluation in an adapter self-play run (iteration t - 1's merged/), or
    None when the run trains full weights (or t == 1)."""
    if getattr(run.cfg, "lora_r", None) is None or t == 1:
        return None
    return str(run.iter_dir(t - 1) / "train" / "merged")


def selfplay_train_arguments(run, t: int, loss: str, policy: Callable[[int], str]) -> list[str] | None:
    """nash_fast.train's model / reference / previous-iterate flags of iteration t with adapters, or None without
    (see the module docstring): fresh trains a new adapter on the merged pi_t; continue trains pi_1's adapter on."""
    cfg = run.cfg
    if cfg.lora_r is None:
        return None
    args = ["--lora-r", str(cfg.lora_r), "--merge-adapters"]
    if cfg.lora_iterations == "fresh" or t == 1:
        base = policy(t)
        args = ["--model", base] + args
        if loss == "inpo":
            args += ["--ref-model", policy(1)]
            if t > 1:
                args += ["--prev-model", base]  # pi_t: this run's base, adapters disabled
        elif loss != "sppo":
            args += ["--ref-model", policy(1)]
        return args  # sppo: the reference is the initial policy = pi_t
    previous = str(run.iter_dir(t - 1) / "train" / "final")
    args = ["--model", policy(1), "--init-adapter", previous] + args
    if loss == "inpo":
        args += ["--ref-model", policy(1), "--prev-model", previous]  # pi_1 = base; pi_t = base + adapter
    elif loss != "sppo":
        args += ["--ref-model", policy(1)]
    return args  # sppo: the reference is the initial policy, base + previous adapter = pi_t


def selfplay_problems(cfg) -> list[str]:
    """Problems with self-play's adapter options (--lora-r, --lora-iterations, LoRA flags in --train-args)."""
    import shlex

    problems = []
    if cfg.lora_r is not None:
        if not isinstance(cfg.lora_r, int) or cfg.lora_r < 1:
            problems.append(f"--lora-r must be a positive integer, got {cfg.lora_r!r}")
        if importlib.util.find_spec("peft") is None:
            problems.append(f"--lora-r needs PEFT, an optional extra: {PEFT_EXTRA} (or pip install peft)")
    try:
        train_flags = [a.split("=")[0] for a in shlex.split(cfg.train_args)]
    except ValueError:
        train_flags = []
    for flag in ("--lora-r", "--lora_r", "--init-adapter", "--init_adapter", "--merge-adapters", "--merge_adapters"):
        if flag in train_flags:
            problems.append(f"--train-args: {flag} is set by self-play (use self-play's --lora-r / --lora-iterations)")
    lora_only = [f for f in train_flags if f.replace("_", "-").startswith(("--lora-", "--load-in-"))
                 and f.replace("_", "-") != "--lora-r"]  # --lora-r there is reported above
    if cfg.lora_r is None and lora_only:
        problems.append(f"--train-args {lora_only[0]} needs self-play's --lora-r")
    return problems
