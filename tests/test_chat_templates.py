"""Record formats and chat templates (chunkflow.data.formats, chunkflow.data.chat_template).

Tokenizers are built here (byte-level BPE with each model's special tokens) and saved as a
Hugging Face directory whose tokenizer_config.json carries Qwen2.5's or Llama 3's chat
template (tests/chat_templates/*.jinja, written for these tests from the public formats).
The ids must equal transformers' ``apply_chat_template`` for the same messages, and the
loss mask must cover exactly each assistant turn's content and its end-of-turn token.
"""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from chunkflow.data import formats
from chunkflow.data.formats import RecordEncoder
from chunkflow.data.reader import DataError, read_jsonl
from chunkflow.data.tokenizer import TokenizerError, load_local_tokenizer

TEMPLATES = Path(__file__).parent / "chat_templates"
CORPUS = [
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "the quick brown fox jumps over the lazy dog", "hello there, how are you today?",
    "system user assistant tool", "Paris is the capital of France. What is 2 + 2? It is 4.",
    "long context training needs chunks\n\nand more lines\n",
]
MODELS = {
    # name: (template file, special tokens, tokenizer_config names, end-of-turn, BOS post-processor)
    "qwen2.5": ("qwen2_5.jinja", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, "<|im_end|>", None),
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, "<|eot_id|>",
               "<|begin_of_text|>"),
}
CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "It is 4."}],
    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": "hello there"},
     {"role": "assistant", "content": "how are you today?\n\nthe lazy dog"},
     {"role": "user", "content": " Paris?"},
     {"role": "assistant", "content": "Paris is the capital of France."}],
    [{"role": "user", "content": "What is 2 + 2?"},  # a tool call (Qwen renders it as JSON)
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
     {"role": "tool", "content": "4"},
     {"role": "assistant", "content": "It is 4."}],
]
QWEN_TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'


def build_tokenizer(folder: Path, specials: list[str], names: dict, template: str | None,
                    bos: str | None = None) -> Path:
    """Byte-level BPE over CORPUS with ``specials`` as single tokens, saved as an HF dir."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is not None:  # Llama 3 prepends <|begin_of_text|> when encoding with special tokens
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_dir(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    template, specials, names, _, bos = MODELS[name]
    folder = tmp_path_factory.mktemp(name)
    return name, build_tokenizer(folder, specials, names, (TEMPLATES / template).read_text(), bos)


def write(tmp_path: Path, records: list, name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def hf_ids(folder: Path, messages: list, **kwargs):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    return tok.apply_chat_template(messages, tokenize=True, **kwargs)


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


# ------------------------------------------------------------------------- chat templates


@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_template_ids_match_transformers_and_mask_is_the_assistant_turns(model_dir, chat):
    name, folder = model_dir
    messages = CHATS[chat]
    end_of_turn = MODELS[name][3]
    encoder = RecordEncoder.from_path(folder)
    tokens, target = encoder.encode(json.dumps({"messages": messages}), "chat.jsonl:1")
    expected = hf_ids(folder, messages)
    expected = expected["input_ids"] if isinstance(expected, dict) or hasattr(expected, "keys") else expected
    assert tokens.tolist() == list(expected)
    tok = encoder.tokenizer.tokenizer
    assert tok.token_to_id(end_of_turn) in tokens.tolist()  # a single special token
    replies = [m["content"].strip() if name == "llama3" else
               (QWEN_TOOL_CALL if m.get("tool_calls") else m["content"])
               for m in messages if m["role"] == "assistant"]
    trained = [tok.decode(tokens[a:b].tolist(), skip_special_tokens=False) for a, b in runs(target)]
    assert trained == [reply + end_of_turn for reply in replies]
    # the token before each trained run closes the assistant header (never trained)
    header_end = {"qwen2.5": "assistant\n", "llama3": "<|end_header_id|>\n\n"}[name]
    for a, _ in runs(target):
        assert tok.decode(tokens[:a].tolist(), skip_special_tokens=False).endswith(header_end)


def test_generation_markers_match_transformers_and_prefix_rule(tmp_path):
    """A template with {% generation %}: the mask is transformers' assistant mask, and the
    same as the prefix rule gives for the same template without the markers."""
    specials, names = MODELS["qwen2.5"][1], MODELS["qwen2.5"][2]
    marked = (TEMPLATES / "chatml_generation.jinja").read_text()
    plain = marked.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    marked_dir = build_tokenizer(tmp_path / "marked", specials, names, marked)
    plain_dir = build_tokenizer(tmp_path / "plain", specials, names, plain)
    line = json.dumps({"messages": CHATS[1]})
    tokens, target = RecordEncoder.from_path(marked_dir).encode(line, "x:1")
    plain_tokens, plain_target = RecordEncoder.from_path(plain_dir).encode(line, "x:1")
    out = hf_ids(marked_dir, CHATS[1], return_dict=True, return_assistant_tokens_mask=True)
    assert tokens.tolist() == list(out["input_ids"]) == plain_tokens.tolist()
    assert target.astype(int).tolist() == list(out["assistant_masks"])
    np.testing.assert_array_equal(target, plain_target)
    assert len(runs(target)) == 2


def test_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    """The last assistant turn renders differently from earlier ones: no prefix rule."""
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
                "{% if loop.last %} (final){% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = build_tokenizer(tmp_path / "t", MODELS["qwen2.5"][1], {}, template)
    path = write(tmp_path, [{"messages": CHATS[1]}])
    with pytest.raises(DataError, match=rf"^{path}:1: cannot find the loss tokens of messages\[2\]"):
        read_jsonl(path, max_seq_len=256, vocab_size=400, encoder=RecordEncoder.from_path(folder))


def test_template_errors_name_the_line(tmp_path):
    template = "{{ raise_exception('roles must alternate') }}"
    folder = build_tokenizer(tmp_path / "t", MODELS["qwen2.5"][1], {}, template)
    encoder = RecordEncoder.from_path(folder)
    with pytest.raises(DataError, match="^d.jsonl:3: the tokenizer's chat_template failed: roles must alternate$"):
        encoder.encode(json.dumps({"messages": CHATS[0]}), "d.jsonl:3")
    folder = build_tokenizer(tmp_path / "s", MODELS["qwen2.5"][1], {}, "{% for %}")
    with pytest.raises(DataError, match="^d.jsonl:4: the tokenizer's chat_template does not parse"):
        RecordEncoder.from_path(folder).encode(json.dumps({"messages": CHATS[0]}), "d.jsonl:4")


def test_template_sources_and_chatml_fallback(tmp_path, caplog):
    specials, names = MODELS["qwen2.5"][1], MODELS["qwen2.5"][2]
    qwen = (TEMPLATES / "qwen2_5.jinja").read_text()
    # chat_template.jinja beats tokenizer_config.json; a list of named templates uses "default"
    folder = build_tokenizer(tmp_path / "file", specials, names, "{{ 'wrong' }}")
    (folder / "chat_template.jinja").write_text(qwen)
    assert load_local_tokenizer(folder / "tokenizer.json").chat_template == qwen
    listed = build_tokenizer(tmp_path / "list", specials, names, None)
    config = json.loads((listed / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": qwen}]
    (listed / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_local_tokenizer(listed).chat_template == qwen
    # no template: ChatML fallback, warned once per process
    bare = build_tokenizer(tmp_path / "bare", specials, names, None)
    monkey_state = formats._warned_chatml
    formats._warned_chatml = False
    try:
        encoder = RecordEncoder.from_path(bare)
        with caplog.at_level(logging.WARNING, logger="chunkflow.data.formats"):
            for _ in range(3):
                tokens, target = encoder.encode(json.dumps({"messages": CHATS[0]}), "x:1")
        assert sum("ChatML fallback" in r.getMessage() for r in caplog.records) == 1
    finally:
        formats._warned_chatml = monkey_state
    tok = encoder.tokenizer.tokenizer
    assert tok.decode(tokens.tolist(), skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\nIt is 4.<|im_end|>\n")
    assert tok.decode(tokens[target].tolist(), skip_special_tokens=False) == "It is 4.<|im_end|>"


def test_encoder_pickles_and_reads_a_bare_tokenizer_json_path(model_dir):
    _, folder = model_dir
    encoder = RecordEncoder.from_path(folder / "tokenizer.json")  # config read from its folder
    line = json.dumps({"messages": CHATS[1]})
    tokens, target = encoder.encode(line, "x:1")
    clone = pickle.loads(pickle.dumps(encoder))
    again, again_target = clone.encode(line, "x:1")
    np.testing.assert_array_equal(tokens, again)
    np.testing.assert_array_equal(target, again_target)
    assert tokens.dtype == np.int64 and target.dtype == bool and tokens.shape == target.shape
    assert RecordEncoder.from_path(None).encode('{"input_ids": [1, 2]}', "x:1")[0].tolist() == [1, 2]


# ------------------------------------------------------------------- text, prompt/response


def test_text_ends_with_eos(model_dir):
    name, folder = model_dir
    encoder = RecordEncoder.from_path(folder)
    tok = encoder.tokenizer.tokenizer
    eos = tok.token_to_id(MODELS[name][2]["eos_token"])
    tokens, target = encoder.encode('{"text": "the quick brown fox"}', "x:1")
    assert tokens[-1] == eos and (tokens == eos).sum() == 1 and target.all()
    body = tok.encode("the quick brown fox", add_special_tokens=False).ids
    bos = [tok.token_to_id("<|begin_of_text|>")] if name == "llama3" else []
    assert tokens.tolist() == bos + body + [eos]
    # a text that already ends with EOS gets no second one
    text = "the quick brown fox" + MODELS[name][2]["eos_token"]
    assert RecordEncoder.from_path(folder).encode(json.dumps({"text": text}), "x:1")[0].tolist() == \
        bos + body + [eos]


def test_text_without_eos_when_the_tokenizer_names_none(tmp_path):
    folder = build_tokenizer(tmp_path / "t", MODELS["qwen2.5"][1], {}, None)
    tokens, _ = RecordEncoder.from_path(folder).encode('{"text": "the lazy dog"}', "x:1")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tokens.tolist() == tok.encode("the lazy dog").ids


def test_prompt_response_trains_the_response_and_eos(model_dir):
    name, folder = model_dir
    encoder = RecordEncoder.from_path(folder)
    tok = encoder.tokenizer.tokenizer
    tokens, target = encoder.encode('{"prompt": "What is 2 + 2?", "response": " It is 4."}', "x:1")
    eos = MODELS[name][2]["eos_token"]
    prompt = tok.encode("What is 2 + 2?").ids  # with Llama 3's BOS
    assert tokens[: len(prompt)].tolist() == prompt and not target[: len(prompt)].any()
    assert target[len(prompt):].all()
    assert tok.decode(tokens[target].tolist(), skip_special_tokens=False) == " It is 4." + eos


FORMAT_ERRORS = {
    "empty response": ({"prompt": "hi", "response": ""}, '"response" is empty'),
    "no response": ({"prompt": "hi"}, '"prompt" needs a "response"'),
    "response alone": ({"response": "hi"}, "none of the known keys"),
    "response with text": ({"text": "hi", "response": "x"}, '"response" only goes with "prompt"'),
    "prompt not str": ({"prompt": 3, "response": "x"}, '"prompt" must be a string, got int'),
    "prompt and messages": ({"prompt": "a", "response": "b", "messages": []}, "prompt and messages"),
    "labels shifted": ({"input_ids": [5, 6, 7], "labels": [6, 7, -100]}, '"labels"[0] = 6 but "input_ids"[0] = 5'),
    "labels length": ({"input_ids": [5, 6, 7], "labels": [5, 6]}, '"labels" has 2 values'),
    "labels and mask": ({"input_ids": [5, 6], "labels": [5, 6], "loss_mask": [1, 1]}, "at most one"),
    "labels not ints": ({"input_ids": [5, 6], "labels": ["a", 6]}, '"labels" must be a flat list'),
    "labels with text": ({"text": "a", "labels": [1]}, '"labels" only goes with "input_ids"'),
    "labels train nothing": ({"input_ids": [5, 6], "labels": [5, -100]}, "no loss token"),
    "bad role": ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role='bot'"),
}


@pytest.mark.parametrize("case", sorted(FORMAT_ERRORS))
def test_format_errors_name_file_and_line(model_dir, case):
    _, folder = model_dir
    record, phrase = FORMAT_ERRORS[case]
    with pytest.raises(DataError) as info:
        RecordEncoder.from_path(folder).encode(json.dumps(record), "data/sft.jsonl:12")
    message = str(info.value)
    assert message.startswith("data/sft.jsonl:12: ") and phrase in message and "\n" not in message


def test_labels_are_aligned_like_hugging_face(tmp_path):
    path = write(tmp_path, [{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}])
    (sample,), _ = read_jsonl(path, max_seq_len=16, vocab_size=100)
    assert sample.input_ids.tolist() == [5, 6, 7] and sample.labels.tolist() == [6, 7, 8]
    assert sample.loss_mask.tolist() == [0.0, 1.0, 1.0]  # same as loss_mask [0, 0, 1, 1]


def test_reader_appends_eos_to_text_and_refuses_an_unknown_eos(model_dir, tmp_path):
    name, folder = model_dir
    path = write(tmp_path, [{"text": "the lazy dog"}])
    tok = load_local_tokenizer(folder)
    (sample,), _ = read_jsonl(path, max_seq_len=64, vocab_size=400, tokenizer=tok)
    assert sample.labels[-1] == tok.eos_id and sample.loss_mask[-1] == 1.0
    bad = build_tokenizer(tmp_path / "bad", MODELS[name][1], {"eos_token": "</s>"}, None)
    with pytest.raises(TokenizerError, match=r"eos_token '</s>' of .*tokenizer_config.json is not a token"):
        load_local_tokenizer(bad)
