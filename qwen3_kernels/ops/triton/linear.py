"""Several projections of one input as one GEMM: q, k and v (or gate and up) multiply the same
activations, so where their weights sit back to back in one buffer (``ops.packing``) ``x @ [Wq; Wk;
Wv].T`` is a single cuBLAS call instead of three: fewer launches per decode step, one read of x,
and in the backward two GEMMs instead of six. There is no Triton kernel here on purpose: cuBLAS is
the faster GEMM at these shapes; what this module adds is the layout. Weights that are not packed
(after FSDP sharding, say) are concatenated per call instead: slower, never wrong."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .. import _checks
from ..packing import packed_view


def _weight_matrix(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    packed = packed_view(weights)
    return packed if packed is not None else torch.cat([w.detach() for w in weights])


@torch.library.custom_op("qwen3_kernels::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    return F.linear(x, _weight_matrix(weights))


@_packed_linear_op.register_fake
def _(x, weights):
    return x.new_empty((*x.shape[:-1], sum(w.shape[0] for w in weights)))


@torch.library.custom_op("qwen3_kernels::packed_linear_backward", mutates_args=())
def _packed_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor], weight_grad: bool
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dW) with dW the (sum of rows, C) gradient of the packed matrix: two GEMMs, not 2 per weight.
    Without ``weight_grad`` (frozen weights: a LoRA base) dW is not computed and comes back empty."""
    dx = dy @ _weight_matrix(weights)
    if not weight_grad:
        return dx, x.new_empty((0, x.shape[-1]))
    dy2, x2 = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    return dx, dy2.t() @ x2


@_packed_linear_backward_op.register_fake
def _(dy, x, weights, weight_grad):
    return torch.empty_like(x), x.new_empty((dy.shape[-1] if weight_grad else 0, x.shape[-1]))


def _setup_packed_linear(ctx, inputs, output):
    x, weights = inputs
    ctx.save_for_backward(x, *weights)
    ctx.rows = [w.shape[0] for w in weights]
    ctx.weight_grad = any(w.requires_grad for w in weights)


def _backward_packed_linear(ctx, dy):
    x, *weights = ctx.saved_tensors
    dx, dw = _packed_linear_backward_op(dy.contiguous(), x, weights, ctx.weight_grad)
    return dx, (list(dw.split(ctx.rows)) if ctx.weight_grad else [None] * len(weights))


_packed_linear_op.register_autograd(_backward_packed_linear, setup_context=_setup_packed_linear)


def packed_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                  biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    _checks.packed_linear(x, weights, biases)
    out = _packed_linear_op(x, list(weights))
    if biases is not None and any(b is not None for b in biases):
        out = out + torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in zip(weights, biases)])
    return out
