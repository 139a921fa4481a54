"""Training data: fine-tuning examples read from JSONL, and batches without padding: examples packed
back to back into one row, each attending only to itself (``QWEN.forward(..., position_ids=...)`` or
``cu_seqlens=...``), in the layout transformers' ``DataCollatorWithFlattening`` produces."""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, NamedTuple, Sequence

import torch

from .model import IGNORE_INDEX


class Examples(NamedTuple):
    """Tokenised fine-tuning examples: ``tokens[i]`` and ``labels[i]`` (-100 where not trained on)."""
    tokens: list[list[int]]
    labels: list[list[int]]
    truncated: int  # how many examples were cut to ``max_len`` tokens


def read_jsonl(path: str | os.PathLike, tokenizer, max_len: int) -> Examples:
    """One example per line: ``{"messages": [{"role": ..., "content": ...}, ...]}`` (Qwen3's chat
    template; trained on the assistant replies only) or ``{"text": "..."}`` (trained on every token,
    ``<|endoftext|>`` appended so the model learns where a document ends). Blank lines are skipped;
    examples longer than ``max_len`` tokens are cut to it (and counted). A line that is not one of
    these is an error naming the file, the line number and what is wrong with it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training data {path!r}: no such file")
    try:
        end_of_text = [tokenizer.token_to_id("<|endoftext|>")]
    except KeyError:
        end_of_text = [tokenizer.eos_token_id]
    tokens, labels, truncated = [], [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                example = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(example, dict) or ("messages" in example) == ("text" in example):
                raise ValueError(f"{where}: expected an object with either \"messages\" (a list of {{\"role\", "
                                 f"\"content\"}}) or \"text\" (a string), got {_abridged(example)}")
            if "text" in example:
                if not isinstance(example["text"], str) or not example["text"]:
                    raise ValueError(f"{where}: \"text\" must be a non-empty string, got {_abridged(example['text'])}")
                ids = tokenizer.encode(example["text"]) + end_of_text
                trained = ids
            else:
                messages = example["messages"]
                if not isinstance(messages, list):
                    raise ValueError(f"{where}: \"messages\" must be a list, got {_abridged(messages)}")
                messages = [_with_text_content(m, i, where) for i, m in enumerate(messages)]
                try:
                    ids, trained = tokenizer.encode_chat(messages)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                if all(t == IGNORE_INDEX for t in trained):
                    raise ValueError(f"{where}: no assistant message, so nothing to train on")
            if len(ids) > max_len:
                ids, trained, truncated = ids[:max_len], trained[:max_len], truncated + 1
            tokens.append(ids)
            labels.append(trained)
    if not tokens:
        raise ValueError(f"training data {path!r} holds no examples")
    return Examples(tokens, labels, truncated)


def _with_text_content(message, index: int, where: str):
    """The message with its content as one string: a list of text parts (``[{"type": "text", "text":
    ...}]``, as many datasets store turns) is joined; any other content is an error naming it."""
    if not isinstance(message, dict) or isinstance(message.get("content"), str):
        return message  # chat_segments names what is wrong with a message that is not a dict
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return {**message, "content": "".join(part["text"] for part in content)}
    raise ValueError(f"{where}: message {index}'s content must be a string or a list of text parts "
                     f"([{{\"type\": \"text\", \"text\": ...}}]), got {_abridged(content)}")


def _abridged(value, limit: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[:limit] + "..."


class PackedBatch(NamedTuple):
    """One padding-free batch of n examples, ``total`` tokens."""
    input_ids: torch.Tensor     # (1, total) int64
    position_ids: torch.Tensor  # (1, total) int64, restarting at 0 for each example
    labels: torch.Tensor        # (1, total) int64; -100 at each example's first token, so no loss crosses
    #                             from one example into the next, and wherever the example's labels say
    cu_seqlens: torch.Tensor    # (n + 1,) int32, prefix sums of the example lengths
    max_seqlen: int             # the longest example

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device),
                           self.cu_seqlens.to(device), self.max_seqlen)


def pack_examples(examples: Iterable[Sequence[int]], max_tokens: int,
                  labels: Iterable[Sequence[int]] | None = None) -> Iterator[PackedBatch]:
    """Packs token lists, in order, into batches of at most ``max_tokens`` tokens: an example that does
    not fit in the current batch starts the next one. ``labels`` (one list per example, same lengths;
    -100 where a token is not trained on, e.g. a prompt) default to the tokens themselves. An empty
    example is skipped; one longer than ``max_tokens`` is an error (truncate it first)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    label_lists = iter(labels) if labels is not None else None
    batch: list[tuple[list[int], list[int]]] = []
    used = 0
    for i, example in enumerate(examples):
        tokens = [int(t) for t in example]
        if label_lists is None:
            example_labels = tokens
        else:
            try:
                example_labels = [int(t) for t in next(label_lists)]
            except StopIteration:
                raise ValueError(f"labels ran out at example {i}: give one label list per example") from None
            if len(example_labels) != len(tokens):
                raise ValueError(f"example {i}: {len(tokens)} tokens but {len(example_labels)} labels")
        if not tokens:
            continue
        if len(tokens) > max_tokens:
            raise ValueError(f"example {i} has {len(tokens)} tokens, more than max_tokens={max_tokens}; "
                             "truncate it first")
        if used + len(tokens) > max_tokens:
            yield _batch(batch)
            batch, used = [], 0
        batch.append((tokens, example_labels))
        used += len(tokens)
    if batch:
        yield _batch(batch)


def _batch(examples: list[tuple[list[int], list[int]]]) -> PackedBatch:
    lengths = [len(tokens) for tokens, _ in examples]
    input_ids = torch.tensor([t for tokens, _ in examples for t in tokens])
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.tensor([label for _, example_labels in examples for label in [IGNORE_INDEX] + example_labels[1:]])
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedBatch(input_ids[None], position_ids[None], labels[None], cu_seqlens, max(lengths))
