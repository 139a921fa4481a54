"""Causal grouped-query flash attention: forward, backward, and split-KV decode over a KV cache.

Layouts follow the ops contract: q (B, Tq, H, D), k and v (B, Tk, Hkv, D), query head h reads KV head
``h // (H // Hkv)`` (K/V are never repeated). The causal mask is aligned bottom-right: query i sees
keys ``j <= i + kv_len - Tq``, where ``kv_len`` is Tk or, with ``kv_lens``, each sequence's own
length. Softmax runs in base 2 with log2(e) folded into the scale; the log-sum-exp saved for the
backward is in base 2 too. A query that sees no key gets a zero output (its LSE is +inf)."""

from __future__ import annotations

import functools
import logging
import math
import os
import warnings

import torch
import triton
import triton.language as tl

from .. import _checks
from . import tuning
from ._common import device_arch, num_sms, on_tensor_device, unit_stride

try:  # host-side TMA descriptors (Triton >= 3.4)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = 1.4426950408889634
log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _kv_len(KV_LENS, b, Tk, HAS_KV_LENS: tl.constexpr):
    """Sequence b's number of valid keys: its entry of KV_LENS, or Tk for all."""
    if HAS_KV_LENS:
        return tl.load(KV_LENS + b).to(tl.int32)
    return Tk


@triton.jit
def _sequence(CU_SEQLENS, b):
    """(first token, length) of packed sequence b: its span ``cu_seqlens[b]:cu_seqlens[b + 1]``."""
    start = tl.load(CU_SEQLENS + b)
    return start.to(tl.int64), (tl.load(CU_SEQLENS + b + 1) - start).to(tl.int32)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, kv_row, kv_col, start, end, offs_m, offs_n,
               offs_d, shift, kv_len, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
               TMA: tl.constexpr):
    """Online softmax over key blocks [start, end). MASKED blocks apply the length and causal masks;
    the others lie wholly inside every row's visible range and skip them. With TMA, k_base and v_base
    are tensor descriptors over (tokens, Hkv * D) and this sequence's key j is row ``kv_row + j``,
    columns ``kv_col ...``: a masked block may read rows past the sequence (the next sequence's, or
    a cache's unwritten slots), so its V rows there are zeroed, as the pointer loads' mask does."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < kv_len
        cols64 = cols.to(tl.int64)
        if TMA:
            k = k_base.load([kv_row + start_n, kv_col]).T
        elif MASKED:
            k = tl.load(k_base + cols64[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k = tl.load(k_base + cols64[None, :] * stride_kt + offs_d[:, None])
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), base-2 logits
        if MASKED:
            visible = col_ok[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if TMA:
            v = v_base.load([kv_row + start_n, kv_col])
            if MASKED:
                v = tl.where(col_ok[:, None], v, 0.0)
        elif MASKED:
            v = tl.load(v_base + cols64[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        else:
            v = tl.load(v_base + cols64[:, None] * stride_vt + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


# Tq/Tk only bound loops and masks (and the LSE strides slb/slh, which are Tq-sized): a one-token
# prompt reuses the long-prompt kernel instead of compiling each autotune candidate again for Tq == 1.
@triton.jit(do_not_specialize=["Tq", "Tk", "slb", "slh"])
def _attn_fwd_kernel(Q, K, V, O, LSE, KV_LENS, CU_SEQLENS, qk_scale, Tq, Tk, H, GROUP,
                     sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sob, sot, soh, slb, slh,
                     CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, TMA: tl.constexpr = False):
    """``O = softmax(Q K^T * scale + mask) V`` for one batch, BLOCK_M query rows; also
    ``LSE = log2(sum(exp2(s)))`` per row. The rows are BLOCK_M // PACK positions of PACK query heads
    that share one KV head (PACK = 1: one head; PACK = GROUP: the whole group, so each K/V tile is
    loaded once for all of them). Key blocks above the diagonal are never loaded, blocks fully below
    it run without a mask, only the diagonal band is masked. With VARLEN, "batch" b is sequence b of
    the packed tokens (CU_SEQLENS), which attends to itself only; tiles past its end do nothing.
    With TMA, K and V are tensor descriptors over all (batch, token) rows (Hopper's TMA loads them)."""
    BLOCK_T: tl.constexpr = BLOCK_M // PACK  # query positions per tile
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    slots = H // PACK
    b = (pid_bh // slots).to(tl.int64)
    slot = pid_bh % slots
    kv_head = ((slot * PACK) // GROUP).to(tl.int64)
    kv_row = (b * Tk).to(tl.int32)  # TMA: the descriptor row of this sequence's first key
    if VARLEN:  # queries and keys are the sequence's own span of the packed tokens
        first, Tq = _sequence(CU_SEQLENS, b)
        Tk = Tq
        Q += first * sqt
        if TMA:
            kv_row = first.to(tl.int32)
        else:
            K += first * skt
            V += first * svt
        O += first * sot
        LSE += first
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    shift = kv_len - Tq  # query i sees keys j <= i + shift
    t0 = pid_m * BLOCK_T
    r = tl.arange(0, BLOCK_M)
    t = t0 + r // PACK                        # each row's query position ...
    h = (slot * PACK + r % PACK).to(tl.int64)  # ... and query head
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = t < Tq
    t64 = t.to(tl.int64)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t64[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None],
                other=0.0)
    kv_col = (kv_head * HEAD_DIM).to(tl.int32)
    if TMA:
        k_base = K
        v_base = V
    else:
        k_base = K + b * skb + kv_head * skh
        v_base = V + b * svb + kv_head * svh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        end = tl.maximum(tl.minimum(kv_len, t0 + BLOCK_T + shift), 0)      # past the last row's last key
        unmasked_end = tl.maximum(tl.minimum(end, t0 + shift + 1), 0)      # keys every row of the tile sees
    else:
        end = kv_len
        unmasked_end = kv_len
    end = tl.where(t0 < Tq, end, 0)  # a tile past a packed sequence's end (VARLEN) loads nothing
    unmasked_end = (tl.minimum(unmasked_end, end) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, kv_row, kv_col, 0, unmasked_end, t,
                               offs_n, offs_d, shift, kv_len, qk_scale, False, CAUSAL, BLOCK_N, DOT_PRECISION, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, kv_row, kv_col, unmasked_end, end, t,
                               offs_n, offs_d, shift, kv_len, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION, TMA)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b * sob + h[:, None] * soh + t64[:, None] * sot + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    lse = tl.where(empty, float("inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b * slb + h * slh + t64, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, Tq, H, sob, sot, soh, sdb, sdt, sdh,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """``delta = rowsum(dO * O)`` per query, the softmax backward's correction term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    rows = offs_m.to(tl.int64)[:, None]
    o = tl.load(O + b * sob + h * soh + rows * sot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows * sdt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + bh.to(tl.int64) * Tq + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, sdot, sdqt, start, end, offs_m,
                offs_n, offs_d, col_ok, Tq, shift, qk_scale,
                MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
                WITH_DK: tl.constexpr, WITH_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """Accumulates dK and/or dV of one key block over query blocks [start, end). Rows past Tq load as
    zeros (dO = 0, delta = 0), so they add nothing even where no mask is applied. ATOMIC_DQ: also adds
    this key block's share of dQ, ``dS K``, into the fp32 rows at dq_base (atomically: every key
    block's program adds into the same rows)."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < Tq
        rows64 = rows.to(tl.int64)
        q = tl.load(q_base + rows64[:, None] * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        do = tl.load(do_base + rows64[:, None] * sdot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        lse = tl.load(lse_base + rows64, mask=row_ok, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            visible = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= rows[None, :] + shift)
            p_t = tl.where(visible, p_t, 0.0)
        if WITH_DV:
            dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WITH_DK:
            delta = tl.load(delta_base + rows64, mask=row_ok, other=0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
            dk = tl.dot(ds_t, q, dk, input_precision=DOT_PRECISION)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION)  # (BLOCK_M, HEAD_DIM)
                tl.atomic_add(dq_base + rows64[:, None] * sdqt + offs_d[None, :], dq, mask=row_ok[:, None],
                              sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["Tq", "Tk", "slb", "slh"])
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, KV_LENS, CU_SEQLENS, qk_scale, sm_scale, Tq, Tk,
                          H, GROUP, sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh,
                          sdkb, sdkt, sdkh, sdvb, sdvt, sdvh, sdqb, sdqt, sdqh, slb, slh,
                          CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          DOT_PRECISION: tl.constexpr, WITH_DK: tl.constexpr = True, WITH_DV: tl.constexpr = True,
                          ATOMIC_DQ: tl.constexpr = False):
    """For one (batch, KV head, BLOCK_N keys), summed over the GROUP query heads that read it:
    ``P^T = exp2(K Q^T * scale - LSE)``, ``dV = P^T dO``, ``dS^T = P^T * (V dO^T - delta)``,
    ``dK = scale * dS^T Q``. Each program owns its dK/dV rows: deterministic, no atomics for them. With
    VARLEN, b is a packed sequence (CU_SEQLENS). LSE and DELTA share one layout (strides slb, slh).
    WITH_DK / WITH_DV: one launch may compute only one of the two (the split backward recomputes
    P^T in each, so each holds one accumulator instead of two). ATOMIC_DQ (with WITH_DK): dQ too,
    added in fp32 into DQ_ACC by atomics, so no dQ pass recomputes P and dP (not deterministic: the
    key blocks add in whatever order they finish)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    n_kv_heads = H // GROUP
    b = (bhk // n_kv_heads).to(tl.int64)
    kv_head = bhk % n_kv_heads
    if VARLEN:
        first, Tq = _sequence(CU_SEQLENS, b)
        Tk = Tq
        Q += first * sqt
        K += first * skt
        V += first * svt
        DO += first * sdot
        DK += first * sdkt
        DV += first * sdvt
        DQ_ACC += first * sdqt
        LSE += first
        DELTA += first
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    shift = kv_len - Tq
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < kv_len
    cols = offs_n.to(tl.int64)[:, None]
    k = tl.load(K + b * skb + kv_head.to(tl.int64) * skh + cols * skt + offs_d[None, :], mask=col_ok[:, None],
                other=0.0)
    v = k
    if WITH_DK:  # only dK's dP^T = V dO^T reads V
        v = tl.load(V + b * svb + kv_head.to(tl.int64) * svh + cols * svt + offs_d[None, :], mask=col_ok[:, None],
                    other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    first_m = 0
    if CAUSAL:  # queries before n0 - shift see none of these keys
        first_m = (tl.maximum(n0 - shift, 0) // BLOCK_M) * BLOCK_M
    first_m = tl.where(n0 < kv_len, first_m, Tq)  # a block past a packed sequence's end sums nothing
    # Query blocks from `unmasked_m` on see every key of this block (and the block lies inside
    # kv_len): they skip the mask; only the diagonal band before them is masked.
    unmasked_m = Tq
    if n0 + BLOCK_N <= kv_len:
        unmasked_m = first_m
        if CAUSAL:
            unmasked_m = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M, Tq)
    for g in range(0, GROUP):
        h = (kv_head * GROUP + g).to(tl.int64)
        q_base = Q + b * sqb + h * sqh
        do_base = DO + b * sdob + h * sdoh
        lse_base = LSE + b * slb + h * slh
        delta_base = DELTA + b * slb + h * slh
        dq_base = DQ_ACC + b * sdqb + h * sdqh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, sdot, sdqt, first_m,
                             unmasked_m, offs_m, offs_n, offs_d, col_ok, Tq, shift, qk_scale,
                             True, CAUSAL, BLOCK_M, DOT_PRECISION, WITH_DK, WITH_DV, ATOMIC_DQ)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, dq_base, sqt, sdot, sdqt, unmasked_m,
                             Tq, offs_m, offs_n, offs_d, col_ok, Tq, shift, qk_scale,
                             False, CAUSAL, BLOCK_M, DOT_PRECISION, WITH_DK, WITH_DV, ATOMIC_DQ)
    store_ok = (offs_n < Tk)[:, None]
    if WITH_DK:
        tl.store(DK + b * sdkb + kv_head.to(tl.int64) * sdkh + cols * sdkt + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=store_ok)
    if WITH_DV:
        tl.store(DV + b * sdvb + kv_head.to(tl.int64) * sdvh + cols * sdvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, start, end, offs_m, offs_n, offs_d, row_ok,
              kv_len, shift, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulates dQ of one query block over key blocks [start, end); unmasked blocks lie wholly
    inside every row's visible range."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < kv_len
        cols64 = cols.to(tl.int64)
        if MASKED:
            k_t = tl.load(k_base + cols64[None, :] * skt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
            v_t = tl.load(v_base + cols64[None, :] * svt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        else:
            k_t = tl.load(k_base + cols64[None, :] * skt + offs_d[:, None])
            v_t = tl.load(v_base + cols64[None, :] * svt + offs_d[:, None])
        s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            visible = col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + shift)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, v_t, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq, input_precision=DOT_PRECISION)
    return dq


# A one-token sequence would otherwise get its own specialisation (Tq == 1 as a constant), which
# compiles to a different schedule that spills; training never needs a faster T = 1 backward.
@triton.jit(do_not_specialize=["Tq", "Tk", "slb", "slh"])
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_LENS, CU_SEQLENS, qk_scale, sm_scale, Tq, Tk, H, GROUP,
                        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh, sdob, sdot, sdoh, sdqb, sdqt, sdqh, slb, slh,
                        CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, VARLEN: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """For one (batch, query head, BLOCK_M queries): ``P = exp2(Q K^T * scale - LSE)``,
    ``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K``, over the key blocks the rows can see. With
    VARLEN, b is a packed sequence (CU_SEQLENS)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kv_head = h // GROUP
    if VARLEN:
        first, Tq = _sequence(CU_SEQLENS, b)
        Tk = Tq
        Q += first * sqt
        K += first * skt
        V += first * svt
        DO += first * sdot
        DQ += first * sdqt
        LSE += first
        DELTA += first
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    shift = kv_len - Tq
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Tq
    rows = offs_m.to(tl.int64)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sqt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows * sdot + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    lse = tl.load(LSE + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * skb + kv_head * skh
    v_base = V + b * svb + kv_head * svh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    if CAUSAL:
        end = tl.maximum(tl.minimum(kv_len, m0 + BLOCK_M + shift), 0)
        unmasked_end = tl.maximum(tl.minimum(end, m0 + shift + 1), 0)
    else:
        end = kv_len
        unmasked_end = kv_len
    end = tl.where(m0 < Tq, end, 0)  # a tile past a packed sequence's end loads nothing
    unmasked_end = (tl.minimum(unmasked_end, end) // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, 0, unmasked_end, offs_m, offs_n, offs_d,
                   row_ok, kv_len, shift, qk_scale, False, CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, skt, svt, unmasked_end, end, offs_m, offs_n, offs_d,
                   row_ok, kv_len, shift, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION)
    tl.store(DQ + b * sdqb + h * sdqh + rows * sdqt + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


@triton.jit
def _attn_decode_kernel(Q, K, V, O_PART, LSE_PART, KV_LENS, qk_scale, Tq, Tk, GROUP, split_size, n_splits,
                        sqb, sqt, sqh, skb, skt, skh, svb, svt, svh,
                        CAUSAL: tl.constexpr, HAS_KV_LENS: tl.constexpr, HEAD_DIM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Flash-decoding, stage 1: program (batch, KV head, split) attends the GROUP * Tq queries of that
    KV head (packed as rows ``g * Tq + t``) to its split of the keys, so each K/V byte is read once.
    Writes the split's normalised partial output and its base-2 LSE (-inf when it saw no key)."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    n_kv_heads = tl.num_programs(1)
    kv_len = _kv_len(KV_LENS, b, Tk, HAS_KV_LENS)
    shift = kv_len - Tq
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * Tq
    t = rows % Tq
    h = kv_head * GROUP + rows // Tq
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + h[:, None] * sqh + t.to(tl.int64)[:, None] * sqt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    k_base = K + b * skb + kv_head * skh
    v_base = V + b * svb + kv_head * svh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    start = split * split_size
    end = tl.minimum(start + split_size, kv_len)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, skt, svt, 0, 0, start, end, t, offs_n, offs_d,
                               shift, kv_len, qk_scale, True, CAUSAL, BLOCK_N, DOT_PRECISION, False)
    empty = l_i == 0.0
    part = ((b * n_kv_heads + kv_head) * n_splits + split) * BLOCK_M + rows
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / tl.where(empty, 1.0, l_i)[:, None])
    tl.store(LSE_PART + part, tl.where(empty, float("-inf"), m_i + tl.math.log2(tl.where(empty, 1.0, l_i))))


@triton.jit
def _attn_decode_combine_kernel(O_PART, LSE_PART, O, Tq, GROUP, n_splits, sob, sot, soh,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr):
    """Flash-decoding, stage 2: ``O = sum_s exp2(lse_s - lse) * O_s`` with ``lse = log2(sum_s exp2(lse_s))``
    for one packed query row; a row no split saw stays zero."""
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    row = tl.program_id(2)
    n_kv_heads = tl.num_programs(1)
    splits = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    split_ok = splits < n_splits
    part = ((b * n_kv_heads + kv_head) * n_splits + splits) * BLOCK_M + row
    lse = tl.load(LSE_PART + part, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    o = tl.load(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    t = row % Tq
    h = kv_head * GROUP + row // Tq
    tl.store(O + b * sob + h * soh + t.to(tl.int64) * sot + offs_d, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

HEAD_DIMS = (16, 32, 64, 128)


def fwd_candidates(arch: int, head_dim: int, dtype: torch.dtype) -> list[dict]:
    """The forward autotune set, default first. ``pack_group`` entries put all query heads of a KV
    group in one tile (used when the group size is a power of two); ``tma`` entries read K and V
    through Hopper's tensor-memory accelerator (host-side descriptors) instead of cp.async, where
    ``can_use_tma`` allows. Every entry is compiled for sm_80 and sm_90a and checked for spills by
    tests/aot_gate.py."""
    def cfg(m, n, warps, stages, pack_group=False, tma=False):
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages, pack_group=pack_group,
                    **({"tma": True} if tma else {}))

    if arch == 0:
        return [cfg(16, 16, 4, 1)]
    if dtype == torch.float32:
        return [cfg(32 if head_dim <= 64 else 16, 16, 4, 2)]
    if arch >= 90:
        # D = 128: a warpgroup's wgmma covers 64 rows, so 8 warps need >= 128 rows (64-row tiles on 8
        # warps compute their first product twice) and 4-warp 128-row tiles spill. The TMA tiles
        # hold 11-15 fewer registers than their cp.async twins (no per-thread K/V addresses).
        if head_dim > 64:
            return [cfg(128, 64, 8, 3), cfg(128, 64, 8, 2), cfg(128, 128, 8, 2), cfg(128, 128, 8, 3),
                    cfg(64, 64, 4, 3), cfg(128, 64, 8, 3, True),
                    cfg(128, 64, 8, 3, tma=True), cfg(128, 128, 8, 2, tma=True), cfg(128, 64, 8, 3, True, tma=True)]
        tiles = [cfg(128, 64, 4, 3), cfg(128, 128, 8, 3), cfg(64, 64, 4, 4), cfg(64, 32, 4, 3),
                 cfg(128, 64, 4, 3, True)]
        if head_dim > 32:
            return tiles + [cfg(128, 64, 4, 3, tma=True), cfg(128, 128, 8, 3, tma=True)]
        return tiles  # no Qwen3 has heads this small (the tests do): no TMA variants to compile
    # sm_80: bound as a launch binds them (16-byte aligned, vectorised), 128 x 64 tiles at D = 128
    # and 128 x 64 on 4 warps at D = 64 spill; these do not, on Triton 3.6 and 3.9 alike.
    if head_dim > 64:
        return [cfg(128, 32, 8, 3), cfg(64, 64, 8, 3), cfg(64, 32, 4, 3), cfg(128, 32, 8, 3, True)]
    return [cfg(64, 64, 4, 3), cfg(128, 64, 8, 3), cfg(128, 32, 4, 3), cfg(64, 32, 4, 4), cfg(128, 64, 8, 3, True)]


def can_pack_group(cfg: dict, group: int) -> bool:
    """A tile holds BLOCK_M // group positions of every head of the group: the group size must be a
    power of two that divides BLOCK_M."""
    return group & (group - 1) == 0 and cfg["BLOCK_M"] % group == 0


def _fits_shared_memory(cfg: dict, head_dim: int, elem_bytes: int, limit: int) -> bool:
    # Q tile plus a K and a V tile per pipeline stage: what the software pipeline keeps resident.
    need = (cfg["BLOCK_M"] + 2 * cfg["num_stages"] * cfg["BLOCK_N"]) * head_dim * elem_bytes
    return need <= limit


AUTOTUNE_ENV = "QWEN3_KERNELS_AUTOTUNE"


def _length_bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(n, 1)), 16384)


def _tuning_mode(device: torch.device) -> str:
    """How choices are made on ``device`` now: "tune" (measure what is not remembered), "lookup"
    (remembered choices only: a CUDA graph is being captured, nothing can be timed) or "off" (the
    defaults: ``QWEN3_KERNELS_AUTOTUNE=0``, or no GPU to time on)."""
    if os.environ.get(AUTOTUNE_ENV, "1") == "0" or device.type != "cuda":
        return "off"
    return "lookup" if torch.cuda.is_current_stream_capturing() else "tune"


def _measure(run) -> float:
    """Milliseconds per call of ``run``: the median of ~100 ms of CUDA-event-timed runs, so
    candidates a few percent apart still rank right at 16k."""
    import triton.testing
    return triton.testing.do_bench(run, warmup=25, rep=100, return_mode="median")


def _smem_limit(device: torch.device) -> int:
    """Shared memory a block may opt into: the card's, or a simulated sm_90's / sm_80's (227 / 163 KB)."""
    if device.type != "cuda":
        return (227 if device_arch(device) >= 90 else 163) * 1024
    props = torch.cuda.get_device_properties(device)
    return getattr(props, "shared_memory_per_block_optin", 0) or 48 * 1024


def config_name(cfg: dict) -> str:
    """A forward config's name in the tuning cache and the logs: '128x64 w8 s3 group tma'."""
    return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']} w{cfg['num_warps']} s{cfg['num_stages']}"
            + (" group" if cfg.get("pack_group") else "") + (" tma" if cfg.get("tma") else ""))


def tuned_fwd_config(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, launch,
                     has_kv_lens: bool = False, packed_lengths: tuple[int, int] | None = None) -> dict:
    """The fastest forward config for this (arch, length buckets, head_dim, dtype, causal, GQA group,
    per-sequence lengths or not, packed sequences or not, TMA-able K/V or not), measured once with
    ``launch(cfg)`` (``_measure``) and remembered across processes (``tuning``). A candidate only
    competes if its output agrees with the default's (``fastest_agreeing``). The default config is
    used where measuring is impossible or unwanted: the interpreter, ``QWEN3_KERNELS_AUTOTUNE=0``
    (how tests pin one config), a rank other than 0 before ``tuning.sync()``; while a CUDA graph is
    captured only a remembered choice is used."""
    arch, D = device_arch(q.device), q.shape[-1]
    candidates = fwd_candidates(arch, D, q.dtype)
    mode = "off" if len(candidates) == 1 else _tuning_mode(q.device)
    if mode == "off":
        return candidates[0]
    Tq, Tk = packed_lengths or (q.shape[1], k.shape[1])  # packed sequences: the longest one's length
    tma = can_use_tma(k, v)
    group = q.shape[2] // k.shape[2]
    bucket = dict(arch=arch, dtype=str(q.dtype).removeprefix("torch."), D=D, Tq=_length_bucket(Tq),
                  Tk=_length_bucket(Tk), causal=causal, group=group, kv_lens=has_kv_lens,
                  packed=packed_lengths is not None, tma=tma)
    by_name = {config_name(c): c for c in candidates}
    if mode == "lookup":
        return by_name.get(tuning.lookup(q.device, "attention forward tiles", bucket), candidates[0])

    def tune():
        limit = _smem_limit(q.device)
        fitting = [c for c in candidates if _fits_shared_memory(c, D, q.element_size(), limit)
                   and (not c["pack_group"] or can_pack_group(c, group)) and (tma or not c.get("tma"))]
        return race(fitting or candidates[:1], launch, _measure, what="attention forward", name=config_name)

    name = tuning.tuned(q.device, "attention forward tiles", bucket, tune, valid=lambda n: n in by_name)
    return by_name.get(name, candidates[0])


def _max_difference(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.float() - ref.float()).abs().nan_to_num(float("inf")).amax().item() if x.numel() else 0.0


def close_in_ulps(x: torch.Tensor, ref: torch.Tensor, ulps: float, floor: float = 0.0) -> tuple[bool, str]:
    """Whether ``x`` is ``ref`` up to ``ulps`` units in the last place of their dtype relative to
    ``ref``'s largest magnitude (at least ``floor``), with the same non-finite entries: what another
    summation order changes, nothing a wrong mask or a lost tile would."""
    if x.shape != ref.shape or x.dtype != ref.dtype:
        return False, f"{tuple(x.shape)} {x.dtype} instead of {tuple(ref.shape)} {ref.dtype}"
    scale = max(ref.abs().nan_to_num(0.0, 0.0, 0.0).amax().float().item() if ref.numel() else 0.0, floor,
                torch.finfo(torch.float32).tiny)
    tol = ulps * torch.finfo(ref.dtype).eps * scale
    ok = torch.allclose(x, ref, rtol=0, atol=tol, equal_nan=True)
    return ok, f"max |difference| {_max_difference(x, ref):.3g}, allowed {tol:.3g}"


def _forward_agrees(ref: tuple, got: tuple) -> tuple[bool, str]:
    """4 units in the last place of the output dtype relative to the output's largest value (at
    least 1), 1e-3 on the (fp32, base-2) log-sum-exp, and the same non-finite entries."""
    (ref_out, ref_lse), (out, lse) = ref, got
    ok, detail = close_in_ulps(out, ref_out, 4, floor=1.0)
    ok_lse = torch.allclose(lse, ref_lse, rtol=1e-3, atol=1e-3, equal_nan=True)
    if not ok_lse:
        detail += f"; lse max |difference| {_max_difference(lse, ref_lse):.3g}, allowed 1e-3 + 1e-3 relative"
    return ok and ok_lse, detail


def _gradients_agree(ref: tuple, got: tuple) -> tuple[bool, str]:
    """dq, dk and dv each within 8 units in the last place of their largest value: tiles of other
    sizes, atomics and recomputation change the order of fp32 sums, and a rounding to the half
    dtype may land one unit apart."""
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        ok, detail = close_in_ulps(g, r, 8)
        if not ok:
            return False, f"{name}: {detail}"
    return True, ""


class NotOffered(RuntimeError):
    """A candidate that does not exist on this device or for these inputs (an SDPA backend that
    has no kernel here): left out without a warning."""


def race(candidates: list, launch, measure, *, what: str, name=str, agree=_forward_agrees,
         ) -> tuple[str, dict[str, float], dict[str, str]]:
    """``fastest_agreeing`` that also returns what it measured: (winner's name, {name: ms} of every
    timed candidate, {name: why} of every dropped one)."""
    timings: dict[str, float] = {}
    dropped: dict[str, str] = {}
    best = fastest_agreeing(candidates, launch, measure, what=what, name=name, agree=agree, timings=timings,
                            dropped=dropped)
    return name(best), timings, dropped


def fastest_agreeing(candidates: list, launch, measure, *, what: str = "attention forward", name=str,
                     agree=_forward_agrees, timings: dict | None = None, dropped: dict | None = None):
    """The candidate with the least ``measure(lambda: launch(cfg))`` among those whose outputs (the
    tuple ``launch`` returns) ``agree`` with the first candidate's: a config that fails to launch or
    computes something else on this GPU (a TMA descriptor the hardware reads otherwise than the
    compiler assumed, say) is dropped with a warning instead of winning on speed. The default
    agreement (``_forward_agrees``) is the forward's: (out, lse). ``timings`` and ``dropped``, if
    given, receive {name: ms} and {name: reason}."""
    timings = {} if timings is None else timings
    dropped = {} if dropped is None else dropped
    ref = tuple(t.clone() for t in launch(candidates[0]))
    best, best_time = candidates[0], measure(lambda: launch(candidates[0]))
    timings[name(best)] = best_time
    for cfg in candidates[1:]:
        try:
            agrees, detail = agree(ref, tuple(launch(cfg)))
            elapsed = measure(lambda cfg=cfg: launch(cfg)) if agrees else None
        except NotOffered as error:
            log.info("%s autotune: %s is not offered here: %s", what, name(cfg), error)
            dropped[name(cfg)] = f"not offered here: {error}"
            continue
        except Exception as error:  # noqa: BLE001 - any failure drops the candidate, the reason is logged
            log.warning("%s autotune: dropped %s, it failed on this GPU: %s", what, name(cfg), error)
            dropped[name(cfg)] = f"failed: {error}"
            continue
        if not agrees:
            log.warning("%s autotune: dropped %s, its output disagrees with %s's (%s)", what, name(cfg),
                        name(candidates[0]), detail)
            dropped[name(cfg)] = f"disagrees with {name(candidates[0])}: {detail}"
            continue
        timings[name(cfg)] = elapsed
        if elapsed < best_time:
            best, best_time = cfg, elapsed
    return best


# ----------------------------------------------------------------------------------------------
# Backward candidates
# ----------------------------------------------------------------------------------------------

def _tile(m: int, n: int, warps: int, stages: int) -> dict:
    return dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)


def _tile_name(t: dict) -> str:
    return f"{t['BLOCK_M']}x{t['BLOCK_N']} w{t['num_warps']} s{t['num_stages']}"


def bwd_candidate(design: str, dkdv: dict, dq: dict | None = None, may_spill: bool = False) -> dict:
    """One backward design with its launch configs. ``design``:

    - ``joint``: one dK/dV launch per key block (P^T, dP^T, dV, dK: 4 products per tile pair) and
      the dQ launch (P, dP, dQ: 3), 7 in all, deterministic;
    - ``split``: dV and dK as two launches of the dK/dV kernel, each recomputing P^T (2 + 3), then
      dQ: 8 products, one accumulator held per launch;
    - ``joint-atomic`` / ``split-atomic``: the dK launch also adds dS K into an fp32 dQ by atomics
      and there is no dQ launch (5 / 6 products); the order of those adds varies from run to run,
      so these are offered only while ``torch.are_deterministic_algorithms_enabled()`` is False.

    ``dkdv``: BLOCK_N keys held, BLOCK_M queries per step; ``dq``: BLOCK_M queries held, BLOCK_N keys
    per step. ``may_spill``: the compile gate (tests/aot_gate.py) reports register spills for it on
    some stack; the card ranks it anyway. Any other candidate that spills on the card is dropped."""
    atomic = design.endswith("-atomic")
    if atomic != (dq is None):
        raise ValueError(f"a {design} backward {'has no' if atomic else 'needs a'} dQ launch config")
    name = f"{design} dkdv {_tile_name(dkdv)}" + (f" dq {_tile_name(dq)}" if dq else "")
    return dict(name=name, design=design, dkdv=dkdv, dq=dq, may_spill=may_spill)


def bwd_candidates(arch: int, head_dim: int, dtype: torch.dtype, deterministic: bool | None = None) -> list[dict]:
    """The backward autotune set on sm_{arch}, default first; the atomic designs only when
    ``deterministic`` (default: ``torch.are_deterministic_algorithms_enabled()``) is False.

    The default is the deterministic candidate with the least tensor-core work per (query tile,
    key tile) pair -- products times the warpgroups that repeat each -- among those that compile
    without spills on Triton 3.6 and 3.9 (tests/aot_gate.py reports every candidate's work and
    spills, and checks that rule). The dK/dV tiles hold BLOCK_N keys, the dQ tiles BLOCK_M queries;
    on sm_90 a held tile of 64 rows per warpgroup runs each product on wgmma once."""
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if arch == 0 or dtype == torch.float32:
        # a 16 x 16 dK/dV tile of D = 16 on 4 warps spills on sm_80 (ptxas keeps a local array)
        small = _tile(16, 16, 2 if head_dim <= 16 else 4, 1)
        return [bwd_candidate("joint", small, small)]
    T, joint, split = _tile, functools.partial(bwd_candidate, "joint"), functools.partial(bwd_candidate, "split")
    if arch >= 90 and head_dim > 64:
        # Default: joint, 16 queries per step over 64 held keys, then dQ over 64 held queries: 7
        # products per tile pair, none repeated (64 held rows per warpgroup). The joint tiles of 32
        # queries spill (both fp32 accumulators of 64 x 128 beside a 64 x 32 P^T), so the split
        # design (8 products) was the default before; 16 queries leave room for both accumulators.
        cands = [joint(T(16, 64, 4, 1), T(64, 64, 4, 2)),
                 joint(T(16, 64, 4, 1), T(128, 64, 8, 2)),
                 joint(T(16, 128, 8, 1), T(128, 32, 8, 3)),
                 joint(T(32, 64, 8, 1), T(64, 64, 4, 2)),  # 8 warps over 64 keys: a product done 1.5x
                 joint(T(32, 128, 8, 2), T(64, 64, 4, 2), may_spill=True),
                 split(T(32, 64, 4, 1), T(64, 64, 4, 2)),
                 split(T(32, 128, 8, 1), T(128, 64, 8, 2)),
                 split(T(16, 64, 4, 2), T(64, 32, 4, 3))]
        atomic = [bwd_candidate("joint-atomic", T(16, 64, 4, 1), may_spill=True),
                  bwd_candidate("joint-atomic", T(16, 128, 8, 1)),
                  bwd_candidate("split-atomic", T(32, 64, 4, 1)), bwd_candidate("split-atomic", T(32, 128, 8, 1))]
    elif arch >= 90 and head_dim > 32:
        cands = [joint(T(32, 64, 4, 2), T(64, 32, 4, 2)),
                 joint(T(32, 64, 4, 2), T(64, 64, 4, 2)),
                 joint(T(64, 64, 4, 1), T(64, 32, 4, 2)),
                 joint(T(16, 64, 4, 2), T(64, 32, 4, 3)),
                 joint(T(32, 128, 8, 2), T(128, 32, 8, 2)),
                 split(T(32, 64, 4, 2), T(64, 32, 4, 2))]
        atomic = [bwd_candidate("joint-atomic", T(32, 64, 4, 2))]
    elif arch >= 90:
        # dK/dV single-buffered: with 2 stages Triton 3.6 spills 56 bytes at D <= 32
        cands = [joint(T(64, 64, 4, 1), T(64, 64, 4, 2)),
                 joint(T(32, 64, 4, 1), T(64, 64, 4, 2)),
                 joint(T(32, 128, 8, 1), T(128, 32, 8, 2))]
        atomic = [bwd_candidate("joint-atomic", T(64, 64, 4, 1))]
    elif head_dim > 64:
        # Default: 64 held keys on 8 warps (4 products, none repeated) and dQ over 32 queries on 8
        # warps: 7. 32 held keys on 8 warps repeat products across warps (9 in all).
        cands = [joint(T(64, 64, 8, 1), T(32, 64, 8, 1)),
                 joint(T(32, 64, 4, 1), T(64, 64, 8, 2)),
                 joint(T(16, 128, 8, 1), T(64, 64, 8, 3)),
                 joint(T(32, 64, 8, 1), T(32, 64, 8, 1)),
                 joint(T(32, 64, 8, 2), T(32, 64, 8, 2)),
                 split(T(32, 64, 4, 1), T(32, 64, 8, 1))]
        atomic = [bwd_candidate("joint-atomic", T(32, 64, 8, 1)),
                  bwd_candidate("split-atomic", T(32, 64, 4, 1), may_spill=True)]
    elif head_dim > 32:
        cands = [joint(T(32, 64, 4, 1), T(32, 64, 4, 1)),
                 joint(T(32, 64, 4, 1), T(64, 32, 4, 2)),
                 joint(T(32, 128, 8, 1), T(128, 32, 8, 2)),
                 split(T(32, 64, 4, 1), T(32, 64, 4, 1), may_spill=True)]
        atomic = [bwd_candidate("joint-atomic", T(32, 64, 4, 1))]
    else:
        # Default dQ: 128 held queries on 8 warps (3 products); a 32-query dQ tile on 4 warps
        # repeats every product at D <= 32 (6).
        cands = [joint(T(32, 64, 4, 1), T(128, 32, 8, 2)),
                 joint(T(32, 64, 4, 1), T(32, 64, 4, 1)),
                 joint(T(32, 128, 8, 1), T(128, 32, 8, 2))]
        atomic = [bwd_candidate("joint-atomic", T(32, 64, 4, 1))]
    return cands if deterministic else cands + atomic


def _bwd_fits_shared_memory(cand: dict, head_dim: int, elem_bytes: int, limit: int) -> bool:
    # dK/dV: the held K and V tiles plus a Q and a dO tile per stage; dQ: the held Q and dO plus a K
    # and a V tile per stage (what each software pipeline keeps resident).
    t = cand["dkdv"]
    need = [(2 * t["BLOCK_N"] + 2 * t["num_stages"] * t["BLOCK_M"]) * head_dim * elem_bytes]
    if cand["dq"]:
        t = cand["dq"]
        need.append((2 * t["BLOCK_M"] + 2 * t["num_stages"] * t["BLOCK_N"]) * head_dim * elem_bytes)
    return max(need) <= limit


def bwd_bucket(q, k, causal: bool, kv_lens=None, cu_seqlens=None, max_seqlen: int | None = None) -> dict:
    """The backward tuning's bucket: arch, dtype, head dim, length buckets (packed: the longest
    sequence's), causal, GQA group, per-sequence lengths, packed, deterministic mode."""
    _, Tq, Tk = _batches(q, k, cu_seqlens, max_seqlen)
    return dict(arch=device_arch(q.device), dtype=str(q.dtype).removeprefix("torch."), D=q.shape[-1],
                Tq=_length_bucket(Tq), Tk=_length_bucket(Tk), causal=causal, group=q.shape[2] // k.shape[2],
                kv_lens=kv_lens is not None, packed=cu_seqlens is not None,
                deterministic=torch.are_deterministic_algorithms_enabled())


def tuned_bwd_candidate(do, q, k, v, out, lse, causal: bool, softmax_scale: float, kv_lens=None, cu_seqlens=None,
                        max_seqlen: int | None = None) -> dict:
    """The fastest backward candidate for this (arch, length buckets, head_dim, dtype, causal, GQA
    group, per-sequence lengths, packed, deterministic mode), each timed as the whole backward (all
    its launches) on these inputs with ``_measure``, remembered across processes (``tuning``). A
    candidate competes only if its dq, dk and dv agree with the default's (``_gradients_agree``);
    one that fails, disagrees, or spills on this card though the gate found it spill-free is
    dropped with a warning. Defaults as in ``tuned_fwd_config``."""
    arch, D = device_arch(q.device), q.shape[-1]
    deterministic = torch.are_deterministic_algorithms_enabled()
    candidates = bwd_candidates(arch, D, q.dtype, deterministic)
    mode = "off" if len(candidates) == 1 else _tuning_mode(q.device)
    if mode == "off":
        return candidates[0]
    bucket = bwd_bucket(q, k, causal, kv_lens, cu_seqlens, max_seqlen)
    by_name = {c["name"]: c for c in candidates}
    if mode == "lookup":
        return by_name.get(tuning.lookup(q.device, "attention backward", bucket), candidates[0])

    def launch(cand):
        grads, compiled = _run_backward(cand, do, q, k, v, out, lse, causal, softmax_scale, kv_lens, cu_seqlens,
                                        max_seqlen)
        spills = sum(getattr(c, "n_spills", 0) or 0 for c in compiled if c is not None)
        if spills and cand is not candidates[0] and not cand["may_spill"]:
            raise RuntimeError(f"it spills {spills} bytes of registers on this GPU, where the compile gate "
                               "(tests/aot_gate.py) found it spill-free")
        return grads

    def tune():
        limit = _smem_limit(q.device)
        fitting = [c for c in candidates if _bwd_fits_shared_memory(c, D, q.element_size(), limit)]
        return race(fitting or candidates[:1], launch, _measure, what="attention backward",
                    name=lambda c: c["name"], agree=_gradients_agree)

    name = tuning.tuned(q.device, "attention backward", bucket, tune, valid=lambda n: n in by_name)
    return by_name.get(name, candidates[0])


def decode_config(arch: int, head_dim: int, dtype: torch.dtype, packed_rows: int) -> dict:
    block_m = max(16, triton.next_power_of_2(packed_rows))
    if arch == 0:
        return dict(BLOCK_M=block_m, BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        return dict(BLOCK_M=block_m, BLOCK_N=16, num_warps=4, num_stages=2)
    # Small heads get 2 warps: a 16 x 64 tile of D <= 32 spread over 4 warps spills on sm_90.
    # 3 stages: the next K and V tiles load while this one is used (2 stages single-buffer them, so
    # each iteration waits for its own loads); 72 KB of shared memory at D = 128 still leaves 3 CTAs
    # per SM on sm_90, 2 on sm_80.
    return dict(BLOCK_M=block_m, BLOCK_N=64, num_warps=8 if head_dim > 64 else 4 if head_dim > 32 else 2,
                num_stages=3)


DELTA_BLOCK_M = 32


def can_use_tma(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether K and V can be read through 2-D TMA descriptors over (batch x token, Hkv x D): heads
    of D unit-stride elements back to back, batches one token stride apart, and the 16-byte
    alignment TMA needs of the base and the row stride."""
    if TensorDescriptor is None:
        return False
    for x in (k, v):
        B, T, Hkv, D = x.shape
        if (x.stride(3) != 1 or (Hkv > 1 and x.stride(2) != D) or (B > 1 and x.stride(0) != T * x.stride(1))
                or x.data_ptr() % 16 or (x.stride(1) * x.element_size()) % 16):
            return False
    return True


def _kv_descriptor(x: torch.Tensor, block_n: int):
    B, T, Hkv, D = x.shape
    return TensorDescriptor(x, shape=[B * T, Hkv * D], strides=[x.stride(1), 1], block_shape=[block_n, D])


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently run as TF32: the result would be ~1e-3 off eager fp32.
    return "ieee" if dtype == torch.float32 else "tf32"


@on_tensor_device
def _batches(q, k, cu_seqlens, max_seqlen) -> tuple[int, int, int]:
    """(programs' batch count, Tq, Tk) as the kernels see them: with ``cu_seqlens`` one "batch" per
    packed sequence and ``max_seqlen`` sizing the grid (each program reads its own length)."""
    if cu_seqlens is None:
        return q.shape[0], q.shape[1], k.shape[1]
    return cu_seqlens.shape[0] - 1, max_seqlen, max_seqlen


def _strides(x: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, token, head) strides; packed sequences index the one batch row by token offset."""
    return (0 if varlen else x.stride(0)), x.stride(1), x.stride(2)


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    # packed sequences share the one batch row of (1, H, total): a sequence's offset comes from cu_seqlens
    return (0 if varlen else lse.stride(0)), lse.stride(1)


@on_tensor_device
def attention_forward(q, k, v, causal: bool, softmax_scale: float, kv_lens=None, config: dict | None = None,
                      cu_seqlens=None, max_seqlen: int | None = None):
    """Returns (out (B, Tq, H, D), lse (B, H, Tq) fp32, base 2). ``config`` pins the launch config
    (one of ``fwd_candidates``); by default it is tuned. With ``cu_seqlens`` (packed sequences, B =
    1), ``max_seqlen`` sizes the grid; tiles past a sequence's end exit at once."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Tq), dtype=torch.float32, device=q.device)
    varlen = cu_seqlens is not None
    batches, Tq, Tk = _batches(q, k, cu_seqlens, max_seqlen)
    if out.numel() == 0 or batches == 0 or Tq == 0:
        return out.zero_(), lse.fill_(float("inf"))

    group = H // Hkv

    # the tuner offers TMA candidates only where can_use_tma holds; a pinned config is checked here
    if config is not None and config.get("tma") and not can_use_tma(k, v):
        raise ValueError(f"config {config} loads K/V through TMA descriptors, which need unit-stride heads of "
                         f"D elements, (batch, token) rows one stride apart and 16-byte alignment; "
                         f"got k {tuple(k.shape)} strides {k.stride()}, v strides {v.stride()}")

    def launch(cfg):
        pack = group if cfg["pack_group"] and can_pack_group(cfg, group) else 1
        meta = {k: v for k, v in cfg.items() if k not in ("pack_group", "tma")}
        keys, values = k, v
        if cfg.get("tma"):
            keys, values = _kv_descriptor(k, cfg["BLOCK_N"]), _kv_descriptor(v, cfg["BLOCK_N"])
        _attn_fwd_kernel[(triton.cdiv(Tq, cfg["BLOCK_M"] // pack), batches * (H // pack))](
            q, keys, values, out, lse, kv_lens if kv_lens is not None else q, cu_seqlens if varlen else q,
            softmax_scale * LOG2E, Tq, Tk, H, group,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
            *_lse_strides(lse, varlen),
            CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, VARLEN=varlen, HEAD_DIM=D, PACK=pack,
            DOT_PRECISION=_dot_precision(q.dtype), TMA=bool(cfg.get("tma")), **meta)
        return out, lse

    if config is None:
        config = tuned_fwd_config(q, k, v, causal, launch, kv_lens is not None, (Tq, Tk) if varlen else None)
    return launch(config)


@on_tensor_device
def attention_backward(do, q, k, v, out, lse, causal: bool, softmax_scale: float, kv_lens=None, cu_seqlens=None,
                       max_seqlen: int | None = None, candidate: dict | None = None):
    """Returns (dq, dk, dv). ``candidate`` pins the design (one of ``bwd_candidates``); by default it
    is tuned."""
    do, q, k, v = unit_stride(do), unit_stride(q), unit_stride(k), unit_stride(v)
    batches, Tq, _ = _batches(q, k, cu_seqlens, max_seqlen)
    if q.numel() == 0 or k.numel() == 0 or batches == 0 or Tq == 0:
        return tuple(torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    if candidate is None:
        candidate = tuned_bwd_candidate(do, q, k, v, out, lse, causal, softmax_scale, kv_lens, cu_seqlens, max_seqlen)
    grads, _ = _run_backward(candidate, do, q, k, v, out, lse, causal, softmax_scale, kv_lens, cu_seqlens,
                             max_seqlen)
    return grads


def _run_backward(cand: dict, do, q, k, v, out, lse, causal, softmax_scale, kv_lens, cu_seqlens, max_seqlen):
    """Every launch of one backward candidate: ((dq, dk, dv), the compiled kernels it launched)."""
    B, T, H, D = q.shape
    Hkv = k.shape[2]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    varlen = cu_seqlens is not None
    batches, Tq, Tk = _batches(q, k, cu_seqlens, max_seqlen)
    delta = torch.empty_like(lse)
    # row-wise: packed rows need no schedule
    compiled = [_attn_bwd_delta_kernel[(triton.cdiv(T, DELTA_BLOCK_M), B * H)](
        out, do, delta, T, H, *out.stride()[:3], *do.stride()[:3], HEAD_DIM=D, BLOCK_M=DELTA_BLOCK_M, num_warps=4)]
    common = dict(CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, VARLEN=varlen, HEAD_DIM=D,
                  DOT_PRECISION=_dot_precision(q.dtype))
    lens = kv_lens if kv_lens is not None else q
    sequences = cu_seqlens if varlen else q
    atomic = cand["design"].endswith("-atomic")
    parts = [dict(WITH_DK=False, WITH_DV=True), dict(WITH_DK=True, WITH_DV=False)] \
        if cand["design"].startswith("split") else [{}]
    if atomic:  # the dK launch adds dQ in fp32; it becomes q's dtype below
        parts[-1]["ATOMIC_DQ"] = True
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    else:
        dq_acc = dq  # not read: ATOMIC_DQ is off
    tile = cand["dkdv"]
    for part in parts:
        compiled.append(_attn_bwd_dkdv_kernel[(triton.cdiv(Tk, tile["BLOCK_N"]), batches * Hkv)](
            q, k, v, do, lse, delta, dk, dv, dq_acc, lens, sequences, softmax_scale * LOG2E, softmax_scale, Tq, Tk,
            H, H // Hkv, *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dk, varlen), *_strides(dv, varlen), *_strides(dq_acc, varlen), *_lse_strides(lse, varlen),
            **common, **part, **tile))
    if atomic:
        torch.mul(dq_acc, softmax_scale, out=dq_acc)
        dq.copy_(dq_acc)
    else:
        tile = cand["dq"]
        compiled.append(_attn_bwd_dq_kernel[(triton.cdiv(Tq, tile["BLOCK_M"]), batches * H)](
            q, k, v, do, lse, delta, dq, lens, sequences, softmax_scale * LOG2E, softmax_scale, Tq, Tk, H, H // Hkv,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen),
            *_strides(dq, varlen), *_lse_strides(lse, varlen), **common, **tile))
    return (dq, dk, dv), compiled


def num_splits(batch: int, kv_heads: int, max_kv_len: int, block_n: int, sms: int) -> int:
    """Enough (batch, KV head, split) programs to fill the GPU about twice, each with at least a few
    key blocks of work."""
    if max_kv_len <= 0:
        return 1
    want = triton.cdiv(2 * sms, batch * kv_heads)
    return max(1, min(want, triton.cdiv(max_kv_len, 4 * block_n), 128))


@on_tensor_device
def decode_forward(q, k, v, causal: bool, softmax_scale: float, kv_lens=None):
    """Split-KV attention for few queries over many keys; returns out (B, Tq, H, D)."""
    q, k, v = unit_stride(q), unit_stride(k), unit_stride(v)
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    group = H // Hkv
    cfg = decode_config(device_arch(q.device), D, q.dtype, group * Tq)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    splits = num_splits(B, Hkv, Tk, block_n, num_sms(q.device))
    split_size = triton.cdiv(triton.cdiv(max(Tk, 1), splits), block_n) * block_n
    o_part = torch.empty((B, Hkv, splits, block_m, D), dtype=torch.float32, device=q.device)
    lse_part = torch.empty((B, Hkv, splits, block_m), dtype=torch.float32, device=q.device)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    _attn_decode_kernel[(B, Hkv, splits)](
        q, k, v, o_part, lse_part, kv_lens if kv_lens is not None else q, softmax_scale * LOG2E, Tq, Tk, group,
        split_size, splits, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        CAUSAL=causal, HAS_KV_LENS=kv_lens is not None, HEAD_DIM=D, DOT_PRECISION=_dot_precision(q.dtype), **cfg)
    _attn_decode_combine_kernel[(B, Hkv, group * Tq)](
        o_part, lse_part, out, Tq, group, splits, *out.stride()[:3],
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_S=triton.next_power_of_2(splits), num_warps=4 if D > 64 else 2)
    return out


def use_decode_kernel(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Few packed query rows over many keys: the split-KV kernel keeps the GPU busy where the
    prefill kernel would launch only B * H programs."""
    Tq, H, Tk, Hkv = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    return (H // Hkv) * Tq <= 64 and Tk >= 4 * Tq


# ----------------------------------------------------------------------------------------------
# torch.library registration
# ----------------------------------------------------------------------------------------------

@torch.library.custom_op("qwen3_kernels::flash_attention", mutates_args=())
def _flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
                        causal: bool, softmax_scale: float, cu_seqlens: torch.Tensor | None = None,
                        max_seqlen: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, softmax_scale, kv_lens, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


@_flash_attention_op.register_fake
def _(q, k, v, kv_lens, causal, softmax_scale, cu_seqlens=None, max_seqlen=0):
    B, Tq, H, _ = q.shape
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty((B, H, Tq), dtype=torch.float32)


@torch.library.custom_op("qwen3_kernels::flash_attention_backward", mutates_args=())
def _flash_attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 out: torch.Tensor, lse: torch.Tensor, kv_lens: torch.Tensor | None, causal: bool,
                                 softmax_scale: float, cu_seqlens: torch.Tensor | None = None, max_seqlen: int = 0
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, out, lse, causal, softmax_scale, kv_lens, cu_seqlens, max_seqlen)


@_flash_attention_backward_op.register_fake
def _(do, q, k, v, out, lse, kv_lens, causal, softmax_scale, cu_seqlens=None, max_seqlen=0):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_flash_attention(ctx, inputs, output):
    q, k, v, kv_lens, causal, softmax_scale, cu_seqlens, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_lens, cu_seqlens)
    ctx.causal, ctx.softmax_scale, ctx.max_seqlen = causal, softmax_scale, max_seqlen


def _backward_flash_attention(ctx, dout, _dlse):
    q, k, v, out, lse, kv_lens, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _flash_attention_backward_op(dout, q, k, v, out, lse, kv_lens, ctx.causal, ctx.softmax_scale,
                                              cu_seqlens, ctx.max_seqlen)
    return dq, dk, dv, None, None, None, None, None


_flash_attention_op.register_autograd(_backward_flash_attention, setup_context=_setup_flash_attention)


@torch.library.custom_op("qwen3_kernels::decode_attention", mutates_args=())
def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None,
                         causal: bool, softmax_scale: float) -> torch.Tensor:
    return decode_forward(q, k, v, causal, softmax_scale, kv_lens)


@_decode_attention_op.register_fake
def _(q, k, v, kv_lens, causal, softmax_scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ----------------------------------------------------------------------------------------------
# SDPA in the race
# ----------------------------------------------------------------------------------------------

# SDPA's backends that race the Triton kernels (torch.nn.attention.SDPBackend member names)
SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}
TRITON = "triton"


def sdpa_computes(q: torch.Tensor, k: torch.Tensor, causal: bool, kv_lens, cu_seqlens) -> bool:
    """Whether SDPA computes exactly what ``attention`` is asked for: dense (no ``kv_lens``, no
    packed sequences), not empty, and a causal mask only where Tq == Tk (SDPA aligns it top-left,
    ours bottom-right: they agree on square scores alone). GQA goes in as ``enable_gqa``, so K/V
    are never repeated."""
    Tq, Tk = q.shape[1], k.shape[1]
    return (kv_lens is None and cu_seqlens is None and (not causal or Tq == Tk) and Tq > 0 and Tk > 0
            and q.shape[0] > 0 and q.shape[2] > 0)


def sdpa_attention(q, k, v, causal: bool, softmax_scale: float, backend: str) -> torch.Tensor:
    """``attention`` through SDPA pinned to one backend (a key of ``SDPA_BACKENDS``); (B, Tq, H, D)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    gqa = {"enable_gqa": True} if q.shape[2] != k.shape[2] else {}
    # a Python branch: under torch.compile with dynamic shapes `causal and Tq > 1` is a SymBool,
    # which is_causal rejects (one query over one key is the same either way)
    is_causal = True if causal and q.shape[1] > 1 else False
    with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend])):
        try:
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                 is_causal=is_causal, scale=softmax_scale, **gqa)
        except TypeError as e:  # a torch without enable_gqa
            raise NotOffered(f"this torch's SDPA cannot share K/V across query heads ({e})") from None
        except RuntimeError as e:
            if "No available kernel" in str(e) or "No viable backend" in str(e):  # CUDA's words, the CPU's
                raise NotOffered(str(e).splitlines()[0][:200]) from None
            raise
    return out.transpose(1, 2)


_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_RACE_FIELDS = ("dtype", "D", "B", "T", "H", "Hkv", "Tk", "causal")


def _race_bucket(q: torch.Tensor, k: torch.Tensor, causal: bool) -> tuple:
    """The race's shape bucket, in ``_RACE_FIELDS`` order (plain Python a torch.compile trace follows)."""
    B, T, H, D = q.shape
    return (_DTYPE_NAMES.get(q.dtype, "other"), D, _length_bucket(B), _length_bucket(T), H, k.shape[2],
            _length_bucket(k.shape[1]), causal)


def _race_op(needs_grad: bool) -> str:
    return "attention forward+backward" if needs_grad else "attention forward"


# (device, op, bucket) -> the implementation that serves it, for torch.compile traces: a dict lookup
# is what a trace can follow (and guard on) where the tuning cache's file and clock are not.
_served: dict[tuple, str] = {}


@torch.compiler.assume_constant_result
def _load_served(device: str) -> bool:
    """Fills ``_served`` with the race winners remembered for ``device`` (tuned earlier in this
    process, in the cache file, or sent by rank 0): run at trace time, where nothing can be timed."""
    device = torch.device(device)
    if _tuning_mode(device) == "off":
        return False
    for op in (_race_op(False), _race_op(True)):
        for bucket, choice in tuning.remembered(device, op):
            if set(bucket) == set(_RACE_FIELDS) and (choice == TRITON or choice in SDPA_BACKENDS):
                _served[(str(device), op, tuple(bucket[f] for f in _RACE_FIELDS))] = choice
    return True


def race_winner(q, k, v, causal: bool, softmax_scale: float, needs_grad: bool) -> str:
    """Which implementation serves this dense attention: ``TRITON`` or an SDPA backend, whichever
    was fastest on this bucket (forward alone, or forward + backward when gradients are wanted),
    among those whose outputs (and gradients) agree with the Triton kernels'. Decided before the
    custom op, so the custom op stays what it was and a torch.compile trace holds the winner that
    was remembered when it traced (nothing can be timed on a trace's fake tensors); a bucket no
    one tuned before the trace is served by the Triton kernels there."""
    op, bucket = _race_op(needs_grad), _race_bucket(q, k, causal)
    served = (str(q.device), op, bucket)
    if torch.compiler.is_compiling():
        _load_served(str(q.device))
        return _served.get(served, TRITON)
    mode = _tuning_mode(q.device)
    if mode == "off":
        return TRITON
    valid = (lambda name: name == TRITON or name in SDPA_BACKENDS)
    named = dict(zip(_RACE_FIELDS, bucket))
    if mode == "lookup":
        choice = tuning.lookup(q.device, op, named)
        return choice if choice is not None and valid(choice) else TRITON
    dout = torch.randn(q.shape, dtype=q.dtype, device=q.device, generator=torch.Generator(q.device).manual_seed(0))

    def run(name: str):
        def fn(q, k, v):
            if name == TRITON:
                return _flash_attention_op(q, k, v, None, causal, softmax_scale, None, 0)[0]
            with warnings.catch_warnings():  # SDPA warns why each backend it was denied cannot run
                warnings.simplefilter("ignore")
                return sdpa_attention(q, k, v, causal, softmax_scale, name)
        if not needs_grad:
            with torch.no_grad():
                return (fn(q, k, v),)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        with torch.enable_grad():
            out = fn(*leaves)
            return (out.detach(), *torch.autograd.grad(out, leaves, dout))

    half = q.dtype != torch.float32

    def agree(ref, got):
        # SDPA is another algorithm (natural-base exp, its own tiles and rounding points): twice the
        # tiling allowance in half precision, and room for fp32 sums over thousands of keys taken
        # in another order
        allowed = (8, 16, 16, 16) if half else (256, 512, 512, 512)
        for name, g, r, ulps in zip(("out", "dq", "dk", "dv"), got, ref, allowed):
            ok, detail = close_in_ulps(g, r, ulps, floor=1.0 if name == "out" else 0.0)
            if not ok:
                return False, f"{name}: {detail}"
        return True, ""

    def tune():
        return race([TRITON, *SDPA_BACKENDS], run, _measure, what=op, agree=agree)

    choice = tuning.tuned(q.device, op, named, tune, valid=valid)
    if choice is None:  # a rank other than 0 before tuning.sync(): the default
        return TRITON
    _served[served] = choice
    return choice


_warned_head_dims: set = set()


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, kv_lens: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    _checks.attention(q, k, v, kv_lens)
    if cu_seqlens is not None:
        max_seqlen = _checks.packed_sequences(q, k, kv_lens, cu_seqlens, max_seqlen)
    D = q.shape[-1]
    if D not in HEAD_DIMS:
        from .. import reference
        if D not in _warned_head_dims:
            _warned_head_dims.add(D)
            log.warning(
                "attention: head_dim %d has no Triton kernel (supported: %s); using the reference", D, HEAD_DIMS)
        return reference.attention(q, k, v, causal, softmax_scale, kv_lens, cu_seqlens, max_seqlen)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(D)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if cu_seqlens is None and not needs_grad and use_decode_kernel(q, k):
        return _decode_attention_op(q, k, v, kv_lens, causal, scale)
    if sdpa_computes(q, k, causal, kv_lens, cu_seqlens):
        winner = race_winner(q, k, v, causal, scale, needs_grad)
        if winner != TRITON:
            return sdpa_attention(q, k, v, causal, scale, winner)
    return _flash_attention_op(q, k, v, kv_lens, causal, scale, cu_seqlens, max_seqlen or 0)[0]
