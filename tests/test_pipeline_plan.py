"""State-aware 1F1B action tables (docs/pipeline.md, chunkflow.pipeline.plan)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.pipeline.plan import (
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
from chunkflow.scheduling.plan import (
    Backward,
    ChunkRef,
    Forward,
    Recompute,
    live_activations_per_sample,
    max_live_activations,
    plan_single_stage,
)
from test_schedule_plan import chunks_of

# long-tailed: mostly standalone chunks, some long samples of up to 12 chunks
unit_sizes = st.lists(
    st.one_of(st.just(0), st.just(0), st.just(0), st.integers(1, 4), st.integers(5, 12)),
    min_size=1, max_size=14)


@settings(max_examples=250, deadline=None)
@given(units=unit_sizes, num_stages=st.integers(2, 8), k=st.integers(1, 5))
def test_every_stage_keeps_the_rules_and_never_deadlocks(units, num_stages, k):
    chunks = chunks_of(units)
    plan = build_pipeline_plan(chunks, num_stages, k)
    validate_plan(plan)  # §2.2 rules per stage, live bound, comm pairing, no deadlock
    check_progress(plan, rendezvous=False)
    for s in range(num_stages):
        acts = plan.actions(s)
        assert max_live_activations(acts) <= live_bound(num_stages, s, k)
        assert all(v <= k for v in live_activations_per_sample(acts, chunks).values())
        # one global backward order: the PP=1 plan's, on every stage
        bwd = [a for a in acts if isinstance(a, (Backward, Recompute))]
        assert bwd == [a for a in plan_single_stage(chunks, k) if isinstance(a, (Backward, Recompute))]


@pytest.mark.parametrize("num_stages", [1, 2, 3])
@pytest.mark.parametrize("units", [[0, 3, 0], [5, 0, 0, 2], [0, 0, 0], [7]])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_exhaustive_small_cases(num_stages, units, k):
    for perm in set(itertools.permutations(units)):
        plan = build_pipeline_plan(chunks_of(list(perm)), num_stages, k)
        validate_plan(plan)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_one_stage_is_the_single_stage_plan(k):
    chunks = chunks_of([0, 4, 0, 0, 2, 7, 0])
    plan = build_pipeline_plan(chunks, 1, k)
    assert plan.actions(0) == plan_single_stage(chunks, k)
    assert not any(isinstance(st.action, Comm) for st in plan.stages[0])


@pytest.mark.parametrize("m,p", [(8, 4), (4, 4), (2, 4), (5, 2), (1, 3)])
def test_plain_1f1b_is_megatrons(m, p):
    plan = plain_1f1b_plan(m, p)
    validate_plan(plan)
    for s in range(p):
        warm = min(p - s - 1, m)
        acts = plan.actions(s)
        # Megatron: warm-up forwards, then (forward, backward) pairs, then backwards
        expect = [Forward(i) for i in range(warm)]
        for i in range(m - warm):
            expect += [Forward(warm + i), Backward(i)]
        expect += [Backward(i) for i in range(m - warm, m)]
        assert acts == expect
        if m > warm:
            assert plan.phase_actions(s, "warmup") == expect[:warm]
            assert plan.phase_actions(s, "cooldown") == expect[len(expect) - warm:]
        assert max_live_activations(acts) == min(p - s, m)


def test_phases_are_in_order_and_named():
    plan = build_pipeline_plan(chunks_of([0, 0, 3, 0, 0, 0]), 4, 1)
    for steps in plan.stages:
        phases = [st.phase for st in steps]
        assert phases == sorted(phases, key=["warmup", "steady", "cooldown"].index)
    assert plan.phase_actions(0, "warmup") == [Forward(0), Forward(1), Forward(2, False)]
    assert plan.phase_actions(3, "warmup") == []  # the last stage starts steady, like Megatron


def test_recompute_is_local_and_right_before_its_backward():
    plan = build_pipeline_plan(chunks_of([0, 5, 0]), 3, 2)
    for s, steps in enumerate(plan.stages):
        acts = [st.action for st in steps]
        for i, a in enumerate(acts):
            if isinstance(a, Recompute):
                rest = acts[i + 1:]
                nxt = next(x for x in rest if not isinstance(x, Comm))
                assert nxt == Backward(a.mb)
                between = rest[: rest.index(nxt)]  # at most the gradient receive
                ops = [op for c in between for op in c.ops]
                assert all(op.op == "recv" and op.payload == "grad" for op in ops)
                assert len(ops) == (1 if s < 2 else 0)


def test_channels_pair_in_order():
    plan = build_pipeline_plan(chunks_of([0, 3, 0, 2]), 3, 1)
    pairs = match_ops(plan)
    for (s, t, o), (peer, u) in pairs.items():
        op = plan.stages[s][t].action.ops[o]
        assert op.peer == peer
        back = [x for x in plan.stages[peer][u].action.ops if x.peer == s and x.op != op.op]
        assert (op.payload, op.mb) in [(x.payload, x.mb) for x in back]


def test_checkers_catch_broken_tables():
    plan = plain_1f1b_plan(3, 2)
    # swap two Comm groups' contents on stage 1 -> channel order differs
    bad = PipelinePlan(plan.num_stages, plan.k, plan.chunks, [list(s) for s in plan.stages])
    comms = [i for i, st in enumerate(bad.stages[1]) if isinstance(st.action, Comm)]
    a, b = comms[0], comms[1]
    bad.stages[1][a], bad.stages[1][b] = bad.stages[1][b], bad.stages[1][a]
    with pytest.raises(AssertionError):
        validate_plan(bad)
    # a cyclic wait: both stages send before they receive, each a separate blocking group
    deadlock = PipelinePlan(2, 1, [ChunkRef()], [
        [Step("steady", Comm((P2POp("send", "activation", 0, 1),))),
         Step("steady", Comm((P2POp("recv", "grad", 0, 1),)))],
        [Step("steady", Comm((P2POp("send", "grad", 0, 0),))),
         Step("steady", Comm((P2POp("recv", "activation", 0, 0),)))],
    ])
    with pytest.raises(AssertionError, match="deadlock"):
        check_progress(deadlock)
    check_progress(deadlock, rendezvous=False)  # buffered sends would get through


def test_errors_and_printout():
    with pytest.raises(ValueError, match="stages"):
        build_pipeline_plan([ChunkRef()], 0, 1)
    with pytest.raises(ValueError, match="at least one"):
        build_pipeline_plan([], 2, 1)
    text = format_plan(build_pipeline_plan(chunks_of([0, 3, 0]), 2, 1), comm=True)
    assert text.splitlines()[0].startswith("stage 0  warmup  : F0")
    assert "R2 [rg2] B2" in text and "x(s1)" in text
    assert "[" not in format_plan(build_pipeline_plan(chunks_of([0, 3, 0]), 2, 1))


def test_docstring_example_is_what_the_code_prints():
    import chunkflow.pipeline.plan as mod

    doc = mod.__doc__
    start = doc.index("    stage 0  warmup  : F0\n")
    block = doc[start:doc.index("\n\n", start)]
    expected = "\n".join(line[4:] for line in block.splitlines())
    chunks = [ChunkRef()] + [ChunkRef("s", j, 3) for j in range(3)] + [ChunkRef()]
    assert format_plan(build_pipeline_plan(chunks, 2, 1), comm=True) == expected
