"""Build a megatron-core ``GPTModel`` (Qwen2 / Llama shape) from a chunkflow config.

The layer spec is megatron's local spec (RMSNorm, SwiGLU MLP, RoPE) with core attention
replaced by :class:`~chunkflow.model.attention.SDPAAttention`, which accepts packed
(THD) micro-batches and the ChunkFlow hook, every norm (the two per layer and the final
one) replaced by :class:`~chunkflow.model.norm.RMSNorm`, which supports sequence
parallelism, and a RoPE module that can shift positions by a per-call offset (dependent
chunk j starts at position j*C).
"""

from __future__ import annotations

import contextvars
import copy
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.transformer_block import (TransformerBlockSubmodules,
                                                         get_num_layers_to_build)
from megatron.core.transformer.transformer_config import TransformerConfig

from chunkflow.config.schema import Config
from chunkflow.model.attention import SDPAAttention
from chunkflow.model.norm import RMSNorm

__all__ = ["build_transformer_config", "build_model", "ROPE_OFFSET", "torch_dtype"]

# Position offset added to RoPE positions for the current forward (0 = none).
ROPE_OFFSET: contextvars.ContextVar[int] = contextvars.ContextVar("chunkflow_rope_offset", default=0)

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
           "fp64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


class OffsetRotaryEmbedding(RotaryEmbedding):
    """``RotaryEmbedding`` whose positions start at ``ROPE_OFFSET`` for the current call.

    GPTModel asks its rotary module for ``max_seq_len`` positions with no offset; the
    parent's ``forward(max_seq_len, offset)`` already supports an offset (and caches per
    offset), so this only threads the context's offset through. Values are identical to
    slices of the full table.
    """

    def forward(self, max_seq_len: int, offset: int = 0, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().forward(max_seq_len, offset + ROPE_OFFSET.get(), *args, **kwargs)


def build_transformer_config(cfg: Config, *, variable_seq_lengths: bool = True) -> TransformerConfig:
    """Map the chunkflow config onto megatron's ``TransformerConfig``."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    dtype = torch_dtype(m.dtype)
    recompute: dict[str, Any] = {}
    if t.recompute == "selective":
        recompute = {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}
    elif t.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform",
                     "recompute_num_layers": 1}
    elif t.recompute == "block":  # the first n layers of this stage, one checkpoint each
        recompute = {"recompute_granularity": "full", "recompute_method": "block",
                     "recompute_num_layers": t.recompute_num_layers}
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.hidden_size // m.num_attention_heads,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=m.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_std,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        tensor_model_parallel_size=p.tensor,
        pipeline_model_parallel_size=p.pipeline,
        sequence_parallel=p.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=m.dtype == "bf16",
        fp16=m.dtype == "fp16",
        variable_seq_lengths=variable_seq_lengths,
        # megatron's config check demands this with variable_seq_lengths, even for
        # dense models; it has no effect without experts.
        moe_token_dispatcher_type="alltoall",
        calculate_per_token_loss=True,
        deallocate_pipeline_outputs=False,
        **recompute,
    )
    if "recompute_modules" in kwargs and "recompute_modules" not in TransformerConfig.__dataclass_fields__:
        kwargs.pop("recompute_modules")  # pragma: no cover - older megatron-core
    # No CUDA graphs. The field's default "full" is itself deprecated (a warning per
    # config); 0.19 renamed cuda_graph_scope to cuda_graph_modules.
    fields = TransformerConfig.__dataclass_fields__
    kwargs["cuda_graph_modules" if "cuda_graph_modules" in fields else "cuda_graph_scope"] = []
    return TransformerConfig(**kwargs)


def _block_spec(tc: TransformerConfig) -> TransformerBlockSubmodules:
    """This pipeline stage's layer specs and final norm.

    Given a bare layer spec, ``TransformerBlock`` would build its final norm from a
    module-level default (``WrappedTorchNorm`` without Apex/TE, which refuses sequence
    parallelism); spelling out the block's submodules lets it use our norm too. The
    layer count is megatron's own for this stage (pipeline rank from ``parallel_state``,
    as ``TransformerBlock`` reads it).
    """
    layer = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    sub = layer.submodules
    sub.input_layernorm = sub.pre_mlp_layernorm = RMSNorm
    attn = sub.self_attention.submodules
    attn.core_attention = SDPAAttention
    for qk in ("q_layernorm", "k_layernorm"):  # IdentityOp unless qk_layernorm is on
        if getattr(attn, qk, IdentityOp) is not IdentityOp:
            setattr(attn, qk, RMSNorm)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(tc),
                                      layer_norm=RMSNorm)


def build_model(
    cfg: Config, *, pre_process: bool, post_process: bool, transformer_config: TransformerConfig | None = None
) -> GPTModel:
    """One pipeline stage of the model (all of it when ``pipeline == 1``)."""
    tc = transformer_config or build_transformer_config(cfg)
    m = cfg.model
    model = GPTModel(
        config=tc,
        transformer_layer_spec=_block_spec(tc),
        vocab_size=m.vocab_size,
        max_sequence_length=cfg.data.max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=m.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(m.rope_base) if float(m.rope_base).is_integer() else m.rope_base,
        parallel_output=True,
    )
    if m.dtype == "fp64":
        # megatron's local norms are created in fp32 whatever params_dtype says.
        model = model.double()
    rope = getattr(model, "rotary_pos_emb", None)
    if isinstance(rope, RotaryEmbedding) and type(rope) is RotaryEmbedding:
        rope.__class__ = OffsetRotaryEmbedding
    return model
