"""Tokenizer round trips, the Qwen3 chat template against the published Jinja template, generation
defaults, streaming decode."""

from pathlib import Path

import pytest
from conftest import CORPUS, write_tokenizer

from qwen3_kernels import Tokenizer
from qwen3_kernels.tokenizer import chat_prompt

jinja2 = pytest.importorskip("jinja2")
TEMPLATE = (Path(__file__).parent / "data" / "qwen3_chat_template.jinja").read_text()


def published(messages, **kwargs):
    """The published Qwen3 template, rendered the way transformers renders chat templates."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(TEMPLATE).render(messages=messages, **kwargs)


@pytest.fixture
def tokenizer(tmp_path):
    write_tokenizer(tmp_path / "tok")
    return Tokenizer.from_pretrained(tmp_path / "tok")


@pytest.mark.parametrize("text", ["héllo wörld 你好，世界 🙂🚀 ∑ x² ≤ ∞", "plain ascii", "",
                                  "<|im_start|>user\nhi 🙂<|im_end|>\n"])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids(tokenizer):
    ids = tokenizer.encode("<|im_start|>assistant<|im_end|>")
    assert ids[0] == tokenizer.token_to_id("<|im_start|>") and ids[-1] == tokenizer.token_to_id("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == ids[-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "assistant"


def test_generation_defaults_come_from_the_checkpoint(tokenizer):
    g = tokenizer.generation
    assert g.eos_token_ids == [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    assert (g.temperature, g.top_k, g.top_p) == (0.6, 20, 0.95)


def test_without_generation_config_eos_is_the_tokenizers(tmp_path):
    write_tokenizer(tmp_path / "tok", generation=False)
    tok = Tokenizer.from_pretrained(tmp_path / "tok")
    assert tok.generation.eos_token_ids == [tok.eos_token_id] and tok.generation.temperature == 0.0


CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "<think>\nThe user greets.\n</think>\n\nHello! 🙂"},
     {"role": "user", "content": "What is 你好?"}],
    [{"role": "user", "content": "first"}, {"role": "assistant", "content": "one"},
     {"role": "user", "content": "second"}, {"role": "assistant", "content": "<think>why</think>two"}],
    [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "reasoning_content": "r"},
     {"role": "system", "content": "late system"}, {"role": "user", "content": "q2"}],
    [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": "calling"},
     {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "22C"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("enable_thinking", [True, False])
def test_chat_template_matches_the_published_template(messages, add_generation_prompt, enable_thinking):
    ours = chat_prompt(messages, add_generation_prompt, enable_thinking)
    assert ours == published(messages, add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)


def test_chat_template_shape():
    prompt = chat_prompt([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_bad_messages_are_named():
    with pytest.raises(ValueError, match="unknown role 'robot'"):
        chat_prompt([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="messages is empty"):
        chat_prompt([])


def test_streaming_never_emits_half_a_character(tokenizer):
    text = "".join(CORPUS[:6])
    ids = tokenizer.encode(text)
    decoder = tokenizer.stream_decoder()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some multi-byte characters did span tokens


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "empty")
