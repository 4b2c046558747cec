"""State-aware chunk order at one pipeline stage (docs/chunkflow.md): the single source of truth.

Pure: no torch, no process group. A data-parallel rank's micro-batches (its rows, in the
data layer's order) are described by :class:`ChunkRef` s; :func:`plan_single_stage` turns
them into the list of actions a PP=1 executor runs, and :func:`sample_programs` gives the
per-sample pieces the pipeline schedule (``chunkflow.pipeline.plan``) interleaves.

Rules for a long sample of N dependent chunks (micro-batches m_0..m_{N-1}) and bound K:

* N <= K: forward m_0..m_{N-1} keeping graphs, backward m_{N-1}..m_0;
* N > K: forward m_0..m_{N-1} ascending, chunks j < N-K without a graph (only their K/V
  go to the state store), chunks j >= N-K with a graph; backward m_{N-1}..m_{N-K}; then
  for j = N-K-1 down to 0: Recompute(m_j) immediately followed by Backward(m_j);
* after chunk 0's backward the sample's state (K/V, their gradients) is released: Free.

A standalone chunk is Forward(keep) then Backward right away. Example, micro-batches
``[a | s0 s1 s2 | b]`` (s a long sample with N = 3), K = 1, as :func:`format_actions`
prints it (one column per step; "-" = standalone)::

    mb  0 -      F+ B
    mb  1 s:0          F-                R  B  x
    mb  2 s:1             F-       R  B
    mb  3 s:2                F+ B
    mb  4 -                                       F+ B

``F+`` keeps the graph, ``F-`` does not (K/V only), ``R`` is the recompute-forward and
``x`` frees the sample's state. With K = 2, s1 would be ``F+`` and need no ``R``.
At PP=1 at most max(1, K) graphs are alive at once (:func:`max_live_activations`).

SpaCO (``backprop``, :mod:`chunkflow.scheduling.spaco`) back-propagates only chosen
chunks of a long sample. Same rows, K = 1, chunks {0, 2} of s chosen: s1 runs forward
for its K/V only and is never rebuilt; the last *chosen* chunks keep their graphs::

    mb  0 -      F+ B
    mb  1 s:0          F-          R  B  x
    mb  2 s:1             F-
    mb  3 s:2                F+ B
    mb  4 -                                 F+ B
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Hashable, Mapping, Optional, Sequence, Union

from chunkflow.data.types import PackedRow

__all__ = [
    "ChunkRef",
    "Forward",
    "Backward",
    "Recompute",
    "Free",
    "Action",
    "SampleProgram",
    "describe_rows",
    "sample_programs",
    "plan_single_stage",
    "max_live_activations",
    "live_activations_per_sample",
    "validate_actions",
    "format_actions",
]


@dataclass(frozen=True)
class ChunkRef:
    """What the schedule needs to know about one micro-batch (one row).

    ``sample`` is None for a standalone chunk (whole short samples, no shared state),
    else the key of the long sample whose chunk ``chunk_index`` of ``num_chunks`` it is.
    """

    sample: Optional[Hashable] = None
    chunk_index: int = 0
    num_chunks: int = 1

    @property
    def dependent(self) -> bool:
        return self.sample is not None


@dataclass(frozen=True)
class Forward:
    """Run micro-batch ``mb`` forward; ``keep_graph=False`` keeps only its K/V (no_grad)."""

    mb: int
    keep_graph: bool = True


@dataclass(frozen=True)
class Backward:
    """Backward of ``mb`` (its graph exists: from its Forward or the Recompute just before)."""

    mb: int


@dataclass(frozen=True)
class Recompute:
    """Forward ``mb`` again with a graph (reading the stored K/V of earlier chunks);
    always immediately followed by ``Backward(mb)``."""

    mb: int


@dataclass(frozen=True)
class Free:
    """Release the state store of long sample ``sample`` (after its chunk 0's backward)."""

    sample: Hashable


Action = Union[Forward, Backward, Recompute, Free]


@dataclass(frozen=True)
class SampleProgram:
    """One unit of work that must stay together: a long sample or one standalone chunk.

    ``forwards`` in ascending chunk order; ``backward_tasks`` in the order they must run,
    each ``(Backward,)`` or ``(Recompute, Backward)``, the last one followed by ``Free``
    for a long sample.
    """

    sample: Optional[Hashable]
    mbs: tuple[int, ...]
    forwards: tuple[Forward, ...]
    backward_tasks: tuple[tuple[Action, ...], ...]


def describe_rows(rows: Sequence[PackedRow]) -> list[ChunkRef]:
    """The :class:`ChunkRef` of each row (dependent rows are keyed by their sample id)."""
    return [
        ChunkRef(row.sample_ids[0], row.chunk_index, row.num_chunks) if row.dependent else ChunkRef()
        for row in rows
    ]


def _check_k(k: int) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"chunkflow.k={k!r} is invalid: K must be an integer >= 1")


def _group(chunks: Sequence[ChunkRef]) -> list[tuple[Optional[Hashable], list[int]]]:
    """Units in order of appearance; a long sample's chunks must be consecutive 0..N-1."""
    units: list[tuple[Optional[Hashable], list[int]]] = []
    seen: set[Hashable] = set()
    for mb, c in enumerate(chunks):
        if not c.dependent:
            units.append((None, [mb]))
            continue
        if units and units[-1][0] == c.sample and c.sample is not None:
            units[-1][1].append(mb)
        elif c.sample in seen:
            raise ValueError(f"the chunks of sample {c.sample!r} are not consecutive (mb {mb}); "
                             "the data layer must keep a long sample's chunks together")
        else:
            seen.add(c.sample)
            units.append((c.sample, [mb]))
    for sample, mbs in units:
        if sample is None:
            continue
        idx = [chunks[mb].chunk_index for mb in mbs]
        ns = {chunks[mb].num_chunks for mb in mbs}
        if idx != list(range(len(mbs))) or ns != {len(mbs)}:
            raise ValueError(f"sample {sample!r} has chunk indices {idx} with num_chunks {sorted(ns)}; "
                             f"expected 0..N-1 ascending with N = num_chunks")
    return units


def sample_programs(chunks: Sequence[ChunkRef], k: int,
                    backprop: Optional[Mapping[Hashable, Collection[int]]] = None) -> list[SampleProgram]:
    """Split a rank's micro-batches into units and apply the K rules (module docstring).

    ``backprop`` (SpaCO, :mod:`chunkflow.scheduling.spaco`): for a long sample listed in
    it, only those chunk indices are back-propagated; the others run forward without a
    graph only (K/V into the store) and are never rebuilt. The last K *selected* chunks
    keep their graphs. A sample with no selected chunk gets a task that only frees it.
    Samples not listed (and every standalone chunk) are back-propagated in full.
    """
    _check_k(k)
    programs = []
    for sample, mbs in _group(chunks):
        if sample is None:
            (mb,) = mbs
            programs.append(SampleProgram(None, (mb,), (Forward(mb, True),), ((Backward(mb),),)))
            continue
        n = len(mbs)
        chosen = sorted(set(range(n)) if backprop is None or sample not in backprop else
                        {j for j in backprop[sample] if 0 <= j < n})
        kept = set(chosen[-k:])  # without sampling: chunks j >= N-K keep their graphs
        forwards = tuple(Forward(mb, j in kept) for j, mb in enumerate(mbs))
        tasks: list[tuple[Action, ...]] = []
        for j in reversed(chosen):
            task: tuple[Action, ...] = (Backward(mbs[j]),) if j in kept else (Recompute(mbs[j]), Backward(mbs[j]))
            tasks.append(task + ((Free(sample),) if j == chosen[0] else ()))
        if not chosen:
            tasks.append((Free(sample),))
        programs.append(SampleProgram(sample, tuple(mbs), forwards, tuple(tasks)))
    return programs


def plan_single_stage(chunks: Sequence[Union[ChunkRef, PackedRow]], k: int,
                      backprop: Optional[Mapping[Hashable, Collection[int]]] = None) -> list[Action]:
    """The PP=1 action list: each unit's forwards, then its backward tasks, unit by unit.

    ``backprop`` restricts long samples' backward to chosen chunks (SpaCO, see
    :func:`sample_programs`); None back-propagates everything (ChunkFlow, SeCO).
    """
    refs = describe_rows(chunks) if chunks and isinstance(chunks[0], PackedRow) else list(chunks)
    actions: list[Action] = []
    for prog in sample_programs(refs, k, backprop):
        actions.extend(prog.forwards)
        for task in prog.backward_tasks:
            actions.extend(task)
    return actions


def _live_deltas(actions: Sequence[Action]):
    """Yield (action, +1/-1/0): graphs created by Forward(keep)/Recompute, freed by Backward."""
    for a in actions:
        if isinstance(a, Forward):
            yield a, int(a.keep_graph)
        elif isinstance(a, Recompute):
            yield a, 1
        elif isinstance(a, Backward):
            yield a, -1
        else:
            yield a, 0


def max_live_activations(actions: Sequence[Action]) -> int:
    """Peak number of micro-batches whose autograd graph is alive at once."""
    live = peak = 0
    for _, d in _live_deltas(actions):
        live += d
        peak = max(peak, live)
    return peak


def live_activations_per_sample(actions: Sequence[Action], chunks: Sequence[ChunkRef]) -> dict:
    """Peak live graphs per long sample key (standalone chunks are not counted)."""
    live: dict = {}
    peak: dict = {}
    for a, d in _live_deltas(actions):
        if isinstance(a, Free) or d == 0:
            continue
        s = chunks[a.mb].sample
        if s is not None:
            live[s] = live.get(s, 0) + d
            peak[s] = max(peak.get(s, 0), live[s])
    return peak


def validate_actions(actions: Sequence[Action], chunks: Sequence[ChunkRef], k: int,
                     backprop: Optional[Mapping[Hashable, Collection[int]]] = None) -> None:
    """Raise ``AssertionError`` naming the first broken rule of §2.2 in ``actions``.

    Holds for the PP=1 plan and, stage by stage, for the pipeline plan (whose stages
    interleave units but never reorder a unit's own actions). With ``backprop`` (SpaCO)
    only the chosen chunks of the listed samples may, and must, be back-propagated.
    """
    programs = sample_programs(chunks, k, backprop)
    expected = {p.sample: p for p in programs if p.sample is not None}
    want_bwd = {a.mb for p in programs for t in p.backward_tasks for a in t if isinstance(a, Backward)}
    fwd_done: set[int] = set()
    bwd_done: set[int] = set()
    freed: set = set()
    mine: dict = {s: [] for s in expected}  # sample -> its actions, in order
    for i, a in enumerate(actions):
        if isinstance(a, Free):
            assert a.sample in expected and a.sample not in freed, f"step {i}: unexpected {a}"
            freed.add(a.sample)
            mine[a.sample].append(a)
            continue
        assert 0 <= a.mb < len(chunks), f"step {i}: {a} names no micro-batch"
        s = chunks[a.mb].sample
        assert s not in freed, f"step {i}: {a} after sample {s!r} was freed"
        if isinstance(a, Forward):
            assert a.mb not in fwd_done, f"step {i}: second forward of mb {a.mb}"
            fwd_done.add(a.mb)
        elif isinstance(a, Recompute):
            assert a.mb in fwd_done and a.mb not in bwd_done, f"step {i}: {a} out of place"
            nxt = actions[i + 1] if i + 1 < len(actions) else None
            assert nxt == Backward(a.mb), f"step {i}: {a} not immediately followed by its backward"
        elif isinstance(a, Backward):
            assert a.mb in fwd_done and a.mb not in bwd_done, f"step {i}: {a} before forward or twice"
            bwd_done.add(a.mb)
        if s is None:
            continue
        mine[s].append(a)
    assert fwd_done == set(range(len(chunks))), "some micro-batch is not run forward"
    assert bwd_done == want_bwd, f"backward ran for {sorted(bwd_done)}, the rule wants {sorted(want_bwd)}"
    for s, prog in expected.items():
        want = list(prog.forwards) + [a for t in prog.backward_tasks for a in t]
        got = mine[s]
        # forwards may interleave with the sample's backward tasks only in one way: all
        # forwards first (backward of chunk N-1 needs every forward), so order is exact.
        assert got == want, f"sample {s!r}: actions {got} differ from the rule {want}"
    peaks = live_activations_per_sample(actions, chunks)
    assert all(v <= k for v in peaks.values()), f"more than K={k} live activations: {peaks}"


def _label(a: Action) -> str:
    if isinstance(a, Forward):
        return "F+" if a.keep_graph else "F-"
    return {Backward: "B", Recompute: "R"}[type(a)]


def format_actions(actions: Sequence[Action], chunks: Sequence[ChunkRef]) -> str:
    """One line per micro-batch, one column per step (see the module docstring).

    ``F+`` forward keeping the graph, ``F-`` forward keeping only K/V, ``R`` recompute,
    ``B`` backward, ``x`` the sample's state is freed (shown on its chunk 0).
    """
    lines = []
    for mb, c in enumerate(chunks):
        name = "-" if c.sample is None else f"{c.sample}:{c.chunk_index}"
        cells = []
        for a in actions:
            if isinstance(a, Free):
                mark = c.sample == a.sample and c.chunk_index == 0
                cells.append("x" if mark else "")
            else:
                cells.append(_label(a) if a.mb == mb else "")
        lines.append(f"mb {mb:>2} {name:<6} " + "".join(cell.ljust(3) for cell in cells).rstrip())
    return "\n".join(lines)
