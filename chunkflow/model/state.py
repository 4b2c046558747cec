"""Move weights between the *full* model (one tensor per parameter, global layer numbers,
as a TP=1/PP=1 run names them) and one rank's shard of a TP x PP layout.

Tensor parallelism splits a parameter along its ``partition_dim`` (megatron marks
sharded parameters with ``tensor_model_parallel``). Two layouts need care:

* ``linear_qkv`` is stored group-major, ``[groups x (heads/groups + 2) x head_dim, h]``,
  so a contiguous split gives each rank whole query groups: plain slicing is right.
* ``linear_fc1`` of a gated MLP (SwiGLU) is ``[gate; up]``, each ``[ffn, h]``; rank r
  holds ``[gate_r; up_r]``, so each half is sliced separately.

Pipeline parallelism renumbers layers per stage: local ``decoder.layers.i`` is global
layer ``i + offset`` with ``offset = pp_rank * num_layers / pp``.

Used for layout-equivalence tests, Hugging Face conversion and verification tools.
"""

from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

__all__ = ["global_name", "layer_offset", "shard_tensor", "load_full_state_dict", "local_full_names"]

_LAYER = re.compile(r"^(decoder\.layers\.)(\d+)(\..*)$")


def global_name(name: str, layer_offset: int) -> str:
    """Local parameter name -> name in the full model."""
    m = _LAYER.match(name)
    if not m:
        return name
    return f"{m.group(1)}{int(m.group(2)) + layer_offset}{m.group(3)}"


def layer_offset(model: torch.nn.Module) -> int:
    """Global index of this pipeline stage's first layer (0 for a stage without layers)."""
    model = getattr(model, "module", model)
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    return int(layers[0].layer_number) - 1 if layers is not None and len(layers) else 0


def _is_gated_fc1(name: str) -> bool:
    return name.endswith("mlp.linear_fc1.weight") or name.endswith("mlp.linear_fc1.bias")


def shard_tensor(full: torch.Tensor, param: torch.Tensor, name: str, tp_rank: int, tp_size: int,
                 gated: bool = True) -> torch.Tensor:
    """This rank's slice of ``full`` for the local parameter ``param``."""
    if tp_size == 1 or not getattr(param, "tensor_model_parallel", False):
        return full
    dim = getattr(param, "partition_dim", 0)
    if gated and _is_gated_fc1(name):
        halves = full.chunk(2, dim=dim)
        return torch.cat([h.chunk(tp_size, dim=dim)[tp_rank] for h in halves], dim=dim)
    return full.chunk(tp_size, dim=dim)[tp_rank]


def load_full_state_dict(
    model: torch.nn.Module,
    full: Mapping[str, torch.Tensor],
    *,
    tp_rank: int,
    tp_size: int,
    layer_offset: Optional[int] = None,
    gated: bool = True,
) -> None:
    """Copy this rank's shard of every parameter from a full state dict into ``model``.

    Raises ``KeyError`` naming the missing tensor, ``ValueError`` naming the tensor and
    both shapes on a mismatch.
    """
    module = getattr(model, "module", model)
    offset = _layer_offset(module) if layer_offset is None else layer_offset
    with torch.no_grad():
        for name, param in module.named_parameters():
            gname = global_name(name, offset)
            if gname not in full:
                raise KeyError(f"full state dict has no tensor '{gname}' (for local '{name}')")
            piece = shard_tensor(full[gname], param, name, tp_rank, tp_size, gated)
            if tuple(piece.shape) != tuple(param.shape):
                raise ValueError(
                    f"tensor '{gname}': expected shape {tuple(param.shape)} on this rank, "
                    f"got {tuple(piece.shape)} from a full tensor of {tuple(full[gname].shape)}"
                )
            param.copy_(piece.to(param.dtype))


def local_full_names(model: torch.nn.Module, layer_offset: int) -> dict[str, str]:
    """Local parameter name -> full-model name, for every parameter of ``model``."""
    module = getattr(model, "module", model)
    return {n: global_name(n, layer_offset) for n, _ in module.named_parameters()}


_layer_offset = layer_offset
