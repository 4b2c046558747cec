"""scripts/finetune.py with one rank made to fail mid-run (tests/test_failures.py).

    CHUNKFLOW_TEST_FAIL=raise|stop:<rank>:<step>  torchrun tests/_failing_finetune.py --config ...

``raise``: that rank raises at the start of the step; ``stop``: it sends itself SIGSTOP
(a hung process). A test helper: production code has no such hook.
"""

import importlib.util
import os
import signal
import sys
from pathlib import Path

from chunkflow.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
how, rank, step = os.environ["CHUNKFLOW_TEST_FAIL"].split(":")
original = Trainer.train_step


def train_step(self):
    if self.ctx.rank == int(rank) and self.step + 1 == int(step):
        if how == "raise":
            raise RuntimeError(f"injected failure on rank {rank} at step {step}")
        os.kill(os.getpid(), signal.SIGSTOP)
    return original(self)


Trainer.train_step = train_step
spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "scripts" / "finetune.py")
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)
sys.exit(finetune.main())
