"""The token store: prepared once, memory-mapped, equal to reading the JSONL; Megatron's
indexed files; the trainer's cached preparation of a JSONL data.path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from chunkflow.config import load_config
from chunkflow.data.dataset import load_samples
from chunkflow.data.loader import GlobalBatchLoader, StepPlanLoader
from chunkflow.data.prepare import prepare_store
from chunkflow.data.reader import DataError, read_jsonl
from chunkflow.data.store import FILES, StoreDataset, TokenStore, is_store
from chunkflow.train.data_cache import resolve_data

WORDS = "hello world how are you fine thanks and the quick brown fox jumps over lazy dog"
VOCAB = 512


def _tokenizer(path: Path, extra: str = "") -> str:
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS + extra, "system user assistant"], trainers.WordLevelTrainer(
        special_tokens=["[UNK]", "<|im_start|>", "<|im_end|>"]))
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    return str(path)


def _write(path: Path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


def _corpus(path: Path, num: int = 60, seed: int = 0) -> str:
    """Every format, blank lines, lengths 2..40, some samples with loss late in the sample."""
    rng = np.random.default_rng(seed)
    words = WORDS.split()
    lines: list = []
    for i in range(num):
        n = int(rng.integers(2, 40))
        kind = i % 4
        if kind == 0:
            lines.append({"input_ids": rng.integers(0, VOCAB, n).tolist()})
        elif kind == 1:  # loss only on the last tokens: truncation may cut all of it
            lines.append({"input_ids": rng.integers(0, VOCAB, n).tolist(),
                          "loss_mask": [0] * (n - 2) + [1, 1]})
        elif kind == 2:
            lines.append({"text": " ".join(rng.choice(words, n))})
        else:
            lines.append({"messages": [{"role": "user", "content": " ".join(rng.choice(words, 3))},
                                       {"role": "assistant", "content": " ".join(rng.choice(words, n))}]})
        if i % 17 == 0:
            lines.append("   ")
    return _write(path, lines)


def _data_cfg(path: str, tokenizer: str = "", **kw):
    cfg = load_config(None, [])
    return dataclasses.replace(cfg.data, path=path, tokenizer=tokenizer, **kw)


def _same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.sample_id == y.sample_id
        for field in ("input_ids", "labels", "loss_mask"):
            ax, ay = getattr(x, field), getattr(y, field)
            assert ax.dtype == ay.dtype and np.array_equal(ax, ay), (x.sample_id, field)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    t = tmp_path_factory.mktemp("store")
    tok = _tokenizer(t / "tok")
    data = _corpus(t / "data.jsonl")
    summary = prepare_store([data], out=t / "store", tokenizer=tok, workers=1, batch_lines=7)
    return SimpleNamespace(t=t, tok=tok, data=data, store=str(t / "store"), summary=summary)


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_store_round_trip_equals_read_jsonl(prepared, overlong):
    from chunkflow.data.tokenizer import load_tokenizer

    for max_seq_len in (1024, 20):  # nothing overlong / a third of the samples overlong
        want, stats = read_jsonl(prepared.data, max_seq_len=max_seq_len, vocab_size=VOCAB,
                                 overlong=overlong, tokenizer=load_tokenizer(prepared.tok))
        got, desc = load_samples(_data_cfg(prepared.store, prepared.tok, max_seq_len=max_seq_len,
                                           overlong=overlong), vocab_size=VOCAB)
        assert isinstance(got, StoreDataset) and prepared.store in desc
        _same(got, want)
        assert (got.truncated, got.dropped, got.dropped_no_loss) == (
            stats.truncated, stats.dropped, stats.dropped_no_loss)
    assert stats.truncated + stats.dropped > 0 and (overlong == "drop" or stats.dropped_no_loss > 0)
    s = prepared.summary
    assert (s.samples, s.blank) == (60, 4)
    assert s.tokens == sum(len(x) + 1 for x in read_jsonl(prepared.data, max_seq_len=1024, vocab_size=VOCAB,
                                                          tokenizer=load_tokenizer(prepared.tok))[0])
    assert sum(count for _, _, count in s.histogram) == 60


def test_overlong_error_names_the_line_and_the_store(prepared):
    with pytest.raises(DataError, match=r"data\.jsonl:\d+: sample has \d+ positions after shifting.*"
                                        r"sample \d+ of the store"):
        load_samples(_data_cfg(prepared.store, prepared.tok, max_seq_len=20), vocab_size=VOCAB)


def test_workers_give_byte_identical_stores_and_a_rerun_is_a_no_op(prepared):
    out = prepared.t / "store2"
    two = prepare_store([prepared.data], out=out, tokenizer=prepared.tok, workers=2, batch_lines=7)
    assert not two.up_to_date
    for name, _ in FILES.values():
        assert (out / name).read_bytes() == (Path(prepared.store) / name).read_bytes(), name
    index = out / "index.json"
    before = index.stat().st_mtime_ns
    again = prepare_store([prepared.data], out=out, tokenizer=prepared.tok, workers=2)
    assert again.up_to_date and index.stat().st_mtime_ns == before
    assert "up to date" in again.lines_of_text()[0]
    other_tok = _tokenizer(prepared.t / "tok2", extra=" extra words")  # another tokenizer: redo
    assert not prepare_store([prepared.data], out=out, tokenizer=other_tok, workers=1).up_to_date


def test_an_interrupted_run_leaves_no_complete_looking_store(prepared):
    out = prepared.t / "interrupted"

    def stop(lines: int, tokens: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare_store([prepared.data], out=out, tokenizer=prepared.tok, workers=1, batch_lines=7,
                      on_progress=stop)
    assert not out.exists() and not list(prepared.t.glob(".interrupted.partial-*"))
    # an older store under the same name survives a failed rewrite untouched
    prepare_store([prepared.data], out=out, tokenizer=prepared.tok, workers=1)
    bad = _write(prepared.t / "later_bad.jsonl", [{"input_ids": [1, 2]}, '{"input_ids": [1'])
    with pytest.raises(DataError, match=r"later_bad\.jsonl:2: malformed JSON"):
        prepare_store([bad], out=out, workers=1)
    assert is_store(out) and TokenStore(out).num_samples == 60
    # a store whose files do not match its index is refused, named
    (out / "tokens.bin").write_bytes(b"\0" * 8)
    with pytest.raises(DataError, match="tokens.bin: 8 bytes, the index says"):
        TokenStore(out)


def test_tokenizer_mismatch_and_vocab_overflow_are_refused(prepared):
    other = _tokenizer(prepared.t / "tok_other", extra=" different")
    with pytest.raises(DataError, match="prepared with the tokenizer .* differs"):
        load_samples(_data_cfg(prepared.store, other), vocab_size=VOCAB)
    top = TokenStore(prepared.store).max_token_id
    with pytest.raises(DataError, match=rf"data\.jsonl:\d+: token id {top} at position \d+ is outside "
                                        rf"\[0, {top}\)"):
        load_samples(_data_cfg(prepared.store, prepared.tok), vocab_size=top)
    load_samples(_data_cfg(prepared.store, prepared.tok), vocab_size=top + 1)  # just enough


def test_loader_over_a_store_plans_and_resumes_like_jsonl(prepared):
    from test_loader import plan_key

    cfg = load_config(None, ["data.global_batch_size=8", "data.max_seq_len=32", "data.overlong=drop",
                             "chunkflow.chunk_size=16", "train.schedule=chunkflow"])
    from chunkflow.data.tokenizer import load_tokenizer

    jsonl, _ = read_jsonl(prepared.data, max_seq_len=32, vocab_size=VOCAB, overlong="drop",
                          tokenizer=load_tokenizer(prepared.tok))
    store, _ = load_samples(dataclasses.replace(cfg.data, path=prepared.store), vocab_size=VOCAB)
    a = StepPlanLoader.from_config(cfg, jsonl, dp_size=2)
    b = StepPlanLoader.from_config(cfg, store, dp_size=2)
    for _ in range(9):  # past an epoch boundary
        assert plan_key(a.next()) == plan_key(b.next())
    state = json.loads(json.dumps(b.state_dict()))
    expected = [plan_key(b.next()) for _ in range(4)]
    resumed = StepPlanLoader.from_config(cfg, load_samples(
        dataclasses.replace(cfg.data, path=prepared.store), vocab_size=VOCAB)[0], dp_size=2)
    resumed.load_state_dict(state)
    assert [plan_key(resumed.next()) for _ in range(4)] == expected


@pytest.mark.megatron
def test_megatron_indexed_files_are_read_with_every_token_trained(tmp_path):
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(3)
    docs = [rng.integers(0, VOCAB, int(n)).tolist() for n in rng.integers(2, 30, 25)]
    prefix = tmp_path / "corpus_text_document"
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.uint16)
    for doc in docs:
        builder.add_item(torch.tensor(doc, dtype=torch.int64))
        builder.end_document()
    builder.finalize(str(prefix) + ".idx")
    want, _ = read_jsonl(_write(tmp_path / "same.jsonl", [{"input_ids": d} for d in docs]),
                         max_seq_len=1024, vocab_size=VOCAB)
    for path in (str(prefix), str(prefix) + ".bin", str(prefix) + ".idx"):
        got, desc = load_samples(_data_cfg(path), vocab_size=VOCAB)
        assert "every token trains" in desc
        _same(got, want)
    assert all(s.loss_mask.all() for s in got)
    with pytest.raises(DataError, match=r"corpus_text_document\.bin: sample \d+: sample has"):
        load_samples(_data_cfg(str(prefix), max_seq_len=5), vocab_size=VOCAB)
    truncated, _ = load_samples(_data_cfg(str(prefix), max_seq_len=5, overlong="truncate"), vocab_size=VOCAB)
    assert max(len(s) for s in truncated) == 5 and len(truncated) == len(docs)
    small = load_samples(_data_cfg(str(prefix)), vocab_size=10)[0]  # ids checked per sample
    with pytest.raises(DataError, match=r"corpus_text_document\.bin: sample \d+: token id"):
        [small[i] for i in range(len(small))]


class _KV:
    """The launcher's key-value store as the other ranks see it."""

    def __init__(self) -> None:
        self.values: dict = {}

    def set(self, key, value):
        self.values[key] = value.encode()

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key]


def test_training_prepares_a_jsonl_path_once_into_the_cache(prepared, tmp_path):
    import chunkflow.train.data_cache as data_cache

    cfg = load_config(None, [f"data.path={prepared.data}", f"data.tokenizer={prepared.tok}",
                             f"train.output_dir={tmp_path / 'run'}", "data.prepare_workers=1"])
    rank0, rank1 = SimpleNamespace(rank=0, world_size=2), SimpleNamespace(rank=1, world_size=2)
    kv, said = _KV(), []
    calls = data_cache._calls
    data0 = resolve_data(cfg, rank0, log=said.append, kv=kv)
    data_cache._calls = calls  # rank 1 in its own process: the same call count, the same key
    assert resolve_data(cfg, rank1, poll_s=0.01, kv=kv).path == data0.path
    assert Path(data0.path).parent == tmp_path / ".chunkflow_data_cache"  # outside the run's directory
    assert is_store(data0.path) and any("prepared data.path=" in line for line in said)
    assert not (tmp_path / "run").exists()
    said.clear()
    assert resolve_data(cfg, SimpleNamespace(rank=0, world_size=1), log=said.append).path == data0.path
    assert said == []  # up to date: nothing prepared, nothing said
    bad = _write(tmp_path / "bad.jsonl", [{"input_ids": [1, 2]}, {"input_ids": [1, 2]}, "[3]"])
    cfg = load_config(None, [f"data.path={bad}", f"train.output_dir={tmp_path / 'run'}"])
    calls = data_cache._calls
    with pytest.raises(DataError, match=r"bad\.jsonl:3: expected a JSON object") as on_rank0:
        resolve_data(cfg, rank0, kv=kv)
    data_cache._calls = calls
    with pytest.raises(DataError) as on_rank1:  # the other ranks stop with the same line
        resolve_data(cfg, rank1, poll_s=0.01, kv=kv)
    assert str(on_rank1.value) == str(on_rank0.value)
    synthetic = load_config(None, [])
    assert resolve_data(synthetic, SimpleNamespace(rank=0, world_size=1)) is synthetic.data
    # an edited input gets a new store; the old one is kept (a run may still use it) and named
    src = tmp_path / "edited.jsonl"
    src.write_text(Path(prepared.data).read_text())
    solo = SimpleNamespace(rank=0, world_size=1)
    cfg = load_config(None, [f"data.path={src}", f"data.tokenizer={prepared.tok}",
                             f"train.output_dir={tmp_path / 'run'}", "data.prepare_workers=1"])
    first = resolve_data(cfg, solo, log=said.append).path
    with src.open("a") as f:
        f.write(json.dumps({"input_ids": [1, 2, 3]}) + "\n")
    said.clear()
    second = resolve_data(cfg, solo, log=said.append).path
    assert second != first and is_store(first) and is_store(second)
    assert any(line.startswith(f"1 older cache(s) of {src}") and first in line for line in said), said
    assert data0.path not in " ".join(said)  # a store of another input file is not listed
