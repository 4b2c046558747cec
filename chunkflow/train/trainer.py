"""The training loop: one class that any schedule plugs into.

Per optimizer step::

    plan  = loader.next()                    # same StepPlan on every rank (pure)
    rows  = plan.rows_per_rank[dp_rank]      # this data-parallel rank's micro-batches
    res   = schedule.run(rows)               # forward + backward (megatron or chunkflow)
    optimizer.step(); scheduler.step()       # grads already scaled by 1/global loss tokens

A schedule is any object with ``run(rows) -> StepResult``; the plan loader decides how
a global batch becomes rows (Megatron packing to ``data.max_seq_len``, or ChunkFlow
chunks). Nothing else in the loop depends on which one is used.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from chunkflow.config.loader import config_to_dict, dump_config
from chunkflow.config.schema import Config
from chunkflow.parallel import comm
from chunkflow.parallel.distributed import ParallelContext
from chunkflow.train.checkpoint import latest_checkpoint, prune_checkpoints, save_checkpoint
from chunkflow.train.errors import load_checkpoint_checked
from chunkflow.train.loggers import build_sinks, check_sink_packages
from chunkflow.train.autotune import autotune, needs_autotune
from chunkflow.train.build import build_model_and_ddp, build_schedule
from chunkflow.train.metrics import (MetricsWriter, PeakMemory, device_clock, gather_rank_stats,
                                     resolve_peak_tflops, step_flops, throughput_metrics)
from chunkflow.train.optim import build_optimizer, build_scheduler
from chunkflow.train.preemption import PreemptionGuard
from chunkflow.train.progress import Progress

__all__ = ["Trainer", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient stopped the run (train.nonfinite); says which step."""


class Trainer:
    def __init__(self, cfg: Config, ctx: ParallelContext, *, log: Any = print):
        self.cfg, self.ctx = cfg, ctx
        # One rank speaks: the one that also writes metrics (last stage, first TP/DP rank).
        self.log = log if ctx.is_logging_rank else (lambda *a, **k: None)
        self.out_dir = Path(cfg.train.output_dir)
        check_sink_packages(cfg.log)  # every rank: a missing tensorboard/wandb stops all at once

        from chunkflow.data.loader import StepPlanLoader
        from chunkflow.train.data_cache import load_run_samples

        self.samples, self.data_desc = load_run_samples(
            cfg, ctx, log=print if ctx.rank == 0 else (lambda *a, **k: None))

        self.model, self.tc = build_model_and_ddp(cfg, ctx, prepare=self._prepare_model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg)
        self.tc.grad_scale_func = self.optimizer.scale_loss if cfg.model.dtype == "fp16" else None
        self.loaded_from = self._resolve_load()
        self.autotune_report: Optional[dict] = None
        if needs_autotune(cfg):  # chunkflow.chunk_size / k = auto: profile, simulate, choose
            chosen = _saved_chunking(self.loaded_from)
            if chosen:  # a resumed run keeps its (C, K): the same float order, an exact resume
                cfg = dataclasses.replace(cfg, chunkflow=dataclasses.replace(
                    cfg.chunkflow, chunk_size=chosen[0], k=chosen[1]))
                self.log(f"chunkflow.chunk_size/k=auto: (C, K) = {chosen} as chosen before {self.loaded_from}")
            else:
                trainable = sum(p.numel() for p in self.model.module.parameters() if p.requires_grad)
                cfg, self.autotune_report = autotune(cfg, self.model, ctx, self.samples, log=self.log,
                                                     trainable_params=trainable)
            self.cfg = cfg
        self.loader = StepPlanLoader.from_config(cfg, self.samples, dp_size=ctx.dp_size)
        self.schedule = build_schedule(cfg, self.model, ctx)

        self.step = 0
        if self.loaded_from:
            state = load_checkpoint_checked(self.loaded_from, cfg, model=self.model, optimizer=self.optimizer)
            self.step = int(state["step"])
            if not state.get("model_only"):  # e.g. an imported HF model: weights only
                self.scheduler.load_state_dict(state["scheduler"])
                self.loader.load_state_dict(state["loader"])
            self.log(f"resumed from {self.loaded_from} at step {self.step}")
        # Steps after the checkpoint's are dropped from metrics.jsonl: they run again.
        self.metrics = MetricsWriter(self.out_dir, ctx.is_logging_rank,
                                     resume_step=self.step if self.loaded_from else None)
        self.sinks = build_sinks(cfg, self.out_dir) if ctx.is_logging_rank else []  # log.*: TensorBoard, W&B
        self.skipped_in_a_row = 0
        self.skipped_total = 0
        self.guard: Optional[PreemptionGuard] = None  # installed by train()
        self.stop_requested = False
        if ctx.rank == 0:  # only once the run has started: a failing start keeps the old one
            dump_config(cfg, self.out_dir / "config.yaml")
        self.memory = PeakMemory(ctx.device)
        self.peak_tflops, peak_source = resolve_peak_tflops(cfg.train.peak_tflops, ctx.device)
        self.log(f"MFU against {self.peak_tflops} TFLOP/s per GPU ({peak_source})" if self.peak_tflops
                 else f"mfu is null: {peak_source}")

    def _resolve_load(self) -> str:
        """``train.load`` as a directory: ``auto`` = the newest checkpoint under the output
        directory (none: a fresh start)."""
        load = self.cfg.train.load
        if load != "auto":
            return load
        found = latest_checkpoint(self.out_dir)
        self.log(f"train.load=auto: {'resuming from ' + str(found) if found else 'no checkpoint under ' + str(self.out_dir) + ', starting fresh'}")
        return str(found) if found else ""

    def _prepare_model(self, model: torch.nn.Module) -> None:
        """HF weights and LoRA adapters, before DDP sizes its gradient buffers."""
        cfg = self.cfg
        if cfg.model.hf_dir and not cfg.train.load:  # start from Hugging Face weights
            from chunkflow.model.hf import load_hf_weights

            n = load_hf_weights(model, cfg.model.hf_dir, cfg.model, tp_rank=self.ctx.tp_rank,
                                tp_size=self.ctx.tp_size)
            self.log(f"loaded {n:,} parameters of this rank from {cfg.model.hf_dir}")
        if cfg.lora.enabled:  # freeze the base, add adapters
            from chunkflow.model.lora import apply_lora, load_adapters

            lo = cfg.lora
            names = apply_lora(model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout,
                               targets=lo.targets, seed=lo.seed)
            if lo.load:
                load_adapters(model, lo.load)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            self.log(f"LoRA r={lo.rank} on {', '.join(lo.targets)}: {len(names)} adapter tensors, "
                     f"{trainable:,} trainable parameters on this rank"
                     + (f" (from {lo.load})" if lo.load else ""))

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        plan = self.loader.next()
        rows = plan.rows_per_rank[ctx.dp_rank]
        self.memory.reset()
        t0 = device_clock(ctx.device)  # the device is idle: the last step ended synchronised
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        if hasattr(self.schedule, "step"):  # SpaCO keys its chunk draws by step
            self.schedule.step = self.step
        result = self.schedule.run(rows)
        nonfinite, self.stop_requested = self._step_flags(result.loss_sum)
        if nonfinite:
            ok, grad_norm = self._nonfinite_step()
        else:
            self.skipped_in_a_row = 0
            ok, grad_norm, _ = self.optimizer.step()
        if ok:  # a skipped step (fp16 overflow, non-finite) does not advance the LR schedule
            self.scheduler.step(increment=1)
        step_time = device_clock(ctx.device) - t0  # one synchronise: compute, not launches
        self.step += 1

        loss = self._global_loss(result.loss_sum, plan.num_loss_tokens)
        stats = gather_rank_stats(ctx, {
            "pp_rank": ctx.pp_rank, "busy_s": result.busy_s, "wall_s": result.wall_s,
            "step_time_s": step_time, "peak_mem_allocated_bytes": self.memory.peak_allocated(),
            "peak_mem_reserved_bytes": self.memory.peak_reserved(),
        })
        flops = step_flops(cfg.model, num_tokens=plan.num_tokens, sum_sq_seqlens=plan.sum_sq_seqlens)
        record = {
            "step": self.step,
            "loss": loss,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "lr": float(self.optimizer.param_groups[0]["lr"]),
            "tokens": int(plan.num_tokens),
            "loss_tokens": int(plan.num_loss_tokens),
            **throughput_metrics(stats, num_tokens=plan.num_tokens, flops=flops,
                                 num_stages=ctx.pp_size, peak_tflops=self.peak_tflops),
            "micro_batches": len(rows),
            "dp_imbalance": float(plan.imbalance),
            "schedule": cfg.train.schedule,
            "update_ok": bool(ok),
            "nonfinite": bool(nonfinite),
            "skipped_steps": self.skipped_total,
        }
        record.update(getattr(result, "extra", {}) or {})
        self.metrics.write(record)
        for sink in self.sinks:
            sink.write(record)
        return record

    def _step_flags(self, loss_sum: float) -> tuple[bool, bool]:
        """(any rank saw a non-finite loss or gradient, any rank was asked to stop), agreed
        by every rank with one MAX all-reduce before the optimizer step (train.nonfinite,
        train/preemption.py). fp16 gradients are left to the loss scaler, which skips
        overflowing steps itself."""
        bad = torch.zeros((), dtype=torch.int32, device=self.ctx.device)
        if not math.isfinite(loss_sum):
            bad += 1
        if self.cfg.model.dtype != "fp16":
            for buffer in getattr(self.model, "buffers", []):
                bad += (~torch.isfinite(buffer.grad_data)).any().to(torch.int32)
        stop = 1 if self.guard is not None and self.guard.requested else 0
        flags = torch.stack([bad.clamp(max=1), torch.tensor(stop, dtype=torch.int32, device=self.ctx.device)])
        if dist.is_initialized() and self.ctx.world_size > 1:
            flags = comm.all_reduce(flags, op="max")
        bad_any, stop_any = flags.tolist()  # one read back per step
        return bool(bad_any), bool(stop_any)

    def _nonfinite_step(self) -> tuple[bool, None]:
        """train.nonfinite: abort before anything non-finite is saved, or drop this update."""
        step = self.step + 1
        if self.cfg.train.nonfinite == "abort":
            raise NonFiniteError(
                f"step {step}: the loss or a gradient is NaN/inf; stopped before the update "
                f"(nothing non-finite was saved). Lower train.lr, check the data, or set "
                f"train.nonfinite=skip to drop such updates")
        self.skipped_in_a_row += 1
        self.skipped_total += 1
        if self.skipped_in_a_row >= self.cfg.train.max_skipped:
            raise NonFiniteError(
                f"step {step}: {self.skipped_in_a_row} updates in a row had a NaN/inf loss or "
                f"gradient (train.max_skipped={self.cfg.train.max_skipped}); stopping")
        self.log(f"step {step}: non-finite loss or gradient, update skipped "
                 f"({self.skipped_in_a_row} in a row)")
        self.optimizer.zero_grad()
        return False, None

    def _global_loss(self, loss_sum: float, num_loss_tokens: int) -> float:
        """Mean per-token loss over the global batch, on the logging rank."""
        if dist.is_initialized() and self.ctx.dp_size > 1:
            (loss_sum,) = comm.reduce_scalars([loss_sum], group=self.ctx.dp_group)
        return float(loss_sum) / max(num_loss_tokens, 1)

    # ------------------------------------------------------------------ loop
    def banner(self) -> str:
        """What this run is: layout, model, precision, schedule, kernels and versions."""
        from importlib.metadata import PackageNotFoundError, version

        from chunkflow.model.attention import attention_backend
        from chunkflow.model.provider import torch_dtype

        cfg, ctx = self.cfg, self.ctx
        p, m, c = cfg.parallel, cfg.model, cfg.chunkflow
        n = sum(q.numel() for q in self.model.module.parameters())
        n_all = comm.reduce_scalars([n])[0] / ctx.dp_size if dist.is_initialized() else n
        try:
            mcore = version("megatron-core")
        except PackageNotFoundError:  # pragma: no cover - source checkout of megatron
            mcore = "?"
        schedule = (f"chunkflow (mode {c.mode}, C={c.chunk_size}, K={c.k})" if cfg.train.schedule == "chunkflow"
                    else f"megatron (micro-batch capacity {cfg.data.max_seq_len}, recompute {cfg.train.recompute})")
        return "\n".join([
            f"layout: tensor {ctx.tp_size} x pipeline {ctx.pp_size} x data {ctx.dp_size} = {ctx.world_size} "
            f"ranks on {ctx.device.type}, sequence parallel {'on' if p.sequence_parallel else 'off'}, "
            f"distributed optimizer {'on' if cfg.train.distributed_optimizer else 'off'}",
            f"model: {m.num_layers} layers, hidden {m.hidden_size}, {int(n_all):,} parameters, {m.dtype}",
            f"schedule: {schedule}; attention: {attention_backend(ctx.device, torch_dtype(m.dtype))}",
            f"versions: torch {torch.__version__}, megatron-core {mcore}, chunkflow {_git_commit()}",
        ])

    def train(self) -> dict:
        cfg = self.cfg
        banner = self.banner()  # a collective (parameter count): every rank builds it
        self.log(banner)
        self.log(f"data: {self.data_desc}")
        if self.step >= cfg.train.steps:
            self.log(f"nothing to train: {self.loaded_from} is at step {self.step} and "
                     f"train.steps={cfg.train.steps} (raise train.steps to go on)")
            return self._summary(None, {}, 0, 0.0, 0, None, finished_before=True)
        self.guard = PreemptionGuard(cfg.train.preempt_signals) if cfg.train.preempt_signals else None
        failed = True
        try:
            summary = self._loop()
            failed = False
            return summary
        finally:
            if self.guard is not None:
                self.guard.restore()
            self.close_sinks(failed)

    def close_sinks(self, failed: bool = False) -> None:
        """Flush and close the TensorBoard / W&B sinks (end of run, pre-emption or error)."""
        for sink in self.sinks:
            sink.close(failed)
        self.sinks = []

    def _loop(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        first: Optional[dict] = None
        last: dict = {}
        tokens = 0
        peak_mem = 0
        tty = self.ctx.is_logging_rank and self.log is print and sys.stdout.isatty()
        progress = Progress(cfg.train.steps, self.step, tty=tty)
        while self.step < cfg.train.steps:
            rec = self.train_step()
            tokens += rec["tokens"]
            peak_mem = max(peak_mem, rec["peak_mem_bytes"])
            first = first or rec
            last = rec
            if self.ctx.is_logging_rank and (self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps):
                progress.clear()
                self.log(
                    f"step {rec['step']:>5}/{cfg.train.steps}  loss {rec['loss']:.4f}  "
                    f"grad_norm {_fmt(rec['grad_norm'], '.3f', 'skipped')}  lr {rec['lr']:.2e}  "
                    f"{rec['step_time_s']:.3f} s  tokens/s/gpu {rec['tokens_per_s_per_gpu']:.0f}  "
                    f"tflops/s/gpu {rec['tflops_per_s_per_gpu']:.4g}  "
                    + (f"mfu {100 * rec['mfu']:.1f}%  " if rec["mfu"] is not None else "")
                    + f"peak mem {rec['peak_mem_allocated_bytes'] / 2**30:.2f} GiB  "
                    f"bubble {rec['bubble_fraction']:.2f}  {progress.summary(self.step)}"
                )
            else:
                progress.show(rec)
            saved = None
            if cfg.train.save_every and self.step % cfg.train.save_every == 0 and self.step < cfg.train.steps:
                saved = self.out_dir / f"checkpoint_step{self.step}"
                self.save(saved)
            if self.stop_requested and self.step < cfg.train.steps:
                if saved is None:
                    saved = self.out_dir / f"checkpoint_step{self.step}"
                    self.save(saved)
                progress.clear()
                self.log(f"pre-empted at step {self.step}: saved {saved}")
                return self._summary(first, last, tokens, time.perf_counter() - t_start, peak_mem, saved,
                                     preempted=True)
        elapsed = time.perf_counter() - t_start
        if cfg.train.save_timeline:
            self._save_timeline()
        ckpt = None
        if cfg.train.save_at_end:  # a new name: never the checkpoint this run loaded
            ckpt = self.out_dir / f"checkpoint_step{self.step}"
            self.save(ckpt)
        return self._summary(first, last, tokens, elapsed, peak_mem, ckpt)

    def _summary(self, first: Optional[dict], last: dict, tokens: int, elapsed: float, peak_mem: int,
                 ckpt: Optional[Path], *, preempted: bool = False, finished_before: bool = False) -> dict:
        return {
            "steps": self.step,
            "preempted": preempted,
            "finished_before": finished_before,
            "first_loss": first["loss"] if first else None,
            "final_loss": last.get("loss"),
            "tokens": tokens,
            "elapsed_s": elapsed,
            "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
            "peak_mem_bytes": peak_mem if last else None,  # max over steps and ranks
            "output_dir": str(self.out_dir),
            "checkpoint": str(ckpt) if ckpt else None,
        }

    def _save_timeline(self) -> None:
        """Gather the last step's per-stage intervals onto the logging rank as JSON."""
        timeline = getattr(self.schedule, "last_timeline", None)
        if timeline is None or self.ctx.dp_rank != 0 or self.ctx.tp_rank != 0:
            return
        if dist.is_initialized() and self.ctx.pp_size > 1:
            stages = comm.all_gather_object(timeline, group=self.ctx.pp_group)
        else:
            stages = [timeline]
        if self.ctx.is_logging_rank:
            import json

            path = self.out_dir / "timeline.json"
            path.write_text(json.dumps({"step": self.step, "stages": stages}))
            self.log(f"timeline of step {self.step}: {path}")

    def save(self, path: Path) -> None:
        """Write ``path`` atomically (train/checkpoint.py), then prune to
        ``train.keep_checkpoints``, sparing it and the checkpoint this run loaded."""
        if self.loaded_from and Path(path).resolve() == Path(self.loaded_from).resolve():
            raise RuntimeError(f"refusing to save over {path}: this run loaded it")
        state = {
            "step": self.step,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "config": config_to_dict(self.cfg),
        }
        extra = None
        if self.cfg.lora.enabled:  # the adapters on their own, any-layout (lora.load reads them)
            from chunkflow.model.lora import save_adapters

            def extra(tmp: Path) -> None:
                save_adapters(self.model, tmp / "adapter", rank=self.ctx.rank)

        save_checkpoint(path, model=self.model, optimizer=self.optimizer, trainer_state=state, rank=self.ctx.rank,
                        extra=extra)
        if self.ctx.rank == 0:
            protect = [path] + ([self.loaded_from] if self.loaded_from else [])
            for gone in prune_checkpoints(self.out_dir, self.cfg.train.keep_checkpoints, protect=protect):
                self.log(f"deleted {gone}")
        if dist.is_initialized():
            comm.barrier()


def _fmt(value: Optional[float], spec: str, missing: str) -> str:
    """``value`` formatted, or ``missing`` (e.g. no grad norm: fp16 step skipped on overflow)."""
    return missing if value is None else format(value, spec)


def _git_commit() -> str:
    """The checkout's commit (``+dirty`` with local changes), or the package version."""
    import subprocess

    import chunkflow

    root = Path(chunkflow.__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha, dirty = "", ""
    return f"{sha}{'+dirty' if dirty else ''}" if sha else chunkflow.__version__


def _saved_chunking(ckpt: str) -> Optional[tuple[int, int]]:
    """(chunk_size, k) a checkpoint's run trained with, when it ran ChunkFlow with numbers
    (an automatic choice is saved resolved); None otherwise (no checkpoint, an import,
    another schedule). A damaged trainer.json is named later by the checkpoint check."""
    if not ckpt:
        return None
    try:
        import json

        saved = json.loads((Path(ckpt) / "trainer.json").read_text()).get("config", {})
        c = saved.get("chunkflow", {})
        if saved.get("train", {}).get("schedule") != "chunkflow":
            return None
        size, k = c.get("chunk_size"), c.get("k")
        return (size, k) if isinstance(size, int) and isinstance(k, int) else None
    except (OSError, ValueError, AttributeError):
        return None
