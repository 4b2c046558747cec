"""What is installed and which backends a run would choose.

Nothing here needs a process group. GPU-only packages are looked up by distribution
metadata and a guarded import, so a missing one is reported as missing (never raised).
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import platform
from typing import Any, Optional

import torch

from chunkflow.train.metrics import device_peak_tflops

__all__ = ["collect_environment", "attention_backend_name"]

def _version(dist: str) -> Optional[str]:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _importable(module: str) -> tuple[bool, str]:
    try:
        importlib.import_module(module)
        return True, ""
    except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def attention_backend_name(device: torch.device, dtype: torch.dtype) -> str:
    """The attention kernel chunkflow uses for ``dtype`` on ``device``.

    Asks ``chunkflow.model.attention.attention_backend(device, dtype)`` when the module
    has it; otherwise describes the choice ``causal_attention`` makes (flash-attn for
    fp16/bf16 CUDA tensors when it imports, torch SDPA otherwise).
    """
    from chunkflow.model import attention

    fn = getattr(attention, "attention_backend", None)
    if fn is not None:
        return str(fn(device, dtype))
    probe = torch.empty(0, device=device, dtype=dtype)
    available = getattr(attention, "flash_attn_available", None)
    if available is not None and available(probe):
        return "flash-attn"
    return "sdpa"


def collect_environment(device: torch.device) -> dict[str, Any]:
    """Versions, devices and the backends a run on ``device`` would pick."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "megatron_core": _version("megatron-core") or _version("megatron_core"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "transformer_engine": (_version("transformer-engine") or _version("transformer_engine")
                               or _version("transformer-engine-torch")),
        "cuda_available": torch.cuda.is_available(),
        "device": str(device),
        "gpus": [],
    }
    env["flash_attn_import"], env["flash_attn_import_error"] = _importable("flash_attn")
    env["transformer_engine_import"], env["transformer_engine_import_error"] = (
        _importable("transformer_engine.pytorch") if env["transformer_engine"] else (False, "not installed"))
    if torch.cuda.is_available():  # pragma: no cover - GPU only
        try:
            env["nccl"] = ".".join(str(v) for v in torch.cuda.nccl.version())
        except Exception:  # noqa: BLE001
            env["nccl"] = None
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({
                "index": i, "name": p.name, "memory_bytes": int(p.total_memory),
                "capability": f"{p.major}.{p.minor}", "peak_bf16_tflops": device_peak_tflops(p.name),
            })
        env["bf16_supported"] = torch.cuda.is_bf16_supported()
    env["process_group_backend"] = "nccl" if torch.cuda.is_available() else "gloo"
    env["attention_backend"] = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        try:
            env["attention_backend"][name] = attention_backend_name(device, dtype)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            env["attention_backend"][name] = f"error: {e}"
    return env
