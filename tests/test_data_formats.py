"""Fine-tuning data in the formats people have: the same records as JSONL, a JSON array, parquet, Arrow
(stream and file), a ``save_to_disk`` directory (and a DatasetDict's "train" split) give the same tokens
and labels; TRL's prompt/completion records train on the completion only; worker processes change
nothing; the token cache is reused, invalidated by a changed file, and never read half-written; bad
paths and records are errors naming them."""

import concurrent.futures
import json
import os
import sys
import time

import numpy as np
import pytest
from conftest import write_tokenizer

from qwen3_kernels import Tokenizer
from qwen3_kernels.data import (TokenizedExamples, cache_key, check_data_path, data_fingerprint, pack_examples,
                                read_examples, read_jsonl)
from qwen3_kernels.data import sources as sources_module
from qwen3_kernels.data import tokenized as tokenized_module

IGNORE = -100
SYSTEM = {"role": "system", "content": "Be kind."}
RECORDS = [
    {"messages": [SYSTEM, {"role": "user", "content": "Hello"},
                  {"role": "assistant", "content": "Hello! 🙂", "reasoning_content": "A greeting."},
                  {"role": "user", "content": "Say 你好"}, {"role": "assistant", "content": "你好!"}]},
    {"text": "The quick brown fox jumps over the lazy dog. " * 4},  # longer than MAX_LEN: truncated
    {"messages": [{"role": "user", "content": "emoji?"}, {"role": "assistant", "content": "🙂🚀✨"}]},
    {"text": "héllo wörld, ça va?"},
] * 3
MAX_LEN = 40


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tokenizer(path)
    return Tokenizer.from_pretrained(path)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _lists(examples):
    return [list(t) for t in examples.tokens], [list(t) for t in examples.labels], examples.truncated


class _Untouchable:
    """A tokenizer whose every encode raises: what a cache hit may be given."""

    def __init__(self, tokenizer):
        self._tok, self.eos_token, self.pad_token = tokenizer._tok, tokenizer.eos_token, tokenizer.pad_token
        self.token_to_id = tokenizer.token_to_id

    def encode(self, text):
        raise AssertionError("tokenised although the cache holds these examples")

    encode_chat = encode


def _dataset_copies(tmp_path, jsonl):
    """The JSONL's records as parquet, Arrow stream, Arrow file, a save_to_disk directory and a DatasetDict
    directory, each written by datasets / pyarrow as a user would."""
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    ds = datasets.load_dataset("json", data_files=str(jsonl), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == len(RECORDS) and set(ds.column_names) == {"messages", "text"}  # nulls where absent
    ds.to_parquet(str(tmp_path / "data.parquet"))
    table = ds.data.table
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=5)
    ds.save_to_disk(str(tmp_path / "saved"), num_shards=2)
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(str(tmp_path / "saved_dict"))
    return {"parquet": tmp_path / "data.parquet", "arrow stream": tmp_path / "stream.arrow",
            "arrow file": tmp_path / "file.arrow", "saved": tmp_path / "saved", "saved dict": tmp_path / "saved_dict"}


def test_every_format_gives_the_jsonl_examples(tokenizer, tmp_path):
    jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    expected = _lists(read_jsonl(jsonl, tokenizer, MAX_LEN))
    full = read_jsonl(jsonl, tokenizer, 4096).tokens
    assert expected[2] == sum(len(t) > MAX_LEN for t in full) == 6 and len(expected[0]) == len(RECORDS)
    chat_ids, chat_labels = tokenizer.encode_chat(RECORDS[0]["messages"])
    assert expected[0][0] == chat_ids[:MAX_LEN] and expected[1][0] == chat_labels[:MAX_LEN]

    array = tmp_path / "array.json"
    array.write_text("[\n" + ",\n".join(json.dumps(r, indent=1) for r in RECORDS) + "\n]\n")
    lines_json = tmp_path / "lines.json"
    lines_json.write_text(jsonl.read_text())
    paths = {"jsonl": jsonl, "json array": array, "json lines": lines_json, **_dataset_copies(tmp_path, jsonl)}
    assert {name: check_data_path(p) for name, p in paths.items()} == {
        "jsonl": "jsonl", "json array": "json", "json lines": "json", "parquet": "parquet", "arrow stream": "arrow",
        "arrow file": "arrow", "saved": "datasets", "saved dict": "datasets"}
    for name, path in paths.items():
        examples = read_examples(path, tokenizer, MAX_LEN, workers=1)
        assert isinstance(examples, TokenizedExamples) and len(examples) == len(RECORDS), name
        assert _lists(examples) == expected, name
        assert examples.num_tokens == sum(map(len, expected[0])) == int(examples.lengths.sum()), name
        assert list(examples.lengths) == list(map(len, expected[0])), name
        assert examples.num_trained_tokens == sum(sum(t != IGNORE for t in labels[1:]) for labels in expected[1])
    batches = list(pack_examples(examples.tokens, max_tokens=128, labels=examples.labels))
    assert sum(b.input_ids.numel() for b in batches) == examples.num_tokens
    assert sum(int((b.labels != IGNORE).sum()) for b in batches) == examples.num_trained_tokens


def test_text_parts_read_as_their_text_in_every_json_form(tokenizer, tmp_path):
    parts = [{"messages": [{**m, "content": [{"type": "text", "text": m["content"][:2]},
                                             {"type": "text", "text": m["content"][2:]}]}
                           for m in r["messages"]]} if "messages" in r else r for r in RECORDS]
    plain = _lists(read_examples(_write_jsonl(tmp_path / "plain.jsonl", RECORDS), tokenizer, MAX_LEN))
    assert _lists(read_examples(_write_jsonl(tmp_path / "parts.jsonl", parts), tokenizer, MAX_LEN)) == plain
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    assert _lists(read_examples(tmp_path / "parts.json", tokenizer, MAX_LEN)) == plain


def test_prompt_completion_strings_train_on_the_completion(tokenizer, tmp_path):
    pairs = [{"prompt": "Sky colour? ", "completion": "Blue, on a clear day."}, {"prompt": "", "completion": "ça va"}]
    examples = read_examples(_write_jsonl(tmp_path / "pc.jsonl", pairs), tokenizer, 4096)
    end = tokenizer.token_to_id("<|endoftext|>")
    for i, pair in enumerate(pairs):
        prompt, completion = tokenizer.encode(pair["prompt"]), tokenizer.encode(pair["completion"]) + [end]
        assert examples.tokens[i] == prompt + completion
        assert examples.labels[i] == [IGNORE] * len(prompt) + completion
    # packing never trains an example's first token: the second example's prompt is empty
    assert examples.num_trained_tokens == sum(len(tokenizer.encode(p["completion"])) + 1 for p in pairs) - 1


def test_prompt_completion_chat_equals_the_conversation_trained_on_the_completion(tokenizer, tmp_path):
    conversation = RECORDS[0]["messages"]
    single = [{"prompt": conversation[:4], "completion": conversation[4:]}]  # the prompt holds an assistant turn
    as_pair = read_examples(_write_jsonl(tmp_path / "pair.jsonl", single), tokenizer, 4096)
    ids, labels = tokenizer.encode_chat(conversation)
    assert as_pair.tokens[0] == ids
    trained = [t for t in as_pair.labels[0] if t != IGNORE]
    assert tokenizer.decode(trained) == "<think>\n\n</think>\n\n你好!<|im_end|>"  # the completion's reply only
    assert all(t in (full, IGNORE) for t, full in zip(as_pair.labels[0], labels))
    assert sum(t != IGNORE for t in labels) > len(trained)  # the messages form also trains the first reply

    # every reply in the completion (a multi-turn completion): exactly the messages form
    whole = [{"prompt": conversation[:2], "completion": conversation[2:]}]
    assert _lists(read_examples(_write_jsonl(tmp_path / "whole.jsonl", whole), tokenizer, 4096)) == ([ids], [labels], 0)

    # one user turn and one reply: exactly the messages form
    turn = [{"prompt": [SYSTEM, {"role": "user", "content": "Hi"}],
             "completion": [{"role": "assistant", "content": "Yo"}]}]
    messages = [{"messages": turn[0]["prompt"] + turn[0]["completion"]}]
    assert (_lists(read_examples(_write_jsonl(tmp_path / "turn.jsonl", turn), tokenizer, 4096))
            == _lists(read_examples(_write_jsonl(tmp_path / "messages.jsonl", messages), tokenizer, 4096)))


def test_prompt_completion_through_parquet(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [{"prompt": [{"role": "user", "content": f"Count to {i}"}],
                "completion": [{"role": "assistant", "content": " ".join(map(str, range(i)))}]} for i in range(1, 6)]
    jsonl = _write_jsonl(tmp_path / "pc.jsonl", records)
    datasets.load_dataset("json", data_files=str(jsonl), split="train",
                          cache_dir=str(tmp_path / "hf")).to_parquet(str(tmp_path / "pc.parquet"))
    assert (_lists(read_examples(tmp_path / "pc.parquet", tokenizer, 4096))
            == _lists(read_examples(jsonl, tokenizer, 4096)))


def test_workers_give_the_same_examples_and_name_a_bad_record(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(tokenized_module, "_CHUNK", 5)  # many chunks, finishing out of order
    records = RECORDS * 4
    jsonl = _write_jsonl(tmp_path / "data.jsonl", records)
    seen = []
    one = read_examples(jsonl, tokenizer, MAX_LEN, workers=1, progress=seen.append)
    assert seen == list(range(5, len(records), 5)) + [len(records)]
    two = read_examples(jsonl, tokenizer, MAX_LEN, workers=2, cache_dir=tmp_path / "cache")
    assert _lists(one) == _lists(two) and len(one) == len(records)
    assert np.array_equal(one.lengths, two.lengths)

    bad = _write_jsonl(tmp_path / "bad.jsonl", records[:30] + [{"text": ""}] + records)
    with pytest.raises(ValueError, match=r"bad.jsonl:31: \"text\" must be a non-empty string"):
        read_examples(bad, tokenizer, MAX_LEN, workers=2, cache_dir=tmp_path / "cache")
    assert [n for n in os.listdir(tmp_path / "cache") if not n.endswith(".lock")] == [os.path.basename(two.directory)]


def test_the_cache_is_reused_and_a_changed_file_is_tokenised_again(tokenizer, tmp_path):
    jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    cache = tmp_path / "tokenized"
    seen = []
    first = read_examples(jsonl, tokenizer, MAX_LEN, cache_dir=cache, progress=seen.append)
    assert seen == [len(RECORDS)]  # one chunk
    assert os.path.dirname(first.directory) == str(cache)
    assert os.path.basename(first.directory) == cache_key(jsonl, tokenizer, MAX_LEN)
    again = read_examples(jsonl, _Untouchable(tokenizer), MAX_LEN, cache_dir=cache, progress=seen.append)
    assert seen == [len(RECORDS)]
    assert again.directory == first.directory and _lists(again) == _lists(first)

    with pytest.raises(AssertionError, match="tokenised although"):  # another max_len: another key
        read_examples(jsonl, _Untouchable(tokenizer), MAX_LEN + 1, cache_dir=cache)
    before = data_fingerprint(jsonl)
    _write_jsonl(jsonl, RECORDS[1:])
    assert data_fingerprint(jsonl) != before
    with pytest.raises(AssertionError, match="tokenised although"):
        read_examples(jsonl, _Untouchable(tokenizer), MAX_LEN, cache_dir=cache)
    changed = read_examples(jsonl, tokenizer, MAX_LEN, cache_dir=cache)
    assert changed.directory != first.directory and _lists(changed)[0] == _lists(first)[0][1:]


class _Counting:
    """The tokenizer, counting the records it encodes (slowly, so that concurrent callers overlap)."""

    def __init__(self, tokenizer):
        self._tok, self.eos_token, self.pad_token = tokenizer._tok, tokenizer.eos_token, tokenizer.pad_token
        self.token_to_id, self.inner, self.calls = tokenizer.token_to_id, tokenizer, 0

    def encode(self, text):
        self.calls += 1
        time.sleep(0.01)
        return self.inner.encode(text)

    def encode_chat(self, messages):
        self.calls += 1
        time.sleep(0.01)
        return self.inner.encode_chat(messages)


def test_concurrent_callers_build_the_cache_once(tokenizer, tmp_path):
    """The ranks of a run share the cache directory: one tokenises, the others wait and read."""
    jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    counting = _Counting(tokenizer)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: read_examples(jsonl, counting, MAX_LEN, cache_dir=tmp_path / "c"), range(3)))
    assert counting.calls == len(RECORDS)  # one pass over the records
    assert {r.directory for r in results} == {results[0].directory}
    assert all(_lists(r) == _lists(read_jsonl(jsonl, tokenizer, MAX_LEN)) for r in results)


@pytest.mark.parametrize("damage", ["no meta", "short tokens", "other key", "not json"])
def test_a_broken_cache_is_rebuilt_never_read(tokenizer, tmp_path, damage):
    jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)
    cache = tmp_path / "tokenized"
    good = _lists(read_examples(jsonl, tokenizer, MAX_LEN, cache_dir=cache))
    directory = cache / cache_key(jsonl, tokenizer, MAX_LEN)
    meta = directory / "meta.json"
    if damage == "no meta":  # killed before the last file was written
        meta.unlink()
    elif damage == "short tokens":
        with open(directory / "tokens.bin", "r+b") as f:
            f.truncate(8)
    elif damage == "other key":
        meta.write_text(json.dumps({**json.loads(meta.read_text()), "key": "0" * 64}))
    else:
        meta.write_text("{")
    leftover = cache / f".tmp-{directory.name}-deadbeef"  # a builder killed half way
    leftover.mkdir()
    (leftover / "tokens.bin").write_bytes(b"\0" * 12)
    with pytest.raises(AssertionError, match="tokenised although"):
        read_examples(jsonl, _Untouchable(tokenizer), MAX_LEN, cache_dir=cache)
    rebuilt = read_examples(jsonl, tokenizer, MAX_LEN, cache_dir=cache)
    assert rebuilt.directory == str(directory) and _lists(rebuilt) == good
    assert sorted(os.listdir(cache)) == sorted([directory.name, directory.name + ".lock"])
    assert _lists(read_examples(jsonl, _Untouchable(tokenizer), MAX_LEN, cache_dir=cache)) == good


def test_without_a_cache_dir_the_tokens_live_in_a_temporary_directory(tokenizer, tmp_path):
    examples = read_examples(_write_jsonl(tmp_path / "data.jsonl", RECORDS), tokenizer, MAX_LEN)
    scratch = os.path.dirname(examples.directory)
    assert os.path.isdir(scratch) and examples.tokens[-1] == examples.tokens[3]
    del examples
    import gc
    gc.collect()
    assert not os.path.exists(scratch)


def test_paths_that_are_not_data(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^--data '.*nope.parquet': no such file or directory$"):
        check_data_path(tmp_path / "nope.parquet")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"^--eval-data '.*data.csv': unsupported extension '.csv'; supported: "
                                         r"\.jsonl, \.json, \.parquet, \.arrow, or a directory written by datasets"):
        check_data_path(tmp_path / "data.csv", "--eval-data")
    with pytest.raises(ValueError, match="unsupported extension '.csv'"):
        read_examples(tmp_path / "data.csv", tokenizer, MAX_LEN)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match=r"^--data '.*plain' is a directory that datasets' save_to_disk did not "
                                         r"write \(no state.json or dataset_dict.json in it\)"):
        check_data_path(tmp_path / "plain")
    splits = tmp_path / "splits"
    splits.mkdir()
    (splits / "dataset_dict.json").write_text(json.dumps({"splits": ["validation", "test"]}))
    with pytest.raises(ValueError, match=r"is a DatasetDict without a \"train\" split \(it has: validation, test\)"):
        check_data_path(splits)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="empty.json' holds no examples"):
        read_examples(tmp_path / "empty.json", tokenizer, MAX_LEN)


def test_without_datasets_the_error_says_what_to_install(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets now raises ImportError
    with pytest.raises(ImportError, match=r"reading '.*data.parquet' \(.parquet\) needs the datasets library: "
                                          r"install qwen3_kernels\[train\] \(datasets\)"):
        read_examples(tmp_path / "data.parquet", tokenizer, MAX_LEN)
    jsonl = _write_jsonl(tmp_path / "data.jsonl", RECORDS)  # JSON needs no datasets
    assert len(read_examples(jsonl, tokenizer, MAX_LEN)) == len(RECORDS)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "a", "completion": ["b"]}, r'"prompt" and "completion" must both be strings or both be lists'),
    ({"prompt": "a", "completion": ""}, r'"completion" must be a non-empty string'),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "r"}]},
     r'"completion" has no assistant message'),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "bot", "content": "r"}]},
     r"completion message 0 has unknown role 'bot'"),
    ({"prompt": [{"role": "user", "content": [{"type": "image"}]}],
      "completion": [{"role": "assistant", "content": "r"}]},
     r"prompt message 0's content must be a string or a list of text parts"),
    ({"prompt": "a", "completion": "b", "text": "c"}, r'expected an object with either "messages"'),
    ({"completion": "b"}, r'expected an object with either "messages".*"prompt" and "completion"'),
])
def test_a_bad_record_is_named_in_every_format(tokenizer, tmp_path, record, message):
    records = [{"text": "fine"}, {"text": "also fine"}, record]
    with pytest.raises(ValueError, match=r"data.jsonl:3: " + message):
        read_examples(_write_jsonl(tmp_path / "data.jsonl", records), tokenizer, MAX_LEN)
    (tmp_path / "data.json").write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]")
    with pytest.raises(ValueError, match=r"data.json: record 2 \(line 4\): " + message):
        read_examples(tmp_path / "data.json", tokenizer, MAX_LEN)


def test_a_bad_row_in_a_table_is_named(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["fine", "also fine", "", "fine again"]})
    ds.to_parquet(str(tmp_path / "data.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"data.parquet: row 2: \"text\" must be a non-empty string"):
        read_examples(tmp_path / "data.parquet", tokenizer, MAX_LEN)
    with pytest.raises(ValueError, match=r"saved: row 2: \"text\" must be a non-empty string"):
        read_examples(tmp_path / "saved", tokenizer, MAX_LEN)
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=r"broken.parquet: datasets cannot read it as parquet \("):
        read_examples(tmp_path / "broken.parquet", tokenizer, MAX_LEN)


@pytest.mark.parametrize("block", [3, 7, 1 << 20])
def test_a_json_array_is_read_in_blocks(tokenizer, tmp_path, monkeypatch, block):
    """Blocks cut records, numbers and multi-byte characters anywhere; the records and the lines named
    in errors are the same whatever the block size."""
    monkeypatch.setattr(sources_module._JsonArray, "block", block)
    expected = _lists(read_jsonl(_write_jsonl(tmp_path / "data.jsonl", RECORDS), tokenizer, MAX_LEN))
    text = "\ufeff [\n" + ",\n".join(json.dumps(r, indent=2, ensure_ascii=False) for r in RECORDS) + "\n] \n"
    (tmp_path / "data.json").write_text(text, encoding="utf-8")
    assert _lists(read_examples(tmp_path / "data.json", tokenizer, MAX_LEN)) == expected
    starts = [number for number, line in enumerate(text.splitlines(), start=1) if line == "{"]  # each record's
    assert [(where, record) for where, _, record in sources_module.iter_records(tmp_path / "data.json", "json")] == [
        (f"{tmp_path / 'data.json'}: record {i} (line {line})", record) for i, (line, record) in
        enumerate(zip(starts, RECORDS))]
    (tmp_path / "data.json").write_text('[1234\n, {"text": "🙂"}, 5]')
    with pytest.raises(ValueError, match=r"data.json: record 0 \(line 1\): expected an object .* got 1234$"):
        read_examples(tmp_path / "data.json", tokenizer, MAX_LEN)
    (tmp_path / "data.json").write_bytes(b'[{"text": "a"},\n\n{"text": "\xff"}]')
    with pytest.raises(ValueError, match=r"data.json:3: not UTF-8 \(byte 0xff\)"):
        read_examples(tmp_path / "data.json", tokenizer, MAX_LEN)


@pytest.mark.parametrize("block", [5, 1 << 20])
def test_json_array_errors_name_the_line(tokenizer, tmp_path, monkeypatch, block):
    monkeypatch.setattr(sources_module._JsonArray, "block", block)
    (tmp_path / "data.json").write_text('[\n{"text": "a"},\n{"text": "b"\n]')
    with pytest.raises(ValueError, match=r"data.json:4: not valid JSON \(Expecting ',' delimiter, in record 1\)"):
        read_examples(tmp_path / "data.json", tokenizer, MAX_LEN)
    (tmp_path / "data.json").write_text('[{"text": "a"}\n{"text": "b"}]')
    with pytest.raises(ValueError, match=r"data.json:2: not valid JSON \(expected ',' or '\]' after record 0\)"):
        read_examples(tmp_path / "data.json", tokenizer, MAX_LEN)
