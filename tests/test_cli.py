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
    ("--temperature", "-1", "must be >= 0"),
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
