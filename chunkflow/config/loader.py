"""Load a :class:`Config`: dataclass defaults, then a YAML file, then ``a.b=c`` overrides.

Unknown keys are errors that name the full dotted path and the nearest valid key; values
are converted to the field's declared type, so ``train.steps=abc`` fails with the key in
the message rather than deep inside training.

The loader also records which keys the YAML and the overrides set (``explicit``): a key
left out keeps its default. ``model.hf_dir`` refuses to replace an explicit architecture
field with a different value, and validation uses the record to catch a large model whose
other sizes were left at the tiny CPU defaults (see ``ModelConfig``).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from chunkflow.config.errors import ConfigError
from chunkflow.config.hf import apply_hf_config
from chunkflow.config.schema import AUTO, Config, IntOrAuto

__all__ = ["ConfigError", "load_config", "apply_overrides", "config_to_dict", "dump_config"]

logger = logging.getLogger(__name__)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _nearest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(sorted(options))}"


def _coerce(value: Any, typ: Any, path: str) -> Any:
    if typ == IntOrAuto:  # a whole number or "auto" (chunkflow.chunk_size, chunkflow.k)
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        try:
            return _coerce(value, int, path)
        except ConfigError:
            raise ConfigError(f"{path}: expected an integer or '{AUTO}', got {value!r}") from None
    origin = typing.get_origin(typ)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], path)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        from chunkflow.config.validate import CHOICES  # validate imports this module

        names = CHOICES.get(path)
        raise ConfigError(f"{path}: expected " + (f"one of {', '.join(names)}" if names else "a string")
                          + f", got {value!r}" + (" (YAML reads true/false/on/off as booleans)"
                                                  if isinstance(value, bool) else ""))
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # one entry: bench.sweep_k=2
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)[:1] or (Any,)
        items = [_coerce(v, item, f"{path}[{i}]") if item is not Any else v for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    return value


def _merge(obj: Any, updates: Mapping[str, Any], prefix: str, explicit: set[str]) -> None:
    if not isinstance(updates, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {updates!r}")
    types = _field_types(type(obj))
    for key, value in updates.items():
        path = f"{prefix}{key}"
        if key not in types:
            raise ConfigError(f"unknown config key '{path}'{_nearest(key, list(types))}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{path}.", explicit)
        else:
            setattr(obj, key, _coerce(value, types[key], path))
            explicit.add(path)


def _set_dotted(cfg: Config, dotted: str, raw: str, explicit: set[str]) -> None:
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        path = ".".join(parts[: i + 1])
        types = _field_types(type(obj))
        if part not in types:
            parent = ".".join(parts[:i])
            options = [f"{parent}.{k}" if parent else k for k in types]
            raise ConfigError(f"unknown config key '{path}'{_nearest(path, options)}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, part)):
                raise ConfigError(f"'{path}' is a section; set one of its keys, e.g. {path}.<key>=...")
            value = yaml.safe_load(raw) if raw.strip() else ""
            setattr(obj, part, _coerce(value, types[part], path))
            explicit.add(path)
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"'{path}' is a value, not a section")


def apply_overrides(cfg: Config, overrides: Sequence[str], explicit: Optional[set[str]] = None) -> Config:
    """Apply ``a.b=c`` strings in order (values parsed as YAML scalars); the dotted keys
    set are added to ``explicit`` when given."""
    explicit = set() if explicit is None else explicit
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.steps=10)")
        key, raw = item.split("=", 1)
        _set_dotted(cfg, key.strip(), raw, explicit)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the YAML at ``path`` (if any), then ``overrides``; then the
    architecture from ``model.hf_dir``'s config.json (if set, and logged as
    "model.hf_dir sets num_layers=28, ..."); then validated."""
    from chunkflow.config.validate import validate_config

    cfg = Config()
    explicit: set[str] = set()  # dotted keys the YAML or an override set
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from e
        _merge(cfg, data, "", explicit)
    apply_overrides(cfg, overrides, explicit)
    if cfg.model.hf_dir:  # the architecture comes from the HF config.json
        fields = apply_hf_config(cfg, explicit)
        logger.info("model.hf_dir sets %s", ", ".join(fields))
        explicit |= {"model." + f.split("=", 1)[0] for f in fields}
    validate_config(cfg, explicit)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
