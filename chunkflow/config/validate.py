"""Checks that need no process group: run at the edge, before anything is built.

Each error names the setting and says which values would work. Single values are checked
from two tables, :data:`CHOICES` (field -> allowed names) and :data:`NUMBER_RULES` (field
-> allowed range; NaN and infinity are refused for every number, since ``nan <= 0`` is
false and would slip through a range check); rules that relate several fields follow.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Collection, Iterator, Optional

from chunkflow.config.loader import ConfigError
from chunkflow.config.schema import (AUTO, BACKENDS, DTYPES, LENGTH_DISTRIBUTIONS, LORA_TARGETS, MODES, NONFINITE,
                                     OVERLONG, RECOMPUTE, SCHEDULES, SIGNALS, SPACO_SAMPLERS, TINY_DEFAULT_FIELDS,
                                     TINY_DEFAULT_MAX_HIDDEN, Config, ModelConfig)

__all__ = ["validate_config", "validate_layout", "divisors", "CHOICES", "NUMBER_RULES", "CROSS_CHECKED",
           "AUTO_FIELDS", "require_chunking"]

# field -> allowed values (a list field: each entry).
CHOICES: dict[str, tuple[str, ...]] = {
    "model.dtype": DTYPES,
    "parallel.backend": BACKENDS,
    "data.overlong": OVERLONG,
    "data.synthetic.distribution": LENGTH_DISTRIBUTIONS,
    "train.schedule": SCHEDULES,
    "train.recompute": RECOMPUTE,
    "chunkflow.mode": MODES,
    "chunkflow.spaco.sampler": SPACO_SAMPLERS,
    "lora.targets": LORA_TARGETS,
    "bench.megatron_recompute": ("auto",) + RECOMPUTE,
    "bench.safe_probes": ("auto", "always", "never"),
    "train.nonfinite": NONFINITE,
    "train.preempt_signals": SIGNALS,
}

Rule = tuple[Callable[[float], bool], str]  # (accepts the value, the fix in words)
INT_GE1: Rule = (lambda v: v >= 1, "an integer >= 1")
INT_GE0: Rule = (lambda v: v >= 0, "an integer >= 0")
POSITIVE: Rule = (lambda v: v > 0, "a number > 0")
NON_NEGATIVE: Rule = (lambda v: v >= 0, "a number >= 0")
FRACTION: Rule = (lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
BELOW_ONE: Rule = (lambda v: 0 <= v < 1, "a number in [0, 1)")

# field -> the values it accepts on its own (a list field: each entry).
NUMBER_RULES: dict[str, Rule] = {
    "model.num_layers": INT_GE1,
    "model.hidden_size": INT_GE1,
    "model.ffn_hidden_size": INT_GE1,
    "model.num_attention_heads": INT_GE1,
    "model.num_query_groups": INT_GE1,
    "model.vocab_size": INT_GE1,
    "model.rope_base": POSITIVE,
    "model.norm_epsilon": POSITIVE,
    "model.init_std": POSITIVE,
    "parallel.tensor": INT_GE1,
    "parallel.pipeline": INT_GE1,
    "parallel.threads_per_rank": INT_GE1,
    "parallel.timeout_s": INT_GE1,
    "data.max_seq_len": INT_GE1,
    "data.global_batch_size": INT_GE1,
    "data.seed": INT_GE0,
    "data.pad_to_multiple": INT_GE1,
    "data.prepare_workers": INT_GE0,
    "data.synthetic.num_samples": INT_GE1,
    "data.synthetic.short_fraction": FRACTION,
    "data.synthetic.medium_fraction": FRACTION,
    "data.synthetic.long_fraction": FRACTION,
    "data.synthetic.max_len_fraction": FRACTION,
    "data.synthetic.length_scale": POSITIVE,
    "train.steps": INT_GE1,
    "train.recompute_num_layers": INT_GE1,
    "train.lr": POSITIVE,
    "train.min_lr": NON_NEGATIVE,
    "train.warmup_steps": INT_GE0,
    "train.weight_decay": NON_NEGATIVE,
    "train.adam_beta1": BELOW_ONE,
    "train.adam_beta2": BELOW_ONE,
    "train.adam_eps": POSITIVE,
    "train.grad_clip": NON_NEGATIVE,
    "train.seed": INT_GE0,
    "train.log_every": INT_GE1,
    "train.save_every": INT_GE0,
    "train.keep_checkpoints": INT_GE0,
    "train.initial_loss_scale": POSITIVE,
    "train.peak_tflops": NON_NEGATIVE,
    "train.max_skipped": INT_GE1,
    "train.grad_bucket_params": INT_GE0,
    "train.memory_budget_mb": NON_NEGATIVE,
    "chunkflow.k": INT_GE1,
    "lora.rank": INT_GE1,
    "lora.alpha": POSITIVE,
    "lora.dropout": BELOW_ONE,
    "lora.seed": INT_GE0,
    "bench.memory_budget_mb": NON_NEGATIVE,
    "bench.peak_mem_budget_mb": NON_NEGATIVE,
    "bench.warmup_steps": INT_GE1,
    "bench.timed_steps": INT_GE1,
    "bench.selection_steps": INT_GE0,
    "bench.bootstrap_resamples": INT_GE1,
    "bench.sweep_chunk_sizes": INT_GE1,
    "bench.sweep_k": INT_GE1,
}
# Numbers whose range depends on other fields: checked (finite first) further down.
# Whole numbers that may also be AUTO (chunkflow/train/autotune.py picks them).
AUTO_FIELDS = ("chunkflow.chunk_size", "chunkflow.k")
CROSS_CHECKED = ("chunkflow.chunk_size", "chunkflow.spaco.budget", "chunkflow.spaco.max_factor",
                 "data.synthetic.min_len")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _joined(values: list[int]) -> str:
    return ", ".join(str(v) for v in values)


def _leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every non-section field of the config tree."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_choices(values: dict[str, Any]) -> None:
    for key, options in CHOICES.items():
        value = values[key]
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if v not in options]
            if bad or not value:
                why = f" ({', '.join(map(str, bad))})" if bad else " (empty)"
                raise ConfigError(f"{key}={list(value)} is invalid{why}: use one or more of {', '.join(options)}")
        elif value not in options:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(options)}")


def _check_auto(values: dict[str, Any]) -> None:
    """An AUTO_FIELDS entry is a whole number or AUTO (the loader coerces YAML and
    overrides; this catches a ``Config`` built in code)."""
    for key in AUTO_FIELDS:
        value = values[key]
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{key}={value!r} is invalid: use a positive integer or {AUTO}")


def _check_numbers(values: dict[str, Any]) -> None:
    for key, value in values.items():
        if key in AUTO_FIELDS and value == AUTO:
            continue
        items = value if isinstance(value, (list, tuple)) else [value]
        fix = NUMBER_RULES[key][1] if key in NUMBER_RULES else "a finite number"
        if any(_is_number(v) and not math.isfinite(v) for v in items):
            raise ConfigError(f"{key}={value} is not a finite number: use {fix}")
        if key not in NUMBER_RULES:
            continue
        accepts, fix = NUMBER_RULES[key]
        bad = [v for v in items if not accepts(v)]
        if bad and isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={list(value)} is invalid ({_joined(bad)}): use {fix} for each entry")
        if bad:
            raise ConfigError(f"{key}={value} is invalid: use {fix}")


def _check_tiny_defaults(m: ModelConfig, explicit: Collection[str]) -> None:
    """A large model whose other sizes were never set (see ``TINY_DEFAULT_FIELDS``)."""
    if m.hidden_size < TINY_DEFAULT_MAX_HIDDEN:
        return
    tiny = ModelConfig()
    left = [f"model.{k}={getattr(m, k)}" for k in TINY_DEFAULT_FIELDS
            if f"model.{k}" not in explicit and getattr(m, k) == getattr(tiny, k)]
    if left:
        raise ConfigError(
            f"model.hidden_size={m.hidden_size} describes a large model, but {', '.join(left)} "
            f"{'is' if len(left) == 1 else 'are'} still the tiny CPU default; set model.hf_dir to "
            f"take the architecture from a Hugging Face config.json, or set "
            f"{'it' if len(left) == 1 else 'them'} explicitly"
        )


def _check_train_and_data(cfg: Config) -> None:
    t, s = cfg.train, cfg.data.synthetic
    if t.min_lr > t.lr:
        raise ConfigError(
            f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}: the schedule decays from train.lr "
            f"down to train.min_lr; set train.min_lr <= train.lr"
        )
    total = s.short_fraction + s.medium_fraction + s.long_fraction
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(
            f"data.synthetic.short_fraction + medium_fraction + long_fraction = {total:g}: "
            f"they are the shares of three length bands and must sum to 1"
        )
    if s.max_len_fraction > s.long_fraction:
        raise ConfigError(
            f"data.synthetic.max_len_fraction={s.max_len_fraction} exceeds data.synthetic."
            f"long_fraction={s.long_fraction}: the samples at max_seq_len are part of the long "
            f"band; use a value <= {s.long_fraction}"
        )


def validate_config(cfg: Config, explicit: Optional[Collection[str]] = None) -> None:
    """Everything that can be checked without knowing the world size.

    ``explicit``: the dotted keys the YAML, the overrides or ``model.hf_dir`` set (as
    :func:`~chunkflow.config.loader.load_config` records them); with it, a large model
    whose other architecture fields were left at the tiny defaults is refused.
    """
    m, p, d, c = cfg.model, cfg.parallel, cfg.data, cfg.chunkflow
    values = dict(_leaves(cfg))
    _check_choices(values)
    _check_auto(values)
    _check_numbers(values)
    if explicit is not None:
        _check_tiny_defaults(m, explicit)
    _check_train_and_data(cfg)

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
    per_stage = m.num_layers // p.pipeline
    if cfg.train.recompute == "block" and cfg.train.recompute_num_layers > per_stage:
        raise ConfigError(
            f"train.recompute_num_layers={cfg.train.recompute_num_layers} exceeds the {per_stage} layers "
            f"of a pipeline stage (model.num_layers={m.num_layers} / parallel.pipeline={p.pipeline}); "
            f"use 1..{per_stage} (recompute=full recomputes every layer)"
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
    if c.chunk_size != AUTO and (c.chunk_size <= 0 or c.chunk_size > d.max_seq_len or c.chunk_size % multiple):
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
    if d.synthetic.min_len < 1 or d.synthetic.min_len > d.max_seq_len:
        raise ConfigError(
            f"data.synthetic.min_len={d.synthetic.min_len} must be in [1, data.max_seq_len="
            f"{d.max_seq_len}]"
        )
    _validate_seco_spaco(cfg)
    _validate_lora(cfg)


def _validate_seco_spaco(cfg: Config) -> None:
    c, s = cfg.chunkflow, cfg.chunkflow.spaco
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
    if c.k not in (1, AUTO):  # auto resolves to 1 here
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
    if cfg.parallel.sequence_parallel:
        raise ConfigError("lora.enabled=true does not support parallel.sequence_parallel=true; set it to false")


def require_chunking(cfg: Config, tool: str) -> None:
    """Refuse AUTO in ``chunkflow.chunk_size``/``k`` for a tool that does not run the
    trainer's autotuning (chunkflow/train/autotune.py)."""
    for key in AUTO_FIELDS:
        section, name = key.split(".")
        if getattr(getattr(cfg, section), name) == AUTO:
            raise ConfigError(f"{key}={AUTO} is resolved by the trainer (scripts/finetune.py); {tool} "
                              f"needs a number: set {key}=<integer>")


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
