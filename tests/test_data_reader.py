"""JSONL reader: shifting, the three formats, every error naming file:line, overlong policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chunkflow.data.reader import DataError, read_jsonl
from chunkflow.data.tokenizer import TokenizerError, load_tokenizer

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "hello there how are you today",
    "you are a helpful assistant",
    "long context training needs chunks",
]
IM_START, IM_END = "<|im_start|>", "<|im_end|>"


def write(tmp_path: Path, lines: list, name: str = "data.jsonl") -> Path:
    """Each entry is written as JSON unless it is already a string (raw line)."""
    path = tmp_path / name
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n", encoding="utf-8")
    return path


def read(path: Path, **kwargs):
    kwargs.setdefault("max_seq_len", 64)
    kwargs.setdefault("vocab_size", 100)
    return read_jsonl(path, **kwargs)


@pytest.fixture
def word_tokenizer() -> Tokenizer:
    """WordLevel over SENTENCES, with the ChatML markers as special tokens."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]", IM_START, IM_END])
    tok.train_from_iterator(SENTENCES + ["system user assistant"], trainer=trainer)
    return tok


@pytest.fixture
def byte_tokenizer(tmp_path: Path) -> Tokenizer:
    """Byte-level BPE without ChatML tokens (markers become plain text), saved and reloaded."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
    assert loaded.token_to_id(IM_START) is None
    return loaded


# ----------------------------------------------------------------------------- input_ids


def test_input_ids_are_shifted(tmp_path: Path) -> None:
    path = write(tmp_path, [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}])
    (sample,), stats = read(path)
    assert sample.input_ids.tolist() == [5, 6, 7]
    assert sample.labels.tolist() == [6, 7, 8]
    assert sample.loss_mask.tolist() == [0.0, 1.0, 1.0]
    assert sample.input_ids.dtype == np.int64 and sample.loss_mask.dtype == np.float32
    assert stats.tokens == 3 and stats.loss_tokens == 2


def test_default_mask_blank_lines_and_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 100, size=int(n)).tolist() for n in rng.integers(2, 40, size=20)]
    lines: list = []
    for i, doc in enumerate(docs):
        lines.append({"input_ids": doc, "id": f"extra key {i} is ignored"})
        if i % 3 == 0:
            lines.append("   ")
    samples, stats = read(write(tmp_path, lines), first_sample_id=100)
    assert [s.sample_id for s in samples] == list(range(100, 120))
    for sample, doc in zip(samples, docs):
        assert len(sample) == len(doc) - 1
        np.testing.assert_array_equal(sample.labels[:-1], sample.input_ids[1:])
        assert sample.input_ids.tolist() + [int(sample.labels[-1])] == doc
        assert sample.loss_mask.min() == 1.0
    assert stats.skipped_blank == 7 and stats.read == 20 and stats.lines == 27
    assert stats.tokens == sum(len(d) - 1 for d in docs)
    assert "20 samples" in stats.summary() and "\n" not in stats.summary()


# ------------------------------------------------------------------------------- errors

GOOD = {"input_ids": [1, 2, 3]}
ERROR_CASES = {
    "malformed json": ('{"input_ids": [1, 2', "malformed JSON"),
    "not an object": ("[1, 2, 3]", "expected a JSON object"),
    "no known key": ({"tokens": [1, 2]}, "none of the known keys"),
    "two keys": ({"input_ids": [1, 2], "text": "a b"}, "exactly one"),
    "empty list": ({"input_ids": []}, "empty sample"),
    "one token": ({"input_ids": [7]}, "empty sample"),
    "token too big": ({"input_ids": [1, 100, 2]}, "token id 100 at position 1"),
    "token negative": ({"input_ids": [1, 2, -1]}, "token id -1 at position 2"),
    "float token": ({"input_ids": [1, 2.5]}, "integer token ids"),
    "nested ids": ({"input_ids": [[1, 2], [3, 4]]}, "flat list"),
    "mask length": ({"input_ids": [1, 2, 3], "loss_mask": [1, 1]}, "same length"),
    "mask value": ({"input_ids": [1, 2, 3], "loss_mask": [0, 2, 1]}, '"loss_mask"[1] = 2'),
    "no loss": ({"input_ids": [1, 2, 3], "loss_mask": [0, 0, 0]}, "no loss token"),
    "only first token": ({"input_ids": [1, 2, 3], "loss_mask": [1, 0, 0]}, "no loss token"),
    "text no tokenizer": ({"text": "hello there"}, "need a tokenizer"),
    "chat no tokenizer": (
        {"messages": [{"role": "assistant", "content": "hi"}]},
        "need a tokenizer",
    ),
    "overlong": ({"input_ids": list(range(66))}, "65 positions"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_file_and_line(tmp_path: Path, case: str) -> None:
    bad, phrase = ERROR_CASES[case]
    path = write(tmp_path, [GOOD, "", GOOD, bad, GOOD])  # the bad sample is on line 4
    with pytest.raises(DataError) as info:
        read(path)
    message = str(info.value)
    assert message.startswith(f"{path}:4: "), message
    assert phrase in message, message


def test_overlong_error_names_the_setting(tmp_path: Path) -> None:
    path = write(tmp_path, [{"input_ids": list(range(11))}])
    with pytest.raises(DataError, match=r"data\.overlong") as info:
        read(path, max_seq_len=9)
    assert f"{path}:1:" in str(info.value) and "max_seq_len=9" in str(info.value)
    assert read(path, max_seq_len=10)[1].samples == 1  # 10 positions fit exactly


CHAT_ERRORS = {
    "bad role": ([{"role": "bot", "content": "hi"}], "messages[0].role='bot'"),
    "no assistant": ([{"role": "user", "content": "hi"}], "no assistant turn"),
    "empty list": ([], "non-empty list"),
    "content not str": ([{"role": "assistant", "content": 3}], "messages[0].content"),
    "not an object": (["hi"], "messages[0] is not an object"),
}


@pytest.mark.parametrize("case", sorted(CHAT_ERRORS))
def test_chat_errors_name_file_and_line(tmp_path: Path, word_tokenizer, case: str) -> None:
    messages, phrase = CHAT_ERRORS[case]
    path = write(tmp_path, [GOOD, {"messages": messages}])
    with pytest.raises(DataError) as info:
        read(path, tokenizer=word_tokenizer)
    assert str(info.value).startswith(f"{path}:2: ") and phrase in str(info.value)


def test_missing_file_and_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        read(tmp_path / "absent.jsonl")
    with pytest.raises(TokenizerError, match=r"data\.tokenizer=.*does not exist"):
        load_tokenizer(tmp_path / "nope.json")
    with pytest.raises(TokenizerError, match="empty"):
        load_tokenizer("")


# ------------------------------------------------------------------------------ overlong


def overlong_file(tmp_path: Path) -> Path:
    """Samples of 3, 5, 6 and 9 positions (4, 6, 7, 10 tokens); the last one's loss
    tokens are past position 5 (its token 0 is marked, but is never a label)."""
    return write(
        tmp_path,
        [
            {"input_ids": [1, 2, 3, 4]},
            {"input_ids": list(range(10, 16))},
            {"input_ids": list(range(20, 27))},
            {"input_ids": list(range(30, 40)), "loss_mask": [1] + [0] * 6 + [1] * 3},
        ],
    )


def test_overlong_error(tmp_path: Path) -> None:
    path = overlong_file(tmp_path)
    with pytest.raises(DataError, match=rf"^{path}:3: sample has 6 positions"):
        read(path, max_seq_len=5)


def test_overlong_truncate(tmp_path: Path) -> None:
    samples, stats = read(overlong_file(tmp_path), max_seq_len=5, overlong="truncate")
    assert [len(s) for s in samples] == [3, 5, 5]
    assert samples[2].input_ids.tolist() == [20, 21, 22, 23, 24]
    assert samples[2].labels.tolist() == [21, 22, 23, 24, 25]
    assert [s.sample_id for s in samples] == [0, 1, 2]
    assert (stats.read, stats.truncated, stats.dropped, stats.dropped_no_loss) == (4, 2, 0, 1)
    assert stats.samples == 3 and stats.tokens == 13 and stats.max_len == 5


def test_overlong_drop(tmp_path: Path) -> None:
    samples, stats = read(overlong_file(tmp_path), max_seq_len=5, overlong="drop")
    assert [len(s) for s in samples] == [3, 5]
    assert [s.sample_id for s in samples] == [0, 1]
    assert (stats.read, stats.truncated, stats.dropped, stats.samples) == (4, 0, 2, 2)
    assert stats.tokens == 8


# ------------------------------------------------------------------------- text and chat


def test_text_uses_the_tokenizer(tmp_path: Path, word_tokenizer) -> None:
    text = "the lazy dog jumps over the quick brown fox"
    (sample,), _ = read(write(tmp_path, [{"text": text}]), tokenizer=word_tokenizer)
    ids = word_tokenizer.encode(text).ids
    assert len(ids) == 9 and word_tokenizer.token_to_id("[UNK]") not in ids
    assert sample.input_ids.tolist() == ids[:-1] and sample.labels.tolist() == ids[1:]
    assert sample.loss_mask.tolist() == [1.0] * 8


def test_chat_mask_covers_exactly_assistant_tokens(tmp_path: Path, word_tokenizer) -> None:
    messages = [
        {"role": "system", "content": "you are a helpful assistant"},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "how are you today"},
        {"role": "user", "content": "the lazy dog"},
        {"role": "assistant", "content": "jumps"},
    ]
    (sample,), _ = read(write(tmp_path, [{"messages": messages}]), tokenizer=word_tokenizer)
    tok = word_tokenizer.id_to_token
    # Whitespace pre-tokenisation drops the newlines, so the render is, token by token:
    raw = [tok(int(sample.input_ids[0]))] + [tok(int(t)) for t in sample.labels]
    expected, target = [], []
    for m in messages:
        content = m["content"].split()
        expected += [IM_START, m["role"], *content, IM_END]
        is_assistant = m["role"] == "assistant"
        target += [False, False] + [is_assistant] * len(content) + [is_assistant]
    assert raw == expected
    assert sample.loss_mask.tolist() == [float(t) for t in target[1:]]
    trained = [tok(int(t)) for t in sample.labels[sample.loss_mask == 1]]
    assert trained == ["how", "are", "you", "today", IM_END, "jumps", IM_END]


def test_chat_with_plain_text_markers(tmp_path: Path, byte_tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "the quick fox"},
    ]
    path = write(tmp_path, [{"messages": messages}])
    (sample,), _ = read(path, tokenizer=byte_tokenizer, vocab_size=300, max_seq_len=256)
    raw = np.concatenate([sample.input_ids[:1], sample.labels])
    assert byte_tokenizer.decode(raw.tolist()) == (
        f"{IM_START}user\nhello there{IM_END}\n{IM_START}assistant\nthe quick fox{IM_END}\n"
    )
    trained = sample.labels[sample.loss_mask == 1].tolist()
    assert byte_tokenizer.decode(trained) == f"the quick fox{IM_END}"
    # the trained tokens are one contiguous run that ends just before the final newline
    where = np.flatnonzero(sample.loss_mask)
    assert np.all(np.diff(where) == 1)
    assert byte_tokenizer.decode(sample.labels[where[-1] + 1 :].tolist()) == "\n"


# ------------------------------------------------------------------------- load_samples


def test_load_samples_from_file(tmp_path: Path, byte_tokenizer) -> None:
    from chunkflow.config.schema import DataConfig
    from chunkflow.data.dataset import load_samples

    path = write(tmp_path, [{"text": "hello there"}, "", {"input_ids": list(range(40))}])
    cfg = DataConfig(path=str(path), tokenizer=str(tmp_path / "tokenizer.json"),
                     max_seq_len=16, overlong="truncate")
    samples, description = load_samples(cfg, vocab_size=300)
    assert [s.sample_id for s in samples] == [0, 1] and len(samples[1]) == 16
    assert str(path) in description and "1 truncated" in description
    cfg.overlong = "drop"
    cfg.path = str(write(tmp_path, [{"input_ids": list(range(40))}], "long.jsonl"))
    with pytest.raises(DataError, match="no usable sample"):
        load_samples(cfg, vocab_size=300)
    cfg.tokenizer = str(tmp_path / "missing.json")
    with pytest.raises(TokenizerError, match="data.tokenizer"):
        load_samples(cfg, vocab_size=300)
