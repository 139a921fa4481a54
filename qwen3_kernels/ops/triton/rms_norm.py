"""RMSNorm and fused residual-add + RMSNorm, forward and backward."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ._common import as_rows, num_sms, on_tensor_device, row_block


@triton.jit
def _summed_tile(X, R, S, rows, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL: tl.constexpr):
    """x's tile, or with HAS_RESIDUAL ``s = x + r`` (rounded to x's dtype as torch does), stored to S."""
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(S + rows[:, None] * stride_s + cols[None, :], x, mask=mask)
    return x


@triton.jit
def _store_normed_tile(Y, W, x, rstd, rows, stride_y, cols, mask, N):
    normed = (x.to(tl.float32) * rstd[:, None]).to(x.dtype).to(tl.float32)
    w = tl.load(W + cols, mask=cols < N, other=0.0).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, S, RSTD, stride_x, stride_r, stride_y, stride_s, n_rows, N, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr,
                         ROWS: tl.constexpr):
    """ROWS rows per program. With HAS_RESIDUAL, ``s = x + r`` (rounded to x's dtype) is stored and
    normalised instead of x.  ``rstd = 1 / sqrt(mean(s^2) + eps)`` in fp32,
    ``y = w * (s * rstd).to(x.dtype)`` — transformers' rounding order. A row is a tile of BLOCK_N
    columns and, with TAIL_N > 0, a tile of TAIL_N columns after it."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = row_ok[:, None] & (cols < N)[None, :]
    x = _summed_tile(X, R, S, rows, stride_x, stride_r, stride_s, cols, mask, HAS_RESIDUAL)
    sum_sq = tl.sum(x.to(tl.float32) * x.to(tl.float32), axis=1)
    if TAIL_N > 0:
        tail_cols = BLOCK_N + tl.arange(0, TAIL_N)
        tail_mask = row_ok[:, None] & (tail_cols < N)[None, :]
        tail = _summed_tile(X, R, S, rows, stride_x, stride_r, stride_s, tail_cols, tail_mask, HAS_RESIDUAL)
        sum_sq += tl.sum(tail.to(tl.float32) * tail.to(tl.float32), axis=1)
    rstd = tl.math.rsqrt(sum_sq / N + eps)
    _store_normed_tile(Y, W, x, rstd, rows, stride_y, cols, mask, N)
    if TAIL_N > 0:
        _store_normed_tile(Y, W, tail, rstd, rows, stride_y, tail_cols, tail_mask, N)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _bwd_tile(X, DY, W, rows, stride_x, stride_dy, cols, col_ok, mask, w, rstd, LOAD_W: tl.constexpr):
    """(x, dy, n = x * rstd, dn = dy * w) of one tile, the last three in fp32; with LOAD_W, w is
    read here rather than passed in."""
    if LOAD_W:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return x, dy, x.to(tl.float32) * rstd[:, None], dy * w[None, :]


@triton.jit
def _store_dx_tile(DX, DS, rows, stride_dx, stride_ds, cols, mask, n, dn, mean, rstd, HAS_DS: tl.constexpr):
    dx = (dn - n * mean[:, None]) * rstd[:, None]
    if HAS_DS:
        dx += tl.load(DS + rows[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DS, DX, DW_PARTIAL, stride_dy, stride_x, stride_ds, stride_dx,
                         n_rows, N, rows_per_program,
                         HAS_DS: tl.constexpr, BLOCK_N: tl.constexpr, TAIL_N: tl.constexpr, ROWS: tl.constexpr,
                         PREFETCH: tl.constexpr):
    """With ``n = x * rstd``: ``dx = rstd * (dy*w - n * mean(dy*w*n))`` (+ ``ds``, the gradient that
    reaches the residual sum directly). Each program sums ``dy * n`` over its rows into one row of
    DW_PARTIAL; the launcher adds those rows up, so dW is deterministic (no atomics). A row is a
    tile of BLOCK_N columns and, with TAIL_N > 0, a tile of TAIL_N columns after it. PREFETCH = 2
    loads the next rows (cp.async into shared memory) while this one is computed."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if TAIL_N > 0:
        tail_cols = BLOCK_N + tl.arange(0, TAIL_N)
        tail_ok = tail_cols < N
        tail_dw = tl.zeros((TAIL_N,), dtype=tl.float32)
        w = 0.0
    else:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    first = pid.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    # With a tail tile, w is re-read per row in _bwd_tile (an L1 hit): held across rows as well, the
    # tiles spill at 16 warps x 64 registers (2 CTAs per SM).
    for start in tl.range(first, last, ROWS, num_stages=PREFETCH):
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < last
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        mask = row_ok[:, None] & col_ok[None, :]
        x, dy, n, dn = _bwd_tile(X, DY, W, rows, stride_x, stride_dy, cols, col_ok, mask, w, rstd,
                                 TAIL_N > 0)
        dot = tl.sum(dn * n, axis=1)
        if TAIL_N > 0:
            tail_mask = row_ok[:, None] & tail_ok[None, :]
            tail_x, tail_dy, tail_n, tail_dn = _bwd_tile(X, DY, W, rows, stride_x, stride_dy, tail_cols,
                                                         tail_ok, tail_mask, 0.0, rstd, True)
            dot += tl.sum(tail_dn * tail_n, axis=1)
        mean = dot / N
        _store_dx_tile(DX, DS, rows, stride_dx, stride_ds, cols, mask, n, dn, mean, rstd, HAS_DS)
        dw += tl.sum(dy * n.to(x.dtype).to(tl.float32), axis=0)
        if TAIL_N > 0:
            _store_dx_tile(DX, DS, rows, stride_dx, stride_ds, tail_cols, tail_mask, tail_n, tail_dn, mean, rstd,
                           HAS_DS)
            tail_dw += tl.sum(tail_dy * tail_n.to(tail_x.dtype).to(tl.float32), axis=0)
    tl.store(DW_PARTIAL + pid.to(tl.int64) * N + cols, dw, mask=col_ok)
    if TAIL_N > 0:
        tl.store(DW_PARTIAL + pid.to(tl.int64) * N + tail_cols, tail_dw, mask=tail_ok)


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
    block_n, tail_n, rows, num_warps = row_block(N)
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, rows),)](
        x2, r2, weight, y2, s2, rstd, x2.stride(0), r2.stride(0), y2.stride(0), s2.stride(0), n_rows, N, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_N=block_n, TAIL_N=tail_n, ROWS=rows, num_warps=num_warps)
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
    # short rows: half the forward's rows per tile (the backward keeps more fp32 tiles live)
    block_n, tail_n, rows, num_warps = row_block(N, max_elements=2048)
    # Rows double-buffered (PREFETCH) and warps as they compile without spills, at >= 2 CTAs per SM, on
    # Triton 3.6 and 3.9 (tests/aot_gate.py): half precision only (fp32 tiles are twice the registers
    # and shared memory). With the residual gradient a tile-plus-tail row spills at 16 warps x 64
    # registers: 8 warps, and double-buffered only at 5120 columns (at 2560 Triton 3.6 spills 8 bytes).
    prefetch = 2 if x.element_size() == 2 else 1
    if tail_n and d_summed is not None:
        prefetch = prefetch if num_warps == 16 else 1
        num_warps = min(num_warps, 8)
    programs = max(1, min(triton.cdiv(n_rows, rows), 4 * num_sms(x.device)))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows
    programs = max(1, triton.cdiv(n_rows, rows_per_program))
    dw_partial = torch.empty(programs, N, dtype=torch.float32, device=x.device)
    _rms_norm_bwd_kernel[(programs,)](
        dy2, x2, weight, rstd, ds2, dx2, dw_partial, dy2.stride(0), x2.stride(0), ds2.stride(0), dx2.stride(0),
        n_rows, N, rows_per_program,
        HAS_DS=d_summed is not None, BLOCK_N=block_n, TAIL_N=tail_n, ROWS=rows, PREFETCH=prefetch,
        num_warps=num_warps, **({"maxnreg": 64} if num_warps == 16 else {}))  # 16 warps x 64 registers: 2 CTAs/SM
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
