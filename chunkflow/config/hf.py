"""A Hugging Face ``config.json`` -> :class:`~chunkflow.config.schema.ModelConfig` fields.

Pure dictionary work (no torch): the loader calls :func:`apply_hf_config` for
``model.hf_dir``, and ``chunkflow.model.hf`` (weights) and ``chunkflow.hf_convert`` reuse
the mapping::

    hidden_size -> hidden_size            intermediate_size   -> ffn_hidden_size
    num_hidden_layers -> num_layers       num_attention_heads -> num_attention_heads
    num_key_value_heads -> num_query_groups   vocab_size -> vocab_size
    rope_theta (or rope_parameters.rope_theta) -> rope_base   rms_norm_eps -> norm_epsilon
    tie_word_embeddings -> tie_embeddings     initializer_range -> init_std
    Qwen2: qkv_bias=True, Llama: qkv_bias=False (attention_bias must be false)

``model.hf_dir`` owns these fields: a YAML key or override that sets one of them to a
different value is an error (drop the override, or drop ``model.hf_dir``); one that
agrees with config.json is accepted, so a resolved config written by a run loads again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Collection, Optional

from chunkflow.config.errors import ConfigError, UserError
from chunkflow.config.schema import Config, ModelConfig

__all__ = [
    "HFError", "SUPPORTED_ARCHITECTURES", "DTYPE_NAMES", "read_hf_config", "model_fields_from_hf",
    "hf_dtype", "check_parallel_sizes", "apply_hf_config",
]

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
# chunkflow dtype names <-> names in config.json ("dtype" / "torch_dtype").
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


class HFError(UserError):
    """A Hugging Face checkpoint chunkflow cannot convert; the message says what and why."""


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise HFError(f"{hf_dir}: no config.json (expected a Hugging Face model directory)")
    return json.loads(path.read_text())


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if archs:
        arch = archs[0]
    else:  # older or hand-written configs: fall back to model_type
        by_type = {t: a for a, t in SUPPORTED_ARCHITECTURES.items()}
        arch = by_type.get(hf.get("model_type", ""), f"model_type={hf.get('model_type')}")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise HFError(
            f"architecture '{arch}' is not supported; chunkflow converts "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2, Qwen2.5, Llama 2/3 without rope scaling)"
        )
    return arch


def _rope(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}  # transformers >= 5
    scaling = hf.get("rope_scaling") or {}  # transformers 4
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFError(f"rope type '{kind}' (rope scaling) is not supported; only plain RoPE is")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_fields_from_hf(hf: dict) -> dict[str, Any]:
    """``ModelConfig`` field values for a Hugging Face ``config.json`` (as a dict)."""
    arch = _architecture(hf)
    if hf.get("hidden_act", "silu") != "silu":
        raise HFError(f"hidden_act '{hf['hidden_act']}' is not supported; only silu (SwiGLU)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != hidden:
        raise HFError(f"head_dim={head_dim} x num_attention_heads={heads} != hidden_size={hidden}; "
                      "chunkflow needs head_dim = hidden_size / num_attention_heads")
    if arch == "LlamaForCausalLM":
        if hf.get("attention_bias", False):
            raise HFError("attention_bias=true (bias on q/k/v and o_proj) is not supported for Llama")
        if hf.get("mlp_bias", False):
            raise HFError("mlp_bias=true is not supported")
        qkv_bias = False
    else:
        if hf.get("use_sliding_window", False):
            raise HFError("use_sliding_window=true is not supported; chunkflow uses full attention")
        qkv_bias = True
    kinds = set(hf.get("layer_types") or ["full_attention"])
    if kinds != {"full_attention"}:
        raise HFError(f"layer_types {sorted(kinds)} are not supported; only full_attention")
    return dict(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        vocab_size=int(hf["vocab_size"]),
        rope_base=_rope(hf),
        norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=qkv_bias,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def hf_dtype(hf: dict) -> Optional[str]:
    """The checkpoint's dtype as a chunkflow name (``bf16``, ...), if config.json says."""
    name = hf.get("dtype") or hf.get("torch_dtype")
    return {v: k for k, v in DTYPE_NAMES.items()}.get(str(name).replace("torch.", ""))


def check_parallel_sizes(m: ModelConfig, tensor: int) -> None:
    """Sizes megatron splits across tensor ranks that the layout checks do not cover."""
    for key, value in (("vocab_size", m.vocab_size), ("ffn_hidden_size", m.ffn_hidden_size)):
        if value % tensor:
            ok = [t for t in range(1, 65) if value % t == 0 and m.num_query_groups % t == 0]
            raise HFError(
                f"model.{key}={value} is not divisible by parallel.tensor={tensor} (megatron "
                f"splits it across tensor ranks and chunkflow does not pad it); use "
                f"parallel.tensor in {ok[:8]}"
            )


def apply_hf_config(cfg: Config, explicit: Collection[str] = ()) -> list[str]:
    """Set ``cfg.model``'s architecture from ``<model.hf_dir>/config.json``; return the
    fields set, as ``["num_layers=28", "hidden_size=3584", ...]``.

    ``explicit`` holds the dotted keys the YAML or the command line set (see
    :func:`~chunkflow.config.loader.load_config`): one of them that disagrees with
    config.json is a :class:`ConfigError` naming both values, never silently replaced.
    Also points ``data.tokenizer`` at the directory's ``tokenizer.json`` when unset.
    """
    hf_dir = cfg.model.hf_dir
    try:
        fields = model_fields_from_hf(read_hf_config(hf_dir))
    except HFError as e:
        raise ConfigError(f"model.hf_dir={hf_dir}: {e}") from e
    conflicts = [f"model.{key}={getattr(cfg.model, key)!r} (config.json: {value!r})"
                 for key, value in fields.items()
                 if f"model.{key}" in explicit and getattr(cfg.model, key) != value]
    if conflicts:
        raise ConfigError(
            f"model.hf_dir={hf_dir} sets the architecture from its config.json, but the config "
            f"also sets {', '.join(conflicts)}; drop the explicit value(s) to use the checkpoint's "
            f"architecture, or drop model.hf_dir to build a fresh model from your fields"
        )
    for key, value in fields.items():
        setattr(cfg.model, key, value)
    try:
        check_parallel_sizes(cfg.model, cfg.parallel.tensor)
    except HFError as e:
        raise ConfigError(f"model.hf_dir={hf_dir}: {e}") from e
    tokenizer = Path(hf_dir) / "tokenizer.json"
    if not cfg.data.tokenizer and tokenizer.is_file():
        cfg.data.tokenizer = str(tokenizer)
    return [f"{key}={value}" for key, value in fields.items()]
