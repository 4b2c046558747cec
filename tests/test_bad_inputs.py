"""Every bad input ends the run with one line naming the culprit and exit code 2, and
leaves an existing output directory byte-identical (issue 14).

Errors raised before process groups exist run in this process through
``scripts/finetune.py``'s ``main(argv)``; those after start-up (data, checkpoint, HF
weights) share one world-1 ``run_distributed`` worker that calls ``main`` once per case.
The config layer's own messages are covered by tests/test_config.py; a few go through
the entry point here. The launcher path (torchrun) is in tests/test_failures.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny_cpu.yaml")
SMALL = ["parallel.pipeline=1", "model.num_layers=2", "data.max_seq_len=64", "data.global_batch_size=2",
         "chunkflow.chunk_size=32", "train.steps=2", "data.synthetic.num_samples=16", "train.schedule=megatron"]


def _finetune():
    spec = importlib.util.spec_from_file_location("finetune_script", ROOT / "scripts" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(finetune, argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = finetune.main(argv)
    return code, out.getvalue(), err.getvalue()


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def _assert_one_line(code: int, out: str, err: str, expected: str) -> None:
    lines = err.splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], (expected, lines[0])
    assert "Traceback" not in out + err


# --------------------------------------------------------------------------- before groups
def _hf_dir(path: Path, **config) -> Path:
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False, **config}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    return path


BEFORE = [  # (id, overrides or a callable(tmp) -> argv tail, env, expected text)
    ("override_type", ["train.steps=ten"], {}, "train.steps: expected an integer, got 'ten'"),
    ("unknown_key", ["train.stepz=3"], {}, "unknown config key 'train.stepz'"),
    ("not_key_value", ["train.steps"], {}, "is not of the form key=value"),
    ("section_set", ["train=3"], {}, "'train' is a section"),
    ("bad_choice", ["train.schedule=fast"], {}, "train.schedule"),
    ("negative_lr", ["train.lr=-1"], {}, "train.lr"),
    ("layout_vs_layers", ["parallel.pipeline=3"], {}, "parallel.pipeline=3 does not divide model.num_layers=4"),
    ("layout_vs_world", ["parallel.pipeline=2"], {"RANK": "0", "WORLD_SIZE": "3"}, "3"),
    ("nccl_without_cuda", ["parallel.pipeline=1", "parallel.backend=nccl"], {}, "parallel.backend=nccl needs CUDA"),
    ("env_rank_not_int", [], {"RANK": "x", "WORLD_SIZE": "2"}, "environment variable RANK='x'"),
    ("env_rank_too_big", [], {"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 is not below WORLD_SIZE=2"),
    ("hf_dir_missing", lambda t: [f"model.hf_dir={t / 'nope'}"], {}, "no config.json"),
    ("hf_no_config_json", lambda t: [f"model.hf_dir={(t / 'empty').mkdir() or t / 'empty'}"], {}, "no config.json"),
    ("hf_unsupported_arch", lambda t: [f"model.hf_dir={_hf_dir(t / 'g', architectures=['GPT2LMHeadModel'])}"], {},
     "architecture 'GPT2LMHeadModel' is not supported"),
    ("hf_rope_scaling", lambda t: [f"model.hf_dir={_hf_dir(t / 'r', rope_scaling={'rope_type': 'yarn'})}"], {},
     "rope type 'yarn'"),
    ("hf_conflicting_field", lambda t: [f"model.hf_dir={_hf_dir(t / 'c')}", "model.hidden_size=96"], {},
     "model.hidden_size=96 (config.json: 64)"),
]


@pytest.mark.parametrize("case", BEFORE, ids=[c[0] for c in BEFORE])
def test_bad_input_before_start_is_one_line_exit_2(case, tmp_path, monkeypatch):
    name, overrides, env, expected = case
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    prev = tmp_path / "prev"
    (prev / "checkpoint_step1").mkdir(parents=True)
    for f, text in (("metrics.jsonl", '{"step": 1}\n'), ("config.yaml", "train: {}\n"),
                    ("checkpoint_step1/trainer.json", '{"step": 1}')):
        (prev / f).write_text(text)
    before = _snapshot(prev)
    tail = overrides(tmp_path) if callable(overrides) else overrides
    code, out, err = _run(_finetune(), ["--config", CONFIG, f"train.output_dir={prev}", *tail])
    _assert_one_line(code, out, err, expected)
    assert _snapshot(prev) == before


def test_missing_config_file_and_bad_yaml(tmp_path):
    finetune = _finetune()
    _assert_one_line(*_run(finetune, ["--config", str(tmp_path / "no.yaml")]), "config file not found")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [steps: 3\n")
    _assert_one_line(*_run(finetune, ["--config", str(bad)]), "not valid YAML")


def test_only_rank_0_prints_before_groups(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, out, err = _run(_finetune(), ["--config", CONFIG, "train.steps=x"])
    assert (code, out, err) == (2, "", "")


# --------------------------------------------------------------------------- after start-up
def _tokenizer(path: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["hello world how are you"] * 3, trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"]))
    tok.save(str(path))
    return path


def _data(t: Path, name: str, lines: list, raw: bytes | None = None) -> str:
    p = t / f"{name}.jsonl"
    p.write_bytes(raw if raw is not None else
                  "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines).encode())
    return str(p)


GOOD = {"input_ids": [1, 2, 3, 4]}


def _data_cases(t: Path) -> list[tuple[str, list[str], str]]:
    tok = _tokenizer(t / "tokenizer.json")
    d = lambda name, *lines: f"data.path={_data(t, name, [GOOD, *lines])}"  # noqa: E731
    chat = [{"role": "user", "content": "hello"}]
    latin1 = json.dumps(GOOD).encode() + b'\n{"text": "caf\xe9"}\n'  # line 2 in Latin-1
    blank = b"\n  \n"
    return [  # (id, overrides, expected): bad line is line 2 unless said
        ("malformed_json", [d("m", '{"input_ids": [1, 2')], "m.jsonl:2: malformed JSON"),
        ("not_an_object", [d("o", "[1, 2, 3]")], "o.jsonl:2: expected a JSON object, got list"),
        ("no_known_key", [d("k", {"tokens": [1, 2]})], "k.jsonl:2: none of the known keys"),
        ("two_formats", [d("two", {"input_ids": [1, 2], "text": "hi"})], "two.jsonl:2: has input_ids and text"),
        ("ids_not_list", [d("s", {"input_ids": "1 2 3"})], 's.jsonl:2: "input_ids" must be a flat list'),
        ("ids_floats", [d("f", {"input_ids": [1.5, 2.0]})], 'f.jsonl:2: "input_ids" must be a flat list'),
        ("ids_nested", [d("n", {"input_ids": [[1, 2], [3, 4]]})], 'n.jsonl:2: "input_ids" must be a flat list'),
        ("mask_length", [d("ml", {"input_ids": [1, 2, 3], "loss_mask": [1, 1]})], 'ml.jsonl:2: "loss_mask" has 2 values'),
        ("mask_value", [d("mv", {"input_ids": [1, 2, 3], "loss_mask": [0, 1, 2]})], 'mv.jsonl:2: "loss_mask"[2] = 2'),
        ("mask_with_text", [d("mt", {"text": "hi", "loss_mask": [1]})], 'mt.jsonl:2: "loss_mask" only goes with'),
        ("token_out_of_vocab", [d("v", {"input_ids": [1, 512]})], "v.jsonl:2: token id 512 at position 1"),
        ("negative_token", [d("neg", {"input_ids": [-1, 3]})], "neg.jsonl:2: token id -1 at position 0"),
        ("one_token", [d("one", {"input_ids": [7]})], "one.jsonl:2: empty sample: 1 token(s)"),
        ("no_loss_token", [d("nl", {"input_ids": [1, 2, 3], "loss_mask": [1, 0, 0]})], "nl.jsonl:2: no loss token"),
        ("non_utf8", [f"data.path={_data(t, 'u', [], raw=latin1)}"],
         "u.jsonl:2: not UTF-8: byte 0xe9 at column 14"),
        ("empty_file", [f"data.path={_data(t, 'e', [], raw=b'')}"], "holds no usable sample"),
        ("blank_lines_only", [f"data.path={_data(t, 'b', [], raw=blank)}"], "holds no usable sample"),
        ("data_file_missing", [f"data.path={t / 'absent.jsonl'}"], "absent.jsonl: no such file (data.path)"),
        ("text_without_tokenizer", [d("tt", {"text": "hello world"})], 'tt.jsonl:2: "text" samples need a tokenizer'),
        ("tokenizer_missing", [d("tm", {"text": "hello"}), f"data.tokenizer={t / 'no_tok.json'}"],
         "data.tokenizer="),
        ("tokenizer_garbage", [d("tg", {"text": "hello"}), f"data.tokenizer={_data(t, 'garbage_tok', ['{'])}"],
         "cannot parse"),
        ("overlong_error", [d("long", {"input_ids": list(range(100))}), "data.overlong=error"],
         "long.jsonl:2: sample has 99 positions after shifting"),
        ("no_assistant_turn", [d("na", {"messages": chat}), f"data.tokenizer={tok}"], "na.jsonl:2: no assistant turn"),
        ("bad_role", [d("br", {"messages": [{"role": "bot", "content": "x"}]}), f"data.tokenizer={tok}"],
         "br.jsonl:2: messages[0].role='bot'"),
        ("text_not_string", [d("ts", {"text": 5}), f"data.tokenizer={tok}"], 'ts.jsonl:2: "text" must be a string'),
        ("empty_response", [d("er", {"prompt": "hello", "response": ""}), f"data.tokenizer={tok}"],
         'er.jsonl:2: "response" is empty'),
        ("labels_shifted", [d("ls", {"input_ids": [1, 2, 3], "labels": [2, 3, -100]})],
         'ls.jsonl:2: "labels"[0] = 2 but "input_ids"[0] = 1'),
        ("batch_larger_than_data", [f"data.path={_data(t, 'few', [GOOD])}", "data.global_batch_size=2"],
         "data.global_batch_size=2 is larger than the dataset (1 samples)"),
    ]


def _edit_trainer_json(src: Path, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    state = json.loads((dst / "trainer.json").read_text())
    edit(state)
    (dst / "trainer.json").write_text(json.dumps(state))
    from chunkflow.train.checkpoint_files import write_manifest

    write_manifest(dst)  # vouch for the edit, so the checks behind the manifest's are reached
    return str(dst)


def _checkpoint_cases(t: Path, ckpt: Path) -> list[tuple[str, list[str], str]]:
    notckpt = t / "not_a_checkpoint"
    notckpt.mkdir()
    (t / "plain_file").write_text("x")
    half = t / "half"
    shutil.copytree(ckpt, half)
    (half / "model" / "metadata.json").unlink()
    corrupt = t / "corrupt"
    shutil.copytree(ckpt, corrupt)
    for shard in (corrupt / "model").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    vouched = t / "corrupt_vouched"  # the same damage under a manifest that agrees with it
    shutil.copytree(corrupt, vouched)
    from chunkflow.train.checkpoint_files import write_manifest

    write_manifest(vouched)
    lying = _edit_trainer_json(ckpt, t / "lying", lambda s: s["config"]["model"].update(hidden_size=64))
    pp2 = _edit_trainer_json(ckpt, t / "pp2", lambda s: s["config"]["parallel"].update(pipeline=2))
    dopt = _edit_trainer_json(ckpt, t / "dopt", lambda s: s["config"]["train"].update(distributed_optimizer=True))
    nostep = _edit_trainer_json(ckpt, t / "nostep", lambda s: s.pop("step"))
    return [
        ("ckpt_missing_dir", [f"train.load={t / 'gone'}"], f"train.load={t / 'gone'}: no such directory"),
        ("ckpt_is_a_file", [f"train.load={t / 'plain_file'}"], "is a file"),
        ("ckpt_not_a_checkpoint", [f"train.load={notckpt}"], "no trainer.json, not a chunkflow checkpoint"),
        ("ckpt_unfinished", [f"train.load={half}"], "no model/metadata.json"),
        ("ckpt_no_step", [f"train.load={nostep}"], "has no step"),
        ("ckpt_other_model_shape", [f"train.load={ckpt}", "model.hidden_size=64", "model.ffn_hidden_size=96"],
         "checkpoint has hidden_size 128 (config has 64), ffn_hidden_size 344 (config has 96)"),
        ("ckpt_shape_mismatch_in_shards", [f"train.load={lying}", "model.hidden_size=64"],
         f"train.load={lying}: cannot read it into this model: a tensor's shape differs"),
        ("ckpt_corrupt_shard", [f"train.load={corrupt}"], f"checkpoint {corrupt} is incomplete (file model/"),
        ("ckpt_corrupt_shard_vouched", [f"train.load={vouched}"], f"train.load={vouched}: cannot read it into this model"),
        ("ckpt_optimizer_layout", [f"train.load={pp2}"],
         "optimizer state saved with parallel.tensor=1 pipeline=2, this run has tensor=1 pipeline=1"),
        ("ckpt_distributed_optimizer", [f"train.load={dopt}"], "saved with train.distributed_optimizer=true"),
    ]


def _hf_weight_cases(t: Path) -> list[tuple[str, list[str], str]]:
    import torch
    from safetensors import torch as safetensors_torch

    from chunkflow.config.schema import ModelConfig
    from chunkflow.model.hf import hf_specs, model_fields_from_hf, read_hf_config

    hf_base = t / "hf_base.yaml"
    hf_base.write_text("data: {max_seq_len: 64, global_batch_size: 2}\nchunkflow: {chunk_size: 32}\n")

    def weights(name, edit):
        d = _hf_dir(t / name)
        m = ModelConfig(**model_fields_from_hf(read_hf_config(d)))
        tensors = {s.name: torch.zeros(s.shape) for s in hf_specs(m, torch.float32)}
        edit(tensors)
        safetensors_torch.save_file(tensors, d / "model.safetensors")
        return f"model.hf_dir={d}"

    def no_weights(name):
        return f"model.hf_dir={_hf_dir(t / name)}"

    cfg = ["--config", str(hf_base)]

    return [
        ("hf_missing_tensor", [*cfg, weights("mt", lambda ts: ts.pop("model.norm.weight"))],
         "missing tensor 'model.norm.weight'"),
        ("hf_wrong_shape", [*cfg, weights("ws", lambda ts: ts.update({"model.norm.weight": torch.zeros(65)}))],
         "tensor 'model.norm.weight' has shape (65,); expected (64,)"),
        ("hf_no_safetensors", [*cfg, no_weights("nw")], "no *.safetensors files"),
    ]


def _after_start_worker(rank, world, root: str):
    import multiprocessing

    multiprocessing.current_process().daemon = False  # megatron's checkpoint writer forks
    t = Path(root)
    finetune = _finetune()
    prev = t / "prev"
    base = ["--config", CONFIG, *SMALL]
    good = _run(finetune, [*base, f"train.output_dir={prev}"])
    from chunkflow.train.checkpoint import latest_checkpoint

    cases = _data_cases(t) + _checkpoint_cases(t, latest_checkpoint(prev)) + _hf_weight_cases(t)
    results = {"good": good}
    for name, overrides, expected in cases:
        before = _snapshot(prev)
        argv = ([*overrides, "train.steps=2"] if overrides[0] == "--config" else [*base, *overrides])
        code, out, err = _run(finetune, [*argv, f"train.output_dir={prev}"])
        results[name] = (code, out, err, expected, _snapshot(prev) == before)
    return results


@pytest.fixture(scope="module")
def after_start(tmp_path_factory):
    from chunkflow.parallel.spawn import run_distributed

    root = tmp_path_factory.mktemp("bad_inputs")
    return run_distributed(_after_start_worker, 1, args=(str(root),), timeout_s=900)[0]


def test_reference_run_succeeds(after_start):
    code, out, err = after_start["good"]
    assert code == 0 and "done: 2 steps" in out, (out, err)


AFTER_IDS = [c for c in (
    "malformed_json not_an_object no_known_key two_formats ids_not_list ids_floats ids_nested mask_length "
    "mask_value mask_with_text token_out_of_vocab negative_token one_token no_loss_token non_utf8 empty_file "
    "blank_lines_only data_file_missing text_without_tokenizer tokenizer_missing tokenizer_garbage "
    "overlong_error no_assistant_turn bad_role text_not_string empty_response labels_shifted "
    "batch_larger_than_data "
    "ckpt_missing_dir ckpt_is_a_file ckpt_not_a_checkpoint ckpt_unfinished ckpt_no_step ckpt_other_model_shape "
    "ckpt_shape_mismatch_in_shards ckpt_corrupt_shard ckpt_corrupt_shard_vouched ckpt_optimizer_layout ckpt_distributed_optimizer "
    "hf_missing_tensor hf_wrong_shape hf_no_safetensors").split()]


@pytest.mark.parametrize("name", AFTER_IDS)
def test_bad_input_after_start_is_one_line_exit_2(after_start, name):
    code, out, err, expected, unchanged = after_start[name]
    _assert_one_line(code, out, err, expected)
    assert unchanged, "the failing run changed the earlier output directory"


def test_every_after_start_case_is_asserted(after_start):
    assert set(after_start) - {"good"} == set(AFTER_IDS)
