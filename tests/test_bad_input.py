"""Every bad input gets a clear error naming the file, key, shape or value."""

import json

import pytest
import torch
from conftest import TINY, edit_json
from safetensors.torch import load_file, save_file

from qwen3_kernels import QWEN, Config


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*does not exist"):
        QWEN.from_pretrained(tmp_path / "does-not-exist")


def test_no_weights(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights in .*model.safetensors"):
        QWEN.from_pretrained(path)


def test_truncated_safetensors_names_the_file(hf_checkpoint):
    path, _ = hf_checkpoint()
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        QWEN.from_pretrained(path)


def test_garbage_safetensors_names_the_file(hf_checkpoint):
    path, _ = hf_checkpoint()
    (path / "model.safetensors").write_bytes(b"\x00" * 7 + b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors: corrupt or truncated"):
        QWEN.from_pretrained(path)


def test_missing_shard_is_named(hf_checkpoint):
    path, _ = hf_checkpoint(tie=False, max_shard_size="20KB")
    shard = sorted(path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=shard.name):
        QWEN.from_pretrained(path)


def _rewrite(path, fn):
    file = path / "model.safetensors"
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(KeyError, match=r"missing tensors: \['blocks.1.attn.k_norm.weight'\]"):
        QWEN.from_pretrained(path)


def test_untied_checkpoint_without_lm_head(hf_checkpoint):
    path, _ = hf_checkpoint(tie=False)
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(KeyError, match="missing tensors: .*lm_head.weight"):
        QWEN.from_pretrained(path)


def test_unexpected_tensor_is_named(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.randn(3, 3)}))
    with pytest.raises(KeyError, match=r"unexpected tensors: \['model.layers.0.mlp.extra_proj.weight'\]"):
        QWEN.from_pretrained(path)


def test_shape_mismatch_names_key_and_both_shapes(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.randn(95, 64)}))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight: checkpoint shape \(95, 64\) "
                                         r"does not match the config's shape \(96, 64\)"):
        QWEN.from_pretrained(path)


def test_layer_count_mismatch(hf_checkpoint):
    path, _ = hf_checkpoint()
    edit_json(path / "config.json", lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(KeyError, match="missing tensors: .*blocks.2.attn"):
        QWEN.from_pretrained(path)


@pytest.fixture(scope="module")
def tiny_model():
    config = Config(vocab_size=TINY["vocab_size"], hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2,
                    head_dim=8, intermediate_size=40, max_position_embeddings=16)
    return QWEN(config)


@pytest.mark.parametrize("ids, error, message", [
    (torch.tensor([[1.0, 2.0]]), TypeError, "integer token ids, got dtype torch.float32"),
    (torch.tensor([[True, False]]), TypeError, "integer token ids, got dtype torch.bool"),
    ([[1, 2]], TypeError, "must be a torch.Tensor"),
    (torch.tensor([3, 4]), ValueError, r"shape \(batch, seq_len\), got \(2,\)"),
    (torch.tensor([[3, -1, 4]]), ValueError, "negative token id -1"),
    (torch.tensor([[3, 211, 4]]), ValueError, "token id 211 >= vocab_size 211"),
    (torch.zeros(1, 17, dtype=torch.long), ValueError, r"sequence length 17 exceeds .*max_position_embeddings=16"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "seq_len is 0"),
])
def test_bad_token_ids(tiny_model, ids, error, message):
    with pytest.raises(error, match=message):
        tiny_model(ids)


def test_bad_backend_setting(monkeypatch):
    from qwen3_kernels import ops
    monkeypatch.setenv("QWEN3_KERNELS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="QWEN3_KERNELS_BACKEND='cuda-please' is not one of"):
        ops.rms_norm(torch.randn(2, 4), torch.ones(4))


def test_corrupt_index(hf_checkpoint):
    path, _ = hf_checkpoint(tie=False, max_shard_size="20KB")
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match="model.safetensors.index.json: not a valid safetensors index"):
        QWEN.from_pretrained(path)
