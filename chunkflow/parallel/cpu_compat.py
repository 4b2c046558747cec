"""Run megatron-core on a CPU-only torch: the one place that knows megatron assumes CUDA.

megatron-core calls ``torch.cuda.current_device()``, creates tensors with
``device="cuda"``, synchronises CUDA streams and keeps its tensor-parallel RNG streams
in CUDA generators. On a machine without CUDA each of those raises. Rather than a
global ``TorchFunctionMode`` (measured +30% on forward/backward), we give the few
megatron modules that make such calls their own view of ``torch``:

* :class:`_TorchView` forwards every attribute to the real ``torch`` except the tensor
  factories (``zeros``, ``empty``, ``tensor``, ...), which map ``device="cuda"`` (or an
  int device index) to the CPU, and ``torch.cuda``, which becomes :class:`_CudaView`.
* :class:`_CudaView` answers ``current_device()`` with the CPU device, makes
  ``synchronize``/``empty_cache``/stream calls no-ops and keeps the RNG functions on
  the CPU generator, so megatron's RNG tracker keeps per-rank streams on the CPU.
* A stand-in for megatron-core >= 0.17's MoE-only ``paged_stash`` kernels module,
  which imports triton unconditionally (we never use MoE).

:func:`apply_cpu_compat` installs all of it and is a no-op when CUDA is available.
It must run before megatron modules are used (importing them is fine: the patch
replaces the module-level ``torch`` name they look up at call time).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import sys
import types
from typing import Any

import torch

__all__ = ["apply_cpu_compat", "cpu_compat_active", "prepare_megatron_import", "PATCHED_MODULES"]

# Modules that call CUDA-only APIs on paths chunkflow uses (model build, RoPE,
# schedules and p2p, DDP buffers, optimizer, grad clipping, RNG tracker).
PATCHED_MODULES = (
    "megatron.core.utils",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.transformer.transformer_block",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "as_tensor", "zeros_like", "ones_like", "empty_like", "full_like",
)
_CPU = torch.device("cpu")
_active = False


def _to_cpu_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


class _Stream:
    """Stand-in for a CUDA stream: every method is a no-op."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args: Any) -> None:
        return None


class _CudaView:
    """What the patched modules see as ``torch.cuda``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def is_available() -> bool:
        return False

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(*args: Any, **kwargs: Any) -> None:
        pass

    @staticmethod
    def empty_cache() -> None:
        pass

    @staticmethod
    def current_stream(*args: Any, **kwargs: Any) -> _Stream:
        return _Stream()

    default_stream = current_stream
    Stream = _Stream

    @staticmethod
    def stream(*args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def memory_allocated(*args: Any, **kwargs: Any) -> int:
        return 0

    max_memory_allocated = memory_allocated

    class random:  # noqa: N801  (mirrors torch.cuda.random)
        @staticmethod
        def get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
            return torch.get_rng_state()


def _factory(fn: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapped.__name__ = getattr(fn, "__name__", "factory")
    return wrapped


class _TorchView(types.ModuleType):
    """What the patched modules see as ``torch``: the real module, CPU-redirected."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaView()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _cpu_get_rng_state(*args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
    torch.set_rng_state(new_state)


_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"


def _clip_grads_cpu(parameters: Any, max_norm: float, total_norm: float,
                    use_decoupled_grad: bool = False, **kwargs: Any) -> None:
    """Scale gradients by ``max_norm / total_norm`` when that is below 1.

    megatron's version asserts ``grad.type() == 'torch.cuda.FloatTensor'``; this is the
    same operation without the device assertion.
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    coeff = max_norm / (total_norm + 1.0e-6)
    if coeff >= 1.0:
        return
    for p in params:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            g.detach().mul_(coeff)


def _stub_paged_stash() -> None:
    """megatron-core >= 0.17 imports triton in ``moe/ops/paged_stash.py`` (MoE-only CUDA
    kernels) whenever ``megatron.core`` is imported. Without triton, register an inert
    stand-in for that one module; calling its kernels raises. A global triton stub would
    break ``torch.compile``'s own triton detection, so only this module is stubbed.
    """
    if _PAGED_STASH in sys.modules or importlib.util.find_spec("triton") is not None:
        return

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("paged-stash MoE kernels need triton and CUDA")

    stub = types.ModuleType(_PAGED_STASH)
    stub.GLOBAL_BLOCK_SIZE = 1024  # type: ignore[attr-defined]
    stub.paged_stash_copy_kernel = _unavailable  # type: ignore[attr-defined]
    stub.paged_stash_pop_kernel = _unavailable  # type: ignore[attr-defined]
    stub.__all__ = ["GLOBAL_BLOCK_SIZE", "paged_stash_copy_kernel", "paged_stash_pop_kernel"]  # type: ignore[attr-defined]
    sys.modules[_PAGED_STASH] = stub


def prepare_megatron_import() -> None:
    """What must happen before ``import megatron.core`` (run by ``import chunkflow``)."""
    _stub_paged_stash()


def cpu_compat_active() -> bool:
    return _active


def apply_cpu_compat(force: bool = False) -> bool:
    """Patch megatron-core for a CPU-only torch. Returns True if patches were applied.

    Does nothing when CUDA is available (unless ``force``, used by tests) and is
    idempotent.
    """
    global _active
    if _active:
        return True
    if torch.cuda.is_available() and not force:
        return False
    _stub_paged_stash()
    view = _TorchView()
    for name in PATCHED_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue  # absent in this megatron-core version
        if getattr(module, "torch", None) is torch:
            module.torch = view
    random = importlib.import_module("megatron.core.tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_rng_state
    random._set_cuda_rng_state = _cpu_set_rng_state
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(name)
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
    _active = True
    return True
