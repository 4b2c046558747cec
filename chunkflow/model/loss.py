"""Per-token language-model losses for one micro-batch.

megatron's vocab-parallel cross-entropy computes in fp32 whatever the model dtype. That
is what training wants, but an fp64 run (used to verify ChunkFlow's gradients to ~1e-12)
needs the loss in fp64 too, so for fp64 models the loss is computed here from the
logits, with the same vocab-parallel reduction (max, sum of exp, target logit all-reduced
over the tensor-parallel group).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from chunkflow.parallel import comm

__all__ = ["token_losses", "masked_loss", "vocab_parallel_cross_entropy"]


def _tp_group() -> Any:
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group()


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group: Any) -> torch.Tensor:
    """Cross-entropy over a vocabulary split across ``group``; logits ``(..., V/tp)``."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    local_v = logits.shape[-1]
    start = rank * local_v
    logits_max = logits.max(dim=-1, keepdim=True).values.detach()
    if world > 1:
        comm.all_reduce(logits_max, op="max", group=group)
    shifted = logits - logits_max
    in_shard = (labels >= start) & (labels < start + local_v)
    local_idx = (labels - start).clamp(0, local_v - 1)
    target = shifted.gather(-1, local_idx.unsqueeze(-1)).squeeze(-1) * in_shard
    sum_exp = shifted.exp().sum(dim=-1)
    if world > 1:
        target = _all_reduce_sum(target, group)
        sum_exp = _all_reduce_sum(sum_exp, group)
    return sum_exp.log() - target


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:  # type: ignore[override]
        return comm.all_reduce(x.clone(), group=group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def _all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    return _AllReduceSum.apply(x, group)


def token_losses(model: Any, b: Any) -> torch.Tensor:
    """Per-token losses ``(1, T)`` on the last stage (the hidden states elsewhere)."""
    module = getattr(model, "module", model)
    config = getattr(module, "config", None)
    if config is None or config.params_dtype != torch.float64:
        return model(b.input_ids, b.position_ids, None, labels=b.labels,
                     packed_seq_params=b.packed_seq_params)
    out = model(b.input_ids, b.position_ids, None, packed_seq_params=b.packed_seq_params)
    if not getattr(module, "post_process", True):
        return out
    return vocab_parallel_cross_entropy(out, b.labels, _tp_group())


def masked_loss(loss_mask: torch.Tensor, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """megatron per-token loss: (sum of masked losses, number of loss tokens, report)."""
    losses = output.reshape(-1)
    losses = losses.to(torch.promote_types(losses.dtype, torch.float32))  # fp64 stays fp64
    mask = loss_mask.reshape(-1).to(losses.dtype)
    loss_sum = (losses * mask).sum()
    num = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach(), num.detach().to(loss_sum.dtype)])
    return loss_sum, num, {"lm loss": report}
