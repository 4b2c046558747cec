"""Convert between Hugging Face model directories and chunkflow checkpoints.

    python scripts/convert_hf.py import --hf-dir D --out O [--tensor N --pipeline M] [--dtype bf16]
    python scripts/convert_hf.py export --ckpt O --hf-dir D2 [--dtype bf16] [--max-shard-gb 5]

Also installed as ``chunkflow-convert``; the logic is ``chunkflow.hf_convert.main``
(``--help`` says more, docs/hf.md has the details).
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")

from chunkflow.hf_convert import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
