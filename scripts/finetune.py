"""Fine-tune a megatron-core model with chunkflow.

    torchrun --nproc-per-node 2 scripts/finetune.py --config configs/tiny_cpu.yaml [key=value ...]

Parses the config, creates process groups, trains, writes metrics and a checkpoint to
``train.output_dir``, and tears down. All logic lives in the ``chunkflow`` package.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from chunkflow.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from chunkflow.parallel.distributed import destroy_distributed, init_distributed
    from chunkflow.train.trainer import Trainer

    try:
        ctx = init_distributed(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        trainer = Trainer(cfg, ctx)
        summary = trainer.train()
        if ctx.is_logging_rank:
            print(
                f"done: {summary['steps']} steps in {summary['elapsed_s']:.1f}s, loss "
                f"{summary['first_loss']:.4f} -> {summary['final_loss']:.4f}, "
                f"{summary['tokens_per_s']:.0f} tokens/s, peak memory "
                f"{summary['peak_mem_bytes'] / 2**20:.0f} MiB/rank\n"
                f"outputs: {summary['output_dir']}/ (config.yaml, metrics.jsonl"
                f"{', checkpoint/' if summary['checkpoint'] else ''})"
            )
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
