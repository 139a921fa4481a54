"""Rotary embedding, alone (``apply_rope``) or fused with Qwen3's per-head RMSNorm of q and k
(``qk_norm_rope``), forward and backward, and the decode-time variant that writes the new keys and
values straight into a KV cache (``qk_norm_rope_into_cache``). One program handles every head of q
and k of one token in one launch, so the token's cos/sin row is read once and each element of q/k
is read and written once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from ._common import num_sms, on_tensor_device, unit_stride, warps_for


@triton.jit
def _norm_rope_heads(X, W, Y, x_row, y_row, sxh, syh, H, HALF, eps, cos1, cos2, sin1, sin2, cols, col_ok,
                     HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's H heads, x_row -> y_row: per head, split x into halves x1, x2 (D = 2 * HALF). With
    HAS_NORM, first ``x <- w * (x * rstd).to(x.dtype)`` with ``rstd = 1/sqrt(mean(x^2) + eps)``. Then
    ``y1 = x1*cos1 - x2*sin1``, ``y2 = x2*cos2 + x1*sin2`` (= ``x*cos + rotate_half(x)*sin``)."""
    if HAS_NORM:
        w1 = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    for h0 in range(0, H, BLOCK_H):  # heads in chunks, so many-head models do not spill
        heads = h0 + tl.arange(0, BLOCK_H)
        mask = (heads < H)[:, None] & col_ok[None, :]
        x_ptr = x_row + heads[:, None] * sxh + cols[None, :]
        x1 = tl.load(x_ptr, mask=mask, other=0.0)
        x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0)
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        if HAS_NORM:
            rstd = tl.math.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF) + eps)[:, None]
            a1 = (a1 * rstd).to(x1.dtype).to(tl.float32) * w1
            a2 = (a2 * rstd).to(x2.dtype).to(tl.float32) * w2
        y_ptr = y_row + heads[:, None] * syh + cols[None, :]
        tl.store(y_ptr, (a1 * cos1 - a2 * sin1).to(Y.dtype.element_ty), mask=mask)
        tl.store(y_ptr + HALF, (a2 * cos2 + a1 * sin2).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(Q, K, V, WQ, WK, COS, SIN, QO, KO, VO, POS, T, HQ, HK, HALF, eps,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                     sqob, sqot, sqoh, skob, skot, skoh, svob, svot, svoh, spb, spt, scb, sct,
                     HAS_NORM: tl.constexpr, HAS_K: tl.constexpr, HAS_V: tl.constexpr, HAS_POS: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token per program: its HQ query heads Q -> QO (norm with WQ, then rotary), with HAS_K its
    HK key heads K -> KO (norm with WK), with HAS_V its value heads copied V -> VO. With HAS_POS the
    keys and values land at row ``POS[b, t]`` of KO/VO (a KV cache) instead of row t, so a decode
    step's q, k and cache writes are one launch; the token's cos/sin row is read once for all."""
    token = tl.program_id(0).to(tl.int64)
    b, t = token // T, token % T
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    c_ptr = b * scb + t * sct + cols
    cos1 = tl.load(COS + c_ptr, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(COS + c_ptr + HALF, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(SIN + c_ptr, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(SIN + c_ptr + HALF, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    _norm_rope_heads(Q, WQ, QO, Q + b * sqb + t * sqt, QO + b * sqob + t * sqot, sqh, sqoh, HQ, HALF, eps,
                     cos1, cos2, sin1, sin2, cols, col_ok, HAS_NORM, BLOCK_H, BLOCK_HALF)
    if HAS_POS:
        row = tl.load(POS + b * spb + t * spt).to(tl.int64)
    else:
        row = t
    if HAS_K:
        _norm_rope_heads(K, WK, KO, K + b * skb + t * skt, KO + b * skob + row * skot, skh, skoh, HK, HALF, eps,
                         cos1, cos2, sin1, sin2, cols, col_ok, HAS_NORM, BLOCK_H, BLOCK_HALF)
    if HAS_V:
        for h0 in range(0, HK, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = (heads < HK)[:, None] & col_ok[None, :]
            v_ptr = V + b * svb + t * svt + heads[:, None] * svh + cols[None, :]
            vo_ptr = VO + b * svob + row * svot + heads[:, None] * svoh + cols[None, :]
            tl.store(vo_ptr, tl.load(v_ptr, mask=mask, other=0.0), mask=mask)
            tl.store(vo_ptr + HALF, tl.load(v_ptr + HALF, mask=mask, other=0.0), mask=mask)


@triton.jit
def _rope_bwd_kernel(DY, X, W, COS, SIN, DX, DW_PARTIAL, n_tokens, tokens_per_program, T, H, HALF, eps,
                     sdb, sdt, sdh, sxb, sxt, sxh, sgb, sgt, sgh, scb, sct,
                     HAS_NORM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotary is orthogonal: ``dn1 = dy1*cos1 + dy2*sin2``, ``dn2 = dy2*cos2 - dy1*sin1``. With
    HAS_NORM (``n = w * xhat``, ``xhat = x * rstd``): ``dx = rstd * (dn*w - xhat * mean(dn*w*xhat))``
    and this program's share of ``dw = sum(dn * xhat)`` goes to one row of DW_PARTIAL."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_HALF)
    col_ok = cols < HALF
    if HAS_NORM:
        w1 = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(W + HALF + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    dw1 = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    dw2 = tl.zeros((BLOCK_HALF,), dtype=tl.float32)
    first = pid.to(tl.int64) * tokens_per_program  # int64, so the loop's token index is too
    last = tl.minimum(first + tokens_per_program, n_tokens)
    for token in range(first, last):
        b, t = token // T, token % T
        c_ptr = b * scb + t * sct + cols
        cos1 = tl.load(COS + c_ptr, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        cos2 = tl.load(COS + c_ptr + HALF, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sin1 = tl.load(SIN + c_ptr, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        sin2 = tl.load(SIN + c_ptr + HALF, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        for h0 in range(0, H, BLOCK_H):
            heads = h0 + tl.arange(0, BLOCK_H)
            mask = (heads < H)[:, None] & col_ok[None, :]
            dy_ptr = DY + b * sdb + t * sdt + heads[:, None] * sdh + cols[None, :]
            dy1 = tl.load(dy_ptr, mask=mask, other=0.0).to(tl.float32)
            dy2 = tl.load(dy_ptr + HALF, mask=mask, other=0.0).to(tl.float32)
            dn1 = dy1 * cos1 + dy2 * sin2
            dn2 = dy2 * cos2 - dy1 * sin1
            if HAS_NORM:
                x_ptr = X + b * sxb + t * sxt + heads[:, None] * sxh + cols[None, :]
                x1 = tl.load(x_ptr, mask=mask, other=0.0)
                x2 = tl.load(x_ptr + HALF, mask=mask, other=0.0)
                a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
                rstd = tl.math.rsqrt((tl.sum(a1 * a1, axis=1) + tl.sum(a2 * a2, axis=1)) / (2 * HALF) + eps)[:, None]
                xhat1, xhat2 = a1 * rstd, a2 * rstd
                # the forward rounded xhat to x's dtype before the weight multiply
                dw1 += tl.sum(dn1 * xhat1.to(x1.dtype).to(tl.float32), axis=0)
                dw2 += tl.sum(dn2 * xhat2.to(x2.dtype).to(tl.float32), axis=0)
                g1, g2 = dn1 * w1, dn2 * w2
                mean = ((tl.sum(g1 * xhat1, axis=1) + tl.sum(g2 * xhat2, axis=1)) / (2 * HALF))[:, None]
                dn1 = (g1 - xhat1 * mean) * rstd
                dn2 = (g2 - xhat2 * mean) * rstd
            dx_ptr = DX + b * sgb + t * sgt + heads[:, None] * sgh + cols[None, :]
            tl.store(dx_ptr, dn1.to(DX.dtype.element_ty), mask=mask)
            tl.store(dx_ptr + HALF, dn2.to(DX.dtype.element_ty), mask=mask)
    if HAS_NORM:
        row = DW_PARTIAL + pid.to(tl.int64) * 2 * HALF
        tl.store(row + cols, dw1, mask=col_ok)
        tl.store(row + HALF + cols, dw2, mask=col_ok)


def _table_strides(cos: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of a (T, D), (1, T, D) or (B, T, D) table: one table for every
    sequence is read with batch stride 0."""
    if cos.dim() == 2:
        return 0, cos.stride(0)
    return (0 if cos.shape[0] == 1 else cos.stride(0)), cos.stride(1)


def _block(H: int, D: int) -> dict:
    block_half = triton.next_power_of_2(D // 2)
    block_h = min(triton.next_power_of_2(H), max(1, 1024 // block_half))  # a half-tile of <= 1024 elements
    # warps sized on the (BLOCK_H, BLOCK_HALF) tiles each load and store moves: 8 elements per thread,
    # 16-byte accesses in half precision (sized on whole heads, threads got 4: 8-byte accesses)
    return dict(BLOCK_H=block_h, BLOCK_HALF=block_half, num_warps=warps_for(block_h * block_half))


def _strides3(x: torch.Tensor | None) -> tuple[int, int, int]:
    return (0, 0, 0) if x is None else tuple(x.stride()[:3])


@on_tensor_device
def rope_forward(x, cos, sin, weight=None, eps=1e-6):
    """Rotary (after a per-head RMSNorm with ``weight``) of one (B, T, H, D) tensor."""
    return qk_norm_rope_forward(x, None, cos, sin, weight, None, eps)[0]


@on_tensor_device
def qk_norm_rope_forward(q, k, cos, sin, q_weight=None, k_weight=None, eps=1e-6, v=None, k_cache=None,
                         v_cache=None, positions=None):
    """q and k (which may be None) in one launch; returns (q_out, k_out). With caches, k's result and
    v go into ``k_cache``/``v_cache`` (B, L, Hkv, D) at rows ``positions`` (B, T), and k_out is
    ``k_cache``. Shapes were checked at the public entry points."""
    q, cos, sin = unit_stride(q), cos.contiguous(), sin.contiguous()
    k = None if k is None else unit_stride(k)
    v = None if v is None else unit_stride(v)
    B, T, H, D = q.shape
    Hkv = 0 if k is None else k.shape[2]
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = k_cache if k_cache is not None else (None if k is None else torch.empty(k.shape, dtype=k.dtype,
                                                                                      device=k.device))
    if q.numel() or (k is not None and k.numel()):
        _rope_fwd_kernel[(B * T,)](
            q, q if k is None else k, q if v is None else v, q if q_weight is None else q_weight,
            q if k_weight is None else k_weight, cos, sin, q_out, q_out if k_out is None else k_out,
            q_out if v_cache is None else v_cache, q if positions is None else positions, T, H, Hkv, D // 2, eps,
            *q.stride()[:3], *_strides3(k), *_strides3(v), *q_out.stride()[:3], *_strides3(k_out),
            *_strides3(v_cache), *((0, 0) if positions is None else positions.stride()), *_table_strides(cos),
            HAS_NORM=q_weight is not None, HAS_K=k is not None, HAS_V=v is not None,
            HAS_POS=positions is not None, **_block(max(H, Hkv), D))
    return q_out, k_out


@on_tensor_device
def rope_backward(dy, x, cos, sin, weight=None, eps=1e-6):
    """Returns (dx, dweight or None)."""
    dy = unit_stride(dy)
    cos, sin = cos.contiguous(), sin.contiguous()
    B, T, H, D = dy.shape
    n_tokens = B * T
    dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
    programs = max(1, min(n_tokens, 8 * num_sms(dy.device)))
    tokens_per_program = triton.cdiv(n_tokens, programs)
    programs = max(1, triton.cdiv(n_tokens, tokens_per_program))
    has_norm = weight is not None
    dw_partial = torch.empty((programs, D) if has_norm else (1,), dtype=torch.float32, device=dy.device)
    if n_tokens:
        _rope_bwd_kernel[(programs,)](
            dy, x, weight if has_norm else dy, cos, sin, dx, dw_partial, n_tokens, tokens_per_program, T, H, D // 2,
            eps, dy.stride(0), dy.stride(1), dy.stride(2), x.stride(0), x.stride(1), x.stride(2),
            dx.stride(0), dx.stride(1), dx.stride(2), *_table_strides(cos), HAS_NORM=has_norm, **_block(H, D))
    if not has_norm:
        return dx, None
    return dx, dw_partial.sum(0).to(weight.dtype) if n_tokens else torch.zeros_like(weight)


# --- torch.library registration ---

def _no_table_grad(cos, sin):
    if cos.requires_grad or sin.requires_grad:
        raise NotImplementedError("the Triton RoPE kernels give no gradient for cos/sin; "
                                  "detach them or use the reference backend")


@torch.library.custom_op("qwen3_kernels::apply_rope", mutates_args=())
def _apply_rope_op(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_forward(x, cos, sin)


@_apply_rope_op.register_fake
def _(x, cos, sin):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("qwen3_kernels::apply_rope_backward", mutates_args=())
def _apply_rope_backward_op(dy: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return rope_backward(dy, dy, cos, sin)[0]


@_apply_rope_backward_op.register_fake
def _(dy, cos, sin):
    return torch.empty_like(dy, memory_format=torch.contiguous_format)


def _setup_apply_rope(ctx, inputs, output):
    _, cos, sin = inputs
    ctx.save_for_backward(cos, sin)


def _backward_apply_rope(ctx, dy):
    cos, sin = ctx.saved_tensors
    return _apply_rope_backward_op(dy, cos, sin), None, None


_apply_rope_op.register_autograd(_backward_apply_rope, setup_context=_setup_apply_rope)


@torch.library.custom_op("qwen3_kernels::qk_norm_rope", mutates_args=())
def _qk_norm_rope_op(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return qk_norm_rope_forward(q, k, cos, sin, q_weight, k_weight, eps)


@_qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format))


@torch.library.custom_op("qwen3_kernels::qk_norm_rope_backward", mutates_args=())
def _qk_norm_rope_backward_op(dq_out: torch.Tensor, dk_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                              q_weight: torch.Tensor, k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                              eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dqw = rope_backward(dq_out, q, cos, sin, q_weight, eps)
    dk, dkw = rope_backward(dk_out, k, cos, sin, k_weight, eps)
    return dq, dk, dqw, dkw


@_qk_norm_rope_backward_op.register_fake
def _(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, eps):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(q_weight), torch.empty_like(k_weight))


def _setup_qk_norm_rope(ctx, inputs, output):
    q, k, q_weight, k_weight, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, q_weight, k_weight, cos, sin)
    ctx.eps = eps


def _backward_qk_norm_rope(ctx, dq_out, dk_out):
    q, k, q_weight, k_weight, cos, sin = ctx.saved_tensors
    dq_out = torch.zeros_like(q) if dq_out is None else dq_out
    dk_out = torch.zeros_like(k) if dk_out is None else dk_out
    dq, dk, dqw, dkw = _qk_norm_rope_backward_op(dq_out, dk_out, q, k, q_weight, k_weight, cos, sin, ctx.eps)
    return dq, dk, dqw, dkw, None, None, None


_qk_norm_rope_op.register_autograd(_backward_qk_norm_rope, setup_context=_setup_qk_norm_rope)


@torch.library.custom_op("qwen3_kernels::qk_norm_rope_into_cache", mutates_args=("k_cache", "v_cache"))
def _qk_norm_rope_into_cache_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                                k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                                v_cache: torch.Tensor, positions: torch.Tensor, eps: float) -> torch.Tensor:
    return qk_norm_rope_forward(q, k, cos, sin, q_weight, k_weight, eps, v, k_cache, v_cache, positions)[0]


@_qk_norm_rope_into_cache_op.register_fake
def _(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, positions, eps):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    _checks.rope(x, cos, sin)
    _no_table_grad(cos, sin)
    return _apply_rope_op(x, cos, sin)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.qk_norm_rope(q, k, q_weight, k_weight, cos, sin)
    _no_table_grad(cos, sin)
    return _qk_norm_rope_op(q, k, q_weight, k_weight, cos, sin, float(eps))


def qk_norm_rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                            k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, positions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    _checks.qk_norm_rope_into_cache(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, positions)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, q_weight, k_weight)):
        raise RuntimeError("qk_norm_rope_into_cache writes a KV cache in place and has no backward; call it "
                           "under torch.no_grad() or torch.inference_mode()")
    _no_table_grad(cos, sin)
    return _qk_norm_rope_into_cache_op(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, positions,
                                       float(eps))
