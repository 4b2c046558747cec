"""Checks that need no process group: run at the edge, before anything is built.

Each error names the setting and says which values would work.
"""

from __future__ import annotations

import math

from chunkflow.config.loader import ConfigError
from chunkflow.config.schema import (DTYPES, LORA_TARGETS, MODES, OVERLONG, RECOMPUTE, SCHEDULES,
                                     SPACO_SAMPLERS, Config)

__all__ = ["validate_config", "validate_layout", "divisors"]


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choice(value: str, options: tuple[str, ...], key: str) -> None:
    if value not in options:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")


def _positive(value: float, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be positive, got {value}")


def _joined(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def validate_config(cfg: Config) -> None:
    """Everything that can be checked without knowing the world size."""
    m, p, d, t, c = cfg.model, cfg.parallel, cfg.data, cfg.train, cfg.chunkflow
    _choice(t.schedule, SCHEDULES, "train.schedule")
    _choice(t.recompute, RECOMPUTE, "train.recompute")
    _choice(m.dtype, DTYPES, "model.dtype")
    _choice(d.overlong, OVERLONG, "data.overlong")
    _choice(p.backend, ("auto", "gloo", "nccl"), "parallel.backend")
    for key in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "vocab_size"):
        _positive(getattr(m, key), f"model.{key}")
    for key, value in (("parallel.tensor", p.tensor), ("parallel.pipeline", p.pipeline),
                       ("data.max_seq_len", d.max_seq_len),
                       ("data.global_batch_size", d.global_batch_size),
                       ("train.steps", t.steps), ("train.lr", t.lr)):
        _positive(value, key)

    if m.hidden_size % m.num_attention_heads:
        ok = [h for h in divisors(m.hidden_size) if h <= 4 * m.num_attention_heads]
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads="
            f"{m.num_attention_heads}; head counts that divide it: {_joined(ok)}"
        )
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(
            f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
            f"model.num_query_groups={m.num_query_groups}; use one of "
            f"{_joined(divisors(m.num_attention_heads))}"
        )
    common = divisors(m.num_query_groups)
    if m.num_attention_heads % p.tensor or m.num_query_groups % p.tensor:
        raise ConfigError(
            f"parallel.tensor={p.tensor} must divide model.num_attention_heads="
            f"{m.num_attention_heads} and model.num_query_groups={m.num_query_groups}; "
            f"use one of {_joined(common)}"
        )
    for key, size in (("vocab_size", m.vocab_size), ("ffn_hidden_size", m.ffn_hidden_size)):
        if size % p.tensor:
            ok = [t for t in divisors(size) if t <= 64 and m.num_attention_heads % t == 0
                  and m.num_query_groups % t == 0]
            raise ConfigError(
                f"parallel.tensor={p.tensor} does not divide model.{key}={size} (sharded "
                f"across tensor ranks); use one of {_joined(ok)}"
            )
    if m.num_layers % p.pipeline:
        raise ConfigError(
            f"parallel.pipeline={p.pipeline} does not divide model.num_layers={m.num_layers}; "
            f"use one of {_joined(divisors(m.num_layers))}"
        )
    if p.sequence_parallel and p.tensor == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tensor > 1")

    if d.pad_to_multiple < 1:
        raise ConfigError(f"data.pad_to_multiple={d.pad_to_multiple} is invalid: use an integer >= 1 "
                          f"(1 = no padding)")

    # ChunkFlow chunk size: positive, at most the longest sample, and a multiple of what
    # every row is padded to (data.pad_to_multiple, and the tensor size under sequence
    # parallelism, which splits each chunk's tokens across tensor ranks). Otherwise a
    # full chunk would be padded and later chunks of its sample would attend to the
    # padding's K/V; only a sample's last chunk may be short.
    multiple = math.lcm(d.pad_to_multiple, p.tensor if p.sequence_parallel else 1)
    if c.chunk_size <= 0 or c.chunk_size > d.max_seq_len or c.chunk_size % multiple:
        why = ""
        if multiple > 1:
            why = (f" (data.pad_to_multiple={d.pad_to_multiple}"
                   + (f", parallel.tensor={p.tensor} with sequence parallelism" if p.sequence_parallel else "")
                   + ")")
        ok = f"a positive multiple of {multiple}{why} " if multiple > 1 else "a positive integer "
        nearest = max(multiple, c.chunk_size // multiple * multiple) if c.chunk_size > 0 else multiple
        hint = f", e.g. {nearest}" if multiple > 1 and nearest <= d.max_seq_len else ""
        raise ConfigError(
            f"chunkflow.chunk_size={c.chunk_size} is invalid: use {ok}"
            f"no larger than data.max_seq_len={d.max_seq_len}{hint}"
        )
    if c.k < 1:
        raise ConfigError(f"chunkflow.k={c.k} is invalid: use an integer >= 1")
    if d.synthetic.min_len < 1 or d.synthetic.min_len > d.max_seq_len:
        raise ConfigError(
            f"data.synthetic.min_len={d.synthetic.min_len} must be in [1, data.max_seq_len="
            f"{d.max_seq_len}]"
        )
    _validate_seco_spaco(cfg)
    _validate_lora(cfg)


def _validate_seco_spaco(cfg: Config) -> None:
    c, s = cfg.chunkflow, cfg.chunkflow.spaco
    _choice(c.mode, MODES, "chunkflow.mode")
    _choice(s.sampler, SPACO_SAMPLERS, "chunkflow.spaco.sampler")
    if s.budget <= 0 or (s.budget >= 1 and not float(s.budget).is_integer()):
        raise ConfigError(
            f"chunkflow.spaco.budget={s.budget} is invalid: use a whole number of chunks (>= 1) "
            f"or a fraction of each long sample's chunks in (0, 1)"
        )
    if s.max_factor != 0 and s.max_factor < 1:
        raise ConfigError(f"chunkflow.spaco.max_factor={s.max_factor} is invalid: use 0 (no cap) or >= 1")
    if c.mode == "chunkflow":
        return
    if cfg.train.schedule != "chunkflow":
        raise ConfigError(
            f"chunkflow.mode={c.mode} runs on the chunk engine: set train.schedule=chunkflow "
            f"(got train.schedule={cfg.train.schedule})"
        )
    if c.k != 1:
        raise ConfigError(
            f"chunkflow.mode={c.mode} keeps one chunk's activations alive (K = 1); got "
            f"chunkflow.k={c.k}: set chunkflow.k=1, or use chunkflow.mode=chunkflow for K > 1"
        )



def _validate_lora(cfg: Config) -> None:
    lo = cfg.lora
    if not lo.enabled:
        if lo.load:
            raise ConfigError(f"lora.load={lo.load!r} needs lora.enabled=true")
        return
    if lo.rank < 1:
        raise ConfigError(f"lora.rank={lo.rank} is invalid: use an integer >= 1")
    _positive(lo.alpha, "lora.alpha")
    if not 0 <= lo.dropout < 1:
        raise ConfigError(f"lora.dropout={lo.dropout} must be in [0, 1)")
    bad = [t for t in lo.targets if t not in LORA_TARGETS]
    if bad or not lo.targets:
        raise ConfigError(
            f"lora.targets={list(lo.targets)} is invalid{' (' + ', '.join(bad) + ')' if bad else ' (empty)'}: "
            f"use one or more of {', '.join(LORA_TARGETS)}"
        )
    if cfg.parallel.sequence_parallel:
        raise ConfigError("lora.enabled=true does not support parallel.sequence_parallel=true; set it to false")


def validate_layout(cfg: Config, world_size: int) -> int:
    """Check the parallel layout against the world size; return the data-parallel size."""
    p = cfg.parallel
    mp = p.tensor * p.pipeline
    if world_size % mp:
        fits = [
            f"tensor={tp} x pipeline={pp}"
            for tp in divisors(world_size)
            for pp in divisors(world_size // tp)
            if cfg.model.num_attention_heads % tp == 0
            and cfg.model.num_query_groups % tp == 0
            and cfg.model.num_layers % pp == 0
        ]
        raise ConfigError(
            f"parallel.tensor={p.tensor} x parallel.pipeline={p.pipeline} = {mp} does not "
            f"divide the world size {world_size}; layouts that fit this model and world: "
            f"{'; '.join(fits)}"
        )
    dp = world_size // mp
    if cfg.data.global_batch_size < dp:
        raise ConfigError(
            f"data.global_batch_size={cfg.data.global_batch_size} is smaller than the "
            f"data-parallel size {dp}; use at least {dp} samples per step"
        )
    return dp
