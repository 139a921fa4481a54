"""packed_linear (q/k/v or gate/up as one GEMM over weights that share a buffer) against the reference's
one-by-one projections and float64, and the packing itself: what it keeps (Parameters, names, values,
state dict) and when the model re-packs (construction, moves, loads)."""

import pytest
import torch
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import DEVICES, DTYPES, atol, needs_triton, rand

from qwen3_kernels import QWEN, Config, ops
from qwen3_kernels.ops import pack_parameters, reference
from qwen3_kernels.ops.packing import packed_view

pytestmark = needs_triton

SMALL = Config(vocab_size=61, hidden_size=48, num_layers=2, num_heads=3, num_kv_heads=1, head_dim=16,
               intermediate_size=40, max_position_embeddings=32)


def _linear():
    from qwen3_kernels.ops.triton import linear
    return linear


def _weights(rows, C, dtype, device, packed):
    weights = [torch.nn.Parameter(rand(n, C, dtype=dtype, device=device, seed=10 + i, scale=C ** -0.5))
               for i, n in enumerate(rows)]
    if packed:
        pack_parameters(weights)
    assert (packed_view(weights) is not None) == packed
    return weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_linear_forward_and_gradients(device, dtype, packed, with_bias):
    linear = _linear()
    B, T, C, rows = 2, 7, 37, (48, 16, 16)
    x = rand(B, T, C, dtype=dtype, device=device).requires_grad_()
    weights = _weights(rows, C, dtype, device, packed)
    biases = ([rand(n, dtype=dtype, device=device, seed=20 + i).requires_grad_() for i, n in enumerate(rows[:2])]
              + [None]) if with_bias else None
    dy = rand(B, T, sum(rows), dtype=dtype, device=device, seed=3)

    out, eager = linear.packed_linear(x, weights, biases), reference.packed_linear(x, weights, biases)
    leaves = [x, *weights, *(biases[:2] if with_bias else [])]
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64 = leaves64[0], leaves64[1:4]
    b64 = leaves64[4:] + [None] if with_bias else [None] * 3
    exact = torch.cat([x64 @ w.T + (b if b is not None else 0) for w, b in zip(w64, b64)], -1)
    assert out.dtype == dtype
    assert_within_rule(out, eager, exact, 2, atol(dtype, exact), "out")

    grads = torch.autograd.grad(out, leaves, dy)
    grads_eager = torch.autograd.grad(eager, leaves, dy)
    grads64 = torch.autograd.grad(exact, leaves64, dy.double())
    names = ["dx", "dWq", "dWk", "dWv", "dbq", "dbk"]
    for name, g, ge, g64 in zip(names, grads, grads_eager, grads64):
        assert g.shape == g64.shape
        assert_within_rule(g, ge, g64, 3, atol(dtype, g64), name)


def test_frozen_weights_get_no_weight_gradient_gemm(monkeypatch):
    """A frozen packed group (the base of a LoRA run): dx only; the backward is told no weight needs a
    gradient, so the (rows x C) weight-gradient GEMM is never computed."""
    linear = _linear()
    seen = []
    original = linear._packed_linear_backward_op
    monkeypatch.setattr(linear, "_packed_linear_backward_op",
                        lambda dy, x, w, weight_grad: seen.append(weight_grad) or original(dy, x, w, weight_grad))
    weights = _weights((16, 8), 24, torch.float32, "cpu", packed=True)
    for w in weights:
        w.requires_grad_(False)
    x = rand(3, 5, 24, seed=1).requires_grad_()
    linear.packed_linear(x, weights).square().sum().backward()
    expected = torch.autograd.grad(reference.packed_linear(x, weights).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)
    assert seen == [False] and all(w.grad is None for w in weights)


def test_pack_parameters_keeps_parameters_and_values():
    weights = _weights((5, 3, 3), 7, torch.float32, "cpu", packed=False)
    ids, values = [id(w) for w in weights], [w.detach().clone() for w in weights]
    pack_parameters(weights)
    assert [id(w) for w in weights] == ids
    assert all(torch.equal(w, v) and w.requires_grad for w, v in zip(weights, values))
    view = packed_view(weights)
    assert view.shape == (11, 7) and torch.equal(view, torch.cat(values))
    storage = weights[0].untyped_storage().data_ptr()
    pack_parameters(weights)  # already packed: left as it is
    assert weights[0].untyped_storage().data_ptr() == storage


def test_pack_parameters_leaves_mismatched_weights_alone():
    a = torch.nn.Parameter(torch.randn(3, 4))
    b = torch.nn.Parameter(torch.randn(2, 4, dtype=torch.float64))
    pack_parameters([a, b])
    assert packed_view([a, b]) is None and b.dtype == torch.float64


def _all_packed(model):
    for block in model.blocks:
        attn, ffn = block.attn, block.ffn
        if packed_view([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]) is None:
            return False
        if packed_view([ffn.gate_proj.weight, ffn.up_proj.weight]) is None:
            return False
    return True


def test_model_packs_at_construction_and_after_every_move():
    torch.manual_seed(0)
    model = QWEN(SMALL)
    assert _all_packed(model)
    keys = list(model.state_dict())
    assert "blocks.0.attn.k_proj.weight" in keys and not any("qkv" in k or "gate_up" in k for k in keys)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    assert _all_packed(model)
    assert all(torch.equal(model.state_dict()[k], v.to(torch.bfloat16)) for k, v in before.items())
    with torch.device("meta"):
        meta = QWEN(SMALL)
    meta.to_empty(device="cpu").reset_parameters()
    assert _all_packed(meta)


def test_from_pretrained_packs(hf_checkpoint):
    path, _ = hf_checkpoint(tie=True)
    assert _all_packed(QWEN.from_pretrained(path))


def test_packed_model_trains_like_the_reference(triton_everywhere):
    """An optimizer step through packed weights (gradients are views of one packed dW) changes each
    parameter as the reference's separate projections do."""
    assert ops.choose("packed_linear", DEVICES[0], torch.float32).backend == "triton"
    torch.manual_seed(0)
    model = QWEN(SMALL).to(DEVICES[0])
    fused = QWEN(SMALL, fused=True).to(DEVICES[0])
    fused.load_state_dict(model.state_dict())
    assert _all_packed(fused)
    ids = torch.randint(0, SMALL.vocab_size, (2, 9)).to(DEVICES[0])
    for m in (model, fused):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(ids).logsumexp(-1).mean().backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)
