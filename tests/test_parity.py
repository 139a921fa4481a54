"""Logits of QWEN.from_pretrained against transformers' Qwen3ForCausalLM on the same checkpoint."""

import pytest
import torch
from conftest import TINY, edit_json, load_hf
from safetensors.torch import load_file, save_file

from qwen3_kernels import QWEN, Config


def _ids(batch=2, seq=23, vocab=TINY["vocab_size"], seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("tie", [True, False])
def test_fp32_logits_match_transformers(hf_checkpoint, tie):
    path, hf = hf_checkpoint(tie=tie)
    model = QWEN.from_pretrained(path)
    assert model.config.tie_word_embeddings is tie
    assert (model.lm_head.weight is model.embeddings.weight) is tie
    ids = _ids()
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    assert _rel_err(ours, theirs) < 1e-5


def test_sharded_checkpoint(hf_checkpoint, capsys):
    path, hf = hf_checkpoint(tie=False, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    model = QWEN.from_pretrained(path)
    assert "loading shard" in capsys.readouterr().err
    ids = _ids()
    with torch.no_grad():
        assert _rel_err(model(ids), hf(ids).logits) < 1e-5


def test_bf16_checkpoint_matches_transformers_bf16_bit_for_bit(hf_checkpoint):
    path, hf = hf_checkpoint(tie=True, dtype=torch.bfloat16)
    model = QWEN.from_pretrained(path)
    assert model.embeddings.weight.dtype == torch.bfloat16
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), hf(ids).logits)


def test_bf16_weights_loaded_as_fp32_match(hf_checkpoint):
    path, hf = hf_checkpoint(tie=True, dtype=torch.bfloat16)
    model = QWEN.from_pretrained(path, dtype=torch.float32)
    hf = load_hf(path, torch.float32)
    ids = _ids()
    with torch.no_grad():
        assert _rel_err(model(ids), hf(ids).logits) < 1e-5


def test_tied_config_whose_file_still_stores_lm_head(hf_checkpoint):
    path, hf = hf_checkpoint(tie=True)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    model = QWEN.from_pretrained(path)
    assert model.lm_head.weight is model.embeddings.weight
    ids = _ids()
    with torch.no_grad():
        assert _rel_err(model(ids), hf(ids).logits) < 1e-5


def test_yarn_rope_scaling_matches_transformers(hf_checkpoint):
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5e6}
    path, hf = hf_checkpoint(tie=True, rope_parameters=yarn)
    config = Config.from_pretrained(path)
    assert config.rope_scaling["rope_type"] == "yarn" and config.rope_theta == 5e6
    model = QWEN.from_pretrained(path)
    ids = _ids(seq=40)  # past the original context, where YaRN's interpolation matters
    with torch.no_grad():
        assert _rel_err(model(ids), hf(ids).logits) < 1e-5


def test_published_spelling_with_rope_scaling(hf_checkpoint):
    """Qwen3's published config.json: top-level rope_theta, torch_dtype and a `rope_scaling` dict."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5e6}
    path, hf = hf_checkpoint(tie=True, rope_parameters=yarn)

    def to_published(c):
        params = c.pop("rope_parameters")
        c["rope_theta"] = params.pop("rope_theta")
        c["rope_scaling"] = params
        c["torch_dtype"] = c.pop("dtype", "float32")

    edit_json(path / "config.json", to_published)
    model = QWEN.from_pretrained(path)
    assert model.config.rope_theta == 5e6
    ids = _ids(seq=40)
    with torch.no_grad():
        assert _rel_err(model(ids), hf(ids).logits) < 1e-5


def test_fp16_and_device_arguments(hf_checkpoint):
    path, hf = hf_checkpoint(tie=False)
    model = QWEN.from_pretrained(path, dtype=torch.float16, device="cpu")
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert all(p.device.type == "cpu" for p in model.parameters())
    hf16 = load_hf(path, torch.float16)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), hf16(ids).logits)


def test_moving_the_model_to_bf16_keeps_rotary_frequencies_fp32(hf_checkpoint):
    path, hf = hf_checkpoint(tie=True, dtype=torch.bfloat16)
    moved = QWEN.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16)
    assert moved.inv_freq.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(moved(ids), hf(ids).logits)
