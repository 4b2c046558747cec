"""The first thing to run: ChunkFlow fine-tunes the tiny default, then the same global
batches go through Megatron's own schedule, and the two are printed side by side.

    bash scripts/dev.sh demo                                  # installs, then runs this
    chunkflow-demo --config configs/tiny_cpu.yaml [--compare-steps 8] [key=value ...]
    torchrun --nproc-per-node 2 -m chunkflow.demo --config configs/tiny_cpu.yaml

Outside torchrun it launches itself on ``--nproc`` processes (default parallel.tensor x
parallel.pipeline) through ``chunkflow.parallel.launch``. Every rank then:

    1. trains ``train.steps`` steps with ``train.schedule=chunkflow``, exactly as
       scripts/finetune.py does (config.yaml, metrics.jsonl, checkpoint in train.output_dir);
    2. re-seeds, rebuilds the model (the same initial weights) and replays the first
       ``--compare-steps`` global batches with ``train.schedule=megatron`` (megatron-core's
       stock 1F1B over rows packed to data.max_seq_len; optimizer steps included), its
       metrics in ``<train.output_dir>/megatron/``;
    3. prints, on the logging rank, both schedules' figures on those batches::

           the same 8 global batches (steps 1-8) under both schedules:
                                                  chunkflow C=256 K=1    megatron 1F1B
             tokens/s                                           3,816            4,495  (0.85x)
             peak activation memory (max rank)               14.3 MiB         38.0 MiB  (0.38x)
             bubble                                              0.30             0.50
             loss                              agrees to 1.2e-07 relative (max over steps 1-8; fp32)
           timeline of step 8 (measured, both schedules): runs/tiny_cpu/timeline.png

       (configs/tiny_cpu.yaml on 2 idle CPU cores)

tokens/s: the steps' global-batch tokens over their synchronised step time, step 1
(warm-up) left out. Activation memory is metered alike on both sides on every rank
(:class:`~chunkflow.scheduling.memory.SavedTensorMeter`: bytes autograd saves for
backward, K/V prefixes and ChunkFlow's K/V state), then the max over ranks and steps.
bubble: the mean of metrics.jsonl's ``bubble_fraction``. The losses are the same
computation cut differently, so they agree to float rounding; above
:data:`LOSS_TOLERANCE` of the dtype the demo says so and exits 1. The picture draws the
compute spans each stage measured (SpanTimer) in the last replayed step, both schedules
on one time axis; the spans are also written as JSON (``scripts/plot_schedule.py
--timeline`` redraws them).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Optional

from chunkflow.config import load_config
from chunkflow.config.errors import ConfigError
from chunkflow.config.schema import Config

__all__ = ["main", "LOSS_TOLERANCE"]

LOSS_TOLERANCE = {"fp64": 1e-9, "fp32": 1e-4, "bf16": 5e-2, "fp16": 5e-2}  # max relative loss gap


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file (train.schedule must be chunkflow)")
    parser.add_argument("--compare-steps", type=int, default=8,
                        help="global batches replayed under megatron's schedule (default 8)")
    parser.add_argument("--nproc", type=int, default=0,
                        help="processes when not under torchrun (default parallel.tensor x parallel.pipeline)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
    if "LOCAL_RANK" not in os.environ:
        return _launch(args, sys.argv[1:] if argv is None else list(argv))

    from chunkflow.parallel.distributed import destroy_distributed, init_distributed
    from chunkflow.train.errors import is_peer_failure, launcher_rank, report_failure

    ctx = None
    try:
        cfg = _demo_config(load_config(args.config, args.overrides), args.compare_steps)
        ctx = init_distributed(cfg)
        code = _run(cfg, ctx, args.compare_steps)
    except BaseException as exc:  # noqa: BLE001 - one line, once, and an exit code
        code = report_failure(exc, rank=ctx.rank if ctx else launcher_rank(), groups_exist=ctx is not None)
        if ctx is not None and not is_peer_failure(exc):
            destroy_distributed()
        return code
    destroy_distributed()
    return code


def _launch(args: argparse.Namespace, argv: list[str]) -> int:
    """Run this module under ``chunkflow.parallel.launch`` (torchrun, worker exit codes)."""
    from chunkflow.parallel.launch import main as launch
    from chunkflow.parallel.spawn import free_port

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nproc = args.nproc or cfg.parallel.tensor * cfg.parallel.pipeline
    return launch([f"--nproc-per-node={nproc}", f"--master-port={free_port()}", "-m", "chunkflow.demo", *argv])


def _demo_config(cfg: Config, compare_steps: int) -> Config:
    if cfg.train.schedule != "chunkflow":
        raise ConfigError(f"train.schedule={cfg.train.schedule}: the demo trains ChunkFlow and replays "
                          f"its batches under megatron's schedule; drop the override (or use "
                          f"scripts/finetune.py to train megatron alone)")
    if cfg.train.load:
        raise ConfigError("train.load: the demo compares both schedules from the same initial weights; "
                          "resume with scripts/finetune.py")
    if not 1 <= compare_steps <= cfg.train.steps:
        raise ConfigError(f"--compare-steps={compare_steps} must be between 1 and train.steps={cfg.train.steps}")
    return cfg


def _replay_config(cfg: Config) -> Config:
    """Megatron's schedule, outputs under megatron/, no checkpoints or sinks. train.steps
    stays: the learning-rate schedule is the main run's, so the replayed steps match."""
    train = dataclasses.replace(cfg.train, schedule="megatron", save_every=0, save_at_end=False,
                                save_timeline=False, output_dir=str(Path(cfg.train.output_dir) / "megatron"))
    log = dataclasses.replace(cfg.log, tensorboard=False, wandb_project="")
    return dataclasses.replace(cfg, train=train, log=log)


class _Metered:
    """A schedule whose steps run under one :class:`SavedTensorMeter` each; keeps each
    step's activation peak and this stage's timeline of step ``keep``. Everything else
    (``step``, ``last``, ...) is the wrapped schedule's."""

    def __init__(self, schedule: Any, module: Any, keep: int):
        object.__setattr__(self, "inner", schedule)
        object.__setattr__(self, "module", module)
        object.__setattr__(self, "keep", keep)
        object.__setattr__(self, "peaks", [])
        object.__setattr__(self, "timeline", [])

    def run(self, rows: Any) -> Any:
        from chunkflow.scheduling.memory import SavedTensorMeter

        with SavedTensorMeter(exclude=self.module) as meter:
            result = self.inner.run(rows)
        kv_state = int((result.extra or {}).get("kv_state_peak_bytes", 0))
        self.peaks.append(int(meter.peak_bytes + meter.peak_kv_bytes + kv_state))
        if len(self.peaks) == self.keep:
            object.__setattr__(self, "timeline", list(getattr(self.inner, "last_timeline", [])))
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:  # e.g. the trainer's schedule.step
        setattr(self.inner, name, value)


def _train(cfg: Config, ctx: Any, keep: int, *, replay: bool) -> _Metered:
    """The whole run (``replay=False``), or its first ``keep`` steps, silently."""
    import torch
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from chunkflow.train.trainer import Trainer

    torch.manual_seed(cfg.train.seed)  # as init_distributed: both runs start from the same weights
    model_parallel_cuda_manual_seed(cfg.train.seed)
    trainer = Trainer(cfg, ctx, log=(lambda *a, **k: None) if replay else print)
    trainer.schedule = metered = _Metered(trainer.schedule, trainer.model.module, keep)
    if replay:
        for _ in range(keep):
            trainer.train_step()
    else:
        summary = trainer.train()
        if ctx.is_logging_rank:
            from chunkflow.finetune import done_line

            print(done_line(summary))
    del trainer
    gc.collect()
    return metered


def _run(cfg: Config, ctx: Any, n: int) -> int:
    from chunkflow.parallel import comm

    cf = _train(cfg, ctx, n, replay=False)
    replay = _replay_config(cfg)
    if ctx.is_logging_rank:
        print(f"replaying global batches 1-{n} under megatron's schedule (outputs: {replay.train.output_dir}/) ...",
              flush=True)
    meg = _train(replay, ctx, n, replay=True)
    mine = {"pp": ctx.pp_rank, "first": ctx.dp_rank == 0 and ctx.tp_rank == 0,
            "peaks": (max(cf.peaks[:n], default=0), max(meg.peaks[:n], default=0)),
            "timelines": (cf.timeline, meg.timeline)}
    ranks = comm.all_gather_object(mine)
    if not ctx.is_logging_rank:
        return 0
    rows = [_records(Path(c.train.output_dir), n) for c in (cfg, replay)]
    peaks = [max(r["peaks"][i] for r in ranks) for i in (0, 1)]
    stages = sorted((r for r in ranks if r["first"]), key=lambda r: r["pp"])
    picture = _draw(cfg, n, [[s["timelines"][i] for s in stages] for i in (0, 1)])
    text, ok = side_by_side(cfg, rows[0], rows[1], peaks)
    print(text)
    print(picture)
    return 0 if ok else 1


def _records(out: Path, n: int) -> list[dict]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in recs if r["step"] <= n]


def side_by_side(cfg: Config, cf: list[dict], meg: list[dict], peaks: list[int]) -> tuple[str, bool]:
    """The comparison table of the module docstring, and whether the losses agree."""
    n = len(meg)
    timed = slice(1, None) if n > 1 else slice(None)  # step 1 warms up

    def tokens_per_s(rs: list[dict]) -> float:
        time_s = sum(r["step_time_s"] for r in rs[timed])
        return sum(r["tokens"] for r in rs[timed]) / time_s if time_s > 0 else 0.0

    def bubble(rs: list[dict]) -> float:
        return sum(r["bubble_fraction"] for r in rs[timed]) / len(rs[timed])

    gaps = [abs(a["loss"] - b["loss"]) / max(abs(b["loss"]), 1e-30) for a, b in zip(cf, meg)]
    gap = max(gaps, default=float("inf"))
    tol = LOSS_TOLERANCE.get(cfg.model.dtype, 1e-4)
    ok = len(cf) == n and gap <= tol
    c = cfg.chunkflow
    left, right = f"chunkflow C={c.chunk_size} K={c.k}", "megatron 1F1B"
    t_cf, t_meg = tokens_per_s(cf), tokens_per_s(meg)
    mib = [p / 2**20 for p in peaks]
    lines = [
        f"the same {n} global batches (steps 1-{n}) under both schedules:",
        f"  {'':<34}{left:>22}{right:>17}",
        f"  {'tokens/s':<34}{t_cf:>22,.0f}{t_meg:>17,.0f}  ({t_cf / t_meg if t_meg else 0:.2f}x)",
        f"  {'peak activation memory (max rank)':<34}{mib[0]:>18.1f} MiB{mib[1]:>13.1f} MiB"
        f"  ({peaks[0] / peaks[1] if peaks[1] else 0:.2f}x)",
        f"  {'bubble':<34}{bubble(cf):>22.2f}{bubble(meg):>17.2f}",
        f"  {'loss':<34}" + (f"agrees to {gap:.1e} relative (max over steps 1-{n}; {cfg.model.dtype})" if ok
                            else f"DIFFERS: {gap:.1e} relative, above {tol:.0e} for {cfg.model.dtype}"),
    ]
    return "\n".join(lines), ok


def _draw(cfg: Config, n: int, timelines: list[list[list[dict]]]) -> str:
    """Write both measured timelines (JSON, and a PNG when matplotlib is there)."""
    from chunkflow.pipeline.draw import draw_timelines
    from chunkflow.pipeline.simulate import Timeline

    out = Path(cfg.train.output_dir)
    c = cfg.chunkflow
    titles = (f"ChunkFlow C={c.chunk_size} K={c.k}, step {n} (measured)",
              f"Megatron 1F1B, rows of {cfg.data.max_seq_len}, step {n} (measured)")
    panels = []
    for name, title, stages in zip(("chunkflow", "megatron"), titles, timelines):
        tl = Timeline.from_json({"stages": stages})
        tl.save(out / f"timeline_{name}.json")
        panels.append((title, tl, None))
    try:
        draw_timelines(panels[::-1], str(out / "timeline.png"), unit="seconds")
    except ImportError:
        return (f"timeline of step {n}: {out}/timeline_chunkflow.json, timeline_megatron.json "
                f"(no matplotlib: pip install matplotlib, then scripts/plot_schedule.py --timeline)")
    return f"timeline of step {n} (measured, both schedules): {out / 'timeline.png'}"


if __name__ == "__main__":
    sys.exit(main())
