"""The command line: generate and chat on a small checkpoint written by the test, the demo, errors."""

import re
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, write_tokenizer

from qwen3_kernels import QWEN, Tokenizer
from qwen3_kernels.__main__ import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "qwen3-tiny"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=512).save_pretrained(path)
    write_tokenizer(path)  # save_pretrained does not touch the tokenizer files, but be sure
    return path


def test_generate_streams_text_and_reports_speed(checkpoint, capsys):
    # like with like: the CLI's defaults on a GPU (CUDA, bf16, fused) round differently from the fp32
    # CPU model this compares against
    assert main(["generate", "--model", str(checkpoint), "--prompt", "Hello world", "--max-new-tokens", "12",
                 "--temperature", "0", "--device", "cpu", "--dtype", "float32", "--no-fused"]) == 0
    out, err = capsys.readouterr()
    tokenizer = Tokenizer.from_pretrained(checkpoint)
    model = QWEN.from_pretrained(checkpoint)
    ids = torch.tensor([tokenizer.encode("Hello world")])
    new = model.generate(ids, 12, eos_token_id=tokenizer.generation.eos_token_ids)[0, ids.shape[1]:].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in tokenizer.generation.eos_token_ids), len(new))]
    assert out.strip("\n") == tokenizer.decode(new, skip_special_tokens=True).strip("\n")
    assert "prefill" in err and "tokens/s" in err


def test_generate_with_chat_template_and_sampling(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt", "你好", "--chat", "--no-think",
            "--max-new-tokens", "8", "--seed", "3"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # seeded sampling with the checkpoint's defaults


def test_chat_over_stdin(checkpoint):
    done = subprocess.run([sys.executable, "-m", "qwen3_kernels", "chat", "--model", str(checkpoint),
                           "--max-new-tokens", "6", "--temperature", "0", "--system", "Be brief."],
                          input="Hi there\nAnd again?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("[prefill") == 2  # one report per turn


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "does not exist"),
    (["generate", "--model", "{empty}", "--prompt", "x"], "no tokenizer.json"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    argv = [a.replace("{empty}", str(tmp_path / "empty")) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("flag, value, message", [
    ("--max-new-tokens", "0", "must be a positive integer"),
    ("--temperature", "-1", "must be a finite number >= 0"),
    ("--top-p", "2", r"must be in \(0, 1\]"),
    ("--top-k", "abc", "invalid _positive_int value"),
])
def test_bad_flag_values(capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--model", "x", "--prompt", "p", flag, value])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_demo_on_a_small_preset_config(checkpoint, capsys):
    assert main(["--model", str(checkpoint), "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "parameters:" in out and "rms_norm" in out and "tokens/s" in out


@pytest.fixture(scope="module")
def short_context(tmp_path_factory):
    """A checkpoint whose context (64 tokens) a chat fills within two turns."""
    path = tmp_path_factory.mktemp("cli64") / "qwen3-64"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=64).save_pretrained(path)
    return path


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "qwen3_kernels", *args], input=stdin, capture_output=True,
                          timeout=300)


def test_generate_clamps_max_new_tokens_to_the_context(short_context, capsys):
    assert main(["generate", "--model", str(short_context), "--prompt", "Hello", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"note: max new tokens 256 clamped to \d+: the prompt's \d+ tokens and the model's 64-token "
                     r"context leave room", err)


def test_chat_keeps_going_when_the_conversation_fills_the_context(short_context):
    done = _cli("chat", "--model", str(short_context), "--max-new-tokens", "10", "--temperature", "0",
                stdin="Hi\nHow are you today my friend?\nAnd once more, how are you?\n".encode())
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert err.count("[prefill") == 3 and "dropped the" in err and "oldest message" in err


def test_chat_survives_a_message_too_long_for_the_context(short_context):
    done = _cli("chat", "--model", str(short_context), "--max-new-tokens", "4", "--temperature", "0",
                stdin=("word " * 80 + "\nHi\n").encode())
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "does not fit the model's 64-token context" in err and err.count("[prefill") == 1


def test_ctrl_c_stops_only_the_current_reply(checkpoint, monkeypatch, capsys):
    import io

    from qwen3_kernels import model as model_module

    real_stream = model_module.QWEN.generate_stream
    calls = []

    def interrupted_once(self, *args, **kwargs):
        calls.append(1)
        for i, tokens in enumerate(real_stream(self, *args, **kwargs)):
            if len(calls) == 1 and i == 2:
                raise KeyboardInterrupt
            yield tokens

    monkeypatch.setattr(model_module.QWEN, "generate_stream", interrupted_once)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hi there\nAnd again?\n")))
    assert main(["chat", "--model", str(checkpoint), "--max-new-tokens", "6", "--temperature", "0",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "reply stopped (Ctrl-C)" in err and err.count("[prefill") == 2 and len(calls) == 2


def test_non_utf8_input_does_not_end_the_chat(checkpoint):
    done = _cli("chat", "--model", str(checkpoint), "--max-new-tokens", "3", "--temperature", "0",
                "--device", "cpu", stdin=b"caf\xe9 \xff\nHi\n")
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "not valid UTF-8" in err and err.count("[prefill") == 2


@pytest.mark.parametrize("argv, message", [
    (["--device", "xyz", "generate", "--model", "m", "--prompt", "p"], "options go after the command"),
    (["generate", "--model", "m", "--prompt", "p", "--temperature", "nan"], "must be a finite number"),
    (["generate", "--model", "m", "--prompt", "p", "--seed", str(2**70)], r"must be in \[0, 2\*\*63\)"),
])
def test_bad_command_lines(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "{ckpt}", "--prompt", "", "--device", "cpu"], "the prompt is empty"),
    (["generate", "--model", "{ckpt}", "--prompt", "x", "--device", "xyz"], "--device 'xyz' is not a device"),
    (["generate", "--model", "/nonexistent", "--prompt", "x"], "checkpoint directory '/nonexistent' does not exist"),
])
def test_one_line_errors(checkpoint, capsys, argv, message):
    assert main([a.replace("{ckpt}", str(checkpoint)) for a in argv]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch that sees no CUDA device")
def test_demo_on_cuda_without_cuda_is_one_line(capsys):
    assert main(["--device", "cuda", "--preset", "0.6B"]) == 1
    err = capsys.readouterr().err
    assert "device cuda is not available" in err and "Traceback" not in err


def test_generation_config_top_k_zero_means_disabled(tmp_path, checkpoint, capsys):
    import json
    import shutil
    path = tmp_path / "topk0"
    shutil.copytree(checkpoint, path)
    config = json.loads((path / "generation_config.json").read_text())
    config["top_k"] = 0
    (path / "generation_config.json").write_text(json.dumps(config))
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "3", "--device", "cpu"]) == 0


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path, capsys):
    path = tmp_path / "mismatch"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size() - 50, max_position_embeddings=64).save_pretrained(path)
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--device", "cpu"]) == 1
    assert "the tokenizer has" in capsys.readouterr().err


def test_broken_pipe_is_quiet(checkpoint):
    import os
    r, w = os.pipe()
    os.close(r)  # the reader (`head`) is gone before the first token
    done = subprocess.run([sys.executable, "-m", "qwen3_kernels", "generate", "--model", str(checkpoint), "--prompt",
                           "Hello world", "--max-new-tokens", "20", "--temperature", "0", "--device", "cpu"],
                          stdout=w, stderr=subprocess.PIPE, timeout=300)
    os.close(w)
    assert "Traceback" not in done.stderr.decode() and done.returncode == 0, done.stderr.decode()


def test_spare_embedding_rows_are_never_sampled(tmp_path, capsys):
    """Published Qwen3 embeddings have 151,936 rows for 151,669 tokens: sampling (here at a high
    temperature, over far more spare rows than tokens) must pick only ids the tokenizer can decode."""
    path = tmp_path / "spare-rows"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size() + 4000, max_position_embeddings=128).save_pretrained(path)
    assert main(["generate", "--model", str(path), "--prompt", "Hello", "--max-new-tokens", "24",
                 "--temperature", "50", "--top-k", "5000", "--top-p", "1", "--device", "cpu"]) == 0
    assert "error" not in capsys.readouterr().err


def test_prompt_bytes_that_are_not_utf8_are_replaced(checkpoint):
    done = subprocess.run([sys.executable, "-m", "qwen3_kernels", "generate", "--model", str(checkpoint), "--prompt",
                           b"caf\xe9 au lait", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"],
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()


def test_streamed_text_shows_an_unknown_id_as_nothing(checkpoint):
    tok = Tokenizer.from_pretrained(checkpoint)
    ids = tok.encode("Hello world")
    decoder = tok.stream_decoder()
    assert "".join(decoder.push(i) for i in [ids[0], len(tok) + 5, *ids[1:]]) == tok.decode(ids)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_tune_without_cuda_is_one_line_and_exit_0(capsys):
    assert main(["tune", "--preset", "0.6B"]) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "no CUDA device" in out and not err
