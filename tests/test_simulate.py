"""Pipeline simulator: the paper's bubble numbers and timelines that respect data flow."""

from __future__ import annotations

import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkflow.data.assignment import CostModel
from chunkflow.pipeline.plan import Comm, P2POp, PipelinePlan, Step, build_pipeline_plan, plain_1f1b_plan
from chunkflow.pipeline.simulate import (
    UNIFORM,
    Interval,
    Timeline,
    check_dependencies,
    chunk_rows,
    simulate,
    simulate_1f1b,
    simulate_chunkflow,
)
from chunkflow.scheduling.plan import ChunkRef, Free
from test_schedule_plan import chunks_of

PAPER = [4, 2, 1, 1]  # docs/pipeline.md: lengths 4U, 2U, U, U, 4 stages


def test_paper_example_plain_1f1b_is_four_sevenths():
    _, t = simulate_1f1b(PAPER, num_stages=4)
    assert t.makespan == 56  # busy 24 per stage (forward 8, backward 16)
    assert t.bubble_fraction == pytest.approx(4 / 7)


@pytest.mark.parametrize("m,p", [(4, 4), (8, 4), (3, 2), (16, 8), (2, 5)])
def test_equal_microbatches_give_the_textbook_bubble(m, p):
    t = simulate(plain_1f1b_plan(m, p), [1.0] * m)
    assert t.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    check_dependencies(plain_1f1b_plan(m, p), t)


def test_state_aware_on_the_paper_example():
    """C = 2U: [2U] [U U] standalone (build_chunks packs the two U), 4U -> 2 chunks."""
    rows = chunk_rows(PAPER, 2)
    assert [(r.dependent, len(r)) for r in rows] == [(False, 2), (False, 2), (True, 2), (True, 2)]
    _, k2 = simulate_chunkflow(rows, num_stages=4, k=2)
    assert k2.makespan == 46 and k2.bubble_fraction == pytest.approx(11 / 23)  # paper: 47.8%
    _, k1 = simulate_chunkflow(rows, num_stages=4, k=1)  # paper: 54.1%, we get 45.8%
    assert k1.makespan == 48 and k1.bubble_fraction == pytest.approx(1 - 26 / 48)
    # C = 4U leaves 2 standalone chunks of 4U and nothing dependent: the paper's 60%
    _, big = simulate_chunkflow(chunk_rows(PAPER, 4), num_stages=4, k=1)
    assert big.bubble_fraction == pytest.approx(0.6)


def test_attention_aware_costs_shift_but_keep_the_ranking():
    unit, cm = 8192, CostModel()  # 8K-token U, 4096-wide model
    lengths = [n * unit for n in PAPER]
    _, base = simulate_1f1b(lengths, num_stages=4, cost_model=cm)
    rows = chunk_rows(lengths, 2 * unit)
    spans = {k: simulate_chunkflow(rows, num_stages=4, k=k, cost_model=cm)[1].makespan for k in (1, 2)}
    assert spans[2] < spans[1] < base.makespan


def _asap_resend(plan: PipelinePlan, fwd: list[float]) -> float:
    """Makespan if each recompute were a forward through the pipeline (option (a) of
    the plan's docstring): R(mb) on stage s also waits for R(mb) on s-1."""
    p = plan.num_stages
    cost = {"Forward": fwd, "Recompute": fwd, "Backward": [2 * c for c in fwd]}
    orders = [[a for a in plan.actions(s) if not isinstance(a, Free)] for s in range(p)]
    end: dict = {}
    pos, clock = [0] * p, [0.0] * p
    while any(pos[s] < len(orders[s]) for s in range(p)):
        for s in range(p):
            while pos[s] < len(orders[s]):
                a = orders[s][pos[s]]
                kind = type(a).__name__
                dep = (kind, a.mb, s + (1 if kind == "Backward" else -1))
                if 0 <= dep[2] < p and dep not in end:
                    break
                clock[s] = max(clock[s], end.get(dep, 0.0)) + cost[kind][a.mb]
                end[(kind, a.mb, s)] = clock[s]
                pos[s] += 1
    return max(clock)


def test_local_recompute_beats_resending():
    plan, t = simulate_chunkflow(chunk_rows(PAPER, 2), num_stages=4, k=1)
    assert _asap_resend(plan, [2.0] * 4) == 66 > t.makespan == 48


@settings(max_examples=60, deadline=None)
@given(units=st.lists(st.one_of(st.just(0), st.integers(1, 6)), min_size=1, max_size=10),
       num_stages=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 10**6),
       rendezvous=st.booleans(), latency=st.sampled_from([0.0, 0.3]))
def test_timelines_respect_the_data_flow(units, num_stages, k, seed, rendezvous, latency):
    rng = random.Random(seed)
    chunks = chunks_of(units)
    plan = build_pipeline_plan(chunks, num_stages, k)
    fwd = [rng.uniform(0.1, 3.0) for _ in chunks]
    t = simulate(plan, fwd, p2p_latency=latency, rendezvous=rendezvous)
    check_dependencies(plan, t)
    assert 0.0 <= t.bubble_fraction < 1.0
    for s in range(num_stages):
        kinds = [(iv.kind, iv.mb) for iv in t.stages[s]]
        assert len(kinds) == len([a for a in plan.actions(s) if not isinstance(a, Free)])
        assert t.busy(s) == pytest.approx(sum(fwd) * 3 + sum(fwd[mb] for kd, mb in kinds if kd == "recompute"))


def test_latency_only_adds_time():
    plan = plain_1f1b_plan(8, 4)
    free, slow = simulate(plan, [1.0] * 8), simulate(plan, [1.0] * 8, p2p_latency=0.5)
    assert slow.makespan >= free.makespan + 2 * 3 * 0.5
    check_dependencies(plan, slow)


def test_per_stage_costs_pace_the_pipeline_at_its_slowest_stage():
    """The last stage 2x slower (output layer, loss): after the first stage's first
    forward, the last stage works without a break, and the first stage's last backward
    ends the step: makespan = 3 f0 + 3 m f1."""
    m, plan = 4, plain_1f1b_plan(4, 2)
    t = simulate(plan, [[1.0] * m, [2.0] * m])
    assert t.makespan == pytest.approx(3 * 1 + 3 * m * 2)
    assert t.busy(1) == pytest.approx(3 * m * 2) and t.busy(0) == pytest.approx(3 * m)
    check_dependencies(plan, t)
    flat = simulate(plan, [1.0] * m, [3.0] * m)  # a flat list is every stage's
    assert flat.to_json() == simulate(plan, [[1.0] * m] * 2, [[3.0] * m] * 2).to_json()
    with pytest.raises(ValueError, match="one per stage"):
        simulate(plan, [[1.0] * m] * 3)
    with pytest.raises(ValueError, match="forward_cost needs 4"):
        simulate(plan, [[1.0] * m, [1.0] * 3])


def test_deadlocked_table_raises():
    # both stages send first, each send its own blocking group: a cyclic wait
    plan = PipelinePlan(2, 1, [ChunkRef()], [
        [Step("steady", Comm((P2POp("send", "activation", 0, 1),))),
         Step("steady", Comm((P2POp("recv", "grad", 0, 1),)))],
        [Step("steady", Comm((P2POp("send", "grad", 0, 0),))),
         Step("steady", Comm((P2POp("recv", "activation", 0, 0),)))],
    ])
    with pytest.raises(RuntimeError, match="deadlocks"):
        simulate(plan, [1.0])
    simulate(plan, [1.0], rendezvous=False)  # buffered sends get through
    with pytest.raises(AssertionError, match="sends"):  # a send nobody receives
        simulate(PipelinePlan(2, 1, [ChunkRef()], [plan.stages[0][:1], []]), [1.0])


def test_timeline_json_round_trip(tmp_path):
    _, t = simulate_chunkflow(chunk_rows(PAPER, 2), num_stages=4, k=1, cost_model=UNIFORM)
    path = tmp_path / "timeline.json"
    t.save(path)
    data = json.loads(path.read_text())
    assert set(data) == {"stages"} and set(data["stages"][0][0]) == {"kind", "mb", "start", "end", "graph"}
    again = Timeline.load(path)
    assert again == t and again.bubble_fraction == t.bubble_fraction
    with pytest.raises(ValueError, match="kind"):
        Timeline.from_json({"stages": [[{"kind": "idle", "mb": 0, "start": 0, "end": 1}]]})
    with pytest.raises(ValueError, match="timeline"):
        Timeline.from_json({"stage": []})
    assert Timeline([[Interval("forward", 0, 0.0, 1.0)], []]).bubble_fraction == pytest.approx(0.5)


def test_plot_script_draws_simulated_and_measured_timelines(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_schedule.py"
    spec = importlib.util.spec_from_file_location("plot_schedule", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    png, js = tmp_path / "s.png", tmp_path / "t.json"
    argv = ["--simulate", "--lengths", "4,2,1,1", "--chunk-size", "2", "--k", "1", "--stages", "4",
            "-o", str(png), "--save-timeline", str(js), "--print"]
    assert mod.main(argv) == 0
    out = capsys.readouterr().out
    assert "bubble 57.1%" in out and "bubble 45.8%" in out and "R2 B2 x(0)" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert mod.main(["--timeline", str(js), "-o", str(tmp_path / "m.png")]) == 0
    assert mod.main(["--timeline", str(tmp_path / "missing.json")]) == 2
