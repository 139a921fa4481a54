"""Triton QK-norm + RoPE and plain RoPE against float64 and eager PyTorch (the flash-attention rule)."""

from qwen3_kernels_testing import float64
import pytest
import torch
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import DEVICES, DTYPES, atol, needs_triton, rand

from qwen3_kernels import calculate_sin_cos
from qwen3_kernels.ops import reference

pytestmark = needs_triton

# (B, T, H, Hkv, D): Qwen3's head_dim 128 with its 2:1 grouping, head_dim 64, odd counts, one token.
SHAPES = [(2, 7, 16, 8, 128), (1, 13, 4, 4, 64), (3, 5, 5, 1, 64), (1, 1, 2, 1, 128), (2, 3, 3, 3, 80)]


def _rope():
    from qwen3_kernels.ops.triton import rope
    return rope


def _tables(B, T, D, dtype, device, per_batch=False):
    positions = torch.arange(T) + (torch.tensor([[0], [9], [4]])[:B] if per_batch else 0)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    sin, cos = calculate_sin_cos(positions, inv_freq, dtype=dtype)
    return cos.to(device), sin.to(device)


def _projection_views(B, T, H, Hkv, D, dtype, device):
    """q and k as the model gets them: strided views into one (B, T, (H + 2*Hkv) * D) projection."""
    proj = rand(B, T, (H + 2 * Hkv) * D, dtype=dtype, device=device, scale=2.0)
    q = proj[..., : H * D].view(B, T, H, D)
    k = proj[..., H * D: (H + Hkv) * D].view(B, T, Hkv, D)
    assert B * T == 1 or not (q.is_contiguous() or k.is_contiguous())
    return q, k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hkv, D", SHAPES)
def test_qk_norm_rope_forward_and_gradients(device, dtype, B, T, H, Hkv, D):
    _check_qk_norm_rope(device, dtype, dtype, B, T, H, Hkv, D)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B, T, H, Hkv, D", SHAPES[1:3])
def test_qk_norm_rope_with_fp32_weights_and_tables(device, dtype, B, T, H, Hkv, D):
    """Half q/k beside fp32 norm weights and cos/sin (transformers' Qwen3 under autocast): fp32 math,
    q/k out in their own dtype, weight gradients in fp32."""
    _check_qk_norm_rope(device, dtype, torch.float32, B, T, H, Hkv, D)


def _check_qk_norm_rope(device, dtype, weight_dtype, B, T, H, Hkv, D):
    rope = _rope()
    q, k = _projection_views(B, T, H, Hkv, D, dtype, device)
    q_before, k_before = q.clone(), k.clone()
    q, k = q.requires_grad_(), k.requires_grad_()
    qw = rand(D, dtype=weight_dtype, device=device, seed=1, scale=0.3, offset=1.0).requires_grad_()
    kw = rand(D, dtype=weight_dtype, device=device, seed=2, scale=0.3, offset=1.0).requires_grad_()
    cos, sin = _tables(B, T, D, weight_dtype, device, per_batch=B > 1)
    dq_out, dk_out = rand(B, T, H, D, dtype=dtype, device=device, seed=3), rand(B, T, Hkv, D, dtype=dtype,
                                                                                device=device, seed=4)

    out = rope.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    assert torch.equal(q, q_before) and torch.equal(k, k_before), "inputs were modified"
    eager = reference.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, qw, kw)]
    q64, k64, qw64, kw64 = leaves64
    exact = (float64.rope(float64.rms_norm(q64, qw64), cos, sin), float64.rope(float64.rms_norm(k64, kw64), cos, sin))
    for name, o, e, x in zip(("q", "k"), out, eager, exact):
        assert o.dtype == dtype and o.shape == x.shape
        assert_within_rule(o, e, x, 2, atol(dtype, x), name)

    grads = torch.autograd.grad(out, (q, k, qw, kw), (dq_out, dk_out))
    grads_eager = torch.autograd.grad(eager, (q, k, qw, kw), (dq_out, dk_out))
    grads64 = torch.autograd.grad(exact, leaves64, (dq_out.double(), dk_out.double()))
    assert [g.dtype for g in grads] == [dtype, dtype, weight_dtype, weight_dtype]
    for name, g, ge, g64 in zip(("dq", "dk", "dq_weight", "dk_weight"), grads, grads_eager, grads64):
        assert_within_rule(g, ge, g64, 3, atol(dtype, g64), name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_apply_rope_forward_and_gradient(device, dtype, per_batch):
    rope = _rope()
    B, T, H, D = 2, 11, 3, 64
    x = rand(B, T, H, D, dtype=dtype, device=device).requires_grad_()
    cos, sin = _tables(B, T, D, dtype, device, per_batch)
    dy = rand(B, T, H, D, dtype=dtype, device=device, seed=1)
    y, y_eager = rope.apply_rope(x, cos, sin), reference.apply_rope(x, cos, sin)
    x64 = x.detach().double().requires_grad_()
    y64 = float64.rope(x64, cos, sin)
    assert_within_rule(y, y_eager, y64, 2, atol(dtype, y64), "y")
    (dx,), (dx_eager,), (dx64,) = (torch.autograd.grad(o, i, g) for o, i, g in
                                   ((y, x, dy), (y_eager, x, dy), (y64, x64, dy.double())))
    assert_within_rule(dx, dx_eager, dx64, 3, atol(dtype, dx64), "dx")


@pytest.mark.parametrize("device", DEVICES)
def test_weight_gradients_are_deterministic(device):
    rope = _rope()
    q, k = (t.requires_grad_() for t in _projection_views(3, 9, 4, 2, 64, torch.float32, device))
    qw, kw = (rand(64, device=device, seed=s, offset=1.0).requires_grad_() for s in (1, 2))
    cos, sin = _tables(3, 9, 64, torch.float32, device)
    grads = [torch.autograd.grad(rope.qk_norm_rope(q, k, qw, kw, cos, sin), (qw, kw),
                                 (torch.ones(3, 9, 4, 64, device=device), torch.ones(3, 9, 2, 64, device=device)))
             for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_bad_shapes_are_named():
    rope = _rope()
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 4, 1, 8)
    cos, sin = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"cos/sin must have shape \(T, D\) = \(4, 8\).*got \(3, 8\)"):
        rope.apply_rope(q, cos[:3], sin[:3])
    with pytest.raises(ValueError, match=r"q must have shape \(B, T, H, D\), got \(4, 2, 8\)"):
        rope.qk_norm_rope(q[0], k, torch.ones(8), torch.ones(8), cos, sin)
    with pytest.raises(ValueError, match=r"k_weight shape \(7,\) must be \(head_dim,\) = \(8,\)"):
        rope.qk_norm_rope(q, k, torch.ones(8), torch.ones(7), cos, sin)
    with pytest.raises(NotImplementedError, match="no gradient for cos/sin"):
        rope.apply_rope(q, cos.requires_grad_(), sin)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, T, H, Hkv, D", [(2, 1, 16, 8, 128), (3, 5, 5, 1, 64), (1, 3, 4, 4, 80)])
def test_qk_norm_rope_into_cache_writes_keys_and_values_at_positions(device, dtype, B, T, H, Hkv, D):
    """The decode-time launch: q returned, k (normed, rotated) and v written into the cache rows given
    by each sequence's positions, every other cache row untouched."""
    rope = _rope()
    proj = rand(B, T, (H + 2 * Hkv) * D, dtype=dtype, device=device, scale=2.0)   # one packed projection
    q, k, v = (t.view(B, T, -1, D) for t in proj.split([H * D, Hkv * D, Hkv * D], dim=-1))
    qw = rand(D, dtype=dtype, device=device, seed=1, scale=0.3, offset=1.0)
    kw = rand(D, dtype=dtype, device=device, seed=2, scale=0.3, offset=1.0)
    max_len = 13
    starts = torch.tensor([0, 7, 4])[:B]                                           # sequences of different lengths
    positions = (starts[:, None] + torch.arange(T)).to(device)
    cos, sin = _tables(B, T, D, dtype, device, per_batch=B > 1)
    before = [rand(B, max_len, Hkv, D, dtype=dtype, device=device, seed=s) for s in (5, 6)]
    k_cache, v_cache = (c.clone() for c in before)
    q_out = rope.qk_norm_rope_into_cache(q, k, v, qw, kw, cos, sin, k_cache, v_cache, positions, 1e-6)

    q_eager, k_eager = reference.qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6)
    q64 = float64.rope(float64.rms_norm(q, qw), cos, sin)
    k64 = float64.rope(float64.rms_norm(k, kw), cos, sin)
    assert q_out.dtype == dtype and q_out.shape == (B, T, H, D)
    assert_within_rule(q_out, q_eager, q64, 2, atol(dtype, q64), "q")
    batch = torch.arange(B, device=device)[:, None]
    assert_within_rule(k_cache[batch, positions], k_eager, k64, 2, atol(dtype, k64), "k in the cache")
    assert torch.equal(v_cache[batch, positions], v), "v is copied into the cache bit for bit"
    untouched = torch.ones(B, max_len, dtype=torch.bool, device=device)
    untouched[batch, positions] = False
    for name, cache, old in (("k_cache", k_cache, before[0]), ("v_cache", v_cache, before[1])):
        assert torch.equal(cache[untouched], old[untouched]), f"{name} rows outside positions changed"


def test_qk_norm_rope_into_cache_names_bad_inputs():
    rope = _rope()
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    cos, sin, w = torch.randn(2, 8), torch.randn(2, 8), torch.ones(8)
    cache = torch.zeros(1, 4, 1, 8)
    ok = torch.tensor([[2, 3]])
    for fn in (rope.qk_norm_rope_into_cache, reference.qk_norm_rope_into_cache):
        with pytest.raises(ValueError, match=r"positions must be in \[0, max_len=4\), got values from 3 to 4"):
            fn(q, k, v, w, w, cos, sin, cache.clone(), cache.clone(), ok + 1)
        with pytest.raises(ValueError, match=r"positions must be an int32/int64 tensor of shape \(B, T\) = \(1, 2\)"):
            fn(q, k, v, w, w, cos, sin, cache.clone(), cache.clone(), ok[0])
        with pytest.raises(ValueError, match=r"k_cache must have shape \(B=1, max_len, Hkv=1, D=8\), got \(1, 4, 2, 8\)"):
            fn(q, k, v, w, w, cos, sin, torch.zeros(1, 4, 2, 8), cache.clone(), ok)
        with pytest.raises(ValueError, match=r"v torch.float32 \(1, 2, 2, 8\) must match k"):
            fn(q, k, q, w, w, cos, sin, cache.clone(), cache.clone(), ok)
    with pytest.raises(RuntimeError, match="writes a KV cache in place and has no backward"):
        rope.qk_norm_rope_into_cache(q.requires_grad_(), k, v, w, w, cos, sin, cache.clone(), cache.clone(), ok)
