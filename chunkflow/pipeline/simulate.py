"""Simulate a pipeline action table: per-stage timelines and the bubble fraction.

Pure. Each stage runs its :class:`~chunkflow.pipeline.plan.Step` s in order, one at a
time. A compute step takes its micro-batch's cost (``Forward`` with or without graph
costs ``forward_cost[mb]``, ``Recompute`` ``recompute_cost[mb]``, ``Backward``
``backward_cost[mb]``, ``Free`` nothing). A ``Comm`` group is posted when the stage
reaches it and finishes when every op in it has finished; an op finishes ``p2p_latency``
after both sides have posted it (rendezvous, the default) or, with ``rendezvous=False``,
a send finishes at once and a receive ``p2p_latency`` after the send was posted. A cost
list holds one cost per micro-batch, the same on every stage, or one such list per stage
(the last stage also runs the output layer and the loss; measured costs differ per stage).

Bubble fraction (the paper's "bubble ratio")::

    bubble = 1 - sum over stages of busy time / (num_stages x makespan)

busy time = forward + recompute + backward compute; makespan = the end of the last step
on any stage (all stages start at 0). Recompute counts as busy: it is work the GPU does,
not idle time (its cost shows up as a longer makespan instead).

Timeline JSON (written by the simulator here, and by the executor when it measures)::

    {"stages": [[{"kind": "forward", "mb": 0, "start": 0.0, "end": 1.0}, ...], ...]}

``kind`` is "forward" | "backward" | "recompute"; times in any unit (seconds when
measured); one list per pipeline stage, in execution order.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from chunkflow.data.assignment import CostModel, estimate_cost, sample_cost
from chunkflow.data.chunking import build_chunks
from chunkflow.data.types import PackedRow, Sample
from chunkflow.pipeline.plan import Comm, PipelinePlan, build_pipeline_plan, match_ops, plain_1f1b_plan
from chunkflow.scheduling.plan import Backward, Forward, Recompute

__all__ = [
    "KINDS",
    "UNIFORM",
    "Interval",
    "Timeline",
    "simulate",
    "row_costs",
    "check_dependencies",
    "samples_of_lengths",
    "simulate_chunkflow",
    "simulate_1f1b",
    "chunk_rows",
]

UNIFORM = CostModel(linear=1.0, attention=0.0)  # cost = tokens: every full chunk costs the same

KINDS = ("forward", "backward", "recompute")


@dataclass(frozen=True)
class Interval:
    kind: str  # one of KINDS
    mb: int
    start: float
    end: float
    graph: bool = True  # False: a forward that kept no graph (K/V only)


@dataclass
class Timeline:
    """What each stage computed when: ``stages[s]`` in execution order."""

    stages: list[list[Interval]]

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def makespan(self) -> float:
        return max((iv.end for st in self.stages for iv in st), default=0.0)

    def busy(self, stage: int) -> float:
        return sum(iv.end - iv.start for iv in self.stages[stage])

    @property
    def bubble_fraction(self) -> float:
        """1 - busy / (num_stages x makespan), see the module docstring."""
        span = self.makespan
        if span <= 0:
            return 0.0
        return 1.0 - sum(self.busy(s) for s in range(self.num_stages)) / (self.num_stages * span)

    def to_json(self) -> dict:
        return {"stages": [[asdict(iv) for iv in st] for st in self.stages]}

    @classmethod
    def from_json(cls, data: dict) -> "Timeline":
        try:
            stages = [[Interval(str(d["kind"]), int(d["mb"]), float(d["start"]), float(d["end"]),
                                bool(d.get("graph", True)))
                       for d in st] for st in data["stages"]]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a timeline: expected {{'stages': [[{{kind, mb, start, end}}]]}} ({e!r})")
        for st in stages:
            for iv in st:
                if iv.kind not in KINDS or iv.end < iv.start:
                    raise ValueError(f"bad interval {iv}: kind must be one of {KINDS}, end >= start")
        return cls(stages)

    def save(self, path: Union[str, Path]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Timeline":
        return cls.from_json(json.loads(Path(path).read_text()))


Costs = Union[Sequence[float], Sequence[Sequence[float]]]


def _per_stage(values: Optional[Costs], default: list[list[float]], n: int, p: int, name: str) -> list[list[float]]:
    """``values`` as one list of ``n`` costs per stage: a flat list is every stage's."""
    if values is None:
        return default
    values = list(values)
    nested = len(values) > 0 and isinstance(values[0], (list, tuple, np.ndarray))
    rows = [list(v) for v in values] if nested else [values] * p
    if len(rows) != p or any(len(r) != n or any(v < 0 for v in r) for r in rows):
        shape = f"{len(rows)} stages x {sorted({len(r) for r in rows})}" if nested else f"{len(values)}"
        raise ValueError(f"{name} needs {n} non-negative costs (or {p} lists of them, one per stage), got {shape}")
    return [[float(v) for v in r] for r in rows]


def simulate(
    plan: PipelinePlan,
    forward_cost: Costs,
    backward_cost: Optional[Costs] = None,
    recompute_cost: Optional[Costs] = None,
    *,
    p2p_latency: float = 0.0,
    rendezvous: bool = True,
) -> Timeline:
    """Per-stage timelines of ``plan`` (backward defaults to 2x forward, recompute to
    forward; costs per micro-batch, or per stage and micro-batch). Raises
    ``RuntimeError`` if the table deadlocks."""
    n, p = plan.num_microbatches, plan.num_stages
    fwd = _per_stage(forward_cost, [], n, p, "forward_cost")
    bwd = _per_stage(backward_cost, [[2 * c for c in st] for st in fwd], n, p, "backward_cost")
    rec = _per_stage(recompute_cost, fwd, n, p, "recompute_cost")
    pairs = match_ops(plan)
    pc, clock = [0] * p, [0.0] * p
    posted: dict[tuple[int, int], float] = {}  # (stage, step) -> time the Comm was posted
    out: list[list[Interval]] = [[] for _ in range(p)]
    while any(pc[s] < len(plan.stages[s]) for s in range(p)):
        moved = False
        for s in range(p):
            steps = plan.stages[s]
            while pc[s] < len(steps):
                act = steps[pc[s]].action
                if isinstance(act, Comm):
                    posted[(s, pc[s])] = clock[s]
                    ends = []
                    for o, op in enumerate(act.ops):
                        peer = posted.get(pairs[(s, pc[s], o)])
                        if op.op == "send" and not rendezvous:
                            ends.append(clock[s])
                        elif peer is None:
                            break
                        else:
                            ends.append(max(clock[s], peer) + p2p_latency)
                    else:
                        clock[s] = max(ends, default=clock[s])
                        pc[s] += 1
                        moved = True
                        continue
                    break
                cost, kind = 0.0, None
                if isinstance(act, Forward):
                    cost, kind = fwd[s][act.mb], "forward"
                elif isinstance(act, Recompute):
                    cost, kind = rec[s][act.mb], "recompute"
                elif isinstance(act, Backward):
                    cost, kind = bwd[s][act.mb], "backward"
                if kind is not None:
                    out[s].append(Interval(kind, act.mb, clock[s], clock[s] + cost))
                    clock[s] += cost
                pc[s] += 1
                moved = True
        if not moved:
            raise RuntimeError(f"the action table deadlocks at steps {pc}")
    return Timeline(out)


def row_costs(rows: Sequence[PackedRow], cost_model: Optional[CostModel] = None) -> list[float]:
    """Forward cost of each row from the data layer's cost model (token-equivalents);
    ``CostModel(attention=0)`` makes cost proportional to tokens."""
    return [estimate_cost(row, cost_model=cost_model) for row in rows]


def check_dependencies(plan: PipelinePlan, timeline: Timeline) -> None:
    """Raise ``AssertionError`` unless the timeline respects the pipeline's data flow:
    forward of mb on stage s starts after it ended on s-1, backward of mb on stage s
    after it ended on s+1 and after mb's forward (or recompute) on s."""
    def when(s: int) -> dict[tuple[str, int], Interval]:
        return {(iv.kind, iv.mb): iv for iv in timeline.stages[s]}

    eps = 1e-9
    stages = [when(s) for s in range(plan.num_stages)]
    for s, ivs in enumerate(stages):
        for (kind, mb), iv in ivs.items():
            if kind == "forward" and s > 0:
                assert iv.start + eps >= stages[s - 1][("forward", mb)].end, f"F{mb} on stage {s} too early"
            if kind == "backward":
                if s + 1 < plan.num_stages:
                    assert iv.start + eps >= stages[s + 1][("backward", mb)].end, f"B{mb} on stage {s} too early"
                prior = ivs.get(("recompute", mb)) or ivs[("forward", mb)]
                assert iv.start + eps >= prior.end, f"B{mb} before its forward on stage {s}"
    for s, ivs in enumerate(timeline.stages):
        assert all(a.end <= b.start + eps for a, b in zip(ivs, ivs[1:])), f"stage {s} overlaps itself"


def samples_of_lengths(lengths: Sequence[int]) -> list[Sample]:
    """Token-free samples of the given lengths (ids 0, 1, ...) for what-if schedules."""
    return [
        Sample(i, np.zeros(n, np.int64), np.zeros(n, np.int64), np.ones(n, np.float32))
        for i, n in enumerate(lengths)
    ]


def simulate_chunkflow(
    rows: Sequence[PackedRow], *, num_stages: int, k: int, cost_model: CostModel = UNIFORM, **kw
) -> tuple[PipelinePlan, Timeline]:
    """State-aware 1F1B over one pipeline's rows; backward = 2x forward, recompute = forward."""
    plan = build_pipeline_plan(rows, num_stages, k)
    return plan, simulate(plan, row_costs(rows, cost_model), **kw)


def simulate_1f1b(
    lengths: Sequence[int], *, num_stages: int, cost_model: CostModel = UNIFORM, **kw
) -> tuple[PipelinePlan, Timeline]:
    """Megatron's 1F1B with one micro-batch per sample, in the given order."""
    plan = plain_1f1b_plan(len(lengths), num_stages)
    return plan, simulate(plan, [sample_cost(n, cost_model) for n in lengths], **kw)


def chunk_rows(lengths: Sequence[int], chunk_size: int) -> list[PackedRow]:
    """The data layer's chunks (``build_chunks``: standalone first, then dependent)."""
    return build_chunks(samples_of_lengths(lengths), chunk_size)
