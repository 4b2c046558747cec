"""scripts/inspect_chunks.py on a tiny config, with a stand-in sample list."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from chunkflow.config import load_config
from chunkflow.data.loader import GlobalBatchLoader
from chunkflow.data.plan import plan_step
from chunkflow.data.stats import COLUMNS, plan_stats
from test_packing import make_sample

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "inspect_chunks.py"
YAML = """\
data:
  max_seq_len: 256
  global_batch_size: 12
chunkflow:
  chunk_size: 64
parallel:
  pipeline: 2
"""


def fake_samples(num: int = 50) -> list:
    rng = np.random.default_rng(0)
    lengths = np.where(rng.random(num) < 0.85, rng.integers(4, 48, num), rng.integers(64, 257, num))
    return [make_sample(i, int(n)) for i, n in enumerate(lengths)]


@pytest.fixture
def script(monkeypatch):
    """The script as a module, with ``chunkflow.data.dataset`` replaced by a stand-in."""
    calls = []

    def load_samples(data_cfg, *, vocab_size):
        calls.append((data_cfg.max_seq_len, vocab_size))
        return fake_samples(), "fake: 50 long-tailed samples"

    monkeypatch.setitem(sys.modules, "chunkflow.data.dataset",
                        types.SimpleNamespace(load_samples=load_samples))
    spec = importlib.util.spec_from_file_location("inspect_chunks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.calls = calls
    return module


def parse(out: str) -> list[dict]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("batch"))
    assert lines[start].split() == list(COLUMNS)
    rows = []
    for line in lines[start + 1 :]:
        cells = line.split()
        rows.append(dict(zip(COLUMNS[:-1], cells[: len(COLUMNS) - 1]), **{"cost/rank": cells[len(COLUMNS) - 1 :]}))
    return rows


def test_tool_prints_both_schedules_per_batch_and_totals(script, tmp_path, capsys):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(YAML)
    assert script.main(["--config", str(cfg_path), "--batches", "3", "--dp", "2"]) == 0
    out = capsys.readouterr().out
    assert "fake: 50 long-tailed samples" in out and "dp=2" in out
    assert script.calls == [(256, 512)]
    rows = parse(out)
    assert [(r["batch"], r["schedule"]) for r in rows] == [
        (b, s) for b in ("0", "1", "2") for s in ("megatron", "chunkflow")
    ] + [("total", "megatron"), ("total", "chunkflow")]

    # The printed figures are the library's figures for the same batches.
    cfg = load_config(cfg_path)
    batches = GlobalBatchLoader(fake_samples(), global_batch_size=12, seed=cfg.data.seed)
    for b in range(3):
        batch = batches.next()
        for r in rows[2 * b : 2 * b + 2]:
            plan = plan_step(batch, schedule=r["schedule"], dp_size=2, max_seq_len=256, chunk_size=64,
                             cost_model=script.CostModel.from_model_config(cfg.model))
            stats = plan_stats(plan)
            for key in ("samples", "tokens", "rows", "standalone", "dependent", "pad"):
                assert int(r[key]) == stats[key], key
            assert float(r["fill"]) == pytest.approx(stats["fill"], abs=1e-3)
            assert float(r["imbalance"]) == pytest.approx(stats["imbalance"], abs=1e-3)
            assert len(r["cost/rank"]) == 2
    chunk_rows = [r for r in rows if r["schedule"] == "chunkflow"]
    assert int(rows[-1]["samples"]) == 36 and int(rows[-1]["dependent"]) > 0
    assert all(float(r["fill"]) <= 1.0 for r in chunk_rows)


def test_tool_dp_from_world_size_and_errors(script, tmp_path, capsys, monkeypatch):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(YAML)
    monkeypatch.setenv("WORLD_SIZE", "8")  # pipeline 2 -> dp 4
    assert script.main(["--config", str(cfg_path), "--batches", "1"]) == 0
    assert "dp=4" in capsys.readouterr().out
    assert script.main(["--config", str(cfg_path), "chunkflow.chunk_size=512"]) == 2
    err = capsys.readouterr().err
    assert "chunkflow.chunk_size=512" in err and "data.max_seq_len=256" in err
    assert script.main(["--config", str(cfg_path), "--dp", "13"]) == 2
    assert "global_batch_size=12" in capsys.readouterr().err


def test_tool_runs_as_a_program_on_real_data(tmp_path):
    pytest.importorskip("chunkflow.data.dataset")
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(YAML)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(cfg_path), "--batches", "2", "--dp", "2",
         "data.synthetic.num_samples=64"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert res.returncode == 0, res.stderr
    assert [r["schedule"] for r in parse(res.stdout)][-2:] == ["megatron", "chunkflow"]


def test_tool_reads_a_jsonl_path_through_the_data_cache(tmp_path, capsys):
    """A JSONL data.path is prepared once into the cache training uses (not read into
    memory), and a malformed line stops the tool with its file and line."""
    spec = importlib.util.spec_from_file_location("inspect_chunks_real", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(YAML)
    rng = np.random.default_rng(1)
    good = tmp_path / "good.jsonl"
    good.write_text("".join('{"input_ids": %s}\n' % rng.integers(0, 512, int(n)).tolist()
                            for n in rng.integers(4, 200, 40)))
    run = f"train.output_dir={tmp_path / 'runs' / 'x'}"
    assert module.main(["--config", str(cfg_path), "--batches", "1", "--dp", "2", f"data.path={good}", run]) == 0
    captured = capsys.readouterr()
    assert "prepared data.path=" in captured.err and "samples" in captured.out
    cache = tmp_path / "runs" / ".chunkflow_data_cache"
    assert [p.name.startswith("good-") for p in cache.iterdir()] == [True]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, oops]}\n')
    assert module.main(["--config", str(cfg_path), f"data.path={bad}", run]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
