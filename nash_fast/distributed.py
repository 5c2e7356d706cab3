"""Processes and devices of a training run: the process group (DeepSpeed's, or a world of one created in-process
when no launcher started us: no MPI discovery), the device, and the DeepSpeed config built from the trainer's
flags or a --deepspeed file with its "auto" values filled.

    dist = setup_distributed(cfg)          # Dist(rank, world_size, local_rank); Dist() without DeepSpeed
    device = select_device(cfg, dist)
    engine, optimizer, _, _ = deepspeed.initialize(..., config=deepspeed_config(cfg, dist.world_size))
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from nash_fast.config import TrainConfig
from nash_fast.interrupt import stop_requested
from nash_fast.rundir import hostname

__all__ = ["Dist", "setup_distributed", "launched", "select_device", "deepspeed_config"]


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
