"""Fine-tune a megatron-core model with chunkflow.

    torchrun --nproc-per-node 2 scripts/finetune.py --config configs/tiny_cpu.yaml [key=value ...]
    python -m chunkflow.parallel.launch --nproc-per-node 2 scripts/finetune.py ...  # same, quiet failures

Parses the config, creates process groups, trains, writes metrics and a checkpoint to
``train.output_dir``, and tears down. A bad input (config, data, checkpoint, HF files,
layout) ends the run with one line naming it, printed once, and exit code 2; see
docs/errors.md. All logic lives in the ``chunkflow`` package.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from chunkflow.finetune import main  # noqa: E402  (also installed as chunkflow-finetune)

if __name__ == "__main__":
    sys.exit(main())
