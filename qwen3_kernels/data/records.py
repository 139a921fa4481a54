"""One fine-tuning record to token ids and labels (-100 where not trained on), whatever form it has:

- ``{"messages": [{"role", "content"}, ...]}``: Qwen3's chat template, trained on the assistant replies;
  ``content`` may be a list of text parts (``[{"type": "text", "text": ...}]``), joined;
- ``{"text": "..."}``: trained on every token, ``<|endoftext|>`` appended;
- TRL's ``{"prompt": ..., "completion": ...}``: both strings (the prompt's tokens then the completion's,
  ``<|endoftext|>`` appended, trained on the completion and that end token), or both lists of messages
  (prompt + completion through the chat template, trained on the completion's assistant replies only).

Every error is one line starting with where the record is (``file:line`` or ``file: row N``)."""

from __future__ import annotations

import json

from ..model import IGNORE_INDEX

_FORMS = ('expected an object with either "messages" (a list of {"role", "content"}), "text" (a string), or '
          '"prompt" and "completion" (two strings, or two lists of messages)')


def end_of_text_ids(tokenizer) -> list[int]:
    """What ends a text document: ``<|endoftext|>``, or the tokenizer's EOS where it has no such token."""
    try:
        return [tokenizer.token_to_id("<|endoftext|>")]
    except KeyError:
        return [tokenizer.eos_token_id]


BLANK = object()  # what parse_json_line returns for a blank line


def parse_json_line(raw: bytes, where: str):
    """A JSONL line (bytes) as a Python value; ``BLANK`` for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
    if not line.strip():
        return BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None


def tokenize_record(record, where: str, tokenizer, end_of_text: list[int]) -> tuple[list[int], list[int]]:
    """``(ids, labels)`` of one record (not truncated)."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: {_FORMS}, got {abridged(record)}")
    has_pair = "prompt" in record or "completion" in record
    forms = ("messages" in record) + ("text" in record) + has_pair
    if forms != 1 or (has_pair and not ("prompt" in record and "completion" in record)):
        raise ValueError(f"{where}: {_FORMS}, got {abridged(record)}")
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text:
            raise ValueError(f"{where}: \"text\" must be a non-empty string, got {abridged(text)}")
        ids = tokenizer.encode(text) + end_of_text
        return ids, list(ids)
    if "messages" in record:
        messages = _messages(record["messages"], where, "messages", "message")
        ids, labels = _encode_chat(tokenizer, messages, where)
        if all(t == IGNORE_INDEX for t in labels):
            raise ValueError(f"{where}: no assistant message, so nothing to train on")
        return ids, labels
    prompt, completion = record["prompt"], record["completion"]
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion:
            raise ValueError(f"{where}: \"completion\" must be a non-empty string")
        prompt_ids = tokenizer.encode(prompt)
        completion_ids = tokenizer.encode(completion) + end_of_text
        return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    if _is_list_like(prompt) and _is_list_like(completion):
        prompt = _messages(prompt, where, "prompt", "prompt message")
        completion = _messages(completion, where, "completion", "completion message")
        if not any(m.get("role") == "assistant" for m in completion):
            raise ValueError(f"{where}: \"completion\" has no assistant message, so nothing to train on")
        ids, labels = _encode_chat(tokenizer, prompt + completion, where)
        replies = [sum(m["role"] == "assistant" for m in part) for part in (prompt, completion)]
        return ids, _untrain_first_replies(labels, replies[0], sum(replies), where)
    raise ValueError(f"{where}: \"prompt\" and \"completion\" must both be strings or both be lists of messages, "
                     f"got {abridged(prompt)} and {abridged(completion)}")


def _is_list_like(value) -> bool:
    return isinstance(value, list) or _is_columns(value)


def _is_columns(value) -> bool:
    """A list of messages as some datasets versions hand it out: one list per field."""
    return (isinstance(value, dict) and bool(value) and all(isinstance(v, list) for v in value.values())
            and len({len(v) for v in value.values()}) == 1)


def _messages(value, where: str, key: str, name: str) -> list:
    if _is_columns(value):
        value = [dict(zip(value, row)) for row in zip(*value.values())]
    if not isinstance(value, list):
        raise ValueError(f"{where}: \"{key}\" must be a list, got {abridged(value)}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"{where}: {name} {i} must be an object with \"role\" and \"content\", got {abridged(m)}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"{where}: {name} {i} has unknown role {m['role']!r}")
        out.append(_with_text_content(m, i, where, name))
    return out


def _encode_chat(tokenizer, messages: list, where: str) -> tuple[list[int], list[int]]:
    try:
        return tokenizer.encode_chat(messages)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _untrain_first_replies(labels: list[int], skip: int, replies: int, where: str) -> list[int]:
    """``labels`` with the first ``skip`` assistant replies no longer trained on. ``encode_chat`` trains on
    each reply as one unbroken run of tokens (a reply runs through its ``<|im_end|>``, and a newline and
    the next turn's header, never trained, separate two replies), so reply k is the k-th run."""
    out, run, inside = list(labels), -1, False
    for k, t in enumerate(labels):
        if t == IGNORE_INDEX:
            inside = False
            continue
        if not inside:
            run, inside = run + 1, True
        if run < skip:
            out[k] = IGNORE_INDEX
    if run + 1 != replies:  # the runs are not the replies: refuse rather than train on the wrong tokens
        raise ValueError(f"{where}: the chat template's labels hold {run + 1} trained runs for {replies} assistant "
                         "messages, so the prompt's replies cannot be told from the completion's")
    return out


def _with_text_content(message: dict, index: int, where: str, name: str = "message") -> dict:
    """The message with its content as one string: a list of text parts (``[{"type": "text", "text":
    ...}]``, as many datasets store turns) is joined; any other content is an error naming it."""
    content = message.get("content")
    if isinstance(content, str):
        return message
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return {**message, "content": "".join(part["text"] for part in content)}
    raise ValueError(f"{where}: {name} {index}'s content must be a string or a list of text parts "
                     f"([{{\"type\": \"text\", \"text\": ...}}]), got {abridged(content)}")


def abridged(value, limit: int = 80) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
