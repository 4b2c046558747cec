"""Low-rank adapters (LoRA) on megatron-core's tensor-parallel linear layers.

A target projection W (out x in) becomes ``W x + (alpha / r) B A dropout(x)`` with
A (r x in), B (out x r); W is frozen, A and B train. Targets are named like Hugging
Face's projections. megatron fuses some of them, so one megatron layer may carry
several adapters, each updating its own rows of the fused output::

    target     megatron layer (parallel type)      rows of the fused output
    q_proj     self_attention.linear_qkv (column)  per query group: [q heads | k | v]
    k_proj       "                                 (group-major interleave, state.py)
    v_proj       "
    o_proj     self_attention.linear_proj (row)    all
    gate_proj  mlp.linear_fc1 (column)             [gate; up]
    up_proj      "
    down_proj  mlp.linear_fc2 (row)                all

Tensor parallelism (TP ranks r of n), never sequence parallel::

    column (qkv, fc1): x full on every rank.  A replicated, B split by output rows
        h = A x            identical on every rank, (tokens, r)
        h = copy(h)        identity forward, all-reduce backward: dA and dx complete
        y_r += B_r h       this rank's rows of the update
    row (proj, fc2): x split by input columns.  A split by input columns, B replicated
        h = all_reduce(A_r x_r)    (tokens, r) partial products summed over ranks
        y += B h                   y is already all-reduced by megatron

Only r-wide tensors are communicated. The full B of q_proj keeps the full weight's row
order (heads of group 0, group 1, ...), so splitting it into contiguous pieces matches
megatron's split of linear_qkv; gate and up have separate B's, each split alike.

Dropout draws one mask for the *full* input and each rank keeps its slice, so TP=n
sees the masks of TP=1. Adapters start with B = 0 (the model is unchanged) and A from
a generator seeded by ``lora.seed`` and the parameter name (same on every rank).

Parameter names: ``<layer>.lora_A.<target>``, ``<layer>.lora_B.<target>`` next to the
frozen ``<layer>.weight``, so base checkpoints, HF conversion and ``model/state.py``
keep their names. Public API: :func:`apply_lora`, :func:`lora_parameters`,
:func:`adapter_state`, :func:`save_adapters`, :func:`load_adapters`,
:func:`merge_lora` (in place, for export) and :func:`merge_full_state` (on full
TP=1 tensors, e.g. read from a checkpoint).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)

from chunkflow.model.state import global_name, layer_offset
from chunkflow.parallel import comm

__all__ = ["LoRASpec", "apply_lora", "lora_parameters", "adapter_state", "save_adapters", "load_adapters",
           "merge_lora", "merge_full_state", "ADAPTER_FILE", "ADAPTER_CONFIG"]

ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

# megatron layer suffix -> (parallel kind, targets in output order)
_LAYERS = {
    "self_attention.linear_qkv": ("column", ("q_proj", "k_proj", "v_proj")),
    "self_attention.linear_proj": ("row", ("o_proj",)),
    "mlp.linear_fc1": ("column", ("gate_proj", "up_proj")),
    "mlp.linear_fc2": ("row", ("down_proj",)),
}


@dataclass
class LoRASpec:
    """What a LoRA layer needs at run time (stored on the layer as ``_lora``)."""

    kind: str  # "column" | "row"
    parts: tuple  # ((target, width per group on this rank), ...) in output order
    groups: int  # column: query groups on this rank (qkv) or 1 (fc1); row: 1
    scale: float  # alpha / rank
    dropout: float
    tp_rank: int
    tp_size: int
    base_cls: type  # the megatron class before LoRA, restored by merge_lora


def _tp(layer: Any) -> tuple[int, int]:
    group = getattr(layer, "tp_group", None)
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _dropout(x: torch.Tensor, p: float, training: bool, full: int, offset: int) -> torch.Tensor:
    """Dropout with one mask for the full last dimension ``full``; keep this rank's slice."""
    if not training or p == 0.0:
        return x
    keep = torch.rand(*x.shape[:-1], full, device=x.device)[..., offset:offset + x.shape[-1]] >= p
    return x * keep.to(x.dtype) / (1.0 - p)


class _LoRAMixin:
    """Mixed into a megatron linear's class: adds the adapters' update to its output."""

    _lora: LoRASpec

    def forward(self, input_: torch.Tensor, *args: Any, **kwargs: Any):  # type: ignore[override]
        out, bias = super().forward(input_, *args, **kwargs)  # type: ignore[misc]
        return out + self._lora_delta(input_).to(out.dtype), bias

    def _lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        s: LoRASpec = self._lora
        group = getattr(self, "tp_group", None)
        lead = x.shape[:-1]
        if s.kind == "row":
            (target, _), = s.parts
            xd = _dropout(x, s.dropout, self.training, x.shape[-1] * s.tp_size, x.shape[-1] * s.tp_rank)
            h = xd @ self.lora_A[target].t()  # (..., r), partial over ranks
            h = reduce_from_tensor_model_parallel_region(h, group=group)
            return (h @ self.lora_B[target].t()) * s.scale
        xd = _dropout(x, s.dropout, self.training, x.shape[-1], 0)
        pieces = []
        for target, width in s.parts:
            if target in self.lora_A:
                h = copy_to_tensor_model_parallel_region(xd @ self.lora_A[target].t(), group=group)
                pieces.append((h @ self.lora_B[target].t()).view(*lead, s.groups, width))
            else:
                pieces.append(x.new_zeros(*lead, s.groups, width))
        return torch.cat(pieces, dim=-1).reshape(*lead, -1) * s.scale

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: Optional[dict] = None):
        """megatron's entries for W (and bias), plus A/B with their TP split axes."""
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sd = super().sharded_state_dict(prefix, sharded_offsets, metadata)  # type: ignore[misc]
        tensors = {name: p for name, p in _own_lora_params(self)}
        axes = {name: p.partition_dim for name, p in tensors.items() if p.tensor_model_parallel}
        extra = {} if metadata is None else {"dp_cp_group": metadata.get("dp_cp_group")}
        sd.update(make_sharded_tensors_for_checkpoint(tensors, prefix, axes, sharded_offsets,
                                                      tp_group=getattr(self, "tp_group", None), **extra))
        return sd


_CLASSES: dict[type, type] = {}


def _lora_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"LoRA{base.__name__}", (_LoRAMixin, base), {})
    return _CLASSES[base]


def _own_lora_params(layer: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:
    for ab in ("lora_A", "lora_B"):
        for target, p in getattr(layer, ab).items():
            yield f"{ab}.{target}", p


def _targets_of(module: torch.nn.Module) -> Iterator[tuple[str, Any, str, tuple]]:
    for name, layer in module.named_modules():
        for suffix, (kind, targets) in _LAYERS.items():
            if name.endswith(suffix):
                yield name, layer, kind, targets


def _column_parts(layer: Any, targets: tuple) -> tuple[int, tuple]:
    """(groups on this rank, ((target, width per group), ...)) of a column layer's output."""
    cfg = layer.config
    out = layer.output_size_per_partition
    if targets[0] == "q_proj":
        per_group = cfg.num_attention_heads // cfg.num_query_groups
        d = cfg.kv_channels
        groups = out // ((per_group + 2) * d)
        return groups, (("q_proj", per_group * d), ("k_proj", d), ("v_proj", d))
    if not cfg.gated_linear_unit:
        raise ValueError("LoRA on mlp.linear_fc1 supports the gated (SwiGLU) MLP only")
    return 1, (("gate_proj", out // 2), ("up_proj", out // 2))


def _full_a(rank: int, fan_in: int, seed: int, name: str) -> torch.Tensor:
    """nn.Linear's default init (kaiming uniform, a = sqrt(5)) from a per-name generator."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(rank, fan_in, dtype=torch.float64).uniform_(-bound, bound, generator=g)


def _new_param(t: torch.Tensor, like: torch.Tensor, parallel: bool, dim: int) -> torch.nn.Parameter:
    p = torch.nn.Parameter(t.to(device=like.device, dtype=like.dtype).contiguous())
    set_tensor_model_parallel_attributes(p, parallel, dim, 1)
    return p


def _require_grad_on_embedding(module: torch.nn.Module) -> None:
    """Make the (frozen) embedding's output require grad: megatron's reentrant activation
    recompute returns outputs without grad when no input requires it, which would cut
    the adapters of every recomputed layer off from the loss."""
    emb = getattr(module, "embedding", None)
    if emb is not None and not getattr(emb, "_lora_grad_hook", False):
        emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True) if torch.is_grad_enabled() else out)
        emb._lora_grad_hook = True


def apply_lora(model: torch.nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
               targets: Sequence[str], seed: int = 0) -> list[str]:
    """Freeze every parameter of ``model`` and add trainable adapters on ``targets``.

    Call after loading base weights and before megatron's DDP wrapper (which allocates
    gradient buffers for trainable parameters only). Returns the adapter parameter names.
    """
    module = getattr(model, "module", model)
    for p in module.parameters():
        p.requires_grad_(False)
    offset = layer_offset(module)
    wanted = set(targets)
    names: list[str] = []
    for name, layer, kind, layer_targets in _targets_of(module):
        chosen = [t for t in layer_targets if t in wanted]
        if not chosen:
            continue
        tp_rank, tp_size = _tp(layer)
        full_name = global_name(name, offset)
        w = layer.weight
        layer.lora_A = torch.nn.ParameterDict()
        layer.lora_B = torch.nn.ParameterDict()
        if kind == "column":
            groups, parts = _column_parts(layer, layer_targets)
            for target, width in parts:
                if target not in wanted:
                    continue
                a = _full_a(rank, w.shape[1], seed, f"{full_name}.lora_A.{target}")
                layer.lora_A[target] = _new_param(a, w, False, 0)
                layer.lora_B[target] = _new_param(torch.zeros(groups * width, rank), w, tp_size > 1, 0)
        else:
            groups, parts = 1, ((layer_targets[0], w.shape[0]),)
            a = _full_a(rank, w.shape[1] * tp_size, seed, f"{full_name}.lora_A.{layer_targets[0]}")
            a = a.chunk(tp_size, dim=1)[tp_rank]
            layer.lora_A[layer_targets[0]] = _new_param(a, w, tp_size > 1, 1)
            layer.lora_B[layer_targets[0]] = _new_param(torch.zeros(w.shape[0], rank), w, False, 0)
        layer._lora = LoRASpec(kind, parts, groups, alpha / rank, dropout, tp_rank, tp_size, type(layer))
        layer.__class__ = _lora_class(type(layer))
        names += [f"{name}.{n}" for n, _ in _own_lora_params(layer)]
    if not names:
        raise ValueError(f"no layer of the model matches lora.targets={list(targets)}")
    _require_grad_on_embedding(module)
    return names


def lora_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """This rank's adapter parameters by *full-model* name (global layer numbers)."""
    module = getattr(model, "module", model)
    offset = layer_offset(module)
    return {global_name(n, offset): p for n, p in module.named_parameters() if ".lora_" in n}


def _gather_tp(p: torch.nn.Parameter, layer_group: Any) -> torch.Tensor:
    if not p.tensor_model_parallel or layer_group is None or not dist.is_initialized():
        return p.detach().clone()
    n = dist.get_world_size(layer_group)
    if n == 1:
        return p.detach().clone()
    return torch.cat(comm.all_gather(p.detach(), group=layer_group), dim=p.partition_dim)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (TP-gathered) adapter tensors of this pipeline stage, by full-model name.
    Collective over the tensor-parallel group."""
    module = getattr(model, "module", model)
    offset = layer_offset(module)
    out: dict[str, torch.Tensor] = {}
    for name, layer, _, _ in _targets_of(module):
        if not isinstance(layer, _LoRAMixin):
            continue
        for pname, p in _own_lora_params(layer):
            out[global_name(f"{name}.{pname}", offset)] = _gather_tp(p, getattr(layer, "tp_group", None))
    return out


def _config_of(model: torch.nn.Module) -> dict:
    module = getattr(model, "module", model)
    specs = [layer._lora for _, layer, _, _ in _targets_of(module) if isinstance(layer, _LoRAMixin)]
    targets = sorted({t for _, layer, _, _ in _targets_of(module) if isinstance(layer, _LoRAMixin)
                      for t in layer.lora_A.keys()})
    rank = next(iter(p.shape[0] for n, p in module.named_parameters() if ".lora_A." in n))
    return {"rank": rank, "alpha": specs[0].scale * rank, "dropout": specs[0].dropout, "targets": targets}


def save_adapters(model: torch.nn.Module, path: str | Path, *, rank: int = 0, world_group: Any = None) -> Path:
    """Write ``<path>/adapter_model.safetensors`` (full tensors, full-model names) and
    ``<path>/adapter_config.json``. Collective: every rank calls it; pipeline stages'
    adapters are gathered to global ``rank`` 0, which writes. Returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    mine = adapter_state(model)
    cfg = _config_of(model)
    if dist.is_initialized() and dist.get_world_size(world_group) > 1:
        every = comm.gather_object({k: v.cpu() for k, v in mine.items()}, dst=0, group=world_group)
        mine = {k: v for d in every or [] for k, v in d.items()}
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in sorted(mine.items())}, str(path / ADAPTER_FILE))
        (path / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=1) + "\n")
    if dist.is_initialized():
        dist.barrier(group=world_group)
    return path


def load_adapters(model: torch.nn.Module, path: str | Path) -> int:
    """Copy this rank's shard of every adapter from ``<path>`` (see :func:`save_adapters`)
    into ``model`` (any TP/PP layout). Returns the number of tensors loaded."""
    from safetensors.torch import load_file

    from chunkflow.model.state import shard_tensor

    path = Path(path)
    if not (path / ADAPTER_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {ADAPTER_FILE} (write one with save_adapters)")
    saved_cfg = json.loads((path / ADAPTER_CONFIG).read_text())
    mine = _config_of(model)
    if saved_cfg["rank"] != mine["rank"] or sorted(saved_cfg["targets"]) != mine["targets"]:
        raise ValueError(f"{path}: adapters of rank {saved_cfg['rank']} on {saved_cfg['targets']} do not fit "
                         f"this model's lora.rank={mine['rank']}, lora.targets={mine['targets']}")
    full = load_file(str(path / ADAPTER_FILE))
    module = getattr(model, "module", model)
    offset = layer_offset(module)
    n = 0
    with torch.no_grad():
        for lname, layer, _, _ in _targets_of(module):
            if not isinstance(layer, _LoRAMixin):
                continue
            tp_rank, tp_size = _tp(layer)
            for pname, p in _own_lora_params(layer):
                name = global_name(f"{lname}.{pname}", offset)
                if name not in full:
                    raise KeyError(f"{path}/{ADAPTER_FILE} has no tensor '{name}'")
                piece = shard_tensor(full[name], p, name, tp_rank, tp_size)
                if piece.shape != p.shape:
                    raise ValueError(f"adapter '{name}': shape {tuple(piece.shape)} on this rank, "
                                     f"want {tuple(p.shape)}")
                p.copy_(piece.to(p.dtype))
                n += 1
    return n


def _column_delta(spec_parts: Sequence[tuple[str, int]], groups: int, a: Mapping[str, torch.Tensor],
                  b: Mapping[str, torch.Tensor], fan_in: int, like: torch.Tensor) -> torch.Tensor:
    """B A of every part, placed at its rows of the fused (group-major) weight."""
    pieces = []
    for target, width in spec_parts:
        if target in a:
            pieces.append((b[target].double() @ a[target].double()).view(groups, width, fan_in))
        else:
            pieces.append(torch.zeros(groups, width, fan_in, dtype=torch.float64, device=like.device))
    return torch.cat(pieces, dim=1).reshape(-1, fan_in)


def merge_lora(model: torch.nn.Module) -> int:
    """Fold every adapter into its base weight (W += alpha/r B A, on each rank's shard),
    remove the adapters and restore megatron's classes. For export or inference: call it
    on a model that is not wrapped for training any more. Returns the layers merged."""
    module = getattr(model, "module", model)
    merged = 0
    with torch.no_grad():
        for _, layer, _, _ in list(_targets_of(module)):
            if not isinstance(layer, _LoRAMixin):
                continue
            s: LoRASpec = layer._lora
            w = layer.weight
            if s.kind == "column":
                delta = _column_delta(s.parts, s.groups, layer.lora_A, layer.lora_B, w.shape[1], w)
            else:
                (target, _), = s.parts
                delta = layer.lora_B[target].double() @ layer.lora_A[target].double()
            w.add_((delta * s.scale).to(w.dtype))
            del layer.lora_A, layer.lora_B
            layer.__class__ = s.base_cls
            del layer._lora
            merged += 1
    return merged


def merge_full_state(full: Mapping[str, torch.Tensor], adapters: Mapping[str, torch.Tensor], *,
                     num_attention_heads: int, num_query_groups: int, alpha: float, rank: int) -> dict:
    """Merged copies of the base weights in ``full`` (full TP=1 tensors by megatron name,
    e.g. read from a checkpoint) given ``adapters`` (full tensors, :func:`save_adapters`
    names). Weights without adapters are returned unchanged."""
    out = dict(full)
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, t in adapters.items():
        layer, ab, target = name.rsplit(".", 2)
        layers.setdefault(layer, {"lora_A": {}, "lora_B": {}})[ab][target] = t
    for layer, ab in layers.items():
        w = full[f"{layer}.weight"]
        kind, targets = next(v for k, v in _LAYERS.items() if layer.endswith(k))
        if kind == "row":
            delta = ab["lora_B"][targets[0]].double() @ ab["lora_A"][targets[0]].double()
        elif targets[0] == "q_proj":
            per_group = num_attention_heads // num_query_groups
            d = w.shape[0] // (num_query_groups * (per_group + 2))
            parts = (("q_proj", per_group * d), ("k_proj", d), ("v_proj", d))
            delta = _column_delta(parts, num_query_groups, ab["lora_A"], ab["lora_B"], w.shape[1], w)
        else:
            half = w.shape[0] // 2
            delta = _column_delta((("gate_proj", half), ("up_proj", half)), 1, ab["lora_A"], ab["lora_B"],
                                  w.shape[1], w)
        out[f"{layer}.weight"] = (w.double() + delta * (alpha / rank)).to(w.dtype)
    return out
