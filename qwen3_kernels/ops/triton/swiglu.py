"""SwiGLU ``silu(gate) * up``, forward and backward; gate and up may be strided views (for example
the two halves of one packed gate/up projection), read in place."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ._common import as_rows, on_tensor_device


@triton.jit
def _swiglu_fwd_kernel(G, U, Y, N, stride_g, stride_u, stride_y, BLOCK: tl.constexpr):
    """``y = g * sigmoid(g) * u``, in fp32, rounded once."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (g * tl.sigmoid(g) * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DY, G, U, DG, DU, N, stride_dy, stride_g, stride_u, stride_dg, stride_du,
                       BLOCK: tl.constexpr):
    """Recomputes ``s = sigmoid(g)``: ``du = dy * g * s``, ``dg = dy * u * s * (1 + g * (1 - s))``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(DU + row * stride_du + cols, (dy * g * s).to(DU.dtype.element_ty), mask=mask)
    tl.store(DG + row * stride_dg + cols, (dy * u * s * (1 + g * (1 - s))).to(DG.dtype.element_ty), mask=mask)


_BLOCK = 1024


@on_tensor_device
def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    g2, u2 = as_rows(gate), as_rows(up)
    M, N = g2.shape
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    y2 = y.view(-1, N)
    if y.numel():
        _swiglu_fwd_kernel[(M, triton.cdiv(N, _BLOCK))](g2, u2, y2, N, g2.stride(0), u2.stride(0), y2.stride(0),
                                                         BLOCK=_BLOCK, num_warps=4)
    return y


@on_tensor_device
def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy2, g2, u2 = as_rows(dy), as_rows(gate), as_rows(up)
    M, N = g2.shape
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    dg2, du2 = dg.view(-1, N), du.view(-1, N)
    if dg.numel():
        _swiglu_bwd_kernel[(M, triton.cdiv(N, _BLOCK))](
            dy2, g2, u2, dg2, du2, N, dy2.stride(0), g2.stride(0), u2.stride(0), dg2.stride(0), du2.stride(0),
            BLOCK=_BLOCK, num_warps=4)
    return dg, du


@torch.library.custom_op("qwen3_kernels::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


@torch.library.custom_op("qwen3_kernels::swiglu_backward", mutates_args=())
def _swiglu_backward_op(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return swiglu_backward(dy, gate, up)


@_swiglu_backward_op.register_fake
def _(dy, gate, up):
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            torch.empty_like(up, memory_format=torch.contiguous_format))


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward_swiglu(ctx, dy):
    gate, up = ctx.saved_tensors
    return _swiglu_backward_op(dy, gate, up)


_swiglu_op.register_autograd(_backward_swiglu, setup_context=_setup_swiglu)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    _checks.swiglu(gate, up)
    return _swiglu_op(gate, up)
