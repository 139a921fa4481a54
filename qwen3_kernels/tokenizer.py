"""Qwen3's tokenizer (``tokenizer.json`` through the ``tokenizers`` package, no transformers at run
time), its chat template written out in code, the checkpoint's generation defaults, and a streaming
decoder that never emits half a UTF-8 character."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class GenerationDefaults:
    """``generation_config.json``: what the checkpoint's authors want unless the caller overrides it."""
    eos_token_ids: list[int] = field(default_factory=list)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    @classmethod
    def from_pretrained(cls, path: str, fallback_eos: Sequence[int] = ()) -> "GenerationDefaults":
        file = os.path.join(path, "generation_config.json")
        data = _read_json(file) if os.path.exists(file) else {}
        eos = data.get("eos_token_id", list(fallback_eos))
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        sample = data.get("do_sample", False)
        # transformers' "disabled" values: top_k 0 and top_p 1.0 filter nothing
        top_k = data.get("top_k") or None
        top_p = data.get("top_p") if data.get("top_p") not in (None, 1, 1.0) else None
        return cls(eos_token_ids=eos, temperature=float(data.get("temperature", 1.0)) if sample else 0.0,
                   top_k=top_k if sample else None, top_p=top_p if sample else None)


def _read_json(file: str) -> dict:
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None


def _token_text(value) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as {"content": ...} objects."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer, eos_token: str | None = None, pad_token: str | None = None,
                 generation: GenerationDefaults | None = None):
        self._tok = tokenizer
        self.eos_token = eos_token
        self.pad_token = pad_token
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.pad_token_id = self.token_to_id(pad_token) if pad_token else None
        fallback = [self.eos_token_id] if self.eos_token_id is not None else []
        self.generation = generation or GenerationDefaults(eos_token_ids=fallback)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Tokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
        if not os.path.exists(file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}")
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:
            raise ValueError(f"{file}: cannot be read as a tokenizers file ({e})") from None
        config_file = os.path.join(path, "tokenizer_config.json")
        config = _read_json(config_file) if os.path.exists(config_file) else {}
        eos, pad = _token_text(config.get("eos_token")), _token_text(config.get("pad_token"))
        for name, token in (("eos_token", eos), ("pad_token", pad)):
            if token is not None and tok.token_to_id(token) is None:
                raise ValueError(f"{config_file}: {name} {token!r} is not in the vocabulary")
        tokenizer = cls(tok, eos, pad)
        fallback = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        tokenizer.generation = GenerationDefaults.from_pretrained(path, fallback)
        return tokenizer

    def token_to_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) map to their ids."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in (ids.reshape(-1).tolist() if hasattr(ids, "reshape") else ids)]
        bad = [i for i in ids if not 0 <= i < len(self)]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary (0 .. {len(self) - 1})")
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool = True) -> str:
        return chat_prompt(messages, add_generation_prompt, enable_thinking)

    def encode_chat(self, messages: Sequence[dict]) -> tuple[list[int], list[int]]:
        """A whole conversation for fine-tuning: its token ids (``encode(apply_chat_template(messages,
        add_generation_prompt=False))``) and labels that train on the assistant replies only (-100
        elsewhere)."""
        segments = chat_segments(messages, add_generation_prompt=False)
        reply_chars, start = [], 0
        for text, is_reply in segments:
            if is_reply:
                reply_chars.append((start, start + len(text)))
            start += len(text)
        encoding = self._tok.encode("".join(text for text, _ in segments), add_special_tokens=False)
        # a token belongs to the piece its first character is in (offsets are character positions)
        in_reply = [any(a <= first < b for a, b in reply_chars) for first, _ in encoding.offsets]
        return encoding.ids, [i if keep else -100 for i, keep in zip(encoding.ids, in_reply)]

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns tokens arriving one by one into text pieces. A token that ends inside a multi-byte
    character decodes to U+FFFD; such text is held back until the character is complete. An id the
    tokenizer does not have (a model's spare embedding rows) decodes to nothing."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens: list[int] = []
        self.emitted = 0  # characters of decode(tokens) already returned

    def push(self, token: int) -> str:
        if not 0 <= int(token) < len(self.tokenizer):  # an id beyond the tokenizer shows as nothing
            return ""
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, self.skip_special_tokens)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece


def chat_prompt(messages: Sequence[dict], add_generation_prompt: bool = True, enable_thinking: bool = True) -> str:
    """Qwen3's chat format, as its published chat template renders it (without tools):
    ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn; the ``<think>`` part of assistant turns
    before the last user query is dropped; the generation prompt opens an assistant turn, with an
    empty ``<think>\\n\\n</think>\\n\\n`` block when thinking is off."""
    return "".join(text for text, _ in chat_segments(messages, add_generation_prompt, enable_thinking))


def chat_segments(messages: Sequence[dict], add_generation_prompt: bool = True, enable_thinking: bool = True
                  ) -> list[tuple[str, bool]]:
    """``chat_prompt`` in pieces ``(text, is_assistant_reply)``: a reply is what an assistant turn
    says after its ``<|im_start|>assistant\\n`` header, through its ``<|im_end|>`` (what fine-tuning
    trains on)."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ValueError(f"message {i} has unknown role {m['role']!r}")
    if not messages:
        raise ValueError("messages is empty")

    def content_of(m):
        c = m.get("content")
        return c if isinstance(c, str) else ""

    def is_tool_response(m):
        c = content_of(m)
        return c.startswith("<tool_response>") and c.endswith("</tool_response>")

    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        m = messages[i]
        if m["role"] == "user" and isinstance(m.get("content"), str) and not is_tool_response(m):
            last_query = i
            break

    out = []
    if messages[0]["role"] == "system":
        out.append((f"<|im_start|>system\n{content_of(messages[0])}<|im_end|>\n", False))
    for i, m in enumerate(messages):
        content, role = content_of(m), m["role"]
        if role == "user" or (role == "system" and i > 0):
            out.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", False))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") if isinstance(m.get("reasoning_content"), str) else ""
            if not isinstance(m.get("reasoning_content"), str) and "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            out.append(("<|im_start|>assistant\n", False))
            if i > last_query and (i == len(messages) - 1 or reasoning):
                out.append((f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}<|im_end|>", True))
            else:
                out.append((f"{content}<|im_end|>", True))
            out.append(("\n", False))
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append(("<|im_start|>user", False))
            out.append((f"\n<tool_response>\n{content}\n</tool_response>", False))
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out.append(("<|im_end|>\n", False))
    if add_generation_prompt:
        out.append(("<|im_start|>assistant\n", False))
        if not enable_thinking:
            out.append(("<think>\n\n</think>\n\n", False))
    return out
