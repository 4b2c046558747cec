"""Config tree: YAML + overrides, clear errors for typos and impossible layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chunkflow.config import ConfigError, dump_config, load_config, validate_layout

ROOT = Path(__file__).resolve().parents[1]


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
        ("train.recompute=most", "train.recompute='most' is not one of none, selective, full"),
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


@pytest.mark.parametrize("name", ["tiny_cpu.yaml", "qwen7b_32k.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(ROOT / "configs" / name)
    assert validate_layout(cfg, {"tiny_cpu.yaml": 2, "qwen7b_32k.yaml": 8}[name]) >= 1


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
