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
* megatron's gradient clipping asserts ``grad.type() == 'torch.cuda.FloatTensor'``;
  :func:`_clip_grads_cpu` does the same scaling without the assertion.
* A few megatron methods use tensor *methods*, which no module view can reach: the
  fp16/bf16 and distributed optimizers' constructors sort parameters by
  ``param.type()`` and reject ``torch.FloatTensor``, tied embeddings with PP>1 call
  ``weight.data.cuda()``, and the distributed optimizer's checkpoint gather calls
  ``send_tensor.cuda()``. While just those methods run, :func:`_cuda_tensor_methods`
  makes ``tensor.type()`` report the CUDA type name and ``tensor.cuda()`` a no-op.
* On CPU the "CUDA" RNG and the CPU RNG are one generator, so megatron's tracker
  warns "CPU RNG state changed" after every fork that draws numbers; that one log
  line is dropped.
* A stand-in for megatron-core >= 0.17's MoE-only ``paged_stash`` kernels module,
  which imports triton unconditionally (we never use MoE).

:func:`quiet_megatron_notices` is separate and device-independent: it drops a few
upstream notices about things chunkflow chose deliberately (GPTModel with the local
spec, synchronous checkpoint saves, no TE/apex/absl), so real warnings stay visible.

:func:`patch_torch_adam_fallback` is separate too: it fixes a distributed-optimizer
checkpoint load that breaks whenever megatron uses torch's Adam (no TE, no apex), on
any device; :func:`chunkflow.parallel.distributed.init_distributed` applies it.

:func:`apply_cpu_compat` installs all of the CPU patches and is a no-op when CUDA is
available.
It must run before megatron modules are used (importing them is fine: the patch
replaces the module-level ``torch`` name they look up at call time).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import sys
import types
import warnings
from typing import Any

import torch

__all__ = [
    "apply_cpu_compat", "cpu_compat_active", "patch_torch_adam_fallback", "prepare_megatron_import", "quiet_megatron_notices",
    "PATCHED_MODULES",
]

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
    "megatron.core.optimizer.grad_scaler",  # fp16 loss scale tensors
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
    coeff = max_norm / (float(total_norm) + 1.0e-6)  # total_norm is a tensor in some versions
    if coeff >= 1.0:
        return
    for p in params:
        g = getattr(p, "decoupled_grad", None) if use_decoupled_grad else p.grad
        if g is not None:
            g.detach().mul_(coeff)


@contextlib.contextmanager
def _cuda_tensor_methods():
    """While active, ``tensor.type()`` names a CPU tensor's CUDA twin
    (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``) and ``tensor.cuda()`` returns
    the tensor unchanged; ``type(dtype)`` conversions are untouched."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
        if dtype is None and not kwargs:
            name = original_type(self)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    def cuda(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self

    torch.Tensor.type, torch.Tensor.cuda = type_, cuda  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda  # type: ignore[method-assign]


def _with_cuda_tensor_methods(fn: Any) -> Any:
    if getattr(fn, "_chunkflow_wrapped", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _cuda_tensor_methods():
            return fn(*args, **kwargs)

    wrapped._chunkflow_wrapped = True  # type: ignore[attr-defined]
    return wrapped


# (module, class, method) run under _cuda_tensor_methods.
_TENSOR_METHOD_USERS = (
    ("megatron.core.optimizer.optimizer", "Float16OptimizerWithFloat16Params", "__init__"),
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "__init__"),
    # Saving its state in the fully_reshardable form gathers through get_parameter_state_dp_zero,
    # which moves each CPU shard with send_tensor.cuda().
    ("megatron.core.optimizer.distrib_optimizer", "DistributedOptimizer", "get_parameter_state_dp_zero"),
    ("megatron.core.models.common.language_module.language_module", "LanguageModule",
     "setup_embeddings_and_output_layer"),
)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of ``prefixes``."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


# Upstream notices about choices chunkflow made on purpose, or about megatron's own calls
# into deprecated torch APIs: nothing a user of chunkflow can act on.
# (logger name, message prefixes): GPTModel is deprecated in 0.19 for HybridModel, whose
# stock spec needs transformer-engine; 0.19 logs "async save is deprecated" on every
# synchronous save too.
_LOG_NOTICES = (
    ("megatron.core.models.gpt.gpt_model", ("GPTModel IS DEPRECATED",)),
    ("megatron.core.dist_checkpointing.strategies.torch", ("MCore's async save is deprecated",)),
)
# (message regex, category) for warnings.filterwarnings.
_WARNING_NOTICES = (
    (r".*(Transformer Engine|Apex)( and Apex)? (is|are) not installed", UserWarning),
    (r"absl\.logging is not installed", UserWarning),
    (r"MimoModelConfig is experimental", UserWarning),  # imported by get_megatron_optimizer
    (r"If you are using transformer_engine as the transformer implementation", UserWarning),
    # megatron's dist_checkpointing on torch.distributed.checkpoint:
    (r"Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    (r"`load_state_dict` is deprecated and will be removed", FutureWarning),  # 0.16
    (r"The argument order of load has been changed", UserWarning),  # 0.19
    (r"torch\.distributed is (disabled, )?unavailable or uninitialized", UserWarning),  # 0.19
    # megatron's distributed optimizer on torch 2.13:
    (r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated", FutureWarning),
)
# CUDA-only advice, dropped only where there is no CUDA.
_CPU_WARNING_NOTICES = (
    (r"When using async grad allreduce it is recommended to set the environment variable CUDA_", UserWarning),
)


def quiet_megatron_notices() -> None:
    """Silence the upstream notices listed above (and nothing else). Idempotent."""
    for name, prefixes in _LOG_NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*prefixes))
    notices = _WARNING_NOTICES + (() if torch.cuda.is_available() else _CPU_WARNING_NOTICES)
    for message, category in notices:
        warnings.filterwarnings("ignore", message=message, category=category)


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
    """What must happen before ``import megatron.core`` (run by ``import chunkflow``):
    the triton-free ``paged_stash`` stand-in, and the notice filters (some notices are
    issued while megatron's modules are imported)."""
    _stub_paged_stash()
    quiet_megatron_notices()


def _keep_adam_step(fn: Any) -> Any:
    """Wrap ``DistributedOptimizer._set_main_param_and_optimizer_states`` so the loaded
    tensors need not carry torch Adam's ``'step'`` (see :func:`patch_torch_adam_fallback`)."""
    if getattr(fn, "_chunkflow_wrapped", False):
        return fn

    @functools.wraps(fn)
    def wrapped(self: Any, model_param: Any, tensors: dict) -> Any:
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group, order = self.model_param_group_index_map[model_param]
            state = self.optimizer.state[self.optimizer.param_groups[group]["params"][order]]
            if "step" in state:  # loaded already, from the param groups: keep it
                tensors = {**tensors, "step": state["step"]}
        return fn(self, model_param, tensors)

    wrapped._chunkflow_wrapped = True  # type: ignore[attr-defined]
    return wrapped


def patch_torch_adam_fallback() -> bool:
    """Fix loading a distributed-optimizer checkpoint when megatron falls back to torch's
    Adam (no transformer-engine, no apex: every CPU run, and GPU runs without them).

    Loading the ``fully_reshardable`` form restores ``'step'`` from the param groups,
    then copies every per-parameter state tensor from the checkpoint, which (by design)
    has none for ``'step'``: ``KeyError: 'step'`` in 0.16 and 0.19. The wrapper hands the
    already-restored step back to the copy. Does nothing with TE/apex. Idempotent.
    """
    module = importlib.import_module("megatron.core.optimizer.distrib_optimizer")
    if getattr(module, "HAVE_APEX_OR_TE", True):
        return False
    cls = module.DistributedOptimizer
    cls._set_main_param_and_optimizer_states = _keep_adam_step(cls.__dict__["_set_main_param_and_optimizer_states"])
    return True


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
    # One generator plays both roles on CPU, so this check in fork() always fires.
    logging.getLogger(random.__name__).addFilter(_DropMessages("CPU RNG state changed within GPU RNG"))
    for name in ("megatron.core.optimizer.clip_grads", "megatron.core.optimizer.optimizer"):
        module = importlib.import_module(name)
        if hasattr(module, "clip_grad_by_total_norm_fp32"):
            module.clip_grad_by_total_norm_fp32 = _clip_grads_cpu
    for module_name, class_name, method in _TENSOR_METHOD_USERS:
        cls = getattr(importlib.import_module(module_name), class_name)
        setattr(cls, method, _with_cuda_tensor_methods(cls.__dict__[method]))
    _active = True
    return True
