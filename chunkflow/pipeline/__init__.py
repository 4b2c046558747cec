"""State-aware 1F1B: the pure action table (``plan``) and its simulator (``simulate``).

The executor that runs a :class:`PipelinePlan` on megatron-core
(``chunkflow.pipeline.executor.StateAwarePipelineSchedule``, a drop-in for megatron's
``forward_backward_pipelining_without_interleaving``) lives beside these and is the
only part that communicates; import it from there (it needs megatron-core).
"""

from chunkflow.pipeline.plan import (
    PHASES,
    Comm,
    P2POp,
    PipelinePlan,
    Step,
    build_pipeline_plan,
    check_progress,
    format_plan,
    live_bound,
    match_ops,
    plain_1f1b_plan,
    validate_plan,
)
from chunkflow.pipeline.simulate import Interval, Timeline, check_dependencies, simulate
from chunkflow.scheduling.plan import Backward, ChunkRef, Forward, Free, Recompute

__all__ = [
    "PHASES",
    "Backward",
    "ChunkRef",
    "Comm",
    "Forward",
    "Free",
    "Interval",
    "P2POp",
    "PipelinePlan",
    "Recompute",
    "Step",
    "Timeline",
    "build_pipeline_plan",
    "check_dependencies",
    "check_progress",
    "format_plan",
    "live_bound",
    "match_ops",
    "plain_1f1b_plan",
    "simulate",
    "validate_plan",
]
