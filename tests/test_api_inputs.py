"""Inputs to the Python API: what is accepted (NumPy/torch integers, dtype names, 0-d EOS tensors)
and what gets a clear error before any work starts."""

import numpy as np
import pytest
import torch
from conftest import write_tokenizer

from qwen3_kernels import QWEN, Config, Tokenizer

CONFIG = Config(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                intermediate_size=40, max_position_embeddings=32)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QWEN(CONFIG).eval()


def _ids(*shape):
    return torch.randint(0, 101, shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("ids, error, message", [
    (torch.zeros(0, 4, dtype=torch.long), ValueError, "batch size is 0"),
    (torch.zeros(1, 4, dtype=torch.uint8), TypeError, "int64 or int32 token ids, got dtype torch.uint8"),
])
def test_bad_token_id_tensors(model, ids, error, message):
    with pytest.raises(error, match=message):
        model(ids)


@pytest.mark.parametrize("max_new_tokens", [np.int64(3), torch.tensor(3), 3])
def test_max_new_tokens_as_numpy_or_torch_integer(model, max_new_tokens):
    assert model.generate(_ids(1, 4), max_new_tokens).shape == (1, 7)


@pytest.mark.parametrize("max_new_tokens, error", [(2.0, TypeError), (True, TypeError), (0, ValueError)])
def test_bad_max_new_tokens(model, max_new_tokens, error):
    with pytest.raises(error, match="max_new_tokens must be a positive integer"):
        model.generate(_ids(1, 4), max_new_tokens)


def test_zero_dim_tensor_as_eos(model):
    first = int(model.generate(_ids(1, 4), 1)[0, -1])
    out = model.generate(_ids(1, 4), 5, eos_token_id=torch.tensor(first))
    assert (out[0, 4:] == first).all()  # finished at once, padded with the EOS id


def test_generate_stream_checks_before_the_first_step(model):
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        model.generate_stream(_ids(1, 4), 3, temperature=float("nan"))  # no next() needed


def test_kv_cache_under_autograd_says_it_is_for_inference(model):
    cache = model.new_cache(1, 16)
    with pytest.raises(RuntimeError, match="a KVCache is for inference"):
        model(_ids(1, 4), cache)
    with torch.no_grad():
        assert model(_ids(1, 4), cache).shape == (1, 4, 101)


def test_dtype_by_name(hf_checkpoint):
    path, _ = hf_checkpoint()
    assert QWEN.from_pretrained(path, dtype="bfloat16").embeddings.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be float32, float16 or bfloat16, got torch.int8"):
        QWEN.from_pretrained(path, dtype="int8")


def test_decode_rejects_ids_outside_the_vocabulary(tmp_path):
    write_tokenizer(tmp_path)
    tok = Tokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="token id -1 is not in the vocabulary"):
        tok.decode([-1])
    assert tok.decode(torch.tensor([tok.encode("Hello")[0]])) == tok.decode(tok.encode("Hello")[:1])


def test_model_built_on_meta_and_materialised_once():
    """The demo's path for big random models: no allocation before the final dtype and device."""
    with torch.device("meta"):
        model = QWEN(CONFIG)
    model = model.to(torch.bfloat16).to_empty(device="cpu").reset_parameters()
    assert model.lm_head.weight is model.embeddings.weight and model.embeddings.weight.dtype == torch.bfloat16
    assert torch.equal(model.norm.weight, torch.ones(32, dtype=torch.bfloat16))
    torch.testing.assert_close(model.inv_freq, QWEN(CONFIG).inv_freq)
    assert model.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert torch.isfinite(model(_ids(1, 5)).float()).all()


def test_numpy_is_a_declared_dependency():
    """torch warns at import on a fresh install without NumPy; the package must bring it."""
    import pathlib
    import tomllib
    pyproject = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(dep.split(";")[0].strip().startswith("numpy") for dep in pyproject["project"]["dependencies"])
