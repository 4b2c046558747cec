"""Watching a run (issue 17): TensorBoard / W&B sinks carry metrics.jsonl's numbers, a
missing package stops the run at start with the fix, the ETA arithmetic."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from _workers import TINY
from chunkflow.config.loader import ConfigError
from chunkflow.parallel.spawn import run_distributed
from chunkflow.train.loggers import check_sink_packages, scalars
from chunkflow.train.progress import ItemProgress, Progress, eta_seconds, format_bytes, format_duration

HAS_TB = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None


def test_scalars_are_the_records_numbers_flat():
    record = {"step": 3, "loss": 2.5, "tokens": 100, "mfu": None, "update_ok": True, "schedule": "chunkflow",
              "stage_busy_fraction": [0.5, 0.75], "spaco_backprop_chunks": 4}
    assert scalars(record) == {"loss": 2.5, "tokens": 100.0, "stage_busy_fraction/0": 0.5,
                               "stage_busy_fraction/1": 0.75, "spaco_backprop_chunks": 4.0}


@pytest.mark.parametrize("field,value,package", [("tensorboard", True, "tensorboard"),
                                                 ("wandb_project", "proj", "wandb")])
def test_missing_package_stops_the_trainer_before_it_builds_anything(monkeypatch, field, value, package):
    from chunkflow.config import load_config
    from chunkflow.train import loggers
    from chunkflow.train.trainer import Trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    cfg = load_config(None, [f"log.{field}={'true' if value is True else value}"])
    with pytest.raises(ConfigError, match=rf"log\.{field}=.* needs the '{package}' package.*pip install {package}"):
        check_sink_packages(cfg.log)
    # The trainer checks first: a bare context is enough, no process group or model is built.
    ctx = SimpleNamespace(is_logging_rank=True)
    with pytest.raises(ConfigError, match=f"pip install {package}"):
        Trainer(cfg, ctx, log=lambda *a, **k: None)


def test_eta_arithmetic():
    assert eta_seconds(10.0, start_step=0, step=5, total_steps=20) == pytest.approx(30.0)
    assert eta_seconds(10.0, start_step=10, step=15, total_steps=20) == pytest.approx(10.0)  # resumed at 10
    assert eta_seconds(10.0, start_step=0, step=20, total_steps=20) == 0.0
    assert eta_seconds(0.0, start_step=7, step=7, total_steps=20) is None  # no step timed yet
    assert format_duration(3725.2) == "1:02:05" and format_duration(None) == "?"

    now = [100.0]
    out = io.StringIO()
    p = Progress(40, 10, tty=True, stream=out, clock=lambda: now[0])
    now[0] += 12.0  # 3 steps (11, 12, 13) in 12 s: 27 left at 4 s each
    assert p.times(13) == (12.0, pytest.approx(108.0))
    assert p.summary(13) == "elapsed 0:00:12  eta 0:01:48"
    p.show({"step": 13, "loss": 1.5, "tokens_per_s_per_gpu": 800.0})
    text = out.getvalue()
    assert text.startswith("\r") and "\n" not in text and "13/40" in text and "eta 0:01:48" in text
    p.clear()
    assert out.getvalue().endswith("\r\033[K")
    quiet = io.StringIO()
    Progress(40, 0, tty=False, stream=quiet).show({"step": 1, "loss": 1.0})
    assert quiet.getvalue() == ""  # not a terminal: only the periodic log lines


def test_item_progress_plain_lines_terminal_redraw_and_eta_by_bytes():
    """The N-of-M API (HF import/export; data preparation and the benchmark may use it)."""
    now = [0.0]
    log = io.StringIO()  # not a terminal: one plain line per every_s, none per item
    p = ItemProgress(10, "tensors", label="import", total_bytes=1000, stream=log, tty=False, every_s=5.0,
                     clock=lambda: now[0])
    for nbytes in (100, 300, 100, 100, 100, 100, 50, 50, 50, 50):
        now[0] += 1.0
        p.advance(nbytes=nbytes)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "\r" not in log.getvalue()
    # at 5 s: 700 of 1000 bytes (5 of 10 items): the ETA follows the bytes, 5/700*300 s
    assert lines[0].startswith("import: 5/10 tensors") and " 70%" in lines[0] and "eta 0:00:02" in lines[0]
    assert "700 B/1000 B" in lines[0]
    p.finish("done")
    assert log.getvalue().splitlines()[-1] == "import: 10 tensors, 1000 B in 0:00:10; done"

    now[0] = 0.0
    term = io.StringIO()
    t = ItemProgress(4, "runs", stream=term, tty=True, redraw_s=0.0, clock=lambda: now[0])
    now[0] += 3.0
    t.advance()
    assert term.getvalue().startswith("\r1/4 runs") and "eta 0:00:09" in term.getvalue()
    assert "\n" not in term.getvalue()  # redrawn in place
    t.advance(3)
    t.finish()
    assert term.getvalue().endswith("\r4 runs in 0:00:03\033[K\n")
    silent = ItemProgress(3, stream=None)
    silent.advance(3)
    silent.finish()  # stream=None: nothing, no error
    assert format_bytes(3.4 * 2**30) == "3.40 GiB" and format_bytes(512) == "512 B"


def sinks_worker(rank: int, world: int, out: str, overrides: list[str]) -> dict:
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.trainer import Trainer

    cfg = load_config(None, list(TINY) + [
        "train.schedule=chunkflow", "chunkflow.mode=spaco", "train.steps=3", "train.save_at_end=false",
        "data.global_batch_size=4", f"train.output_dir={out}", *overrides])
    ctx = init_distributed(cfg)
    lines: list[str] = []
    trainer = Trainer(cfg, ctx, log=lines.append)
    summary = trainer.train()
    return {"steps": summary["steps"], "lines": lines, "sinks_closed": trainer.sinks == []}


WANTED = {"loss", "grad_norm", "lr", "tokens_per_s", "tokens_per_s_per_gpu", "tflops_per_s_per_gpu",
          "peak_mem_allocated_bytes", "bubble_fraction", "dp_imbalance", "micro_batches",
          "spaco_chunks", "spaco_backprop_chunks"}


@pytest.fixture(scope="module")
def watched_run(tmp_path_factory):
    """One 3-step SpaCO run (world 1) with every installed sink on: (output dir, result, rows)."""
    if not HAS_TB:
        pytest.skip("tensorboard is not installed (pip install tensorboard, or the dev extra)")
    out = tmp_path_factory.mktemp("watched") / "run"
    overrides = ["log.tensorboard=true"]
    if HAS_WANDB:
        overrides += ["log.wandb_project=chunkflow-test", "log.wandb_run_name=tiny"]
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DISABLE_GIT": "true"}
    r = run_distributed(sinks_worker, 1, (str(out), overrides), timeout_s=600, env=env)[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, r, rows


@pytest.mark.slow
def test_tensorboard_events_equal_the_metrics(watched_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, r, rows = watched_run
    assert r["steps"] == 3 and r["sinks_closed"]
    assert "elapsed 0:" in r["lines"][-1] and "eta 0:00:00" in r["lines"][-1]  # the last step's log line
    assert [row["step"] for row in rows] == [1, 2, 3]
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert WANTED <= tags, WANTED - tags
    assert "mfu" not in tags  # null on CPU: left out, not written as 0
    for tag in tags:
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2, 3], tag
        for e, row in zip(events, rows):  # event files store float32
            assert e.value == pytest.approx(scalars(row)[tag], rel=1e-6, abs=1e-30), (tag, e.step)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install wandb, or the watch extra)")
def test_wandb_offline_history_equals_the_metrics(watched_run):
    out, _, rows = watched_run
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs
    history = _wandb_history(runs[0])
    assert [h["_step"] for h in history] == [1, 2, 3]
    for h, row in zip(history, rows):
        logged = {k: v for k, v in h.items() if not k.startswith("_")}
        assert logged == pytest.approx(scalars(row), rel=1e-12), row["step"]
    assert WANTED <= set(history[0])


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file. It is a LevelDB-style log: a 7-byte
    header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, little-endian length, type: 1 full, 2 first, 3 middle, 4 last); a
    chunk header never straddles a block. Each whole record is a protobuf ``Record``."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


def _plot_run_module():
    script = Path(__file__).resolve().parents[1] / "scripts" / "plot_run.py"
    spec = importlib.util.spec_from_file_location("plot_run", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plot_run_draws_two_runs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    plot_run = _plot_run_module()
    for name, schedule, mem in [("a", "megatron", 3 * 2**20), ("b", "chunkflow", 2 * 2**20)]:
        rows = [{"step": s, "loss": 5.0 / s, "tokens_per_s_per_gpu": 100.0 * s, "peak_mem_allocated_bytes": mem,
                 "schedule": schedule} for s in range(1, 6)]
        rows[2]["loss"] = float("nan")  # a skipped step: left out, not a crash
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 6, "lo')
    out = tmp_path / "plot.png"
    assert plot_run.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    said = capsys.readouterr().out
    assert "a (megatron), 5 steps" in said and "b (chunkflow), 5 steps" in said
    with pytest.raises(SystemExit, match="no metrics.jsonl"):
        plot_run.main([str(tmp_path), "--out", str(out)])
