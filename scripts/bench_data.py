"""Benchmark the data path at scale: prepare, open, plan, and per-rank memory.

    python scripts/bench_data.py --samples 1000000 --work /tmp/bench_data [--json out.json]

Generates a synthetic ``input_ids`` corpus (no tokenizer needed) with long-tailed
lengths (log-normal, median ``--median-len``, clipped to [2, ``--max-len``]), then reports:

* preparation throughput (tokens/s) with 1 and 2 workers on the first
  ``--throughput-samples`` samples, and the full corpus prepared with ``--workers``;
* store size in bytes per token;
* time to open the store (with and without an overlong scan);
* time to plan one global batch (ChunkFlow plan, dp=2) on stores of several sizes;
* the same on stores of ``--store-samples`` samples written directly (no JSONL: at 1M
  samples generating and tokenizing the JSONL takes longer than the rest together);
* resident memory attributable to data in each of 2 rank processes, on the store and
  on the JSONL path (``--jsonl-rss-samples``: reading the JSONL into every rank is what
  the store replaces, and at 1M samples it needs gigabytes per rank).

Results and the command used are recorded in docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

VOCAB = 32000


def generate(path: Path, num: int, *, median: int, max_len: int, seed: int = 0) -> int:
    """Write ``num`` samples; return the number of tokens."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 1.1, num).astype(np.int64), 2, max_len)
    tokens = 0
    with path.open("w") as f:
        for start in range(0, num, 10000):
            part = lengths[start : start + 10000]
            ids = rng.integers(0, VOCAB, int(part.sum()))
            cuts = np.cumsum(part)[:-1]
            lines = ['{"input_ids": [' + ",".join(map(str, row.tolist())) + "]}\n"
                     for row in np.split(ids, cuts)]
            f.writelines(lines)
            tokens += int(part.sum())
    return tokens


def head(src: Path, dst: Path, num: int) -> None:
    with src.open("rb") as f, dst.open("wb") as g:
        for _, line in zip(range(num), f):
            g.write(line)


def prepare(inputs: Path, out: Path, workers: int) -> dict:
    from chunkflow.data.prepare import prepare_store

    shutil.rmtree(out, ignore_errors=True)
    s = prepare_store([inputs], out=out, workers=workers)
    return {"samples": s.samples, "tokens": s.tokens, "seconds": s.seconds,
            "tokens_per_s": s.tokens / s.seconds, "bytes": s.bytes, "bytes_per_token": s.bytes / s.tokens}


def write_store(out: Path, num: int, *, median: int, max_len: int, seed: int = 1) -> None:
    """A store of ``num`` synthetic samples written directly (same layout as prepare
    writes), to measure opening, planning and memory at sizes whose JSONL would take
    too long to generate and tokenize on a small machine."""
    from chunkflow.data.store import FILES, INDEX, STORE_FORMAT, STORE_VERSION

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(median), 1.1, num).astype(np.int64), 2, max_len)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    arrays = {"tokens": rng.integers(0, VOCAB, int(offsets[-1])).astype(np.uint32),
              "target": np.ones(int(offsets[-1]), dtype=np.uint8), "offsets": offsets,
              "lines": np.arange(1, num + 1, dtype=np.int64)}
    for key, (name, dtype) in FILES.items():
        arrays[key].astype(dtype).tofile(out / name)
    index = {"format": STORE_FORMAT, "version": STORE_VERSION, "num_samples": num,
             "num_tokens": int(offsets[-1]), "loss_tokens": int(offsets[-1] - num),
             "max_len": int(lengths.max()), "max_token_id": int(arrays["tokens"].max()),
             "max_token_where": "synthetic", "tokenizer": None,
             "inputs": [{"path": "synthetic", "samples": num}]}
    (out / INDEX).write_text(json.dumps(index))


def _cfg(path: str, max_seq_len: int, overlong: str):
    from chunkflow.config import load_config

    return load_config(None, [f"data.path={path}", f"data.max_seq_len={max_seq_len}",
                              f"data.overlong={overlong}", "data.global_batch_size=64",
                              "chunkflow.chunk_size=4096", "train.schedule=chunkflow",
                              f"model.vocab_size={VOCAB}"])


def open_and_plan(store: str, max_seq_len: int, overlong: str, batches: int = 20) -> dict:
    from chunkflow.data.dataset import load_samples
    from chunkflow.data.loader import StepPlanLoader

    cfg = _cfg(store, max_seq_len, overlong)
    t0 = time.perf_counter()
    samples, _ = load_samples(cfg.data, vocab_size=VOCAB)
    opened = time.perf_counter() - t0
    loader = StepPlanLoader.from_config(cfg, samples, dp_size=2)
    loader.next()  # the epoch permutation is drawn on the first batch
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    return {"open_s": opened, "plan_s": (time.perf_counter() - t0) / batches, "samples": len(samples)}


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def _rank(path: str, max_seq_len: int, queue) -> None:
    import chunkflow.data.dataset  # noqa: F401 - imports outside the measurement
    import chunkflow.data.loader  # noqa: F401
    import chunkflow.data.plan  # noqa: F401
    from chunkflow.data.dataset import load_samples
    from chunkflow.data.loader import StepPlanLoader

    cfg = _cfg(path, max_seq_len, "drop")
    before = _status()
    samples, _ = load_samples(cfg.data, vocab_size=VOCAB)
    loader = StepPlanLoader.from_config(cfg, samples, dp_size=2)
    for _ in range(50):
        loader.next()
    after = _status()
    queue.put({k: after[k] - before[k] for k in before})


def rank_memory(path: str, max_seq_len: int) -> list[dict]:
    """Data RSS delta in each of 2 concurrent rank processes."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(path, max_seq_len, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--work", default="/tmp/chunkflow_bench_data")
    parser.add_argument("--median-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=32768)
    parser.add_argument("--max-seq-len", type=int, default=16384, help="data.max_seq_len (overlong drop)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--throughput-samples", type=int, default=200_000)
    parser.add_argument("--jsonl-rss-samples", type=int, default=100_000)
    parser.add_argument("--store-samples", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="stores written directly (no JSONL) to measure open / plan / memory")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"args": vars(args), "cpus": os.cpu_count()}

    full = work / "corpus.jsonl"
    t0 = time.perf_counter()
    res["corpus_tokens"] = generate(full, args.samples, median=args.median_len, max_len=args.max_len)
    res["corpus_bytes"] = full.stat().st_size
    print(f"corpus: {args.samples:,} samples, {res['corpus_tokens']:,} tokens, "
          f"{res['corpus_bytes'] / 2**20:.0f} MiB JSONL ({time.perf_counter() - t0:.0f} s to generate)", flush=True)

    sub = work / "corpus_throughput.jsonl"
    head(full, sub, args.throughput_samples)
    res["throughput"] = {}
    for workers in (1, 2):
        r = prepare(sub, work / f"store_tp_w{workers}", workers)
        res["throughput"][workers] = r
        print(f"prepare {r['samples']:,} samples with {workers} worker(s): {r['tokens_per_s']:,.0f} tokens/s "
              f"({r['seconds']:.1f} s)", flush=True)
    same = all((work / "store_tp_w1" / n).read_bytes() == (work / "store_tp_w2" / n).read_bytes()
               for n in ("tokens.bin", "target.bin", "offsets.bin", "lines.bin"))
    res["workers_identical"] = same
    print(f"1 and 2 workers wrote byte-identical stores: {same}", flush=True)

    stores = {f"prepared {args.samples:,}": work / "store_full"}
    r = prepare(full, stores[f"prepared {args.samples:,}"], args.workers)
    res["full"] = r
    print(f"prepare all {r['samples']:,} samples with {args.workers} workers: {r['seconds']:.0f} s, "
          f"{r['tokens_per_s']:,.0f} tokens/s; store {r['bytes'] / 2**20:.0f} MiB = "
          f"{r['bytes_per_token']:.2f} bytes/token", flush=True)
    for n in args.store_samples:
        stores[f"direct {n:,}"] = work / f"store_direct_{n}"
        write_store(stores[f"direct {n:,}"], n, median=args.median_len, max_len=args.max_len)

    res["open_plan"] = {}
    for label, store in stores.items():
        fit = open_and_plan(str(store), args.max_len, "error")  # nothing overlong: no scan
        scan = open_and_plan(str(store), args.max_seq_len, "drop")  # overlong: lengths scanned once
        res["open_plan"][label] = {"open_s": fit["open_s"], "open_drop_s": scan["open_s"],
                                   "plan_s": scan["plan_s"], "kept": scan["samples"]}
        print(f"store {label:>18}: open {fit['open_s'] * 1e3:7.1f} ms (with overlong drop scan "
              f"{scan['open_s'] * 1e3:7.1f} ms), plan one global batch {scan['plan_s'] * 1e3:6.1f} ms", flush=True)

    jsonl = work / "corpus_rss.jsonl"
    head(full, jsonl, args.jsonl_rss_samples)
    res["rss"] = {}
    for label, path in [*stores.items(), (f"jsonl {args.jsonl_rss_samples:,}", jsonl)]:
        ranks = rank_memory(str(path), args.max_seq_len)
        res["rss"][label] = ranks
        print(f"{label:>18}: per-rank data RSS " + ", ".join(
            f"{r['VmRSS'] / 2**20:.1f} MiB (anon {r['RssAnon'] / 2**20:.1f}, file {r['RssFile'] / 2**20:.1f})"
            for r in ranks), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
