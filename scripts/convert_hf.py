"""Convert between Hugging Face model directories and chunkflow checkpoints.

    python scripts/convert_hf.py import --hf-dir D --out O [--tensor N --pipeline M] [--dtype bf16]
    python scripts/convert_hf.py export --ckpt O --hf-dir D2 [--dtype bf16] [--max-shard-gb 5]

``import`` writes ``O/model`` (megatron dist_checkpointing, sharded for N x M; train with
``train.load=O``), ``O/trainer.json`` and ``O/hf`` (config and tokenizer files).
``export`` reads a chunkflow checkpoint of any layout (an import, or a training run's
``checkpoint/``) and writes safetensors, config.json and tokenizer files that
``transformers.AutoModelForCausalLM.from_pretrained(D2)`` loads. See docs/hf.md.
"""

from __future__ import annotations

import argparse
import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from chunkflow.config import ConfigError  # noqa: E402
from chunkflow.config.schema import DTYPES  # noqa: E402
from chunkflow.model.hf import HFError  # noqa: E402
from chunkflow.hf_convert import export_hf_standalone, import_hf  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face directory -> chunkflow checkpoint")
    imp.add_argument("--hf-dir", required=True)
    imp.add_argument("--out", required=True)
    imp.add_argument("--tensor", type=int, default=1)
    imp.add_argument("--pipeline", type=int, default=1)
    imp.add_argument("--dtype", choices=DTYPES, help="default: the dtype in config.json")
    exp = sub.add_parser("export", help="chunkflow checkpoint -> Hugging Face directory")
    exp.add_argument("--ckpt", required=True)
    exp.add_argument("--hf-dir", required=True)
    exp.add_argument("--dtype", choices=DTYPES, help="default: the source model's dtype")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors file size")
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            out = import_hf(args.hf_dir, args.out, tensor=args.tensor, pipeline=args.pipeline, dtype=args.dtype,
                             progress=True)
            print(f"wrote {out} (tensor={args.tensor}, pipeline={args.pipeline}); train with train.load={out}")
        else:
            files = export_hf_standalone(args.ckpt, args.hf_dir, dtype=args.dtype,
                                         max_shard_bytes=int(args.max_shard_gb * 2**30), progress=True)
            print(f"wrote {args.hf_dir}: {', '.join(files)}")
    except (HFError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
