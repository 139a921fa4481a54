"""Every bad input gets a clear error naming the file, key, shape or value."""

import json

import pytest
import torch
from conftest import TINY, edit_json
from safetensors.torch import load_file, save_file

from qwen3_kernels import QWEN, Config
from qwen3_kernels.loading import CheckpointError


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
    with pytest.raises(CheckpointError, match=r"does not match its config: missing model.layers.1.self_attn.k_norm.weight$"):
        QWEN.from_pretrained(path)


def test_untied_checkpoint_without_lm_head(hf_checkpoint):
    path, _ = hf_checkpoint(tie=False)
    _rewrite(path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match="missing lm_head.weight"):
        QWEN.from_pretrained(path)


def test_unexpected_tensor_is_named(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.randn(3, 3)}))
    with pytest.raises(CheckpointError, match=r"unexpected model.layers.0.mlp.extra_proj.weight$"):
        QWEN.from_pretrained(path)


def test_shape_mismatch_names_key_and_both_shapes(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.randn(95, 64)}))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj.weight: checkpoint shape \(95, 64\) "
                                         r"does not match the config's shape \(96, 64\)"):
        QWEN.from_pretrained(path)


@pytest.mark.parametrize("layers, message", [
    (3, r"missing 11 tensors, e.g. model.layers.2.input_layernorm.weight, .*; "
        r"the checkpoint has 2 layers, config.json's num_hidden_layers says 3"),
    (1, r"unexpected 11 tensors, e.g. model.layers.1.input_layernorm.weight.*"
        r"the checkpoint has 2 layers, config.json's num_hidden_layers says 1"),
])
def test_layer_count_mismatch_names_checkpoint_keys(hf_checkpoint, layers, message):
    path, _ = hf_checkpoint()
    edit_json(path / "config.json", lambda c: c.update(num_hidden_layers=layers))
    with pytest.raises(CheckpointError, match=message):
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


def test_unavailable_device_is_not_called_corruption(hf_checkpoint):
    path, _ = hf_checkpoint()
    device = f"cuda:{torch.cuda.device_count() + 3}" if torch.cuda.is_available() else "cuda"
    with pytest.raises(RuntimeError, match=rf"device {device} is not available") as info:
        QWEN.from_pretrained(path, device=device)
    assert "corrupt" not in str(info.value)


def test_out_of_memory_names_the_tensor_and_its_size(hf_checkpoint, monkeypatch):
    path, _ = hf_checkpoint()
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if self.shape == (96, 64):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 KiB")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    with pytest.raises(MemoryError, match=r"out of memory on cpu loading 'model.layers.0.mlp.(gate|up)_proj.weight' "
                                          r"\(\(96, 64\), 0.0 MiB in torch.float32\)") as info:
        QWEN.from_pretrained(path)
    assert "corrupt" not in str(info.value)


def test_index_pointing_to_the_wrong_shard(hf_checkpoint):
    path, _ = hf_checkpoint(tie=False, max_shard_size="20KB")
    index = path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    key = next(k for k, f in weight_map.items() if f == shards[0])
    edit_json(index, lambda d: d["weight_map"].update({key: shards[1]}))
    with pytest.raises(CheckpointError, match=rf"tensor '{key}': the index puts it in {shards[1]}, which does not "
                                              r"contain it") as info:
        QWEN.from_pretrained(path)
    assert "corrupt" not in str(info.value)


def test_headless_checkpoint_gets_a_short_message(hf_checkpoint):
    path, _ = hf_checkpoint()
    _rewrite(path, lambda t: t.update({k.removeprefix("model."): t.pop(k) for k in list(t)}))  # a bare Qwen3Model
    with pytest.raises(CheckpointError) as info:
        QWEN.from_pretrained(path)
    message = str(info.value)
    assert "missing 24 tensors, e.g. model.embed_tokens.weight" in message and "unexpected 24 tensors" in message, message
    assert len(message) < 600 and not message.startswith('"')


def test_progress_line_ends_before_an_error(hf_checkpoint, capsys):
    path, _ = hf_checkpoint(tie=False, max_shard_size="20KB")
    edit_json(path / "config.json", lambda c: c.update(intermediate_size=95))
    with pytest.raises(CheckpointError, match="does not match the config's shape"):
        QWEN.from_pretrained(path)
    err = capsys.readouterr().err
    assert "loading shard" in err and err.endswith("\n")


def test_stray_rotary_inv_freq_is_ignored(hf_checkpoint):
    path, hf = hf_checkpoint()
    _rewrite(path, lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.randn(8),
                                       "model.rotary_emb.inv_freq": torch.randn(8)}))
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(QWEN.from_pretrained(path)(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)


def test_attention_bias_checkpoint_with_o_proj_bias(hf_checkpoint):
    path, hf = hf_checkpoint(attention_bias=True)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        torch.testing.assert_close(QWEN.from_pretrained(path)(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
