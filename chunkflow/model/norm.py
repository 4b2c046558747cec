"""RMSNorm that megatron-core's local layer spec can build, with sequence parallelism.

megatron's local spec builds its norms as ``WrappedTorchNorm``, which refuses
``sequence_parallel`` (Apex and Transformer Engine norms are the usual answer; neither
exists on CPU). The norm itself needs nothing from sequence parallelism: every token is
normalised on its own, so a tensor rank holding ``T / tp`` of the tokens computes its
slice exactly. What changes is the weight's gradient: each rank only sees its tokens'
contribution, so the partial gradients must be summed over the tensor group. megatron's
``finalize_model_grads`` does that for every parameter that carries
``sequence_parallel = True`` (``_allreduce_non_tensor_model_parallel_grads``, the same
attribute in 0.16 and 0.19), which this module sets under sequence parallelism::

    x (tokens / tp, batch, hidden) -> y = x / sqrt(mean(x^2, hidden) + eps) * weight

The forward is ``torch.nn.functional.rms_norm``, the op ``torch.nn.RMSNorm`` (megatron's
``WrappedTorchNorm``) runs, so outputs are bit-identical to it, and the parameter is
still called ``weight`` (checkpoints and the HF names in ``hf.py`` are unchanged). For
bf16/fp16 inputs the op normalises and scales in fp32 and rounds once at the end, like
megatron's fused norms and HF's ``Qwen2RMSNorm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["RMSNorm"]


class RMSNorm(torch.nn.Module):
    """Root-mean-square norm over the last dimension, built as ``RMSNorm(config, hidden_size, eps)``.

    The weight is created in fp32 (as ``WrappedTorchNorm`` did); ``build_model`` casts
    the whole model for fp64 runs. Extra keyword arguments megatron passes to norm
    modules (``persist_layer_norm``, ``zero_centered_gamma``, ...) are accepted and
    must be off.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5,
                 **unused: object) -> None:
        super().__init__()
        if config.normalization != "RMSNorm":
            raise ValueError(f"RMSNorm built for normalization={config.normalization!r}")
        if config.layernorm_zero_centered_gamma:
            raise ValueError("RMSNorm does not implement layernorm_zero_centered_gamma")
        self.normalized_shape = (hidden_size,)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        # Each tensor rank sees only its slice of the sequence: finalize_model_grads sums
        # this weight's gradient over the tensor group.
        self.weight.sequence_parallel = bool(config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., hidden) -> same
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape[0]}, eps={self.eps}, sequence_parallel={self.weight.sequence_parallel}"
