"""Hugging Face Qwen2 / Llama checkpoints <-> megatron-core names, shapes and shards.

Architecture: ``config.json`` -> :class:`~chunkflow.config.schema.ModelConfig` lives in
:mod:`chunkflow.config.hf` (the config layer applies ``model.hf_dir`` without importing
the model); its names are re-exported here. This module adds the reverse mapping
(:func:`hf_config_from_model`) and the weights.

Weights, per layer ``i`` (megatron name of the full TP=1/PP=1 model <- HF name)::

    decoder.layers.i.input_layernorm.weight          <- model.layers.i.input_layernorm.weight
    decoder.layers.i.self_attention.linear_qkv.weight <- q_proj, k_proj, v_proj (interleaved)
    decoder.layers.i.self_attention.linear_proj.weight <- self_attn.o_proj.weight
    decoder.layers.i.pre_mlp_layernorm.weight        <- post_attention_layernorm.weight
    decoder.layers.i.mlp.linear_fc1.weight            <- [mlp.gate_proj; mlp.up_proj]
    decoder.layers.i.mlp.linear_fc2.weight            <- mlp.down_proj.weight
    embedding.word_embeddings.weight <- model.embed_tokens.weight
    decoder.final_layernorm.weight   <- model.norm.weight
    output_layer.weight              <- lm_head.weight (model.embed_tokens.weight when tied)

``linear_qkv`` is group-major: with ``G`` key/value heads, ``n = heads / G`` query heads
per group and head size ``d``, its rows are, for each group ``g``::

    [q head g*n, ..., q head g*n+n-1, k head g, v head g]   (each head: d rows)

so tensor-parallel rank ``r`` of ``T`` owns groups ``[r*G/T, (r+1)*G/T)``: a contiguous
row range of q_proj, of k_proj and of v_proj. :func:`read_shard` reads only those rows
(and only rank r's rows of gate/up, columns of o_proj/down_proj, rows of the vocabulary),
so a rank never holds the full model.

The vocabulary is not padded: ``vocab_size`` must be divisible by the tensor-parallel
size (megatron splits the embedding and output layer by rows); otherwise an error says
which sizes work. Exported checkpoints therefore have exactly the source vocabulary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from chunkflow.config.hf import (DTYPE_NAMES, SUPPORTED_ARCHITECTURES, HFError, apply_hf_config,
                                 check_parallel_sizes, hf_dtype, model_fields_from_hf, read_hf_config)
from chunkflow.config.schema import ModelConfig
from chunkflow.model.safetensors_stream import SafetensorsReader, TensorSpec
from chunkflow.model.state import global_name, layer_offset

__all__ = [
    "HFError", "SUPPORTED_ARCHITECTURES", "TOKENIZER_FILES", "ParamMap",
    "read_hf_config", "model_fields_from_hf", "hf_dtype", "apply_hf_config", "hf_config_from_model",
    "check_parallel_sizes", "megatron_params", "param_map", "hf_specs", "check_hf_tensors",
    "read_shard", "to_hf", "load_hf_weights", "model_config_from_dict", "DTYPE_NAMES",
]

# Small files copied next to the weights on import and export (those that exist).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")


# --------------------------------------------------------------------------- config
def hf_config_from_model(m: ModelConfig, base: Optional[dict], dtype: str, max_positions: int) -> dict:
    """``config.json`` for an export: ``base`` (the source's, if known) with the
    architecture fields set from ``m``; a fresh Qwen2 (qkv bias) or Llama config otherwise."""
    if base is None:
        qwen = m.qkv_bias
        base = {
            "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
            "model_type": "qwen2" if qwen else "llama",
            "hidden_act": "silu",
            "max_position_embeddings": max_positions,
            "rope_parameters": {"rope_type": "default"},
        }
        if not qwen:
            base.update(attention_bias=False, mlp_bias=False)
    out = dict(base)
    out.update(
        hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, vocab_size=m.vocab_size,
        rms_norm_eps=m.norm_epsilon, tie_word_embeddings=m.tie_embeddings,
    )
    if "head_dim" in out or out.get("model_type") == "llama":
        out["head_dim"] = m.hidden_size // m.num_attention_heads
    if "rope_theta" in out:
        out["rope_theta"] = m.rope_base
    else:
        out["rope_parameters"] = {**(out.get("rope_parameters") or {}), "rope_theta": m.rope_base}
    out["torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"] = DTYPE_NAMES[dtype]
    return out


# --------------------------------------------------------------------------- names
@dataclass(frozen=True)
class ParamMap:
    """One megatron parameter of the full model and the HF tensors it is made of.

    ``kind``: ``copy`` (one tensor, split along ``tp_dim`` or replicated when None),
    ``qkv`` (q/k/v interleaved by query group) or ``gated`` ([gate; up], each split).
    """

    name: str
    kind: str
    sources: tuple[str, ...]
    tp_dim: Optional[int]


_LAYER = {  # megatron suffix -> (kind, HF suffixes, tensor-parallel dim)
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",), None),
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                  "self_attn.v_proj.weight"), 0),
    "self_attention.linear_qkv.bias": ("qkv", ("self_attn.q_proj.bias", "self_attn.k_proj.bias",
                                                "self_attn.v_proj.bias"), 0),
    "self_attention.linear_proj.weight": ("copy", ("self_attn.o_proj.weight",), 1),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",), None),
    "mlp.linear_fc1.weight": ("gated", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0),
    "mlp.linear_fc2.weight": ("copy", ("mlp.down_proj.weight",), 1),
}


def param_map(name: str, m: ModelConfig) -> ParamMap:
    """The HF sources of megatron full-model parameter ``name``."""
    if name.startswith("decoder.layers."):
        index, suffix = name[len("decoder.layers."):].split(".", 1)
        if suffix not in _LAYER or (suffix.endswith("qkv.bias") and not m.qkv_bias):
            raise HFError(f"megatron parameter '{name}' has no Hugging Face counterpart")
        kind, sources, dim = _LAYER[suffix]
        return ParamMap(name, kind, tuple(f"model.layers.{index}.{s}" for s in sources), dim)
    if name == "embedding.word_embeddings.weight":
        return ParamMap(name, "copy", ("model.embed_tokens.weight",), 0)
    if name == "decoder.final_layernorm.weight":
        return ParamMap(name, "copy", ("model.norm.weight",), None)
    if name == "output_layer.weight":
        source = "model.embed_tokens.weight" if m.tie_embeddings else "lm_head.weight"
        return ParamMap(name, "copy", (source,), 0)
    raise HFError(f"megatron parameter '{name}' has no Hugging Face counterpart")


def megatron_params(m: ModelConfig) -> list[ParamMap]:
    """Every parameter of the full model, in checkpoint order (tied: no output layer)."""
    names = ["embedding.word_embeddings.weight"]
    for i in range(m.num_layers):
        names += [f"decoder.layers.{i}.{s}" for s in _LAYER if m.qkv_bias or not s.endswith("qkv.bias")]
    names.append("decoder.final_layernorm.weight")
    if not m.tie_embeddings:
        names.append("output_layer.weight")
    return [param_map(n, m) for n in names]


def _head_dim(m: ModelConfig) -> int:
    return m.hidden_size // m.num_attention_heads


def _source_shapes(pm: ParamMap, m: ModelConfig) -> list[tuple[int, ...]]:
    """Full HF shape of each source of ``pm``."""
    h, d = m.hidden_size, _head_dim(m)
    if pm.kind == "qkv":
        rows = [m.num_attention_heads * d, m.num_query_groups * d, m.num_query_groups * d]
        return [(r, h) if pm.name.endswith("weight") else (r,) for r in rows]
    if pm.kind == "gated":
        return [(m.ffn_hidden_size, h)] * 2
    suffix = pm.name.split(".", 3)[-1] if pm.name.startswith("decoder.layers.") else pm.name
    return [{
        "embedding.word_embeddings.weight": (m.vocab_size, h),
        "output_layer.weight": (m.vocab_size, h),
        "self_attention.linear_proj.weight": (h, m.num_attention_heads * d),
        "mlp.linear_fc2.weight": (h, m.ffn_hidden_size),
    }.get(suffix, (h,))]


def hf_specs(m: ModelConfig, dtype: torch.dtype) -> list[TensorSpec]:
    """Every HF tensor of the model in export order (the order :func:`to_hf` yields)."""
    return [TensorSpec(src, shape, dtype)
            for pm in megatron_params(m) for src, shape in zip(pm.sources, _source_shapes(pm, m))]


def check_hf_tensors(reader: SafetensorsReader, m: ModelConfig) -> None:
    """Every expected tensor is present with its expected shape, and nothing else is."""
    expected = {s.name: s.shape for s in hf_specs(m, torch.float32)}
    for name, shape in expected.items():
        if name not in reader:
            raise HFError(f"missing tensor '{name}' (expected shape {shape}) in {reader.dir}")
        got = reader.shape(name)
        if got != shape:
            raise HFError(f"tensor '{name}' has shape {got}; expected {shape} from config.json")
    ignorable = {"lm_head.weight"} if m.tie_embeddings else set()
    extra = [n for n in reader.names()
             if n not in expected and n not in ignorable and not n.endswith("rotary_emb.inv_freq")]
    if extra:
        raise HFError(f"unexpected tensors {extra[:5]} in {reader.dir}: not part of a "
                      "Qwen2/Llama model as described by config.json")


# --------------------------------------------------------------------------- tensors
def _rows(reader: SafetensorsReader, name: str, dim: int, rank: int, parts: int) -> torch.Tensor:
    size = reader.shape(name)[dim]
    step = size // parts
    return reader.read(name, dim, rank * step, (rank + 1) * step)


def read_shard(reader: SafetensorsReader, pm: ParamMap, m: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    """Tensor-parallel rank ``tp_rank``'s piece of ``pm``, reading only that piece."""
    if pm.kind == "copy":
        if pm.tp_dim is None or tp_size == 1:
            return reader.read(pm.sources[0])
        return _rows(reader, pm.sources[0], pm.tp_dim, tp_rank, tp_size)
    if pm.kind == "gated":
        return torch.cat([_rows(reader, s, 0, tp_rank, tp_size) for s in pm.sources], dim=0)
    # qkv: this rank's query groups, [q heads of group g; k of g; v of g] for each g.
    groups = m.num_query_groups // tp_size
    q, k, v = (_rows(reader, s, 0, tp_rank, tp_size) for s in pm.sources)
    rest = q.shape[1:]
    parts = [q.reshape(groups, -1, *rest), k.reshape(groups, -1, *rest), v.reshape(groups, -1, *rest)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def to_hf(pm: ParamMap, full: torch.Tensor, m: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """Split a full megatron tensor back into its HF tensors (views where possible)."""
    if pm.kind == "copy":
        return [(pm.sources[0], full)]
    if pm.kind == "gated":
        gate, up = full.chunk(2, dim=0)
        return [(pm.sources[0], gate), (pm.sources[1], up)]
    d = _head_dim(m)
    per_group = m.num_attention_heads // m.num_query_groups
    rest = full.shape[1:]
    grouped = full.reshape(m.num_query_groups, per_group + 2, d, *rest)
    q = grouped[:, :per_group].reshape(-1, *rest)
    k = grouped[:, per_group].reshape(-1, *rest)
    v = grouped[:, per_group + 1].reshape(-1, *rest)
    return list(zip(pm.sources, (q, k, v)))


def load_hf_weights(model: torch.nn.Module, hf_dir: str | Path, m: ModelConfig, *,
                    tp_rank: int, tp_size: int) -> int:
    """Copy this rank's shard of every parameter of ``model`` (one pipeline stage, one
    tensor rank) from the HF checkpoint in ``hf_dir``; returns the parameter count.

    Each rank reads only its slices (memory-mapped safetensors), so no rank holds the
    full model. Raises :class:`HFError` naming a missing or mis-shaped tensor.
    """
    try:
        reader = SafetensorsReader(hf_dir)
    except FileNotFoundError as e:
        raise HFError(f"model.hf_dir: {e}") from None
    check_hf_tensors(reader, m)
    module = getattr(model, "module", model)
    offset = layer_offset(module)
    count = 0
    with torch.no_grad():
        for name, param in module.named_parameters():
            pm = param_map(global_name(name, offset), m)
            piece = read_shard(reader, pm, m, tp_rank, tp_size)
            if tuple(piece.shape) != tuple(param.shape):
                raise HFError(f"'{pm.name}' from {pm.sources}: expected shape {tuple(param.shape)} "
                              f"on this rank, got {tuple(piece.shape)}")
            param.copy_(piece)
            count += param.numel()
    reader.close()
    return count


def model_config_from_dict(d: dict) -> ModelConfig:
    """A ``ModelConfig`` from its dict form (as stored in ``trainer.json``)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{k: v for k, v in d.items() if k in names})
