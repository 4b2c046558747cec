"""Process groups from the launcher's environment (torchrun, or SLURM's srun).

:func:`init_distributed` is the one edge where process groups are created: it validates
the layout against the world size first (so an impossible layout fails before any
group exists), initialises torch.distributed and megatron's ``parallel_state``, and
returns a :class:`ParallelContext` that is passed down to everything else.

Backends: ``parallel.backend=auto`` is ``"cpu:gloo,cuda:nccl"`` with CUDA (each
collective is routed by its tensors' device, so a host tensor goes through gloo rather
than raising in NCCL; megatron's sub-groups inherit the string, see
:mod:`chunkflow.parallel.comm`) and ``"gloo"`` without. megatron's sub-groups get the
run's ``parallel.timeout_s`` too (its own default is 30 minutes).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from chunkflow.config.errors import ConfigError
from chunkflow.config.schema import Config
from chunkflow.config.validate import validate_layout
from chunkflow.parallel.comm import install_strict_checks, strict_requested

__all__ = ["ParallelContext", "env_world", "init_distributed", "destroy_distributed"]


@dataclass
class ParallelContext:
    rank: int
    world_size: int
    local_rank: int
    tp_size: int
    pp_size: int
    dp_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    dp_group: Any = None
    pp_group: Any = None
    tp_group: Any = None
    mp_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_logging_rank(self) -> bool:
        """The rank that writes metrics: last pipeline stage, first TP and DP rank."""
        return self.is_last_stage and self.tp_rank == 0 and self.dp_rank == 0


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or SLURM's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        names = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    else:
        return 0, 1, 0
    values = []
    for name in names:
        raw = env.get(name, "0")
        if not raw.strip().isdigit():
            raise ConfigError(f"environment variable {name}={raw!r} is not a non-negative integer "
                              "(set by the launcher: torchrun or srun)")
        values.append(int(raw))
    rank, world, local_rank = values
    if world < 1 or rank >= world:
        raise ConfigError(f"environment: {names[0]}={rank} is not below {names[1]}={world}")
    return rank, world, local_rank


MIXED_BACKEND = "cpu:gloo,cuda:nccl"


def _pick_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    return MIXED_BACKEND if torch.cuda.is_available() else "gloo"


def init_distributed(cfg: Config, *, seed: Optional[int] = None) -> ParallelContext:
    """Validate the layout, create process groups, seed RNGs. Call once per process."""
    rank, world, local_rank = env_world()
    validate_layout(cfg, world)  # raises before any group exists
    backend = _pick_backend(cfg.parallel.backend)
    if backend == "nccl" and not torch.cuda.is_available():
        raise ConfigError("parallel.backend=nccl needs CUDA, and this machine has none; use "
                          "parallel.backend=gloo (or auto) on CPU")

    if torch.cuda.is_available():  # pragma: no cover - GPU machines only
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, cfg.parallel.threads_per_rank))
        from chunkflow.parallel.cpu_compat import apply_cpu_compat

        apply_cpu_compat()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=cfg.parallel.timeout_s),
        )
    if strict_requested():
        install_strict_checks()

    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from chunkflow.parallel.cpu_compat import patch_torch_adam_fallback

    patch_torch_adam_fallback()  # a no-op with transformer-engine or apex

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=cfg.parallel.tensor,
        pipeline_model_parallel_size=cfg.parallel.pipeline,
        distributed_timeout_minutes=cfg.parallel.timeout_s / 60,  # a timedelta's minutes
    )
    base_seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(base_seed)
    model_parallel_cuda_manual_seed(base_seed)
    return ParallelContext(
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        device=device,
        dp_group=ps.get_data_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        tp_group=ps.get_tensor_model_parallel_group(),
        mp_group=ps.get_model_parallel_group(),
    )


def destroy_distributed() -> None:
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
