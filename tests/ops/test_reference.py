"""The eager reference ops against independent float64 formulas."""

from qwen3_kernels_testing import float64
import pytest
import torch

from qwen3_kernels import calculate_sin_cos, ops, rotate
from qwen3_kernels.ops import reference

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = list(TOL)


def _rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1000), (3, 7, 128), (2, 1024)])
def test_rms_norm(dtype, shape):
    x, w = _rand(*shape, dtype=dtype), _rand(shape[-1], dtype=dtype, seed=1)
    out = reference.rms_norm(x, w)
    assert out.dtype == dtype and out.shape == x.shape
    assert _rel(out, float64.rms_norm(x, w)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    x, r, w = _rand(5, 1000, dtype=dtype), _rand(5, 1000, dtype=dtype, seed=1), _rand(1000, dtype=dtype, seed=2)
    normed, summed = reference.add_rms_norm(x, r, w, 1e-6)
    assert torch.equal(summed, x + r)
    assert _rel(normed, float64.rms_norm(x.double() + r.double(), w)) < 2 * TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("table_shape", ["(T, D)", "(B, T, D)"])
def test_apply_rope(dtype, table_shape):
    B, T, H, D = 2, 11, 3, 64
    x = _rand(B, T, H, D, dtype=dtype)
    positions = torch.arange(T) if table_shape == "(T, D)" else torch.arange(T) + torch.tensor([[0], [5]])
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2).float() / D))
    sin, cos = calculate_sin_cos(positions, inv_freq, dtype=dtype)
    assert cos.shape == ((T, D) if table_shape == "(T, D)" else (B, T, D))
    out = reference.apply_rope(x, cos, sin)
    assert out.dtype == dtype and _rel(out, float64.rope(x, cos, sin)) < 2 * TOL[dtype]


def test_rotate_is_the_half_split_rotation():
    x = torch.arange(6.0)
    assert torch.equal(rotate(x), torch.tensor([-3.0, -4.0, -5.0, 0.0, 1.0, 2.0]))


def test_qk_norm_rope():
    q, k = _rand(2, 9, 4, 16), _rand(2, 9, 2, 16, seed=1)
    qw, kw = _rand(16, seed=2), _rand(16, seed=3)
    sin, cos = calculate_sin_cos(torch.arange(9), 1.0 / (1e4 ** (torch.arange(0, 16, 2).float() / 16)))
    q_out, k_out = reference.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    assert _rel(q_out, float64.rope(float64.rms_norm(q, qw), cos, sin)) < 1e-5
    assert _rel(k_out, float64.rope(float64.rms_norm(k, kw), cos, sin)) < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu(dtype):
    gate, up = _rand(3, 1001, dtype=dtype) * 4, _rand(3, 1001, dtype=dtype, seed=1)
    assert _rel(reference.swiglu(gate, up), float64.swiglu(gate, up)) < 2 * TOL[dtype]


@pytest.mark.parametrize("Tq, Tk", [(1, 1), (13, 13), (1, 40), (7, 29), (29, 7)])
@pytest.mark.parametrize("H, Hkv", [(4, 2), (4, 1), (3, 3)])
@pytest.mark.parametrize("causal", [True, False])
def test_attention(Tq, Tk, H, Hkv, causal):
    q, k, v = _rand(2, Tq, H, 16), _rand(2, Tk, Hkv, 16, seed=1), _rand(2, Tk, Hkv, 16, seed=2)
    out = reference.attention(q, k, v, causal=causal)
    assert out.shape == q.shape and not out.isnan().any()
    assert _rel(out, float64.attention(q, k, v, causal=causal)) < 1e-5


def test_attention_rows_without_keys_are_zero():
    q, k, v = _rand(1, 6, 2, 8), _rand(1, 3, 2, 8, seed=1), _rand(1, 3, 2, 8, seed=2)
    out = reference.attention(q, k, v, causal=True)  # Tq > Tk: the first 3 queries see no key
    assert torch.equal(out[:, :3], torch.zeros_like(out[:, :3]))
    assert _rel(out, float64.attention(q, k, v)) < 1e-5


def test_attention_softmax_scale():
    q, k, v = _rand(1, 5, 2, 8), _rand(1, 5, 2, 8, seed=1), _rand(1, 5, 2, 8, seed=2)
    out = reference.attention(q, k, v, causal=True, softmax_scale=0.3)
    assert _rel(out, float64.attention(q, k, v, scale=0.3)) < 1e-5


def test_ops_dispatch_to_the_reference_on_cpu(monkeypatch):
    monkeypatch.setattr(ops, "_choices", {})
    x, w = _rand(4, 32), _rand(32, seed=1)
    assert torch.equal(ops.rms_norm(x, w), reference.rms_norm(x, w))
    for op, choice in ops.report("cpu", torch.float32).items():
        assert choice.backend == "reference" and choice.reason, op
    monkeypatch.setenv("QWEN3_KERNELS_BACKEND", "reference")
    assert "forced" in ops.choose("swiglu", "cpu", torch.float32).reason


@pytest.mark.parametrize("Tq", [1, 3])
def test_attention_with_per_sequence_kv_lengths(Tq):
    q, k, v = _rand(3, Tq, 4, 8), _rand(3, 20, 2, 8, seed=1), _rand(3, 20, 2, 8, seed=2)
    kv_lens = torch.tensor([20, 7, 1])
    out = reference.attention(q, k, v, causal=True, kv_lens=kv_lens)
    assert not out.isnan().any()
    assert _rel(out, float64.attention(q, k, v, kv_lens=kv_lens)) < 1e-5
    # keys past a sequence's length do not matter
    k2, v2 = k.clone(), v.clone()
    k2[1, 7:], v2[1, 7:] = 1e4, -1e4
    torch.testing.assert_close(reference.attention(q, k2, v2, kv_lens=kv_lens), out)
