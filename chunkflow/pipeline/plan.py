"""State-aware 1F1B (docs/pipeline.md): the pure per-stage action table of one pipeline.

Input: the ordered micro-batches of one data-parallel pipeline (:class:`ChunkRef` s or
the rank's rows; a long sample's chunks consecutive and ascending), ``num_stages`` p and
K. Output: a :class:`PipelinePlan` whose ``stages[s]`` lists :class:`Step` s, each in a
named phase (warmup / steady / cooldown), holding a compute action -- ``Forward(mb,
keep_graph)``, ``Recompute(mb)``, ``Backward(mb)``, ``Free(sample)`` from
``chunkflow.scheduling.plan`` -- or a :class:`Comm` group of point-to-point ops.

How a stage orders its work
---------------------------
All stages run the forwards in input order and the backward *tasks* in one order: unit
by unit, a long sample's tasks descending (``B(m_{N-1})`` .. ``B(m_{N-K})``, then
``R(m_j) B(m_j)`` for j = N-K-1 .. 0, then ``Free``), exactly as the PP=1 plan. So a
stage's table is fixed by f_s(i), the number of forwards it runs before task i:

1. greedy g_s(i): before task i, forward while forwards remain and either task i needs a
   forward not yet run, or ``live + [task i starts with a Recompute] < p - s``, where
   live = graphs held (``Forward(keep_graph=True)`` not yet backwarded). Forwards
   without a graph do not count, so a stage runs ahead through a long sample's first
   N-K chunks; the recompute reserves its slot before it runs.
2. from the last stage up: f_{p-1} = g_{p-1} and
   f_s(i) = clamp(g_s(i), f_{s+1}(i), min(f_{s+1}(i) + 1, f_{s+1}(i + 1))):
   stage s has sent every activation stage s+1 needs before task i, and at most one
   more, which stage s+1 receives right after sending task i's gradient. This is the
   1F1B pairing (``send_forward_recv_backward`` on s, ``send_backward_recv_forward`` on
   s+1); without the clamp, blocking sends deadlock (e.g. p=2, K=4 with a 3-chunk and a
   6-chunk sample).

With only standalone chunks this is Megatron's 1F1B exactly: warm-up p-s-1 forwards,
steady forward/backward pairs, cool-down backwards. Bound (checked by
:func:`validate_plan`): stage s holds at most max(p - s, K) graphs, at most K of them
from one long sample; it exceeds 1F1B's p - s only while forwarding the K graph chunks
of one sample, whose last chunk must be forwarded before any of its backwards.

Recompute: local, from a cached chunk input (the design question)
-----------------------------------------------------------------
Chunk j < N-K is forwarded once without a graph and again right before its backward:

(a) *re-send*: a second forward pass through the pipeline. Stage s needs chunk j's input
    hidden state again, so stage s-1 recomputes and resends it; R(j) on stage s-1 must
    precede R(j) on stage s, which precedes B(j) on s, which precedes B(j) on s-1: on
    every stage but the last the recomputed graph lives for a whole pipeline round trip
    ("immediately before the backward" cannot hold), and each recomputed chunk puts
    p-1 extra forward hops on the critical path, plus twice the activation traffic.
    Same table, 4 stages, 4U/2U/U/U with C = 2U, K = 1: makespan 66 vs 48 (bubble 60.6%
    vs 45.8%, docs/pipeline.md).
(b) *cache inputs*: during the no-graph forward each stage keeps chunk j's input
    (C x hidden per chunk per stage; token ids on the first stage) until R(j). R(j) runs
    locally from it and the K/V store, then the stage receives the output gradient and
    runs B(j): no extra messages, and R(j) even overlaps the wait for that gradient. The
    cache grows with sample length like the K/V store, but is smaller than it: hidden
    values per token per stage versus 2 x layers_per_stage x kv_heads x head_dim (plus
    the gradient accumulator) for K/V.

We use (b): ``Recompute`` has no communication. The executor must keep each stage's
input of ``Forward(mb, keep_graph=False)`` until ``Recompute(mb)`` has consumed it.

Communication
-------------
Implied by stage position: a Forward on stage s > 0 receives ``activation`` mb from s-1
and on s < p-1 sends it to s+1; a Backward on s < p-1 receives ``grad`` mb from s+1 and
on s > 0 sends it to s-1. Between two compute steps sits one :class:`Comm` with the sends
of the step before and the receives of the step after (a Free is transparent). The
executor posts a Comm's ops together (``batch_isend_irecv``) and must have its receives
before the next compute; it may wait for the sends then (what :func:`check_progress` and
the simulator call rendezvous) or later. Every channel (src -> dst) carries the same
micro-batches in the same order on both ends (:func:`match_ops`), and
:func:`check_progress` proves the table cannot deadlock even with rendezvous sends.

Example, p = 2, K = 1, micro-batches ``[a | s0 s1 s2 | b]`` (s has N = 3 chunks), as
``format_plan(plan, comm=True)`` prints it. F / f = forward with / without graph, R =
recompute, B = backward, x(s) = free s; in [..] s/r = send/recv, a/g = activation/grad::

    stage 0  warmup  : F0
             steady  : [sa0] f1 [sa1 rg0] B0 f2 [sa2] F3 [sa3 rg3] B3 R2 [rg2] B2 F4 [sa4] R1 [rg1] B1 x(s)
             cooldown: [rg4] B4
    stage 1  steady  : [ra0] F0 B0 [sg0 ra1] f1 [ra2] f2 [ra3] F3 B3 [sg3] R2 B2 [sg2] R1 B1 x(s) [sg1 ra4] F4 B4 [sg4]

Stage 1 (last) holds one graph at a time, stage 0 at most two (F4 and R1). R2 on stage 0
runs while stage 1 computes B2, before the gradient arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Hashable, Mapping, Optional, Sequence, Union

from chunkflow.data.types import PackedRow
from chunkflow.scheduling.plan import (
    Action,
    Backward,
    ChunkRef,
    Forward,
    Free,
    Recompute,
    describe_rows,
    max_live_activations,
    sample_programs,
    validate_actions,
)

__all__ = [
    "PHASES",
    "P2POp",
    "Comm",
    "Step",
    "PipelinePlan",
    "build_pipeline_plan",
    "plain_1f1b_plan",
    "live_bound",
    "match_ops",
    "check_progress",
    "validate_plan",
    "format_plan",
]

PHASES = ("warmup", "steady", "cooldown")


@dataclass(frozen=True)
class P2POp:
    """One point-to-point op: ``op`` "send" | "recv" of ``payload`` "activation" | "grad"
    of micro-batch ``mb`` to / from stage ``peer``."""

    op: str
    payload: str
    mb: int
    peer: int


@dataclass(frozen=True)
class Comm:
    """Ops posted together (one ``batch_isend_irecv``); the receives complete before the
    next compute step, the sends then or later (module docstring, Communication)."""

    ops: tuple[P2POp, ...]


@dataclass(frozen=True)
class Step:
    phase: str  # one of PHASES
    action: Union[Action, Comm]


@dataclass
class PipelinePlan:
    """The action table of one pipeline: ``stages[s]`` is what stage s runs, in order."""

    num_stages: int
    k: int
    chunks: list[ChunkRef]  # micro-batch mb is chunks[mb]
    stages: list[list[Step]]

    @property
    def num_microbatches(self) -> int:
        return len(self.chunks)

    def actions(self, stage: int) -> list[Action]:
        """Stage ``stage``'s compute and Free actions, without the Comm steps."""
        return [st.action for st in self.stages[stage] if not isinstance(st.action, Comm)]

    def phase_actions(self, stage: int, phase: str) -> list[Action]:
        return [st.action for st in self.stages[stage] if st.phase == phase and not isinstance(st.action, Comm)]

    def __str__(self) -> str:
        return format_plan(self)


def live_bound(num_stages: int, stage: int, k: int) -> int:
    """Most graphs stage ``stage`` ever holds: max(p - s, K) (module docstring)."""
    return max(num_stages - stage, k)


def _greedy_counts(forwards: list[Forward], tasks: list[tuple[Action, ...]], needs: list[int],
                   limit: int) -> list[int]:
    """Forwards run before each backward task by a stage allowed ``limit`` live graphs.

    ``needs[i]``: the micro-batch whose forward task i cannot precede: the last chunk of
    its unit (a long sample's backward starts after all its forwards, also when SpaCO
    back-propagates only earlier chunks or none).
    """
    done: set[int] = set()
    counts: list[int] = []
    live = fi = 0
    for task, need in zip(tasks, needs):
        recompute = isinstance(task[0], Recompute)
        while fi < len(forwards) and (need not in done or live + recompute < limit):
            done.add(forwards[fi].mb)
            live += forwards[fi].keep_graph
            fi += 1
        counts.append(fi)
        live -= isinstance(task[0], Backward)
    return counts


def _stage_orders(chunks: Sequence[ChunkRef], k: int, num_stages: int,
                  backprop: Optional[Mapping[Hashable, Collection[int]]] = None) -> list[list[Action]]:
    """Every stage's compute order: the greedy g_s, clamped from the last stage up
    (module docstring, steps 1 and 2)."""
    programs = sample_programs(chunks, k, backprop)
    forwards = [f for p in programs for f in p.forwards]
    tasks = [t for p in programs for t in p.backward_tasks]
    needs = [p.mbs[-1] for p in programs for t in p.backward_tasks]
    counts: list[list[int]] = [[] for _ in range(num_stages)]
    below = None
    for s in reversed(range(num_stages)):
        greedy = _greedy_counts(forwards, tasks, needs, num_stages - s)
        if below is not None:  # below[i] <= counts[s][i] <= below[i + 1]
            ahead = [min(f + 1, g) for f, g in zip(below, below[1:] + [len(forwards)])]
            greedy = [min(max(g, lo), hi) for g, lo, hi in zip(greedy, below, ahead)]
        counts[s] = greedy
        below = counts[s]
    orders = []
    for f in counts:
        order: list[Action] = []
        fi = 0
        for task, n in zip(tasks, f):
            order += forwards[fi:n]
            fi = n
            order += task
        orders.append(order)
    return orders


def _p2p(action: Action, stage: int, last: int) -> tuple[list[P2POp], list[P2POp]]:
    """(receives before, sends after) a compute action on ``stage``; Recompute needs none."""
    if isinstance(action, Forward):
        recv = [P2POp("recv", "activation", action.mb, stage - 1)] if stage > 0 else []
        send = [P2POp("send", "activation", action.mb, stage + 1)] if stage < last else []
        return recv, send
    if isinstance(action, Backward):
        recv = [P2POp("recv", "grad", action.mb, stage + 1)] if stage < last else []
        send = [P2POp("send", "grad", action.mb, stage - 1)] if stage > 0 else []
        return recv, send
    return [], []


def _phases(computes: Sequence[Action]) -> list[str]:
    """Megatron's phases: warm-up = the forwards before the first backward task except
    the last of them; cool-down = what follows the backward task after the last forward;
    steady = the rest (a Free goes with the task before it)."""
    starts = [i for i, a in enumerate(computes)
              if isinstance(a, Recompute) or (isinstance(a, Backward) and not isinstance(computes[i - 1], Recompute))]
    fwd = [i for i, a in enumerate(computes) if isinstance(a, Forward)]
    if not starts:  # SpaCO chose no chunk to back-propagate: forwards only
        return ["steady"] * len(computes)
    steady_from = max(i for i in fwd if i < starts[0])
    later = [i for i in starts if i > fwd[-1]]
    cool_from = later[1] if len(later) > 1 else len(computes)
    return ["warmup" if i < steady_from else "cooldown" if i >= cool_from else "steady"
            for i in range(len(computes))]


def _with_comm(computes: list[Action], stage: int, num_stages: int) -> list[Step]:
    phases = _phases(computes)
    steps: list[Step] = []
    pending: list[P2POp] = []
    for a, phase in zip(computes, phases):
        recv, send = _p2p(a, stage, num_stages - 1)
        if not isinstance(a, Free) and (pending or recv):
            steps.append(Step(phase, Comm(tuple(pending + recv))))
            pending = []
        steps.append(Step(phase, a))
        pending += send
    if pending:
        steps.append(Step(phases[-1], Comm(tuple(pending))))
    return steps


def build_pipeline_plan(
    chunks: Sequence[Union[ChunkRef, PackedRow]], num_stages: int, k: int,
    backprop: Optional[Mapping[Hashable, Collection[int]]] = None,
) -> PipelinePlan:
    """The state-aware 1F1B table of one pipeline (rows of one DP rank, data-layer order).

    ``num_stages = 1`` gives the PP=1 order of :func:`~chunkflow.scheduling.plan.plan_single_stage`
    (no Comm steps). ``backprop`` (SpaCO) restricts long samples' backward to the chosen
    chunks, as in :func:`~chunkflow.scheduling.plan.sample_programs`; every stage gets the
    same choice, so the table stays matched across stages.
    """
    if num_stages < 1:
        raise ValueError(f"parallel.pipeline={num_stages} is invalid: use >= 1 stages")
    refs = describe_rows(chunks) if chunks and isinstance(chunks[0], PackedRow) else list(chunks)
    if not refs:
        raise ValueError("a pipeline needs at least one micro-batch")
    orders = _stage_orders(refs, k, num_stages, backprop)
    stages = [_with_comm(order, s, num_stages) for s, order in enumerate(orders)]
    return PipelinePlan(num_stages, k, refs, stages)


def plain_1f1b_plan(num_microbatches: int, num_stages: int) -> PipelinePlan:
    """Megatron's 1F1B (every micro-batch standalone): the baseline for the simulator."""
    return build_pipeline_plan([ChunkRef()] * num_microbatches, num_stages, k=1)


Where = tuple[int, int]  # (stage, step index)


def match_ops(plan: PipelinePlan) -> dict[tuple[int, int, int], Where]:
    """Pair every op with its counterpart: ``(stage, step, op index) -> (peer, step)``.

    Ops on a channel (src -> dst) match in order, the k-th send with the k-th receive;
    raises ``AssertionError`` if their payload or micro-batch differ or one is missing.
    """
    sides: dict[tuple[int, int, str], list[tuple[int, int, int, P2POp]]] = {}
    for s, steps in enumerate(plan.stages):
        for t, st in enumerate(steps):
            if isinstance(st.action, Comm):
                for o, op in enumerate(st.action.ops):
                    src, dst = (s, op.peer) if op.op == "send" else (op.peer, s)
                    assert abs(src - dst) == 1, f"stage {s} step {t}: {op} skips a stage"
                    sides.setdefault((src, dst, op.op), []).append((s, t, o, op))
    pairs: dict[tuple[int, int, int], Where] = {}
    for (src, dst) in {(a, b) for a, b, _ in sides}:
        sends, recvs = sides.get((src, dst, "send"), []), sides.get((src, dst, "recv"), [])
        assert len(sends) == len(recvs), f"channel {src}->{dst}: {len(sends)} sends, {len(recvs)} receives"
        for (s1, t1, o1, a), (s2, t2, o2, b) in zip(sends, recvs):
            assert (a.payload, a.mb) == (b.payload, b.mb), (
                f"channel {src}->{dst}: stage {s1} sends {a.payload} {a.mb} while stage {s2} expects "
                f"{b.payload} {b.mb}")
            pairs[(s1, t1, o1)] = (s2, t2)
            pairs[(s2, t2, o2)] = (s1, t1)
    return pairs


def check_progress(plan: PipelinePlan, *, rendezvous: bool = True) -> None:
    """Run the table with blocking Comm groups and raise ``AssertionError`` on deadlock.

    A stage at a Comm waits until, for each of its ops, the peer has posted the matching
    op (reached the Comm holding it). With ``rendezvous=False`` sends never wait (eager,
    buffered sends). Which ops match does not depend on timing, so one run decides.
    """
    pairs = match_ops(plan)
    pc = [0] * plan.num_stages
    while True:
        moved = False
        for s, steps in enumerate(plan.stages):
            while pc[s] < len(steps):
                act = steps[pc[s]].action
                if isinstance(act, Comm):
                    waits = [pairs[(s, pc[s], o)] for o, op in enumerate(act.ops) if rendezvous or op.op == "recv"]
                    if any(pc[peer] < t for peer, t in waits):
                        break
                pc[s] += 1
                moved = True
        if all(pc[s] == len(steps) for s, steps in enumerate(plan.stages)):
            return
        if not moved:
            stuck = {s: plan.stages[s][pc[s]].action for s in range(plan.num_stages) if pc[s] < len(plan.stages[s])}
            raise AssertionError(f"deadlock: stages wait at {stuck}")


def validate_plan(plan: PipelinePlan) -> None:
    """Every check the executor relies on; raises ``AssertionError`` naming the failure.

    Per stage: the §2.2 rules (forward ascending, backward descending, recompute right
    before backward, <= K graphs per long sample, Free after chunk 0), at most
    :func:`live_bound` graphs, each compute preceded by the receives it needs and
    followed by the sends it owes. Across stages: channels match and no deadlock.
    """
    last = plan.num_stages - 1
    for s, steps in enumerate(plan.stages):
        acts = plan.actions(s)
        validate_actions(acts, plan.chunks, plan.k)
        peak = max_live_activations(acts)
        assert peak <= live_bound(plan.num_stages, s, plan.k), f"stage {s}: {peak} live graphs"
        assert [st.phase for st in steps] == sorted((st.phase for st in steps), key=PHASES.index)
        owed: list[P2POp] = []
        since: list[P2POp] = []  # ops posted since the last compute
        for st in steps:
            if isinstance(st.action, Comm):
                since += st.action.ops
                continue
            if isinstance(st.action, Free):
                continue
            recv, send = _p2p(st.action, s, last)
            assert all(op in since for op in recv), f"stage {s}: {st.action} without its receive"
            assert all(op in since for op in owed), f"stage {s}: sends {owed} not posted before {st.action}"
            owed, since = send, []
        assert all(op in since for op in owed), f"stage {s}: final sends {owed} missing"
    check_progress(plan, rendezvous=True)


def _short(a: Union[Action, Comm]) -> str:
    if isinstance(a, Comm):
        return "[" + " ".join(f"{op.op[0]}{op.payload[0]}{op.mb}" for op in a.ops) + "]"
    if isinstance(a, Forward):
        return f"{'F' if a.keep_graph else 'f'}{a.mb}"
    if isinstance(a, Free):
        return f"x({a.sample})"
    return f"{'B' if isinstance(a, Backward) else 'R'}{a.mb}"


def format_plan(plan: PipelinePlan, *, comm: bool = False) -> str:
    """The per-stage action table, one line per phase (legend in the module docstring)."""
    lines = []
    for s, steps in enumerate(plan.stages):
        head = f"stage {s}"
        for phase in PHASES:
            items = [_short(st.action) for st in steps
                     if st.phase == phase and (comm or not isinstance(st.action, Comm))]
            if items:
                lines.append(f"{head:<8} {phase:<8}: " + " ".join(items))
                head = ""
    return "\n".join(lines)
