"""RMSNorm and fused residual-add + RMSNorm, forward and backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ._common import as_rows, num_sms, on_tensor_device, row_block


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_rows, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """ROWS rows per program. With HAS_RESIDUAL, ``s = x + r`` (rounded to x's dtype) is stored and
    normalised instead of x.  ``rstd = 1 / sqrt(mean(s^2) + eps)`` in fp32,
    ``y = w * (s * rstd).to(x.dtype)`` — transformers' rounding order."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols < N)[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # torch's rounding of a half-precision add
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    h = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / N + eps)
    normed = (h * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DS, DX, DW_PARTIAL, stride_dy, stride_x, stride_ds, stride_dx,
                         n_rows, N, rows_per_program,
                         HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
    """With ``n = x * rstd``: ``dx = rstd * (dy*w - n * mean(dy*w*n))`` (+ ``ds``, the gradient that
    reaches the residual sum directly). Each program sums ``dy * n`` over its rows into one row of
    DW_PARTIAL; the launcher adds those rows up, so dW is deterministic (no atomics)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for start in range(first, last, ROWS):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < last
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        n = x.to(tl.float32) * rstd[:, None]
        dn = dy * w[None, :]
        dx = (dn - n * (tl.sum(dn * n, axis=1) / N)[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        dw += tl.sum(dy * n.to(x.dtype).to(tl.float32), axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=col_ok)


@on_tensor_device
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """Returns (y, summed or None, rstd), y and summed shaped like x (``residual`` too)."""
    x2 = as_rows(x)
    n_rows, N = x2.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = y.view(-1, N)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if residual is not None:
        r2 = as_rows(residual)
        summed = torch.empty_like(y)
        s2 = summed.view(-1, N)
    else:
        r2, summed, s2 = x2, None, y2  # unused by the kernel when HAS_RESIDUAL is False
    if n_rows == 0:
        return y, summed, rstd
    block_n, rows, num_warps = row_block(N)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r2, weight, y2, s2, rstd, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0), n_rows, N, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, ROWS=rows, num_warps=num_warps)
    return y, summed, rstd


@on_tensor_device
def rms_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      d_summed: torch.Tensor | None = None):
    """Returns (dx, dweight); ``x`` is the tensor that was normalised (the sum, for add_rms_norm)."""
    x2, dy2 = as_rows(x), as_rows(dy)
    n_rows, N = x2.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    dx2 = dx.view(-1, N)
    ds2 = as_rows(d_summed) if d_summed is not None else dy2
    # half the forward's tile: the backward keeps more fp32 tiles live, and 4096-element tiles on 16
    # warps spill on Triton 3.6 (sm_90) and fit only one CTA per SM; 2048 fit two to three
    block_n, rows, num_warps = row_block(N, max_elements=2048)
    programs = max(1, min(triton.cdiv(n_rows, rows), 4 * num_sms(x.device)))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    programs = max(1, triton.cdiv(n_rows, rows_per_program))
    dw_partial = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, ds2, dx2, dw_partial, dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0),
        n_rows, N, rows_per_program,
        HAS_DS=d_summed is not None, BLOCK_N=block_n, ROWS=rows, num_warps=num_warps)
    return dx, dw_partial.sum(0).to(weight.dtype)


# --- torch.library registration: opaque to torch.compile, differentiable through autograd ---

@torch.library.custom_op("qwen3_kernels::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = rms_norm_forward(x, weight, eps)
    return y, rstd


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1].numel(),
                                                                                    dtype=torch.float32)


@torch.library.custom_op("qwen3_kernels::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, summed, rstd = rms_norm_forward(x, weight, eps, residual)
    return y, summed, rstd


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    return y, torch.empty_like(y), x.new_empty(x.shape[:-1].numel(), dtype=torch.float32)


@torch.library.custom_op("qwen3_kernels::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          d_summed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return rms_norm_backward(dy, x, weight, rstd, d_summed)


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, d_summed):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(weight)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight, output[1])


def _backward_rms_norm(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(dy, x, weight, rstd, None)
    return dx, dw, None


def _setup_add_rms_norm(ctx, inputs, output):
    _, _, weight, _ = inputs
    ctx.save_for_backward(output[1], weight, output[2])


def _backward_add_rms_norm(ctx, dy, d_summed, _drstd):
    summed, weight, rstd = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(summed)
    dx, dw = _rms_norm_backward_op(dy, summed, weight, rstd, d_summed)
    return dx, dx, dw, None


_rms_norm_op.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)
_add_rms_norm_op.register_autograd(_backward_add_rms_norm, setup_context=_setup_add_rms_norm)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    _checks.rms_norm(x, weight)
    return _rms_norm_op(x, weight, float(eps))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.add_rms_norm(x, residual, weight)
    if residual.shape != x.shape:  # broadcast: the gradient of the smaller residual is a sum, autograd's job
        residual = residual.expand_as(x)
    y, summed, _ = _add_rms_norm_op(x, residual, weight, float(eps))
    return y, summed
