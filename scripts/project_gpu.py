"""Project ChunkFlow vs Megatron step time on GPUs for the paper's Qwen2.5-7B settings.

    python scripts/project_gpu.py [--mfu 0.45] [--batches 32] [--output docs/results/gpu_projection.json]

Nothing runs on a GPU: both schedules are simulated (chunkflow.pipeline.simulate) with a
GPU cost model, and the memory of each side is modelled per stage (docs/gpu_projection.md):

* time: a micro-batch's forward on one stage = model FLOPs of its tokens and causal
  attention pairs (chunkflow.data.flops, Megatron's convention) / (pipeline x tensor size)
  / (peak x MFU); backward 2x forward; Megatron's recompute adds its recomputed share of
  the forward to the backward; a p2p transfer = bytes / bandwidth + latency.
* memory (bytes per token per layer, bf16, sequence parallel, flash attention, per
  tensor rank): 12h + 6f + 4 g d saved by a layer without recompute (LN inputs, QKV
  input, Q, K, V, attention output; LN and fc1 inputs, gate and up outputs, SwiGLU
  output), 2h for a layer under full recompute; the last stage saves fp32 softmax of the
  vocabulary shard (4 V / t per token). Megatron's 1F1B holds p - s micro-batches on stage
  s. Static: bf16 weights + fp32 gradients + fp32 master and Adam moments (distributed
  optimizer, / DP). A GPU of 80 GB minus 4 GiB of margin.
* ChunkFlow's (C, K): chosen by chunkflow.train.autotune's evaluate/choose from the same
  per-stage memory model (K/V state and its fp32 gradients, the pipeline's cached inputs)
  over C in 2K..32K and K in 1..16.
* Megatron: the fastest of recompute none, selective, block n = 1..L/p and full whose
  peak stage fits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from chunkflow.config import load_config
from chunkflow.data.assignment import CostModel, estimate_cost
from chunkflow.data.flops import matmul_params
from chunkflow.data.plan import plan_megatron_step
from chunkflow.pipeline.plan import plain_1f1b_plan
from chunkflow.pipeline.simulate import samples_of_lengths, simulate
from chunkflow.train.autotune import StageMemory, StageTime, choose, evaluate

GIB = 2**30
ROOT = Path(__file__).resolve().parents[1]
# The paper's two Qwen2.5-7B regimes, on our configs' layouts (the paper's exact GPU
# counts and batch are not in our sources: docs/gpu_projection.md).
SETTINGS = {
    "qwen2.5-7b 32K": "configs/qwen7b_32k.yaml",
    "qwen2.5-7b 256K": "configs/bench_qwen7b_256k.yaml",
}
PAPER = {"qwen2.5-7b 256K": {"speedup_up_to": 4.53, "ablation_best": [8192, 4]}}


def lmsys_like_lengths(n: int, max_len: int, seed: int) -> np.ndarray:
    """Long-tailed SFT lengths shaped by the paper's Table 1 (LMSys-Chat-1M): 99% up to
    4K tokens, the longest at the context limit. 99% log-uniform in [16, 4K], 0.9%
    log-uniform in (4K, max), 0.1% exactly max."""
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    short = np.exp(rng.uniform(np.log(16), np.log(4096), n))
    long = np.exp(rng.uniform(np.log(4097), np.log(max_len - 1), n))
    out = np.where(u < 0.99, short, np.where(u < 0.999, long, max_len))
    return out.astype(np.int64)


class Gpu:
    def __init__(self, cfg, *, peak_tflops: float, mfu: float, p2p_gbps: float, p2p_latency_s: float):
        m, p = cfg.model, cfg.parallel
        self.m, self.tp, self.pp = m, p.tensor, p.pipeline
        self.rate = peak_tflops * 1e12 * mfu
        self.p2p_gbps, self.p2p_latency_s = p2p_gbps, p2p_latency_s
        h, f, g, d = m.hidden_size, m.ffn_hidden_size, m.num_query_groups, m.hidden_size // m.num_attention_heads
        self.layers = m.num_layers // self.pp
        self.full_layer = (12 * h + 6 * f + 4 * g * d) / self.tp  # bytes per token, no recompute
        self.ckpt_layer = 2 * h / self.tp  # a layer under full recompute keeps its input
        self.logits = 4 * m.vocab_size / self.tp  # last stage: fp32 softmax of the vocab shard
        self.kv = 2 * g * d * 2 * self.layers / self.tp  # bf16 K and V of one token, this stage
        self.kv_grad = 2 * g * d * 4 * self.layers / self.tp  # fp32 accumulators
        self.hidden_bytes = 2 * h / self.tp
        self.cost = CostModel.from_model_config(m)
        self.unit_s = 2 * matmul_params(m) / (self.pp * self.tp) / self.rate  # one cost unit on one stage

    def static_bytes(self, dp: int) -> float:
        params = (matmul_params(self.m) + self.m.hidden_size * self.m.vocab_size) / (self.tp * self.pp)
        return params * (2 + 4 + 12 / dp)

    def p2p_s(self, tokens: int) -> float:
        return tokens * self.hidden_bytes / (self.p2p_gbps * 1e9) + self.p2p_latency_s

    def stage_memory(self, stage: int) -> StageMemory:
        act = self.layers * self.full_layer + (self.logits if stage == self.pp - 1 else 0.0)
        return StageMemory(0.0, act, self.kv, self.kv, self.kv_grad, 0.0 if stage == 0 else self.hidden_bytes)


def megatron_candidates(layers: int) -> list[tuple[str, int]]:
    """(name, layers per stage recomputed): none, selective (~0), block 1..L/p - 1, full."""
    return [("none", 0), ("selective", 0)] + [(f"block {n}", n) for n in range(1, layers)] + [("full", layers)]


def megatron(gpu: Gpu, batches, dp: int, capacity: int, budget: float) -> dict:
    results = []
    for name, n in megatron_candidates(gpu.layers):
        per_token = (gpu.layers - n) * gpu.full_layer + n * gpu.ckpt_layer
        if name == "selective":
            per_token -= gpu.layers * 2 * gpu.m.hidden_size / gpu.tp  # core attention output
        times, mem = [], 0.0
        for b in batches:
            plan = plan_megatron_step(b, dp_size=dp, max_seq_len=capacity, cost_model=gpu.cost)
            step = 0.0
            for rows in plan.rows_per_rank:
                rows = [r for r in rows if len(r)]
                tokens = [len(r) for r in rows]
                for s in range(gpu.pp):  # 1F1B: p - s consecutive micro-batches in flight on stage s
                    w = gpu.pp - s
                    held = max(sum(tokens[i:i + w]) for i in range(max(1, len(tokens) - w + 1))) * per_token
                    work = max(tokens) * gpu.full_layer if n else 0.0  # one layer rebuilt in backward
                    last = max(tokens) * gpu.logits if s == gpu.pp - 1 else 0.0
                    mem = max(mem, held + work + last)
                fwd = [estimate_cost(r, cost_model=gpu.cost) * gpu.unit_s for r in rows]
                frac = n / gpu.layers  # share of the stage's forward recomputed in backward
                bwd = [2 * x + frac * x for x in fwd]
                tl = simulate(plain_1f1b_plan(len(rows), gpu.pp), fwd, bwd, p2p_latency=gpu.p2p_s(capacity))
                step = max(step, tl.makespan)
            times.append(step)
        results.append({"recompute": name, "memory_gib": mem / GIB, "time_s": float(np.mean(times)),
                        "fits": mem <= budget})
    fitting = [r for r in results if r["fits"]]
    best = min(fitting, key=lambda r: r["time_s"]) if fitting else None
    return {"best": best, "candidates": results}


def project(name: str, path: str, args) -> dict:
    cfg = load_config(str(ROOT / path))
    p, d = cfg.parallel, cfg.data
    world = {"configs/qwen7b_32k.yaml": 8, "configs/bench_qwen7b_256k.yaml": 16}[path]
    dp = world // (p.tensor * p.pipeline)
    gpu = Gpu(cfg, peak_tflops=args.peak_tflops, mfu=args.mfu, p2p_gbps=args.p2p_gbps,
              p2p_latency_s=args.p2p_latency_us * 1e-6)
    budget = 80e9 - gpu.static_bytes(dp) - 4 * GIB
    lengths = lmsys_like_lengths(args.batches * d.global_batch_size, d.max_seq_len, args.seed)
    # every projected step holds one max-length sample at least once in a while: batches in order
    batches = [samples_of_lengths(lengths[i * d.global_batch_size:(i + 1) * d.global_batch_size])
               for i in range(args.batches)]
    mg = megatron(gpu, batches, dp, d.max_seq_len, budget)
    sizes = [c for c in (2048, 4096, 8192, 16384, 32768) if c <= d.max_seq_len]
    mem = [gpu.stage_memory(s) for s in range(p.pipeline)]
    time = StageTime(args.chunk_overhead_us * 1e-6, gpu.unit_s, 2 * args.chunk_overhead_us * 1e-6, 2 * gpu.unit_s)
    cands = evaluate(batches, chunk_sizes=sizes, ks=[1, 2, 4, 8, 16], dp_size=dp, num_stages=p.pipeline,
                     memory=mem, time=time, cost_model=gpu.cost, p2p_s=gpu.p2p_s(sizes[0]))
    best, _ = choose(cands, budget)
    ab = PAPER.get(name, {}).get("ablation_best")
    out = {
        "setting": name, "config": path, "layout": {"tensor": p.tensor, "pipeline": p.pipeline, "data": dp},
        "global_batch_size": d.global_batch_size, "max_seq_len": d.max_seq_len, "batches": args.batches,
        "mean_tokens_per_batch": float(lengths.sum() / args.batches),
        "activation_budget_gib": budget / GIB, "static_gib": gpu.static_bytes(dp) / GIB,
        "megatron": mg,
        "chunkflow": {"best": {"chunk_size": best.chunk_size, "k": best.k, "memory_gib": best.memory_bytes / GIB,
                               "time_s": best.time_s, "bubble": best.bubble},
                      "candidates": [{"chunk_size": c.chunk_size, "k": c.k, "memory_gib": c.memory_bytes / GIB,
                                      "time_s": c.time_s, "bubble": c.bubble, "fits": c.fits(budget)}
                                     for c in cands]},
        "speedup": mg["best"]["time_s"] / best.time_s if mg["best"] else None,
        "paper": PAPER.get(name, {}),
    }
    if ab:
        c = [x for x in cands if (x.chunk_size, x.k) == tuple(ab)]
        out["chunkflow"]["paper_ablation_point"] = {"chunk_size": ab[0], "k": ab[1], "time_s": c[0].time_s,
                                                    "memory_gib": c[0].memory_bytes / GIB} if c else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H800 SXM)")
    ap.add_argument("--mfu", type=float, default=0.45, help="share of peak every matmul and attention kernel reaches")
    ap.add_argument("--p2p-gbps", type=float, default=25.0, help="inter-stage bandwidth, GB/s")
    ap.add_argument("--p2p-latency-us", type=float, default=20.0)
    ap.add_argument("--chunk-overhead-us", type=float, default=300.0, help="fixed seconds per micro-batch forward")
    ap.add_argument("--batches", type=int, default=32, help="global batches averaged")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", default="docs/results/gpu_projection.json")
    args = ap.parse_args(argv)
    results = [project(name, path, args) for name, path in SETTINGS.items()]
    print(f"{'setting':<18} {'megatron best':<16} {'s/step':>8} {'chunkflow (C, K)':<18} {'s/step':>8} {'speedup':>8}")
    for r in results:
        mg, cf = r["megatron"]["best"], r["chunkflow"]["best"]
        print(f"{r['setting']:<18} {mg['recompute'] if mg else 'none fits':<16} {mg['time_s'] if mg else float('nan'):>8.2f} "
              f"{'(%d, %d)' % (cf['chunk_size'], cf['k']):<18} {cf['time_s']:>8.2f} {r['speedup'] or float('nan'):>7.2f}x")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"command": "python scripts/project_gpu.py " + " ".join(argv or sys.argv[1:]),
                                             "assumptions": vars(args), "results": results}, indent=1))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
