"""The GPU acceptance check behind ``scripts/gpu_check.py`` (see docs/gpu.md).

``harness`` runs isolated checks and reports them; ``environment`` lists versions and
backends; ``attention_parity`` compares every attention path with an fp64 reference;
``runs`` holds gradient equivalence and short training runs; ``multi_gpu`` drives
torchrun over NCCL; ``checks`` assembles the list at GPU or CPU-smoke scale.
"""

from chunkflow.gpu_check.harness import FAIL, PASS, SKIP, Check, Result, Skip, run_checks

__all__ = ["PASS", "FAIL", "SKIP", "Check", "Result", "Skip", "run_checks"]
