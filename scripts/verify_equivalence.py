"""Check ChunkFlow's gradients against the Megatron path on your own configuration.

    python scripts/verify_equivalence.py --config configs/tiny_cpu.yaml parallel.pipeline=1
    torchrun --nproc-per-node 2 scripts/verify_equivalence.py --config configs/tiny_cpu.yaml
    torchrun --nproc-per-node 2 scripts/verify_equivalence.py --config my.yaml train.load=runs/x/ckpt

Runs the first global batch both ways on the same weights (those of ``train.load`` or
``model.hf_dir`` if set, else a seeded random init) and prints the loss of each, the
largest relative gradient difference, any NaN/inf found (named), and as the last line
``max_rel_grad_diff=<value>``. Exits 0 on PASS; 1 when the difference exceeds the
tolerance for the model's dtype (1e-5 fp32, 1e-10 fp64) or any loss or gradient is
not finite; 2 on a configuration error or unreadable weights.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from chunkflow.config import ConfigError, load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from chunkflow.parallel.distributed import destroy_distributed, init_distributed

        ctx = init_distributed(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from chunkflow.model.hf import HFError
    from chunkflow.verify import verify_equivalence

    try:
        r = verify_equivalence(cfg, ctx)
    except (HFError, FileNotFoundError) as e:
        print(f"cannot load weights: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if ctx.rank == 0:
        print(f"layout: tensor={cfg.parallel.tensor} pipeline={cfg.parallel.pipeline} "
              f"data={ctx.dp_size}  dtype={cfg.model.dtype}  chunk_size={cfg.chunkflow.chunk_size} "
              f"k={cfg.chunkflow.k}  distributed_optimizer={cfg.train.distributed_optimizer}")
        print(f"weights: {r.weights}")
        print(f"batch: {r.num_tokens} tokens -> {r.num_chunks} chunks ({r.num_dependent_chunks} dependent)")
        print(f"loss megatron={r.loss_megatron:.10f} chunkflow={r.loss_chunkflow:.10f} "
              f"diff={r.loss_diff:.3e} (relative {r.rel_loss_diff:.3e})")
        for item in r.nonfinite:
            print(f"non-finite: {item}")
        print(f"worst parameter: {r.worst_param} (tolerance {r.tolerance:g}) -> {'OK' if r.ok else 'FAIL'}")
        print(f"max_rel_grad_diff={r.max_rel_grad_diff:.3e}")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
