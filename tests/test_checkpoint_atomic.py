"""Atomic, verifiable checkpoints and safe loading (issue 14).

Runs of the Trainer on 2 ranks (DP=2) in three spawns:
  1. killed (``os._exit`` on every rank, CRASH_ENV) after the shards of its second
     checkpoint are written, before the manifest: the torn save is a ``.tmp-`` directory,
     ``latest`` still names the first checkpoint;
  2. one process group for: an uninterrupted reference run; an explicit load of the torn
     directory, of a bit-flipped copy, of a copy with a crafted ``.metadata`` and a
     model that does not match (each refused, by name); ``train.load=auto`` in the
     killed run's directory (resumes from the last complete checkpoint, losses equal
     the reference); ``train.keep_checkpoints=2``;
  3. a re-save of an existing checkpoint name killed between renaming the old one
     aside and renaming the new one in: the old one is still found, complete.
The rest are in-process checks of the manifest, ``latest``, pruning and the unpickler.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from _workers import TINY
from chunkflow.parallel.spawn import DistributedFailure, run_distributed
from chunkflow.train.checkpoint import (CRASH_ENV, LATEST, CheckpointError, checkpoint_problem, latest_checkpoint,
                                        load_checkpoint, prune_checkpoints, verify_checkpoint)
from chunkflow.train.checkpoint_files import MANIFEST, read_dcp_metadata, write_manifest

RUN = ["data.global_batch_size=4", "train.steps=4", "train.save_every=2", "train.warmup_steps=1",
       "parallel.pipeline=1", "train.schedule=chunkflow"]


class _Payload:
    """Unpickling this runs ``touch <marker>``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _trainer(out: Path, *overrides: str):
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.trainer import Trainer

    cfg = load_config(None, list(TINY) + RUN + [f"train.output_dir={out}", *overrides])
    return Trainer(cfg, init_distributed(cfg), log=lambda *a, **k: None)


def _refusal(out: Path, *overrides: str) -> str:
    try:
        _trainer(out, *overrides)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def _strict_load(path: Path, *overrides: str) -> str:
    """load_checkpoint itself (no trainer pre-check against trainer.json's config)."""
    from chunkflow.config import load_config
    from chunkflow.parallel.distributed import init_distributed
    from chunkflow.train.build import build_model_and_ddp
    from chunkflow.train.checkpoint import load_checkpoint

    cfg = load_config(None, list(TINY) + RUN + list(overrides))
    ddp, _ = build_model_and_ddp(cfg, init_distributed(cfg))
    try:
        load_checkpoint(path, model=ddp, optimizer=None)
    except CheckpointError as e:
        return str(e)
    return "loaded"


def train_worker(rank: int, world: int, out: str, overrides: list[str]) -> dict:
    summary = _trainer(Path(out), *overrides).train()
    return {"summary": summary}


def probe_worker(rank: int, world: int, tmp: str) -> dict:
    import torch.distributed as dist

    tmp_path = Path(tmp)
    killed, full = tmp_path / "killed", tmp_path / "full"
    res: dict = {}
    _trainer(full).train()
    dist.barrier()
    res["full"] = _losses(full) if rank == 0 else None

    torn = next(killed.glob(".tmp-checkpoint_step4-*"))
    res["torn_name"] = torn.name
    res["torn"] = _refusal(tmp_path / "probe", f"train.load={torn}")

    flipped, evil = tmp_path / "flipped" / "checkpoint_step2", tmp_path / "evil" / "checkpoint_step2"
    marker = tmp_path / "marker"
    if rank == 0:
        shutil.copytree(killed / "checkpoint_step2", flipped)
        shard = max((flipped / "model").glob("*.distcp"), key=lambda p: p.stat().st_size)
        res["flipped_file"] = f"model/{shard.name}"
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        shard.write_bytes(bytes(data))
        shutil.copytree(killed / "checkpoint_step2", evil)
        (evil / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
        write_manifest(evil)  # an attacker rewrites the manifest too
    dist.barrier()
    res["flipped"] = _refusal(tmp_path / "probe", f"train.load={flipped}")
    res["evil"] = _refusal(tmp_path / "probe", f"train.load={evil}")
    if rank == 0:
        from chunkflow.hf_convert import export_hf

        try:
            export_hf(evil, tmp_path / "evil_export")
            res["evil_export"] = "exported"
        except CheckpointError as e:
            res["evil_export"] = str(e)
    res["marker_exists"] = marker.exists()
    res["mismatch_config"] = _refusal(tmp_path / "probe", f"train.load={killed / 'checkpoint_step2'}",
                                      "model.qkv_bias=false")
    res["mismatch"] = _strict_load(killed / "checkpoint_step2", "model.qkv_bias=false")

    auto = _trainer(killed, "train.load=auto")
    res["auto_loaded"] = auto.loaded_from
    auto.train()
    dist.barrier()
    res["resumed"] = _losses(killed) if rank == 0 else None
    res["after_resume"] = sorted(p.name for p in killed.iterdir())

    _trainer(killed, "train.load=auto", "train.steps=8", "train.save_every=1", "train.keep_checkpoints=2").train()
    dist.barrier()
    res["after_prune"] = sorted(p.name for p in killed.iterdir())
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("atomic")
    out: dict = {}
    with pytest.raises(DistributedFailure):  # rank 0 exits 86 (the other may see the lost peer first)
        run_distributed(train_worker, 2, (str(tmp / "killed"), []), timeout_s=600,
                        env={CRASH_ENV: "before_manifest:checkpoint_step4"})
    out["killed_files"] = sorted(p.name for p in (tmp / "killed").iterdir())
    out["killed_latest"] = latest_checkpoint(tmp / "killed")
    out["killed_step2_problem"] = checkpoint_problem(tmp / "killed" / "checkpoint_step2", full=True)
    out["probe"] = run_distributed(probe_worker, 2, (str(tmp),), timeout_s=900)[0]
    # Re-save checkpoint_step4 of the reference run, killed with the old one renamed aside.
    with pytest.raises(DistributedFailure):  # rank 0 exits 86 (the other may see the lost peer first)
        run_distributed(train_worker, 2, (str(tmp / "full"), [f"train.load={tmp / 'full' / 'checkpoint_step2'}"]),
                        timeout_s=600, env={CRASH_ENV: "after_aside:checkpoint_step4"})
    out["tmp"] = tmp
    return out


def test_kill_during_first_save_leaves_the_previous_checkpoint(runs):
    files = runs["killed_files"]
    assert "checkpoint_step2" in files and "checkpoint_step4" not in files, files
    assert any(f.startswith(".tmp-checkpoint_step4-") for f in files), files
    assert runs["killed_latest"].name == "checkpoint_step2"
    assert runs["killed_step2_problem"] is None  # complete: every hash matches


def test_auto_resume_uses_the_last_complete_checkpoint_and_matches(runs):
    probe, killed = runs["probe"], runs["tmp"] / "killed"
    assert probe["auto_loaded"] == str(killed / "checkpoint_step2")
    assert probe["resumed"] == probe["full"], (probe["full"], probe["resumed"])  # bit-exact, fp32
    assert "checkpoint_step4" in probe["after_resume"]
    assert not [f for f in probe["after_resume"] if f.startswith(".tmp-")]  # the torn save was cleared


def test_explicit_load_of_the_torn_save_is_refused_by_name(runs):
    msg = runs["probe"]["torn"]
    assert runs["probe"]["torn_name"] in msg and "incomplete" in msg and MANIFEST in msg, msg
    assert f"newest valid checkpoint is {runs['tmp'] / 'killed' / 'checkpoint_step2'}" in msg, msg


def test_bit_flipped_shard_is_refused_naming_the_file(runs):
    msg = runs["probe"]["flipped"]
    assert "corrupt" in msg and runs["probe"]["flipped_file"] in msg and "flipped" in msg, msg


def test_crafted_metadata_is_refused_without_running(runs):
    probe = runs["probe"]
    for msg in (probe["evil"], probe["evil_export"]):
        assert "unsafe" in msg and "system" in msg and ".metadata" in msg, msg
    assert not probe["marker_exists"]


def test_model_mismatch_names_the_keys(runs):
    msg = runs["probe"]["mismatch"]  # the strict key check of load_checkpoint
    assert "does not match the model" in msg and "unexpected" in msg and "linear_qkv.bias" in msg, msg
    # through the trainer, the saved config already names the difference
    assert "checkpoint has qkv_bias True (config has False)" in runs["probe"]["mismatch_config"]


def test_keep_checkpoints_prunes_but_spares_the_loaded_one(runs):
    kept = [f for f in runs["probe"]["after_prune"] if f.startswith("checkpoint")]
    # newest two (7, 8) and step 4, which that run loaded
    assert kept == ["checkpoint_step4", "checkpoint_step7", "checkpoint_step8"], kept


def test_kill_during_resave_keeps_the_old_checkpoint_findable(runs):
    full = runs["tmp"] / "full"
    names = sorted(p.name for p in full.iterdir())
    assert "checkpoint_step4" not in names, names
    found = latest_checkpoint(full)
    assert found is not None and found.name.startswith(".old-checkpoint_step4-"), names
    verify_checkpoint(found)  # every hash matches: complete
    assert (full / LATEST).read_text().strip() == "checkpoint_step4"  # not yet rewritten


# --------------------------------------------------------------------------- in-process
def _fake(root: Path, name: str, step: int) -> Path:
    d = root / name
    (d / "model").mkdir(parents=True)
    (d / "model" / "shard").write_bytes(os.urandom(4096))
    (d / "trainer.json").write_text(json.dumps({"step": step}))
    write_manifest(d)
    return d


def test_manifest_catches_bit_flips_and_truncation(tmp_path):
    ok = _fake(tmp_path, "checkpoint_step1", 1)
    bad = _fake(tmp_path, "checkpoint_step2", 2)
    assert checkpoint_problem(bad, full=True) is None
    data = bytearray((bad / "model" / "shard").read_bytes())
    data[7] ^= 0x80
    (bad / "model" / "shard").write_bytes(bytes(data))
    assert checkpoint_problem(bad) is None  # sizes alone cannot see a flipped bit
    with pytest.raises(CheckpointError, match=r"checkpoint_step2 is corrupt \(file model/shard: blake2b") as e:
        verify_checkpoint(bad)
    assert f"newest valid checkpoint is {ok}" in str(e.value)
    (bad / "model" / "shard").write_bytes(bytes(data[:100]))
    assert "incomplete (file model/shard: size 100" in checkpoint_problem(bad)
    assert latest_checkpoint(tmp_path) == ok  # the pointer is absent: highest valid step


def test_latest_prefers_the_pointer_and_refuses_only_invalid(tmp_path):
    _fake(tmp_path, "checkpoint_step5", 5)
    three = _fake(tmp_path, "checkpoint_step3", 3)
    (tmp_path / LATEST).write_text("checkpoint_step3\n")  # e.g. a run resumed from an earlier step
    assert latest_checkpoint(tmp_path) == three
    only_old = tmp_path / "legacy"
    (only_old / "checkpoint_step9" / "model").mkdir(parents=True)
    (only_old / "checkpoint_step9" / "trainer.json").write_text('{"step": 9}')
    with pytest.raises(CheckpointError, match="no valid checkpoint, only checkpoint_step9 .incomplete"):
        latest_checkpoint(only_old)  # never a silent fresh start over existing checkpoints
    write_manifest(only_old / "checkpoint_step9")  # vouching for it (docs/checkpoints.md)
    assert latest_checkpoint(only_old).name == "checkpoint_step9"


def test_prune_keeps_the_newest_and_protected_and_clears_leftovers(tmp_path):
    for s in range(1, 6):
        _fake(tmp_path, f"checkpoint_step{s}", s)
    (tmp_path / ".tmp-checkpoint_step6-abc").mkdir()
    old = _fake(tmp_path, ".old-checkpoint_step5-abc", 5)
    gone = prune_checkpoints(tmp_path, 2, protect=[tmp_path / "checkpoint_step1"])
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint_step1", "checkpoint_step4", "checkpoint_step5"], left
    assert old in gone and len(gone) == 4
    assert prune_checkpoints(tmp_path, 0) == []  # 0 keeps all


def test_crafted_pickles_are_refused_and_plain_pickle_would_run_them(tmp_path):
    import torch

    from chunkflow.train.checkpoint_files import check_pickled_objects

    marker = tmp_path / "marker"
    d = _fake(tmp_path, "checkpoint_step1", 1)
    (d / "model" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    write_manifest(d)
    with pytest.raises(CheckpointError, match=r"unsafe .*refused to load '(posix|os)\.system'"):
        read_dcp_metadata(d / "model")
    with pytest.raises(CheckpointError, match="unsafe"):
        load_checkpoint(d, model=None, optimizer=None)  # refused before the model is touched
    torch.save({"x": _Payload(marker)}, d / "model" / "common.pt")

    class _NoObjects:
        state_dict_metadata: dict = {}
        storage_data: dict = {}

    with pytest.raises(CheckpointError, match="common.pt: unsafe pickle"):
        check_pickled_objects(d / "model", _NoObjects())
    assert not marker.exists()
    pickle.loads((d / "model" / ".metadata").read_bytes())  # the control: plain pickle runs it
    assert marker.exists()
