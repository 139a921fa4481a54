"""Fused linear cross-entropy against float64 and eager PyTorch (the flash-attention rule), its
reductions and ignored targets, and the memory contract: no tensor of N x V elements, ever."""

import pytest
import torch
from qwen3_kernels_testing.dispatch import IntoCustomOps
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import DEVICES, DTYPES, atol, needs_triton, rand

from qwen3_kernels.ops import reference

pytestmark = needs_triton

# N tokens, C hidden, V vocab: odd sizes; the chunk budget below makes 301 a 256-row chunk plus a ragged one
N, C, V = 37, 29, 301


def _ce():
    from qwen3_kernels.ops.triton import cross_entropy
    return cross_entropy


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 256 vocab rows (the minimum), so the vocabulary is walked in more than one."""
    monkeypatch.setattr(_ce(), "LOGITS_CHUNK_BYTES", 1)


def _inputs(dtype, device, shape=(N,), ignore_every=0, ignore_index=-100, seed=0):
    hidden = rand(*shape, C, dtype=dtype, device=device, seed=seed).requires_grad_()
    weight = rand(V, C, dtype=dtype, device=device, seed=seed + 1, scale=0.5).requires_grad_()
    targets = torch.randint(0, V, shape, generator=torch.Generator().manual_seed(seed + 2))
    if ignore_every:
        targets.view(-1)[::ignore_every] = ignore_index
    return hidden, weight, targets.to(device)


def _float64(hidden, weight, targets, ignore_index, reduction):
    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    logits = (h @ w.T).reshape(-1, V)
    t = targets.reshape(-1)
    counted = t != ignore_index
    picked = logits.gather(1, torch.where(counted, t, 0)[:, None])[:, 0]
    losses = torch.where(counted, logits.logsumexp(-1) - picked, 0.0)
    if reduction == "none":
        out = losses.view(targets.shape)
    elif reduction == "sum":
        out = losses.sum()
    else:
        out = losses.sum() / counted.sum().clamp(min=1)
    return out, (h, w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_gradients(device, dtype, reduction, small_chunks):
    ce = _ce()
    hidden, weight, targets = _inputs(dtype, device, shape=(3, 13), ignore_every=4)
    out = ce.linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    eager = reference.linear_cross_entropy(hidden, weight, targets, reduction=reduction)
    exact, leaves64 = _float64(hidden, weight, targets, -100, reduction)
    assert out.dtype == torch.float32 and out.shape == exact.shape
    assert_within_rule(out, eager, exact, 2, atol(torch.float32, exact), "loss")

    grad_out = rand(*out.shape, device=device, seed=9) if reduction == "none" else torch.tensor(1.7, device=device)
    grads = torch.autograd.grad(out, (hidden, weight), grad_out)
    grads_eager = torch.autograd.grad(eager, (hidden, weight), grad_out)
    grads64 = torch.autograd.grad(exact, leaves64, grad_out.double())
    for name, g, ge, g64 in zip(("dhidden", "dweight"), grads, grads_eager, grads64):
        assert g.dtype == dtype
        assert_within_rule(g, ge, g64, 3, atol(dtype, g64), name)


@pytest.mark.parametrize("device", DEVICES)
def test_every_target_ignored_gives_zero_loss_and_zero_gradients(device):
    ce = _ce()
    hidden, weight, targets = _inputs(torch.float32, device)
    targets = torch.full_like(targets, -100)
    for reduction in ("mean", "sum"):
        loss = ce.linear_cross_entropy(hidden, weight, targets, reduction=reduction)
        assert loss.item() == 0.0, reduction
        dh, dw = torch.autograd.grad(loss, (hidden, weight))
        assert not dh.any() and not dw.any()


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_and_frozen_weight(device, small_chunks):
    """ignore_index may be a real class id; a frozen weight (LoRA) gets no gradient and costs none."""
    ce = _ce()
    hidden, weight, targets = _inputs(torch.float32, device, ignore_every=3, ignore_index=7)
    weight.requires_grad_(False)
    out = ce.linear_cross_entropy(hidden, weight, targets, ignore_index=7)
    eager = reference.linear_cross_entropy(hidden, weight, targets, ignore_index=7)
    exact, (h64, _) = _float64(hidden, weight, targets, 7, "mean")
    assert_within_rule(out, eager, exact, 2, 1e-6, "loss")
    (dh,), (dh_eager,), (dh64,) = (torch.autograd.grad(o, i) for o, i in ((out, hidden), (eager, hidden), (exact, h64)))
    assert_within_rule(dh, dh_eager, dh64, 3, atol(torch.float32, dh64), "dhidden")


class _Allocations(IntoCustomOps):
    """The largest tensor any op allocated, in elements, inside qwen3_kernels ops too."""

    def __init__(self, record=None):
        super().__init__()
        self.record = record if record is not None else {"largest": 0, "op": None}

    def nested(self):
        return _Allocations(self.record)

    def aten(self, func, args, kwargs, out):
        if any(r.alias_info is not None for r in func._schema.returns):
            return  # a view, an in-place or out= op: it allocates nothing
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.record["largest"]:
                self.record.update(largest=t.numel(), op=str(func))


def test_never_holds_a_tensor_of_tokens_times_vocab(small_chunks):
    """Forward and backward, every tensor any op allocates is recorded: none may hold N x V elements
    (the logits or their gradient). The weight gradient (V x C, C < N) is the largest allowed."""
    ce = _ce()
    hidden, weight, targets = _inputs(torch.float32, DEVICES[0], shape=(67,), ignore_every=5)
    assert hidden.shape[0] > C
    with _Allocations() as seen:
        loss = ce.linear_cross_entropy(hidden, weight, targets)
        loss.backward()
    assert seen.record["largest"] < 67 * V, seen.record
    with _Allocations() as eager:  # the check sees the logits where they exist
        reference.linear_cross_entropy(hidden, weight, targets).backward()
    assert eager.record["largest"] >= 67 * V


def test_bad_inputs_are_named():
    ce = _ce()
    hidden, weight, targets = _inputs(torch.float32, "cpu")
    for fn in (ce.linear_cross_entropy, reference.linear_cross_entropy):
        with pytest.raises(ValueError, match=r"target 301 is outside \[0, vocab size 301\)"):
            fn(hidden, weight, torch.where(targets == targets[0], V, targets))
        with pytest.raises(ValueError, match=r"targets shape \(36,\) must be hidden's leading shape \(37,\)"):
            fn(hidden, weight, targets[1:])
        with pytest.raises(ValueError, match=r"must agree on C, got hidden \(37, 29\) and weight \(301, 28\)"):
            fn(hidden, weight[:, 1:], targets)
        with pytest.raises(TypeError, match="targets must be int64"):
            fn(hidden, weight, targets.float())
        with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
            fn(hidden, weight, targets, reduction="avg")
