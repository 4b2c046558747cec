"""The list of checks :mod:`scripts/gpu_check.py` runs, at GPU scale or CPU-smoke scale.

=======================  ============================================  ==========================
check                    GPU (default)                                 ``--cpu-smoke``
=======================  ============================================  ==========================
env                      versions, GPUs, chosen backends               same
init                     process group (nccl), world size 1            gloo
attention[fp64|fp32]     every case, default kernel path               same, torch SDPA
attention[bf16|fp16]     default path (flash-attn if installed)        SKIP: no CUDA device
attention[*,sdpa-forced] SDPA path where flash-attn is the default     SKIP
verify[fp64|fp32]        verify_equivalence, tiny model, 1024 tokens   same on CPU
verify[bf16]             same in bf16                                  SKIP: no CUDA device
verify[fp32,offload-kv]  verify[fp32] with chunkflow.offload_kv: K/V   same; host pool = a
                         in pinned host memory, side-stream copies     memory-mapped file
train[chunkflow]         Qwen2.5-7B width, --layers 2, 32K, C 8K, K 2  tiny model, 512, C 128
train[resume]            resume the step-2 checkpoint, same losses     same
train[megatron]          Megatron schedule on the same data            same
multi_gpu[...]           torchrun, 2 GPUs, TP2 / PP2, verify + train   SKIP: no CUDA device
=======================  ============================================  ==========================
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from chunkflow.gpu_check.harness import FAIL, PASS, Check, Result, Skip

__all__ = ["Options", "build_checks"]


@dataclass
class Options:
    cpu_smoke: bool = False
    workdir: Path = Path("gpu_check_work")
    repo_root: Path = Path(".")
    layers: int = 2
    seq_len: int = 32768
    chunk_size: int = 8192
    k: int = 2
    steps: int = 4
    save_at: int = 2
    megatron_recompute: str = "full"
    multi_gpu: bool = True
    nproc: int = 2
    timeout_s: float = 1200.0
    peak_tflops: Optional[float] = None

    @property
    def train_dtype(self) -> str:
        return "fp32" if self.cpu_smoke else "bf16"

    @property
    def width(self) -> str:
        return "tiny" if self.cpu_smoke else "qwen7b"

    def scaled(self) -> "Options":
        """CPU smoke: tiny model, short sequences, no recompute needed."""
        if not self.cpu_smoke:
            return self
        return Options(**{**self.__dict__, "seq_len": 512, "chunk_size": 128, "layers": 2,
                          "megatron_recompute": "none", "multi_gpu": False})


# Loss agreement between runs: resume (same schedule) and megatron vs chunkflow.
RESUME_TOL = {"fp32": 1e-6, "bf16": 1e-3}
SCHEDULE_TOL = {"fp32": 1e-4, "bf16": 1e-2}


@dataclass
class State:
    """What checks hand to later checks (the process group, the reference run)."""

    opts: Options
    cuda: bool
    ctx: Any = None
    env: dict = field(default_factory=dict)
    chunkflow_records: list = field(default_factory=list)


def _need_cuda(state: State) -> None:
    if not state.cuda:
        raise Skip("no CUDA device")


def _env(state: State) -> Result:
    from chunkflow.gpu_check.environment import collect_environment

    device = torch.device("cuda", 0) if state.cuda else torch.device("cpu")
    env = collect_environment(device)
    state.env = env
    gpus = env["gpus"]
    dev = (f"{len(gpus)}x {gpus[0]['name']} {gpus[0]['memory_bytes'] / 2**30:.0f} GiB" if gpus else "no GPU")
    att = env["attention_backend"].get("bf16" if state.cuda else "fp32")
    value = (f"torch {env['torch']} (CUDA {env['torch_cuda']}), megatron-core {env['megatron_core']}, "
             f"flash-attn {env['flash_attn'] or 'absent'}, TE {env['transformer_engine'] or 'absent'}; "
             f"{dev}; pg {env['process_group_backend']}, attention {att}")
    return Result("env", PASS, value=value, details=env)


def _init(state: State) -> Result:
    from chunkflow.config.loader import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.parallel.spawn import free_port

    # This driver is one process: ignore a surrounding torchrun/SLURM world.
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    for key in ("SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    cfg = load_config(None, ["parallel.tensor=1", "parallel.pipeline=1", "parallel.backend=auto"])
    state.ctx = init_distributed(cfg)
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "none"
    return Result("init", PASS, value=f"process group {backend}, world 1, device {state.ctx.device}",
                  details={"backend": str(backend), "device": str(state.ctx.device)})


def _attention(state: State, dtype: str, forced: bool) -> Result:
    from chunkflow.gpu_check.attention_parity import kernel_paths, run_parity

    if dtype in ("bf16", "fp16"):
        _need_cuda(state)
    device = state.ctx.device
    paths = kernel_paths(device, dtype)
    if forced:
        if len(paths) < 2:
            raise Skip(f"chunkflow uses {paths[0][0]} for {dtype} here: no other path to force")
        label, context = paths[1]
        label = f"{label} (forced; default {paths[0][0]})"
    else:
        label, context = paths[0]
    r = run_parity(device, dtype, context)
    value = f"{label}: worst rel {r['worst']:.1e} ({r['worst_at']}), tol {r['tolerance']:.0e}"
    details = {"backend": label, **r}
    if r["failures"]:
        return Result("", FAIL, value=value, reason=f"{label}: " + "; ".join(r["failures"][:3]), details=details)
    return Result("", PASS, value=value, details=details)


def _verify_config(state: State, dtype: str, *extra: str):
    from chunkflow.gpu_check.runs import run_config

    return run_config(state.opts.workdir, f"verify_{dtype}", width="tiny", layers=2, dtype=dtype,
                      seq_len=1024, chunk_size=256, k=2, steps=1, extra=extra)


def _verify(state: State, dtype: str, offload: bool = False) -> Result:
    from chunkflow.gpu_check.runs import run_verify

    if dtype == "bf16":
        _need_cuda(state)
    extra = ("chunkflow.offload_kv=true",) if offload else ()
    r = run_verify(_verify_config(state, dtype, *extra), state.ctx)
    pool = "pinned host memory" if state.ctx.device.type == "cuda" else "a memory-mapped file"
    value = (f"K/V offloaded to {pool}; " if offload else "") + (f"max rel grad diff {r['max_rel_grad_diff']:.1e} (tol {r['tolerance']:.0e}), loss "
             f"{r['loss_megatron']:.6f} vs {r['loss_chunkflow']:.6f}, {r['num_chunks']} chunks "
             f"({r['num_dependent_chunks']} dependent)")
    if not r["ok"]:
        return Result("", FAIL, value=value, reason=f"gradients differ: {r['max_rel_grad_diff']:.2e} at "
                      f"{r['worst_param']} (tol {r['tolerance']:.0e})", details=r)
    if r["num_dependent_chunks"] == 0:
        return Result("", FAIL, value=value, reason="no dependent chunk in the batch: nothing was tested", details=r)
    return Result("", PASS, value=value, details=r)


def _train_config(state: State, name: str, *extra: str):
    from chunkflow.gpu_check.runs import run_config

    o = state.opts
    return run_config(o.workdir, name, width=o.width, layers=o.layers, dtype=o.train_dtype, seq_len=o.seq_len,
                      chunk_size=o.chunk_size, k=o.k, steps=o.steps, extra=extra)


def _finite_losses(records: list[dict]) -> Optional[str]:
    bad = [r["step"] for r in records if r.get("loss") is None or not math.isfinite(r["loss"])]
    return f"non-finite loss at steps {bad}" if bad else None


def _peak(state: State) -> Optional[float]:
    if state.opts.peak_tflops:
        return state.opts.peak_tflops
    gpus = state.env.get("gpus") or []
    return gpus[0].get("peak_bf16_tflops") if gpus else None


def _train_chunkflow(state: State) -> Result:
    from chunkflow.gpu_check.runs import describe_throughput, run_training, summarize_metrics

    o = state.opts
    cfg = _train_config(state, "chunkflow", f"train.save_every={o.save_at}")
    run = run_training(cfg, state.ctx)
    recs = run["records"]
    s = summarize_metrics(recs, world_size=1, peak_tflops=_peak(state))
    details = {**s, "build_s": run["build_s"], "train_s": run["train_s"], "log": run["log"]}
    value = (f"{len(recs)} steps, loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}, "
             + describe_throughput(s)) if recs else "no metrics"
    problem = _finite_losses(recs) or (None if len(recs) == o.steps else f"{len(recs)} of {o.steps} steps logged")
    expected = math.log(cfg.model.vocab_size)
    if not problem and abs(recs[0]["loss"] - expected) > 0.25 * expected:
        problem = f"first loss {recs[0]['loss']:.3f} is far from ln(vocab) = {expected:.3f} for a fresh model"
    if not problem and not (Path(cfg.train.output_dir) / f"checkpoint_step{o.save_at}").is_dir():
        problem = f"no checkpoint_step{o.save_at} written"
    if problem:
        return Result("", FAIL, value=value, reason=problem, details=details)
    state.chunkflow_records = recs
    return Result("", PASS, value=value, details=details)


def _train_resume(state: State) -> Result:
    from chunkflow.gpu_check.runs import compare_losses, run_training

    o = state.opts
    ckpt = o.workdir / "chunkflow" / f"checkpoint_step{o.save_at}"
    run = run_training(_train_config(state, "resume", f"train.load={ckpt}"), state.ctx)
    recs = run["records"]
    worst, problems = compare_losses(state.chunkflow_records, recs)
    tol = RESUME_TOL[o.train_dtype]
    steps = [r["step"] for r in recs]
    value = f"steps {steps[0]}-{steps[-1]} after resuming at {o.save_at}: max rel loss diff {worst:.1e} (tol {tol:.0e})" \
        if steps else "no steps ran"
    details = {"steps": steps, "losses": [r["loss"] for r in recs], "max_rel_loss_diff": worst, "tolerance": tol}
    if steps != list(range(o.save_at + 1, o.steps + 1)):
        problems.append(f"resumed steps {steps}, expected {o.save_at + 1}..{o.steps}")
    if not worst <= tol:
        problems.append(f"losses differ from the uninterrupted run by {worst:.2e} > {tol:.0e}")
    if problems:
        return Result("", FAIL, value=value, reason="; ".join(problems), details=details)
    return Result("", PASS, value=value, details=details)


def _train_megatron(state: State) -> Result:
    from chunkflow.gpu_check.runs import compare_losses, describe_throughput, run_training, summarize_metrics

    o = state.opts
    cfg = _train_config(state, "megatron", "train.schedule=megatron", f"train.recompute={o.megatron_recompute}")
    run = run_training(cfg, state.ctx)
    recs = run["records"]
    s = summarize_metrics(recs, world_size=1, peak_tflops=_peak(state))
    details = {**s, "recompute": o.megatron_recompute, "build_s": run["build_s"], "train_s": run["train_s"]}
    value = f"recompute {o.megatron_recompute}, " + describe_throughput(s)
    problems = [p for p in [_finite_losses(recs)] if p]
    if state.chunkflow_records:
        worst, mismatch = compare_losses(state.chunkflow_records, recs)
        tol = SCHEDULE_TOL[o.train_dtype]
        details.update(max_rel_loss_diff_vs_chunkflow=worst, tolerance=tol)
        value += f"; loss vs chunkflow max rel diff {worst:.1e} (tol {tol:.0e})"
        cf = summarize_metrics(state.chunkflow_records, world_size=1, peak_tflops=None)
        if cf["step_time_s"] and s["step_time_s"]:
            details["chunkflow_speedup"] = s["step_time_s"] / cf["step_time_s"]
            value += f"; chunkflow step time {details['chunkflow_speedup']:.2f}x faster"
        problems += mismatch
        if not worst <= tol:
            problems.append(f"losses differ from chunkflow's by {worst:.2e} > {tol:.0e}")
    else:
        value += "; not compared (no train[chunkflow] run)"
    if problems:
        return Result("", FAIL, value=value, reason="; ".join(problems), details=details)
    return Result("", PASS, value=value, details=details)


def _multi_gpu(state: State, entry: str, layout: str) -> Result:
    from chunkflow.config.loader import dump_config
    from chunkflow.gpu_check.multi_gpu import parse_max_rel_grad_diff, run_torchrun, torchrun_command
    from chunkflow.gpu_check.runs import read_metrics
    from chunkflow.parallel.spawn import free_port

    o = state.opts
    _need_cuda(state)
    if not o.multi_gpu:
        raise Skip("multi-GPU part turned off (--no-multi-gpu)")
    if torch.cuda.device_count() < o.nproc:
        raise Skip(f"needs {o.nproc} CUDA devices, found {torch.cuda.device_count()}")
    size = o.nproc
    par = [f"parallel.{layout}={size}", "parallel.backend=nccl"]
    name = f"{entry}_{layout}{size}"
    if entry == "verify":
        cfg = _verify_config(state, "fp32")
        script = o.repo_root / "scripts" / "verify_equivalence.py"
        extra = par
    else:
        cfg = _train_config(state, name)
        script = o.repo_root / "scripts" / "finetune.py"
        extra = par + [f"train.steps={min(o.steps, 2)}", f"train.output_dir={o.workdir / name}"]
    yaml_path = o.workdir / f"{name}.yaml"
    dump_config(cfg, yaml_path)
    cmd = torchrun_command(script, yaml_path, extra, nproc=size, port=free_port())
    stdout = run_torchrun(cmd, cwd=o.repo_root, timeout_s=o.timeout_s, log_path=o.workdir / f"{name}.log")
    if entry == "verify":
        diff = parse_max_rel_grad_diff(stdout)
        if diff is None:
            return Result("", FAIL, reason="no max_rel_grad_diff= line in the output")
        return Result("", PASS, value=f"{layout} {size} over NCCL: max rel grad diff {diff:.1e} (tol 1e-05)",
                      details={"max_rel_grad_diff": diff})
    recs = read_metrics(o.workdir / name)
    details: dict[str, Any] = {"losses": [r["loss"] for r in recs], "records": recs}
    problem = _finite_losses(recs)
    value = f"{layout} {size} over NCCL: {len(recs)} steps, losses " + ", ".join(f"{r['loss']:.4f}" for r in recs)
    if state.chunkflow_records and recs:
        rel = abs(recs[0]["loss"] - state.chunkflow_records[0]["loss"]) / abs(state.chunkflow_records[0]["loss"])
        details["step1_rel_diff_vs_1gpu"] = rel
        value += f" (step 1 vs 1 GPU: rel {rel:.1e}, informational)"
    if problem:
        return Result("", FAIL, value=value, reason=problem, details=details)
    return Result("", PASS, value=value, details=details)


def build_checks(opts: Options) -> tuple[list[Check], State]:
    state = State(opts=opts, cuda=torch.cuda.is_available() and not opts.cpu_smoke)
    checks: list[Check] = [Check("env", lambda: _env(state)), Check("init", lambda: _init(state))]

    def add(name: str, fn: Callable[[], Result], needs: tuple[str, ...] = ("init",)) -> None:
        checks.append(Check(name, fn, needs))

    for dtype in ("fp64", "fp32", "bf16", "fp16"):
        add(f"attention[{dtype}]", lambda d=dtype: _attention(state, d, False))
    for dtype in ("bf16", "fp16"):
        add(f"attention[{dtype},sdpa-forced]",
            lambda d=dtype: (_need_cuda(state), _attention(state, d, True))[1])
    for dtype in ("fp64", "fp32", "bf16"):
        add(f"verify[{dtype}]", lambda d=dtype: _verify(state, d))
    add("verify[fp32,offload-kv]", lambda: _verify(state, "fp32", offload=True))
    add("train[chunkflow]", lambda: _train_chunkflow(state))
    add("train[resume]", lambda: _train_resume(state), ("init", "train[chunkflow]"))
    add("train[megatron]", lambda: _train_megatron(state))
    for entry in ("verify", "train"):
        for layout in ("tensor", "pipeline"):
            add(f"multi_gpu[{entry},{layout[0]}p{opts.nproc}]", lambda e=entry, lay=layout: _multi_gpu(state, e, lay),
                needs=())
    return checks, state
