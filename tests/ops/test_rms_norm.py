"""Triton RMSNorm and add+RMSNorm against float64 and eager PyTorch (the flash-attention rule)."""

from qwen3_kernels_testing import float64
import pytest
import torch
from qwen3_kernels_testing.kernels import DEVICES, DTYPES, atol, needs_triton, rand
from qwen3_kernels_testing.float64 import assert_within_rule

from qwen3_kernels.ops import reference

pytestmark = needs_triton

# 96 and 5120 rows run as a tile and a tail tile (64 + 32, 4096 + 1024: Qwen3-14B/32B's hidden size)
SHAPES = [(1, 1024), (3, 5, 1024), (37, 1000), (2, 19, 128), (1, 64), (257, 96), (2, 3, 5120)]


def _kernels():
    from qwen3_kernels.ops.triton import rms_norm  # a module: imported late, after conftest's setup
    return rms_norm


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_forward_and_gradients(device, dtype, shape):
    kernels = _kernels()
    x = rand(*shape, dtype=dtype, device=device, scale=2.0).requires_grad_()
    w = rand(shape[-1], dtype=dtype, device=device, seed=1, scale=0.3, offset=1.0).requires_grad_()
    dy = rand(*shape, dtype=dtype, device=device, seed=2)

    y = kernels.rms_norm(x, w, 1e-6)
    y_eager = reference.rms_norm(x, w, 1e-6)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = float64.rms_norm(x64, w64)
    assert y.dtype == dtype and y.shape == x.shape
    assert_within_rule(y, y_eager, y64, 2, atol(dtype, y64), "y")

    dx, dw = torch.autograd.grad(y, (x, w), dy)
    dx_eager, dw_eager = torch.autograd.grad(y_eager, (x, w), dy)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert_within_rule(dx, dx_eager, dx64, 3, atol(dtype, dx64), "dx")
    assert_within_rule(dw, dw_eager, dw64, 3, atol(dtype, dw64), "dw")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 7, 1024), (41, 1000), (1, 1, 64), (5, 2560)])
def test_add_rms_norm_forward_and_gradients(device, dtype, shape):
    kernels = _kernels()
    x = rand(*shape, dtype=dtype, device=device).requires_grad_()
    r = rand(*shape, dtype=dtype, device=device, seed=1, scale=3.0).requires_grad_()
    w = rand(shape[-1], dtype=dtype, device=device, seed=2, scale=0.3, offset=1.0).requires_grad_()
    dy, ds = rand(*shape, dtype=dtype, device=device, seed=3), rand(*shape, dtype=dtype, device=device, seed=4)

    y, s = kernels.add_rms_norm(x, r, w, 1e-6)
    y_eager, s_eager = reference.add_rms_norm(x, r, w, 1e-6)
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    s64 = x64 + r64
    y64 = float64.rms_norm(s64, w64)
    assert_within_rule(s, s_eager, s64, 2, atol(dtype, s64), "x + residual")
    assert_within_rule(y, y_eager, y64, 2, atol(dtype, y64), "y")

    grads = torch.autograd.grad((y, s), (x, r, w), (dy, ds))
    grads_eager = torch.autograd.grad((y_eager, s_eager), (x, r, w), (dy, ds))
    grads64 = torch.autograd.grad((y64, s64), (x64, r64, w64), (dy.double(), ds.double()))
    for name, g, ge, g64 in zip(("dx", "dresidual", "dw"), grads, grads_eager, grads64):
        assert_within_rule(g, ge, g64, 3, atol(dtype, g64), name)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_input_and_only_one_output_used(device):
    kernels = _kernels()
    base = rand(6, 2 * 96, device=device)
    x = base[:, ::2].requires_grad_()  # last-dim stride 2: the launcher must copy, not misread
    w = rand(96, device=device, seed=1, offset=1.0).requires_grad_()
    torch.testing.assert_close(kernels.rms_norm(x, w), reference.rms_norm(x, w), rtol=1e-5, atol=1e-5)
    r = rand(6, 96, device=device, seed=2).requires_grad_()
    y, _ = kernels.add_rms_norm(x, r, w)
    y.sum().backward()  # no gradient flows into the sum output: the kernel must treat it as zero
    ref_x, ref_r, ref_w = (t.detach().clone().requires_grad_() for t in (x, r, w))
    reference.add_rms_norm(ref_x, ref_r, ref_w)[0].sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradient_is_deterministic(device):
    kernels = _kernels()
    x = rand(301, 128, device=device).requires_grad_()
    w = rand(128, device=device, seed=1).requires_grad_()
    dy = rand(301, 128, device=device, seed=2)
    first = torch.autograd.grad(kernels.rms_norm(x, w), w, dy)[0]
    second = torch.autograd.grad(kernels.rms_norm(x, w), w, dy)[0]
    assert torch.equal(first, second)


def test_bad_shapes_are_named():
    kernels = _kernels()
    with pytest.raises(ValueError, match=r"weight shape \(5,\) does not match x's last dim 4"):
        kernels.rms_norm(torch.randn(3, 4), torch.ones(5))
    with pytest.raises(ValueError, match=r"residual shape \(3, 5\) does not broadcast to x.s shape \(3, 4\)"):
        kernels.add_rms_norm(torch.randn(3, 4), torch.randn(3, 5), torch.ones(4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, w_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                            (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
@pytest.mark.parametrize("shape", [(3, 7, 96), (37, 1000)])
def test_a_weight_in_another_dtype(device, dtype, w_dtype, shape):
    """fp32 weights beside half activations (autocast, fp32 master weights), and any other float
    weight: fp32 math, y and dx in the activations' dtype, dw in the weight's; rms_norm and
    add_rms_norm."""
    kernels = _kernels()
    x = rand(*shape, dtype=dtype, device=device, scale=2.0).requires_grad_()
    r = rand(*shape, dtype=dtype, device=device, seed=3).requires_grad_()
    w = rand(shape[-1], dtype=w_dtype, device=device, seed=1, scale=0.3, offset=1.0).requires_grad_()
    dy = rand(*shape, dtype=dtype, device=device, seed=2)
    x64, r64, w64 = (t.detach().double().requires_grad_() for t in (x, r, w))
    for name, run, inputs, inputs64, exact in (
            ("rms_norm", lambda f, a, w: f.rms_norm(a, w, 1e-6), (x,), (x64,), lambda a: float64.rms_norm(a, w64)),
            ("add_rms_norm", lambda f, a, b, w: f.add_rms_norm(a, b, w, 1e-6)[0], (x, r), (x64, r64),
             lambda a, b: float64.rms_norm(a + b, w64))):
        y, y_eager, y64 = run(kernels, *inputs, w), run(reference, *inputs, w), exact(*inputs64)
        assert y.dtype == dtype and y_eager.dtype == dtype
        assert_within_rule(y, y_eager, y64, 2, atol(dtype, y64), f"{name} y")
        grads = torch.autograd.grad(y, (*inputs, w), dy)
        grads_eager = torch.autograd.grad(y_eager, (*inputs, w), dy)
        grads64 = torch.autograd.grad(y64, (*inputs64, w64), dy.double())
        assert [g.dtype for g in grads] == [dtype] * len(inputs) + [w_dtype]
        for i, (g, ge, g64) in enumerate(zip(grads, grads_eager, grads64)):
            rounded_to = w_dtype if g is grads[-1] and w_dtype.itemsize < dtype.itemsize else dtype
            assert_within_rule(g, ge, g64, 3, atol(rounded_to, g64), f"{name} grad {i}")


def test_a_weight_that_is_not_floating_point_is_named():
    kernels = _kernels()
    for f in (kernels, reference):
        with pytest.raises(TypeError, match="rms_norm: weight dtype torch.int64 is not a floating-point dtype"):
            f.rms_norm(torch.randn(3, 4), torch.ones(4, dtype=torch.int64))
