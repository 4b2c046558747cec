"""Hugging Face conversion (issue 7), checked against transformers itself.

* parity: tiny random Qwen2 / Llama (GQA; Llama also with tied embeddings) loaded from
  the HF directory into TP=1, TP=2 and PP=2 layouts give transformers' logits to 1e-5;
* an imported checkpoint (written sharded for one layout, loaded into another) gives
  the same logits, and exporting it reproduces every tensor bit for bit;
* a short fine-tune started from an HF directory (its tokenizer, its architecture)
  exports to a directory transformers loads, with the chunkflow checkpoint's logits;
* unsupported architectures, wrong shapes and missing tensors are named in the error.

Models are created here with transformers' config classes (never downloaded); all the
megatron work of a test runs in one spawn of 2 gloo processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chunkflow.parallel.spawn import run_distributed

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

pytestmark = [pytest.mark.megatron]

ROOT = Path(__file__).resolve().parents[1]
TOKENS = [3, 17, 200, 45, 9, 128, 77, 1, 254, 33, 90, 12, 61, 5, 140, 222, 8, 19, 71, 100]
ARCHS = {  # name -> (family, layers, tied embeddings)
    "qwen2": ("qwen2", 4, False),
    "llama": ("llama", 2, False),
    "llama_tied": ("llama", 2, True),
}
LAYOUTS = {"tp1": [], "tp2": ["parallel.tensor=2"], "pp2": ["parallel.pipeline=2"]}
BASE = ["data.max_seq_len=64", "data.global_batch_size=2", "chunkflow.chunk_size=32"]


# --------------------------------------------------------------------------- helpers
def make_hf_model(family: str, layers: int, tied: bool, path: Path, seed: int = 0):
    """A random GQA model saved as safetensors; every weight (norms and biases too) random."""
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                  tie_word_embeddings=tied, max_position_embeddings=256)
    if family == "qwen2":
        config = transformers.Qwen2Config(rope_theta=1e6, **common)
        cls = transformers.Qwen2ForCausalLM
    else:
        config = transformers.LlamaConfig(rope_theta=5e5, **common)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
    model.save_pretrained(path)
    return model


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([TOKENS])).logits[0].float()


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["the quick brown fox jumps over the lazy dog", "long context fine tuning with chunks",
              "hello world again and again"] * 20
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"]))
    tok.save(str(path / "tokenizer.json"))


def megatron_logits(model, ctx, tokens) -> torch.Tensor | None:
    """Full-vocabulary logits ``(S, V)`` on the first TP/DP rank of the last stage."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    ids = torch.tensor([tokens])
    pos = torch.arange(len(tokens))[None]
    captured = {}

    def step(data_iterator, model):
        next(data_iterator)
        out = model(ids, pos, None)

        def loss_func(t):
            captured["logits"] = t.detach()
            return t.sum() * 0, torch.tensor(1), {}

        return out, loss_func

    get_forward_backward_func()(forward_step_func=step, data_iterator=iter([0]), model=[model],
                                num_microbatches=1, seq_length=len(tokens), micro_batch_size=1,
                                forward_only=True)
    if not ctx.is_last_stage:
        return None
    logits = captured["logits"][0].contiguous()  # (S, V / tp)
    if ctx.tp_size > 1:
        parts = [torch.empty_like(logits) for _ in range(ctx.tp_size)]
        dist.all_gather(parts, logits, group=ctx.tp_group)
        logits = torch.cat(parts, dim=-1)
    return logits if ctx.tp_rank == 0 and ctx.dp_rank == 0 else None


def _allow_checkpoint_writers() -> None:
    # megatron's checkpoint writer starts helper processes; run_distributed's ranks are
    # daemonic, which forbids children.
    import multiprocessing

    multiprocessing.current_process().daemon = False


def _model_for(overrides):
    from chunkflow.config import load_config
    from chunkflow.model.provider import build_model
    from chunkflow.parallel.distributed import init_distributed

    cfg = load_config(None, BASE + list(overrides))
    ctx = init_distributed(cfg)
    model = build_model(cfg, pre_process=ctx.is_first_stage, post_process=ctx.is_last_stage)
    return cfg, ctx, model


# --------------------------------------------------------------------------- workers
def _parity_worker(rank, world, dirs, imports, out_root):
    """Logits per (model, source, layout); imports: (model, import layout, load layout)."""
    import torch.distributed as dist

    from chunkflow.model.hf import load_hf_weights
    from chunkflow.hf_convert import export_hf, import_rank, layout_config
    from chunkflow.train.checkpoint import load_checkpoint

    _allow_checkpoint_writers()
    results = {}
    for name, hf_dir in dirs.items():
        for layout, overrides in LAYOUTS.items():
            cfg, ctx, model = _model_for([f"model.hf_dir={hf_dir}", *overrides])
            load_hf_weights(model, hf_dir, cfg.model, tp_rank=ctx.tp_rank, tp_size=ctx.tp_size)
            results[(name, "hf_dir", layout)] = megatron_logits(model, ctx, TOKENS)
    for name, import_layout, load_layout in imports:
        hf_dir, ckpt = dirs[name], f"{out_root}/{name}_{import_layout}"
        sizes = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}[import_layout]
        import_rank(hf_dir, ckpt, layout_config(hf_dir, tensor=sizes[0], pipeline=sizes[1]))
        # Load with the architecture from the checkpoint's own hf/ copy of config.json.
        cfg, ctx, model = _model_for([f"model.hf_dir={ckpt}/hf", *LAYOUTS[load_layout]])
        load_checkpoint(ckpt, model=model, optimizer=None)
        results[(name, f"import_{import_layout}", load_layout)] = megatron_logits(model, ctx, TOKENS)
        _model_for([f"model.hf_dir={hf_dir}"])  # TP=1/PP=1 groups for export
        if rank == 0:
            export_hf(ckpt, f"{ckpt}_export")
        dist.barrier()
    return {k: v for k, v in results.items() if v is not None}


def _finetune_worker(rank, world, hf_dir, data_path, out_dir):
    from chunkflow.train.checkpoint import load_checkpoint
    from chunkflow.train.trainer import Trainer

    _allow_checkpoint_writers()
    cfg, ctx, _ = _model_for([
        f"model.hf_dir={hf_dir}", f"data.path={data_path}", "parallel.pipeline=2",
        "data.global_batch_size=4", "train.steps=3", "train.lr=0.01", "train.warmup_steps=0",
        f"train.output_dir={out_dir}",
    ])
    summary = Trainer(cfg, ctx, log=lambda *a: None).train()
    _, ctx, fresh = _model_for([f"model.hf_dir={hf_dir}", "parallel.pipeline=2"])
    load_checkpoint(summary["checkpoint"], model=fresh, optimizer=None)
    return {"tokenizer": cfg.data.tokenizer, "checkpoint": summary["checkpoint"],
            "loss": (summary["first_loss"], summary["final_loss"]),
            "logits": megatron_logits(fresh, ctx, TOKENS)}


def _lora_finetune_worker(rank, world, hf_dir, data_path, out_dir):
    """Fine-tune LoRA adapters from an HF directory; logits of the adapted model."""
    from chunkflow.train.trainer import Trainer

    _allow_checkpoint_writers()
    cfg, ctx, _ = _model_for([
        f"model.hf_dir={hf_dir}", f"data.path={data_path}", "lora.enabled=true", "lora.rank=4",
        "data.global_batch_size=4", "train.steps=3", "train.lr=0.05", "train.warmup_steps=0",
        f"train.output_dir={out_dir}",
    ])
    trainer = Trainer(cfg, ctx, log=lambda *a: None)
    summary = trainer.train()
    return {"checkpoint": summary["checkpoint"], "logits": megatron_logits(trainer.model, ctx, TOKENS)}


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    dirs, ref, models = {}, {}, {}
    for i, (name, (family, layers, tied)) in enumerate(ARCHS.items()):
        dirs[name] = root / name
        models[name] = make_hf_model(family, layers, tied, dirs[name], seed=i)
        ref[name] = hf_logits(models[name])
        assert ref[name].std() > 0.5  # logits far from zero: 1e-5 is a real bound
    make_tokenizer(dirs["qwen2"])
    return root, dirs, ref


@pytest.fixture(scope="module")
def parity(hf_models):
    root, dirs, _ = hf_models
    imports = [("qwen2", "tp2", "pp2"), ("llama_tied", "pp2", "tp2")]
    per_rank = run_distributed(_parity_worker, 2, ({k: str(v) for k, v in dirs.items()}, imports, str(root)),
                               timeout_s=300)
    merged = {}
    for r in per_rank:
        merged.update(r)
    return merged


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(ARCHS))
def test_logits_match_transformers(hf_models, parity, name, layout):
    _, _, ref = hf_models
    got = parity[(name, "hf_dir", layout)]
    assert got.shape == ref[name].shape
    assert (got - ref[name]).abs().max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("name,import_layout,load_layout", [("qwen2", "tp2", "pp2"), ("llama_tied", "pp2", "tp2")])
def test_imported_checkpoint_logits_and_bitwise_round_trip(hf_models, parity, name, import_layout, load_layout):
    root, dirs, ref = hf_models
    got = parity[(name, f"import_{import_layout}", load_layout)]
    assert (got - ref[name]).abs().max() < 1e-5
    source = safetensors_torch.load_file(dirs[name] / "model.safetensors")
    exported_dir = root / f"{name}_{import_layout}_export"
    exported = safetensors_torch.load_file(exported_dir / "model.safetensors")
    assert sorted(exported) == sorted(source)
    for key, tensor in source.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    assert json.loads((exported_dir / "config.json").read_text()) == json.loads((dirs[name] / "config.json").read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported_dir).eval()
    assert torch.equal(hf_logits(reloaded), ref[name])


@pytest.mark.slow
def test_finetune_from_hf_dir_then_export(hf_models, tmp_path):
    _, dirs, ref = hf_models
    data = tmp_path / "data.jsonl"
    lines = ["the quick brown fox jumps over the lazy dog again and again",
             "long context fine tuning with chunks", "hello world"] * 4
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    results = run_distributed(_finetune_worker, 2, (str(dirs["qwen2"]), str(data), str(tmp_path / "run")),
                              timeout_s=300)
    last = results[1]
    assert results[0]["tokenizer"] == str(dirs["qwen2"] / "tokenizer.json")
    out = tmp_path / "exported"
    cli = subprocess.run([sys.executable, str(ROOT / "scripts/convert_hf.py"), "export", "--ckpt", last["checkpoint"],
                          "--hf-dir", str(out), "--max-shard-gb", "0.0001"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # streamed into several files
    shards = len(set(index["weight_map"].values()))  # progress: not a terminal, so one closing line
    assert re.search(rf"^export: \d+ parameters, [\d.]+ \w*B in \d+:\d\d:\d\d; into {shards} safetensors files$",
                     cli.stdout, re.M), cli.stdout
    assert (out / "tokenizer.json").read_text() == (dirs["qwen2"] / "tokenizer.json").read_text()
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    logits = hf_logits(model)
    assert (logits - ref["qwen2"]).abs().max() > 1e-2  # the run changed the weights
    assert (logits - last["logits"]).abs().max() < 1e-5


def test_lora_finetune_exports_merged_weights(hf_models, tmp_path):
    _, dirs, ref = hf_models
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["hello world again", "chunks of text"] * 4))
    (result,) = run_distributed(_lora_finetune_worker, 1, (str(dirs["qwen2"]), str(data), str(tmp_path / "run")),
                                timeout_s=300)
    out = tmp_path / "exported"
    cli = subprocess.run([sys.executable, str(ROOT / "scripts/convert_hf.py"), "export", "--ckpt",
                          result["checkpoint"], "--hf-dir", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert cli.returncode == 0, cli.stderr[-3000:]
    logits = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval())
    assert (logits - ref["qwen2"]).abs().max() > 1e-3  # the adapters changed the model
    assert (logits - result["logits"]).abs().max() < 1e-5  # merged export == adapted model


# --------------------------------------------------------------------------- errors
def _tiny_llama_dir(path: Path, **config) -> Path:
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 96, "num_hidden_layers": 1, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False, **config}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    return path


def _write_weights(path: Path, edit=None) -> None:
    from chunkflow.config.schema import ModelConfig
    from chunkflow.model.hf import hf_specs, model_fields_from_hf, read_hf_config

    m = ModelConfig(**model_fields_from_hf(read_hf_config(path)))
    tensors = {s.name: torch.zeros(s.shape) for s in hf_specs(m, torch.float32)}
    if edit:
        edit(tensors)
    safetensors_torch.save_file(tensors, path / "model.safetensors")


def test_unsupported_architecture_is_named(tmp_path):
    from chunkflow.config import ConfigError, load_config

    d = _tiny_llama_dir(tmp_path / "m", architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(ConfigError, match="MistralForCausalLM"):
        load_config(None, [f"model.hf_dir={d}"])
    cli = subprocess.run([sys.executable, str(ROOT / "scripts/convert_hf.py"), "import", "--hf-dir", str(d),
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "architecture 'MistralForCausalLM' is not supported" in cli.stderr


def test_rope_scaling_and_vocab_split_are_refused(tmp_path):
    from chunkflow.config import ConfigError, load_config

    d = _tiny_llama_dir(tmp_path / "a", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})
    with pytest.raises(ConfigError, match="rope type 'llama3'"):
        load_config(None, [f"model.hf_dir={d}"])
    d = _tiny_llama_dir(tmp_path / "b", vocab_size=255)
    with pytest.raises(ConfigError, match=r"vocab_size=255 is not divisible by parallel.tensor=2"):
        load_config(None, [f"model.hf_dir={d}", "parallel.tensor=2"])


def test_config_comes_from_hf_dir(tmp_path):
    from chunkflow.config import ConfigError, load_config

    d = _tiny_llama_dir(tmp_path / "m", rope_theta=5e5, rms_norm_eps=1e-5, tie_word_embeddings=True)
    (d / "tokenizer.json").write_text("{}")
    cfg = load_config(None, [f"model.hf_dir={d}"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_query_groups) == (1, 64, 96, 2)
    assert (m.rope_base, m.norm_epsilon, m.qkv_bias, m.tie_embeddings) == (5e5, 1e-5, False, True)
    assert cfg.data.tokenizer == str(d / "tokenizer.json")
    with pytest.raises(ConfigError, match=r"model.num_layers=7 \(config.json: 1\)"):
        load_config(None, [f"model.hf_dir={d}", "model.num_layers=7"])  # refused, not overridden


def test_wrong_shape_and_missing_tensor_are_named(tmp_path):
    from chunkflow.config.schema import ModelConfig
    from chunkflow.model.hf import HFError, check_hf_tensors, model_fields_from_hf, read_hf_config
    from chunkflow.model.safetensors_stream import SafetensorsReader

    d = _tiny_llama_dir(tmp_path / "m")
    m = ModelConfig(**model_fields_from_hf(read_hf_config(d)))
    key = "model.layers.0.self_attn.k_proj.weight"
    _write_weights(d, lambda t: t.__setitem__(key, torch.zeros(64, 64)))
    with pytest.raises(HFError, match=rf"tensor '{key}' has shape \(64, 64\); expected \(32, 64\)"):
        check_hf_tensors(SafetensorsReader(d), m)
    _write_weights(d, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(HFError, match=r"missing tensor 'model.norm.weight' \(expected shape \(64,\)\)"):
        check_hf_tensors(SafetensorsReader(d), m)
    _write_weights(d, lambda t: t.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.zeros(64)))
    with pytest.raises(HFError, match="unexpected tensors.*o_proj.bias"):
        check_hf_tensors(SafetensorsReader(d), m)


def test_streaming_writer_matches_safetensors(tmp_path):
    from chunkflow.model.safetensors_stream import SafetensorsReader, SafetensorsWriter, TensorSpec

    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)}
    plan = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    writer = SafetensorsWriter(tmp_path, plan, max_shard_bytes=64)
    for k, v in tensors.items():
        writer.write(k, v)
    files = writer.close()
    assert len(files) == 2 and (tmp_path / "model.safetensors.index.json").is_file()
    reader = SafetensorsReader(tmp_path)
    for k, v in tensors.items():
        assert torch.equal(reader.read(k), v) and reader.dtype(k) == v.dtype
    assert torch.equal(reader.read("a", 1, 2, 4), tensors["a"][:, 2:4])
    with pytest.raises(ValueError, match="expected tensor 'a' next"):
        SafetensorsWriter(tmp_path / "x", plan).write("b", tensors["b"])


def test_convert_cli_names_a_missing_checkpoint_and_exits_2(tmp_path, capsys):
    """chunkflow-convert's bad input is one line and exit code 2, not a traceback."""
    from chunkflow.hf_convert import main

    import os

    env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    assert main(["export", "--ckpt", str(tmp_path / "nope"), "--hf-dir", str(tmp_path / "out")]) == 2
    # the in-process group's rendezvous does not leak into later launches (e.g. an sbatch)
    assert {k: os.environ.get(k) for k in env} == env
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "nope" in err[0], err
    assert not (tmp_path / "out").exists()  # nothing half-written
