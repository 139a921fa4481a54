"""The README's Python blocks, run in order as one script (as a reader would paste them), against
tiny random checkpoints saved under the directory names the README uses (Qwen3-0.6B/, a dense Qwen3
with a tokenizer; Qwen3-30B-A3B/, a Qwen3-MoE with the same vocabulary). Nothing is substituted in
the code: a block that stops running, or refers to something an earlier block no longer defines,
fails here."""

import os
import re

import pytest
import torch
from conftest import make_hf_model, make_hf_moe_model, write_tokenizer

transformers = pytest.importorskip("transformers")
README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks() -> list[str]:
    with open(README) as f:
        return re.findall(r"^```python\n(.*?)^```$", f.read(), flags=re.S | re.M)


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    dense = tmp_path / "Qwen3-0.6B"
    vocab = write_tokenizer(dense).get_vocab_size()
    make_hf_model(vocab_size=vocab, max_position_embeddings=256).save_pretrained(dense)
    write_tokenizer(dense)
    make_hf_moe_model(vocab_size=vocab, max_position_embeddings=256).save_pretrained(tmp_path / "Qwen3-30B-A3B")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_its_examples():
    blocks = python_blocks()
    assert len(blocks) >= 5 and all(block.strip() for block in blocks)


def test_the_readme_python_blocks_run_in_order(checkpoints, capsys):
    namespace = {"__name__": "readme"}
    for number, block in enumerate(python_blocks(), start=1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"README python block {number} failed: {type(e).__name__}: {e}\n{block}") from e
    assert torch.isfinite(namespace["loss"]).all()
    assert namespace["logits"].shape[:2] == namespace["input_ids"].shape
    assert "8,190,735,360 parameters" in capsys.readouterr().out   # Qwen3-8B, counted on the meta device
