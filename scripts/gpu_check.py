"""Check chunkflow on a GPU machine in one command (about 10 minutes on one GPU).

    python scripts/gpu_check.py --out gpu_check.json          # GPU(s)
    python scripts/gpu_check.py --cpu-smoke --out x.json      # the same checks, scaled down, on CPU

Prints one PASS/FAIL/SKIP line per check (the key number, or why it failed or was
skipped), writes every number to the JSON report, and exits 1 if any check failed
(2 when no CUDA device is visible without --cpu-smoke). See docs/gpu.md.
"""

from __future__ import annotations

import sys
import warnings

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex|apex).*")
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*full scope is deprecated.*")

from chunkflow.gpu_check.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
