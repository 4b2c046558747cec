"""Metric sinks besides ``metrics.jsonl``: TensorBoard and Weights & Biases (``log.*``).

The trainer hands each sink the record it writes to ``metrics.jsonl``, once per step on
the logging rank::

    sinks = build_sinks(cfg, out_dir)      # [] when log.* enables none
    sink.write(record)                     # every number of the record, at record["step"]
    sink.close(failed)                     # end of the run (also pre-empted); failed: an error ended it

A record's numbers become scalars under their own key (``loss``, ``tokens_per_s_per_gpu``,
``mfu``, ``spaco_backprop_chunks``, ...); a list of numbers (``stage_busy_fraction``)
becomes one scalar per entry (``stage_busy_fraction/0``, ...); ``None``, booleans and
names are left out. Both packages are optional: :func:`check_sink_packages` runs on every
rank before the model is built, so a missing one stops the run at once, with the fix.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional, Protocol

from chunkflow.config.loader import ConfigError, config_to_dict
from chunkflow.config.schema import Config, LogConfig

__all__ = ["MetricSink", "TensorBoardSink", "WandbSink", "build_sinks", "check_sink_packages", "scalars"]


class MetricSink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self, failed: bool = False) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """The record's numbers, flat: ``{"loss": 2.1, "stage_busy_fraction/0": 0.8, ...}``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        if key == "step":
            continue
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                if _is_number(v):
                    out[f"{key}/{i}"] = float(v)
        elif _is_number(value):
            out[key] = float(value)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# log field -> (module to import, pip package that provides it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb_project": ("wandb", "wandb")}


def _enabled(log: LogConfig) -> list[str]:
    return [name for name in _PACKAGES if getattr(log, name)]


def check_sink_packages(log: LogConfig) -> None:
    """Raise :class:`ConfigError` naming the ``pip install`` when an enabled sink's package
    is missing. Cheap (no import): every rank calls it, so all of them stop together."""
    for name in _enabled(log):
        module, package = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            value = "true" if name == "tensorboard" else repr(getattr(log, name))
            raise ConfigError(
                f"log.{name}={value} needs the '{package}' package, which is not installed: "
                f"pip install {package} (or, in a checkout, pip install -e '.[watch]'), or turn log.{name} off")


class TensorBoardSink:
    """Event files under ``<output_dir>/tensorboard`` (``tensorboard --logdir`` on it)."""

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        step = int(record["step"])
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a run killed mid-way still shows its steps

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbSink:
    """One Weights & Biases run; its files go to ``<output_dir>/wandb``."""

    def __init__(self, out_dir: Path, project: str, name: str, config: Optional[dict] = None):
        import wandb

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name or None, dir=str(out_dir), config=config or {},
                              mode=os.environ.get("WANDB_MODE") or None)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=int(record["step"]))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)  # W&B marks a failed run as such


def build_sinks(cfg: Config, out_dir: Path) -> list[MetricSink]:
    """The sinks ``cfg.log`` enables (call on the logging rank only)."""
    check_sink_packages(cfg.log)
    sinks: list[MetricSink] = []
    if cfg.log.tensorboard:
        sinks.append(TensorBoardSink(Path(out_dir) / "tensorboard"))
    if cfg.log.wandb_project:
        sinks.append(WandbSink(Path(out_dir), cfg.log.wandb_project, cfg.log.wandb_run_name,
                               config=config_to_dict(cfg)))
    return sinks
