"""Config tree: YAML + overrides, clear errors for typos, bad numbers and impossible
layouts; model.hf_dir and its explicit-field conflicts; the config layer's imports."""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import typing
from pathlib import Path

import pytest
import yaml

from chunkflow.config import ConfigError, dump_config, load_config, validate_layout
from chunkflow.config.schema import Config
from chunkflow.config.validate import CHOICES, CROSS_CHECKED, NUMBER_RULES

ROOT = Path(__file__).resolve().parents[1]


def _schema_leaves(cls: type = Config, prefix: str = "") -> dict[str, typing.Any]:
    """dotted key -> declared type of every non-section field of the schema."""
    out = {}
    for f in dataclasses.fields(cls):
        typ = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(_schema_leaves(typ, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = typ
    return out


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 7\nmodel:\n  hidden_size: 256\n")
    cfg = load_config(f, ["train.steps=9", "parallel.pipeline=2", "data.overlong=drop"])
    assert cfg.train.steps == 9  # override beats YAML
    assert cfg.model.hidden_size == 256  # YAML beats default
    assert cfg.model.num_layers == 4  # default kept
    assert cfg.parallel.pipeline == 2 and cfg.data.overlong == "drop"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.stpes=3", "unknown config key 'train.stpes'; did you mean 'train.steps'"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean 'train'"),
        ("chunkflow.chunksize=64", "did you mean 'chunkflow.chunk_size'"),
        ("train.steps=abc", "train.steps: expected an integer"),
        ("train.schedule=fast", "train.schedule='fast' is not one of megatron, chunkflow"),
        ("train.recompute=most", "train.recompute='most' is not one of none, selective, block, full"),
        ("bench.safe_probes=true", "bench.safe_probes: expected one of auto, always, never, got True "
                                   "(YAML reads true/false/on/off as booleans)"),
        ("train", "not of the form key=value"),
        ("model=3", "'model' is a section"),
    ],
)
def test_bad_overrides_name_the_key(override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert expected in str(e.value)


def test_unknown_yaml_key_names_its_path(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  max_seq_length: 10\n")
    with pytest.raises(ConfigError, match=r"'data.max_seq_length'; did you mean 'max_seq_len'"):
        load_config(f)


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["parallel.pipeline=3"], "parallel.pipeline=3 does not divide model.num_layers=4; use one of 1, 2, 4"),
        (["parallel.tensor=4"], "parallel.tensor=4 must divide model.num_attention_heads=4 and model.num_query_groups=2; use one of 1, 2"),
        (["model.num_query_groups=3"], "use one of 1, 2, 4"),
        (["chunkflow.chunk_size=0"], "chunkflow.chunk_size=0 is invalid"),
        (["chunkflow.chunk_size=4096"], "no larger than data.max_seq_len=1024"),
        (["parallel.tensor=2", "parallel.sequence_parallel=true", "chunkflow.chunk_size=255"],
         "use a positive multiple of 2"),
        (["chunkflow.k=0"], "chunkflow.k=0 is invalid"),
    ],
)
def test_impossible_settings_say_what_would_work(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)


def test_layout_against_world_size_lists_fitting_layouts():
    cfg = load_config(None, ["parallel.tensor=2", "parallel.pipeline=2"])
    assert validate_layout(cfg, 8) == 2
    with pytest.raises(ConfigError) as e:
        validate_layout(cfg, 6)
    msg = str(e.value)
    assert "does not divide the world size 6" in msg
    assert "tensor=2 x pipeline=1" in msg and "tensor=1 x pipeline=2" in msg
    assert "tensor=3" not in msg  # 3 does not divide 4 heads


def test_layout_errors_before_any_process_group(monkeypatch):
    import torch.distributed as dist

    from chunkflow.parallel.distributed import init_distributed

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = load_config(None, ["parallel.pipeline=2"])
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        init_distributed(cfg)
    assert not dist.is_initialized()


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    # None of them sets model.hf_dir: they load (and pass the large-model rule) without
    # any Hugging Face directory present.
    cfg = load_config(path)
    assert cfg.model.hf_dir == ""
    world = cfg.parallel.tensor * cfg.parallel.pipeline
    assert validate_layout(cfg, world) == 1


def test_tiny_config_is_qwen2_shaped():
    cfg = load_config(ROOT / "configs" / "tiny_cpu.yaml")
    m = cfg.model
    assert m.num_query_groups < m.num_attention_heads and m.qkv_bias and not m.tie_embeddings
    assert cfg.parallel.pipeline == 2 and m.dtype == "fp32"


def test_qwen7b_config_matches_the_released_architecture():
    from chunkflow.model.provider import build_transformer_config

    cfg = load_config(ROOT / "configs" / "qwen7b_32k.yaml")
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.num_attention_heads, m.num_query_groups) == (28, 3584, 28, 4)
    assert (m.ffn_hidden_size, m.vocab_size, m.rope_base, m.norm_epsilon) == (18944, 152064, 1e6, 1e-6)
    assert m.qkv_bias and not m.tie_embeddings and m.dtype == "bf16"
    assert cfg.data.max_seq_len == 32768
    tc = build_transformer_config(cfg)  # builds the megatron config without allocating weights
    assert tc.num_query_groups == 4 and tc.kv_channels == 128 and tc.bf16


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=11", "chunkflow.k=3"])
    dump_config(cfg, tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["train"]["steps"] == 11
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_tensor_size_must_divide_vocab_and_ffn():
    with pytest.raises(ConfigError, match=r"parallel.tensor=2 does not divide model.vocab_size=511"):
        load_config(None, ["parallel.tensor=2", "model.vocab_size=511"])
    with pytest.raises(ConfigError, match=r"model.ffn_hidden_size=345.*use one of 1"):
        load_config(None, ["parallel.tensor=2", "model.ffn_hidden_size=345"])


# ------------------------------------------------------------------ every number, every name
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.log_every=0"], "train.log_every=0 is invalid: use an integer >= 1"),
        (["train.save_every=-1"], "train.save_every=-1 is invalid: use an integer >= 0"),
        (["train.lr=nan"], "train.lr=nan is not a finite number: use a number > 0"),
        (["train.lr=.inf"], "train.lr=inf is not a finite number"),
        (["train.lr=0"], "train.lr=0.0 is invalid: use a number > 0"),
        (["train.min_lr=-1e-5"], "train.min_lr=-1e-05 is invalid: use a number >= 0"),
        (["train.min_lr=0.01"], "train.min_lr=0.01 exceeds train.lr=0.001"),
        (["train.warmup_steps=-1"], "train.warmup_steps=-1 is invalid: use an integer >= 0"),
        (["train.grad_clip=-1"], "train.grad_clip=-1.0 is invalid: use a number >= 0"),
        (["train.steps=0"], "train.steps=0 is invalid: use an integer >= 1"),
        (["train.weight_decay=-0.1"], "train.weight_decay=-0.1 is invalid: use a number >= 0"),
        (["train.adam_beta1=1"], "train.adam_beta1=1.0 is invalid: use a number in [0, 1)"),
        (["train.adam_beta2=-0.5"], "train.adam_beta2=-0.5 is invalid: use a number in [0, 1)"),
        (["train.adam_eps=0"], "train.adam_eps=0.0 is invalid: use a number > 0"),
        (["train.seed=-1"], "train.seed=-1 is invalid: use an integer >= 0"),
        (["parallel.threads_per_rank=0"], "parallel.threads_per_rank=0 is invalid: use an integer >= 1"),
        (["parallel.timeout_s=0"], "parallel.timeout_s=0 is invalid: use an integer >= 1"),
        (["parallel.tensor=0"], "parallel.tensor=0 is invalid: use an integer >= 1"),
        (["parallel.pipeline=-2"], "parallel.pipeline=-2 is invalid: use an integer >= 1"),
        (["data.global_batch_size=0"], "data.global_batch_size=0 is invalid: use an integer >= 1"),
        (["data.max_seq_len=0"], "data.max_seq_len=0 is invalid: use an integer >= 1"),
        (["data.pad_to_multiple=0"], "data.pad_to_multiple=0 is invalid: use an integer >= 1"),
        (["data.seed=-3"], "data.seed=-3 is invalid: use an integer >= 0"),
        (["chunkflow.chunk_size=-8"], "chunkflow.chunk_size=-8 is invalid: use a positive integer"),
        (["chunkflow.k=0"], "chunkflow.k=0 is invalid: use an integer >= 1"),
        (["chunkflow.spaco.budget=nan"], "chunkflow.spaco.budget=nan is not a finite number"),
        (["chunkflow.spaco.max_factor=.inf"], "chunkflow.spaco.max_factor=inf is not a finite number"),
        (["model.num_layers=0"], "model.num_layers=0 is invalid: use an integer >= 1"),
        (["model.hidden_size=-128"], "model.hidden_size=-128 is invalid: use an integer >= 1"),
        (["model.ffn_hidden_size=0"], "model.ffn_hidden_size=0 is invalid"),
        (["model.num_attention_heads=0"], "model.num_attention_heads=0 is invalid"),
        (["model.num_query_groups=0"], "model.num_query_groups=0 is invalid"),
        (["model.vocab_size=0"], "model.vocab_size=0 is invalid"),
        (["model.init_std=0"], "model.init_std=0.0 is invalid: use a number > 0"),
        (["model.norm_epsilon=-1e-6"], "model.norm_epsilon=-1e-06 is invalid: use a number > 0"),
        (["model.rope_base=0"], "model.rope_base=0.0 is invalid: use a number > 0"),
        (["model.rope_base=nan"], "model.rope_base=nan is not a finite number"),
        (["bench.warmup_steps=0"], "bench.warmup_steps=0 is invalid: use an integer >= 1"),
        (["bench.timed_steps=0"], "bench.timed_steps=0 is invalid: use an integer >= 1"),
        (["bench.memory_budget_mb=-1"], "bench.memory_budget_mb=-1.0 is invalid: use a number >= 0"),
        (["bench.peak_mem_budget_mb=nan"], "bench.peak_mem_budget_mb=nan is not a finite number"),
        (["bench.sweep_k=2,0"], "bench.sweep_k=[2, 0] is invalid (0): use an integer >= 1 for each entry"),
        (["bench.sweep_chunk_sizes=-64"], "bench.sweep_chunk_sizes=[-64] is invalid (-64)"),
        (["lora.rank=0"], "lora.rank=0 is invalid: use an integer >= 1"),
        (["lora.alpha=0"], "lora.alpha=0.0 is invalid: use a number > 0"),
        (["lora.dropout=1"], "lora.dropout=1.0 is invalid: use a number in [0, 1)"),
        (["lora.targets=q_proj,qkv"], "lora.targets=['q_proj', 'qkv'] is invalid (qkv): use one or more of"),
        (["data.synthetic.num_samples=0"], "data.synthetic.num_samples=0 is invalid"),
        (["data.synthetic.short_fraction=1.5"], "data.synthetic.short_fraction=1.5 is invalid: use a fraction in [0, 1]"),
        (["data.synthetic.medium_fraction=nan"], "data.synthetic.medium_fraction=nan is not a finite number"),
        (["data.synthetic.short_fraction=0.5"], "short_fraction + medium_fraction + long_fraction = 0.6"),
        (["data.synthetic.max_len_fraction=0.05"], "data.synthetic.max_len_fraction=0.05 exceeds data.synthetic.long_fraction=0.02"),
        (["data.synthetic.min_len=0"], "data.synthetic.min_len=0 must be in [1, data.max_seq_len=1024]"),
    ],
)
def test_bad_values_name_the_key_and_the_fix(overrides, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert expected in str(e.value)


def test_every_number_has_a_rule_and_every_rule_a_field():
    leaves = _schema_leaves()
    numeric = {k for k, t in leaves.items() if t in (int, float) or typing.get_args(t) in ((int,), (float,))}
    assert numeric - set(NUMBER_RULES) - set(CROSS_CHECKED) == set()
    assert set(NUMBER_RULES) | set(CROSS_CHECKED) | set(CHOICES) <= set(leaves)


@pytest.mark.parametrize("key", sorted(k for k, t in _schema_leaves().items() if t is float))
@pytest.mark.parametrize("bad", ["nan", "-.inf"])
def test_no_float_field_accepts_nan_or_inf(key, bad):
    # NaN compares False with everything, so a range check alone lets it through.
    with pytest.raises(ConfigError, match=rf"^{key}=(nan|-inf) is not a finite number"):
        load_config(None, [f"{key}={bad}"])


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_enumeration_is_checked(key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}=bogus"])
    assert str(e.value).startswith(f"{key}=") and "bogus" in str(e.value)
    assert ", ".join(CHOICES[key]) in str(e.value)


def test_parallel_backend_choices():
    assert load_config(None, ["parallel.backend=gloo"]).parallel.backend == "gloo"
    with pytest.raises(ConfigError, match="parallel.backend='mpi' is not one of auto, gloo, nccl"):
        load_config(None, ["parallel.backend=mpi"])


# ------------------------------------------------------------------ model.hf_dir
def _hf_dir(path: Path, **changes) -> Path:
    path.mkdir(parents=True)
    hf = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
          "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
          "tie_word_embeddings": False, "initializer_range": 0.02}
    hf.update(changes)
    (path / "config.json").write_text(json.dumps(hf))
    return path


def test_hf_dir_announces_the_fields_it_sets(tmp_path, caplog):
    d = _hf_dir(tmp_path / "m")
    with caplog.at_level(logging.INFO, logger="chunkflow.config.loader"):
        cfg = load_config(None, [f"model.hf_dir={d}"])
    m = cfg.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads) == (2, 64, 96, 4)
    assert (m.num_query_groups, m.vocab_size, m.rope_base) == (2, 256, 1e6)
    assert ("model.hf_dir sets num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, "
            "num_query_groups=2, vocab_size=256, rope_base=1000000.0") in caplog.text


@pytest.mark.parametrize("where", ["override", "yaml"])
def test_hf_dir_refuses_a_conflicting_explicit_field(tmp_path, where):
    d = _hf_dir(tmp_path / "m")
    f = tmp_path / "c.yaml"
    f.write_text(f"model:\n  hf_dir: {d}\n" + ("  num_layers: 4\n  vocab_size: 512\n" if where == "yaml" else ""))
    overrides = ["model.num_layers=4", "model.vocab_size=512"] if where == "override" else []
    with pytest.raises(ConfigError) as e:
        load_config(f, overrides)
    msg = str(e.value)
    assert f"model.hf_dir={d}" in msg
    assert "model.num_layers=4 (config.json: 2)" in msg and "model.vocab_size=512 (config.json: 256)" in msg
    assert "drop the explicit value(s)" in msg and "or drop model.hf_dir" in msg


def test_hf_dir_accepts_agreeing_fields_and_its_resolved_config_reloads(tmp_path):
    d = _hf_dir(tmp_path / "m")
    cfg = load_config(None, [f"model.hf_dir={d}", "model.num_layers=2", "model.rope_base=1e6"])
    assert cfg.model.num_layers == 2
    dump_config(cfg, tmp_path / "resolved.yaml")  # every field explicit, all agreeing
    assert load_config(tmp_path / "resolved.yaml") == cfg
    # A non-architecture model field (dtype) stays the user's.
    assert load_config(None, [f"model.hf_dir={d}", "model.dtype=fp64"]).model.dtype == "fp64"


# ------------------------------------------------------------------ large model, tiny defaults
def test_large_model_with_tiny_defaults_is_refused():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.hidden_size=3584"])
    msg = str(e.value)
    assert ("model.num_layers=4, model.ffn_hidden_size=344, model.num_attention_heads=4, "
            "model.vocab_size=512 are still the tiny CPU default") in msg
    assert "model.hf_dir" in msg
    big = ["model.hidden_size=3584", "model.num_attention_heads=28", "model.num_query_groups=4",
           "model.ffn_hidden_size=18944", "model.num_layers=28"]
    with pytest.raises(ConfigError, match=r"but model.vocab_size=512 is still the tiny CPU default"):
        load_config(None, big)
    # The same values set on purpose are accepted, and so is a mid-size model.
    assert load_config(None, big + ["model.vocab_size=512"]).model.vocab_size == 512
    assert load_config(None, ["model.hidden_size=512"]).model.hidden_size == 512
    with pytest.raises(ConfigError, match="tiny CPU default"):
        load_config(None, ["model.hidden_size=1024"])  # the threshold itself


def test_large_model_from_hf_dir_is_not_tiny(tmp_path):
    d = _hf_dir(tmp_path / "m", hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                num_hidden_layers=4, vocab_size=512, intermediate_size=344)
    m = load_config(None, [f"model.hf_dir={d}"]).model  # same numbers as the defaults, but set
    assert (m.hidden_size, m.num_layers, m.vocab_size) == (1024, 4, 512)


# ------------------------------------------------------------------ imports run one way
def test_config_imports_nothing_above_it():
    for path in sorted((ROOT / "chunkflow" / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("chunkflow.") or name.startswith("chunkflow.config"), (path.name, name)
                assert name.split(".")[0] != "torch", (path.name, name)


def test_qwen7b_config_with_released_hf_dir_loads(tmp_path):
    # README: --config configs/qwen7b_32k.yaml model.hf_dir=/models/Qwen2.5-7B. The YAML's
    # explicit architecture agrees with the released config.json, so this is no conflict.
    d = _hf_dir(tmp_path / "qwen2.5-7b", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, rope_theta=1000000.0,
                rms_norm_eps=1e-06, max_position_embeddings=131072, use_sliding_window=False,
                torch_dtype="bfloat16")
    cfg = load_config(ROOT / "configs" / "qwen7b_32k.yaml", [f"model.hf_dir={d}"])
    assert (cfg.model.num_layers, cfg.model.vocab_size, cfg.model.dtype) == (28, 152064, "bf16")
    with pytest.raises(ConfigError, match=r"model.num_layers=28 \(config.json: 24\)"):
        load_config(ROOT / "configs" / "qwen7b_32k.yaml", [f"model.hf_dir={_hf_dir(tmp_path / 'other', num_hidden_layers=24)}"])
