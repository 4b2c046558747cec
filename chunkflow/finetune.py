"""Fine-tune a megatron-core model with chunkflow: the ``chunkflow-finetune`` command.

    torchrun --nproc-per-node 2 scripts/finetune.py --config configs/tiny_cpu.yaml [key=value ...]
    chunkflow-launch --nproc-per-node 2 -m chunkflow.finetune --config configs/tiny_cpu.yaml  # installed
    chunkflow-finetune --config configs/tiny_cpu.yaml train.schedule=chunkflow   # one process

Parses the config, creates process groups, trains, writes metrics and a checkpoint to
``train.output_dir``, and tears down. A bad input (config, data, checkpoint, HF files,
layout) ends the run with one line naming it, printed once, and exit code 2; see
docs/errors.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from chunkflow.config import load_config

__all__ = ["main", "done_line"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

    from chunkflow.parallel.distributed import destroy_distributed, init_distributed
    from chunkflow.train.errors import is_peer_failure, launcher_rank, report_failure

    ctx = None
    try:
        cfg = load_config(args.config, args.overrides)
        ctx = init_distributed(cfg)
        from chunkflow.train.trainer import Trainer

        summary = Trainer(cfg, ctx).train()
    except BaseException as exc:  # noqa: BLE001 - one line, once, and an exit code
        code = report_failure(exc, rank=ctx.rank if ctx else launcher_rank(), groups_exist=ctx is not None)
        if ctx is not None and not is_peer_failure(exc):  # nothing is stuck: tear down cleanly
            destroy_distributed()
        return code
    destroy_distributed()
    if ctx.is_logging_rank:
        print(done_line(summary))
    return 0


def done_line(s: dict) -> str:
    """The run's last line: steps, time, loss, throughput, memory, where its outputs are."""
    if s["finished_before"]:
        return f"done: already at step {s['steps']}; nothing trained. outputs: {s['output_dir']}/"
    head = "pre-empted" if s["preempted"] else "done"
    return (f"{head}: {s['steps']} steps in {s['elapsed_s']:.1f}s, loss {s['first_loss']:.4f} -> "
            f"{s['final_loss']:.4f}, {s['tokens_per_s']:.0f} tokens/s, peak memory "
            f"{s['peak_mem_bytes'] / 2**20:.0f} MiB/rank\n"
            f"outputs: {s['output_dir']}/ (config.yaml, metrics.jsonl"
            f"{', ' + s['checkpoint'] if s['checkpoint'] else ''})")


if __name__ == "__main__":
    sys.exit(main())
