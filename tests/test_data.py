"""Fine-tuning data from JSONL: chat examples trained on the assistant replies only, plain text on
every token, truncation counted, and every malformed line named by its number."""

import json

import pytest
from conftest import write_tokenizer

from qwen3_kernels import Tokenizer
from qwen3_kernels.data import pack_examples, read_jsonl

CHAT = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "<think>\nA greeting.\n</think>\n\nHello! 🙂"},
        {"role": "user", "content": "Say 你好"}, {"role": "assistant", "content": "\n 你好!"}]


@pytest.fixture
def tokenizer(tmp_path):
    write_tokenizer(tmp_path / "tok")
    return Tokenizer.from_pretrained(tmp_path / "tok")


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_chat_examples_train_on_the_assistant_replies_only(tokenizer):
    ids, labels = tokenizer.encode_chat(CHAT)
    assert ids == tokenizer.encode(tokenizer.apply_chat_template(CHAT, add_generation_prompt=False))
    assert len(labels) == len(ids)
    trained = [t for t in labels if t != -100]
    # earlier turns' reasoning is dropped by the template; the last reply keeps its (empty) think block
    assert tokenizer.decode(trained) == "Hello! 🙂<|im_end|><think>\n\n</think>\n\n 你好!<|im_end|>"
    assert all(t in (i, -100) for t, i in zip(labels, ids))


def test_read_jsonl_reads_chat_and_text_and_counts_truncation(tokenizer, tmp_path):
    text = "A document about sky colour. " * 3
    data = read_jsonl(_write(tmp_path, [{"messages": CHAT}, "", {"text": text}, {"text": "short"}]), tokenizer,
                      max_len=30)
    chat_ids, chat_labels = tokenizer.encode_chat(CHAT)
    assert data.tokens[0] == chat_ids[:30] and data.labels[0] == chat_labels[:30]
    assert data.tokens[1] == (tokenizer.encode(text) + [tokenizer.token_to_id("<|endoftext|>")])[:30]
    assert data.labels[1] == data.tokens[1] and data.tokens[2][-1] == tokenizer.token_to_id("<|endoftext|>")
    assert data.truncated == sum(len(x) > 30 for x in (chat_ids, tokenizer.encode(text) + [0])) == 2
    batches = list(pack_examples(data.tokens, max_tokens=64, labels=data.labels))
    assert sum(b.input_ids.numel() for b in batches) == sum(map(len, data.tokens)) == data.num_tokens
    assert sum(int((b.labels != -100).sum()) for b in batches) == data.num_trained_tokens
    assert data.lengths.tolist() == [len(t) for t in data.tokens]


@pytest.mark.parametrize("line, message", [
    ('{"text": "ok"', r"data.jsonl:2: not valid JSON"),
    ('["text"]', r'data.jsonl:2: expected an object with either "messages".*got \["text"\]'),
    ({"text": "a", "messages": []}, r"data.jsonl:2: expected an object with either"),
    ({"prompt": "a"}, r'data.jsonl:2: expected an object .* got \{"prompt": "a"\}'),
    ({"text": ""}, r'data.jsonl:2: "text" must be a non-empty string'),
    ({"messages": "hi"}, r'data.jsonl:2: "messages" must be a list'),
    ({"messages": [{"role": "robot", "content": "beep"}]}, r"data.jsonl:2: message 0 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, r"data.jsonl:2: no assistant message"),
])
def test_a_bad_line_is_named(tokenizer, tmp_path, line, message):
    path = _write(tmp_path, [{"text": "fine"}, line])
    with pytest.raises(ValueError, match=message):
        read_jsonl(path, tokenizer, max_len=64)


def test_missing_and_empty_files(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl'?: no such file"):
        read_jsonl(tmp_path / "nope.jsonl", tokenizer, max_len=8)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no examples"):
        read_jsonl(tmp_path / "empty.jsonl", tokenizer, max_len=8)


def test_content_given_as_text_parts_reads_as_its_text(tokenizer, tmp_path):
    """[{"type": "text", "text": ...}] turns, as many datasets store them, train as their joined text."""
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in CHAT]
    as_parts = read_jsonl(_write(tmp_path, [{"messages": parts}]), tokenizer, max_len=4096)
    as_text = read_jsonl(_write(tmp_path, [{"messages": CHAT}]), tokenizer, max_len=4096)
    assert as_parts.tokens == as_text.tokens and as_parts.labels == as_text.labels
    with pytest.raises(ValueError, match=r"data.jsonl:1: message 1's content must be a string or a list of text "
                                         r"parts .*got \[\{\"type\": \"image\""):
        read_jsonl(_write(tmp_path, [{"messages": [CHAT[0], {"role": "user", "content": [{"type": "image"}]},
                                                   CHAT[2]]}]), tokenizer, max_len=4096)
