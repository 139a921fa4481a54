"""Triton SwiGLU against float64 and eager PyTorch (the flash-attention rule)."""

from qwen3_kernels_testing import float64
import pytest
import torch
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import DEVICES, DTYPES, atol, needs_triton, rand

from qwen3_kernels.ops import reference

pytestmark = needs_triton


def _swiglu():
    from qwen3_kernels.ops.triton import swiglu
    return swiglu


def _check(gate, up, dy, dtype):
    swiglu = _swiglu()
    y, y_eager = swiglu.swiglu(gate, up), reference.swiglu(gate, up)
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    y64 = float64.swiglu(g64, u64)
    assert y.dtype == dtype and y.shape == gate.shape
    assert_within_rule(y, y_eager, y64, 2, atol(dtype, y64), "y")
    leaves = [gate, up] if gate._base is None else [gate._base]
    grads, grads_eager = torch.autograd.grad(y, leaves, dy), torch.autograd.grad(y_eager, leaves, dy)
    dg64, du64 = torch.autograd.grad(y64, (g64, u64), dy.double())
    exact = [dg64, du64] if gate._base is None else [torch.cat((dg64, du64), -1)]
    for g, ge, g64 in zip(grads, grads_eager, exact):
        assert_within_rule(g, ge, g64, 3, atol(dtype, g64), "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 3072), (37, 1000), (1, 1), (3, 1537)])
def test_swiglu_forward_and_gradients(device, dtype, shape):
    gate = rand(*shape, dtype=dtype, device=device, scale=3.0).requires_grad_()
    up = rand(*shape, dtype=dtype, device=device, seed=1).requires_grad_()
    _check(gate, up, rand(*shape, dtype=dtype, device=device, seed=2), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_gate_up_projection_is_read_in_place(device, dtype):
    packed = rand(3, 7, 2 * 1000, dtype=dtype, device=device, scale=3.0).requires_grad_()
    gate, up = packed[..., :1000], packed[..., 1000:]
    _check(gate, up, rand(3, 7, 1000, dtype=dtype, device=device, seed=2), dtype)


def test_mismatched_inputs_are_named():
    swiglu = _swiglu()
    with pytest.raises(ValueError, match=r"gate shape \(2, 3\) != up shape \(2, 4\)"):
        swiglu.swiglu(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="gate dtype torch.float32 != up dtype torch.float16"):
        swiglu.swiglu(torch.randn(2, 3), torch.randn(2, 3).half())
