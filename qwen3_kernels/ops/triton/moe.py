"""Qwen3-MoE's router and stacked SwiGLU experts, forward and backward, with no host sync.

Routing metadata is built on the device: the N*k (token, slot) pairs are stably sorted by expert
(``order``: sorted row -> flat slot ``n * k + j``; ``pos``: its inverse), and ``offsets`` (E + 1,)
holds where each expert's rows start in that order (``_moe_routing_kernel``, one program, for up to
1024 pairs: a decode step; a device sort above). Every grouped GEMM launches over an upper
bound of row tiles that depends only on shapes, ``cdiv(N*k, BLOCK_M) + min(E, N*k)`` (each expert
wastes less than one tile), and each program finds its expert and rows from ``offsets`` on the
device; programs past the last expert's rows exit at once, so an expert with no token costs one
early exit per tile slot. Nothing reads a device value on the host, so a decode step can be
captured in a CUDA graph. The column blocks of one row tile are neighbouring programs (grid axis 0),
so the gathered rows are read from HBM about once and stay in L2 while the expert's weights stream.

Forward (``moe_experts``), with ``x`` gathered token rows of hidden in sorted order:
  1. ``_moe_gate_up_kernel``: ``[g; u] = x @ gate_up[e]^T``, SwiGLU in the epilogue -> act (N*k, I)
     (and the pre-activations (N*k, 2I) for the backward when a gradient is needed);
  2. ``_moe_grouped_kernel``: ``y = act @ down[e]^T`` -> (N*k, H), sorted order;
  3. ``_moe_gather_sum_kernel``: ``out[n] = sum_j w[n, j] * y[pos(n, j)]`` in fp32, rounded once (a
     gather, not atomics: deterministic).
Backward, with ``dout`` (N, H):
  4. ``_moe_dact_kernel``: ``d = dout[token] @ down[e]`` (N*k, I); epilogue: the routing weight's
     gradient partials ``sum_i d * act`` (one per column block, summed on the device in a fixed
     order), ``dact = w * d`` and the SwiGLU backward -> d[g; u] (N*k, 2I);
  5. ``_moe_grouped_kernel``: ``dx = d[g; u] @ gate_up[e]`` (N*k, H), then ``_moe_gather_sum_kernel``
     sums each token's k rows -> d hidden;
  6. ``_moe_wgrad_kernel``: d down[e] = ``sum over e's rows dout[token]^T (w * act)``, d gate_up[e] =
     ``sum over e's rows d[g; u]^T x``, one program per output tile looping over the expert's rows
     in order (deterministic, no atomics).
All products accumulate in fp32. The row tiles (``gemm_config``: 16 rows for decode, 64 or 128 for
prefill and training) are the default of ``gemm_candidates``, which the tuner ranks on the GPU.

``moe_route``: softmax over the experts in fp32, the top k (chosen on the logits, whose order the
softmax keeps), renormalised; its backward goes through the renormalisation and the softmax.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks
from . import attention, tuning
from ._common import device_arch, on_tensor_device, unit_stride, warps_for


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@triton.jit
def _expert_tile(OFFSETS, tile, E, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Tile slot ``tile`` -> (expert, first row, end of the expert's rows) in sorted order. Expert e
    owns ``cdiv(offsets[e+1] - offsets[e], BLOCK_M)`` consecutive tile slots; a slot past the last
    one gets an empty row range (first row >= end), and its program exits."""
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    lo = tl.load(OFFSETS + e, mask=ok, other=0)
    hi = tl.load(OFFSETS + e + 1, mask=ok, other=0)
    tiles = (hi - lo + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    expert = tl.sum((ends <= tile).to(tl.int32), 0)
    mine = e == expert
    first_tile = tl.sum(tl.where(mine, ends - tiles, 0), 0)
    row_lo = tl.sum(tl.where(mine, lo, 0), 0) + (tile - first_tile) * BLOCK_M
    row_hi = tl.sum(tl.where(mine, hi, 0), 0)
    return expert, row_lo, row_hi


@triton.jit
def _moe_routing_kernel(IDS, ORDER, POS, OFFSETS, M, E, BLOCK: tl.constexpr, CHUNK: tl.constexpr,
                        BLOCK_E: tl.constexpr):
    """One program, a stable counting sort of M <= BLOCK slots by expert id (an id outside [0, E)
    counts as E: after every expert): ``offsets[e]`` = slots with a smaller id, a slot's sorted row
    ``pos[s] = offsets[id[s]] + (earlier slots with the same id)``, and ``order[pos[s]] = s``."""
    e = tl.arange(0, BLOCK_E)
    slots = tl.arange(0, BLOCK)
    ids = tl.load(IDS + slots, mask=slots < M, other=0)
    ids = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
    ids = tl.where(slots < M, ids, E + 1)  # padding: after everything
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for c0 in range(0, BLOCK, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        ids_c = tl.load(IDS + c, mask=c < M, other=0)
        ids_c = tl.where((ids_c >= 0) & (ids_c < E), ids_c, E).to(tl.int32)
        ids_c = tl.where(c < M, ids_c, E + 1)
        counts += tl.sum((e[:, None] == ids_c[None, :]).to(tl.int32), 1)
    starts = tl.cumsum(counts, 0) - counts
    tl.store(OFFSETS + e, starts, mask=e <= E)
    for c0 in range(0, BLOCK, CHUNK):
        c = c0 + tl.arange(0, CHUNK)
        ids_c = tl.load(IDS + c, mask=c < M, other=0)
        ids_c = tl.where((ids_c >= 0) & (ids_c < E), ids_c, E).to(tl.int32)
        earlier = (ids[None, :] == ids_c[:, None]) & (slots[None, :] < c[:, None])
        rank = tl.sum(earlier.to(tl.int32), 1)
        start = tl.sum(tl.where(e[None, :] == ids_c[:, None], starts[None, :], 0), 1)
        row = start + rank
        tl.store(POS + c, row, mask=c < M)
        tl.store(ORDER + row, c, mask=c < M)


@triton.jit
def _moe_gate_up_kernel(X, W, ORDER, OFFSETS, ACT, PRE, E, H, I, stride_x, stride_we, stride_wn, stride_wk,
                        stride_act, stride_pre, TOP_K: tl.constexpr, SAVE_PRE: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """For sorted rows p of expert e (token t = order[p] // k): ``g = x[t] @ W[e, :I]^T``,
    ``u = x[t] @ W[e, I:]^T`` in fp32, ``act[p] = g * sigmoid(g) * u`` rounded once; with SAVE_PRE
    also ``pre[p] = [g; u]`` (rounded) for the backward."""
    expert, row_lo, row_hi = _expert_tile(OFFSETS, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if row_lo >= row_hi:
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    token = (tl.load(ORDER + rows, mask=row_ok, other=0) // TOP_K).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + token[:, None] * stride_x + ks[None, :]
    g_ptrs = W + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None] * stride_wk
    u_ptrs = g_ptrs + I * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = k0 + ks < H
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_g = tl.dot(x, g, acc_g, input_precision=DOT_PRECISION)
        acc_u = tl.dot(x, u, acc_u, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    out_rows = rows.to(tl.int64)[:, None]
    mask = row_ok[:, None] & col_ok[None, :]
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(ACT + out_rows * stride_act + cols[None, :], act.to(ACT.dtype.element_ty), mask=mask)
    if SAVE_PRE:
        tl.store(PRE + out_rows * stride_pre + cols[None, :], acc_g.to(PRE.dtype.element_ty), mask=mask)
        tl.store(PRE + out_rows * stride_pre + I + cols[None, :], acc_u.to(PRE.dtype.element_ty), mask=mask)


@triton.jit
def _moe_grouped_kernel(A, W, OFFSETS, C, E, K, N, stride_a, stride_we, stride_wk, stride_wn, stride_c,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                        DOT_PRECISION: tl.constexpr):
    """For sorted rows p of expert e: ``C[p, n] = sum_k A[p, k] * W[e, k, n]`` (W read through its
    strides: ``down[e]^T`` in the forward, ``gate_up[e]`` in the backward), fp32, rounded once."""
    expert, row_lo, row_hi = _expert_tile(OFFSETS, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if row_lo >= row_hi:
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows.to(tl.int64)[:, None] * stride_a + ks[None, :]
    w_ptrs = W + expert.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    tl.store(C + rows.to(tl.int64)[:, None] * stride_c + cols[None, :], acc.to(C.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _moe_gather_sum_kernel(Y, POS, OFFSETS, WEIGHTS, OUT, E, H, stride_y, stride_out, TOP_K: tl.constexpr,
                           WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
    """``out[n] = sum_j w[n, j] * y[pos[n, j]]`` (w = 1 unless WEIGHTED), in fp32, rounded once; the
    k rows are read in slot order, so the sum is the same on every run. A slot whose sorted row lies
    outside ``[offsets[0], offsets[E])`` (an expert id outside [0, E), which no GEMM computed)
    adds nothing."""
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    first, end = tl.load(OFFSETS), tl.load(OFFSETS + E)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        p = tl.load(POS + n * TOP_K + j)
        y = tl.load(Y + p.to(tl.int64) * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.where((p >= first) & (p < end), y, 0.0)  # a select: whatever an unwritten row holds is dropped
        if WEIGHTED:
            y = y * tl.load(WEIGHTS + n * TOP_K + j).to(tl.float32)
        acc += y
    tl.store(OUT + n * stride_out + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _moe_dact_kernel(DOUT, W, ORDER, OFFSETS, WEIGHTS, PRE, DPRE, DW_PART, E, H, I, stride_dout, stride_we,
                     stride_wk, stride_wn, stride_pre, stride_dpre, stride_dw, TOP_K: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """For sorted rows p of expert e (slot s = order[p], token t = s // k, weight w = weights[s]):
    ``d = dout[t] @ down[e]`` (the gradient of the unweighted expert output y[p] = act[p] @ down[e]^T),
    then ``dw_part[p, block] = sum_i d * act`` over this column block (d w[s] = dout[t] . y[p]),
    ``dact = w * d`` and the SwiGLU backward with ``s = sigmoid(g)``: ``du = dact * g * s``,
    ``dg = dact * u * s * (1 + g * (1 - s))`` -> ``dpre[p] = [dg; du]``."""
    expert, row_lo, row_hi = _expert_tile(OFFSETS, tl.program_id(1), E, BLOCK_M, BLOCK_E)
    if row_lo >= row_hi:
        return
    rows = row_lo + tl.arange(0, BLOCK_M)
    row_ok = rows < row_hi
    slot = tl.load(ORDER + rows, mask=row_ok, other=0)
    token = (slot // TOP_K).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = DOUT + token[:, None] * stride_dout + ks[None, :]
    w_ptrs = W + expert.to(tl.int64) * stride_we + ks[:, None].to(tl.int64) * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k_ok = k0 + ks < H
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    mask = row_ok[:, None] & col_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    g = tl.load(PRE + r64 * stride_pre + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(PRE + r64 * stride_pre + I + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    act = (g * s * u).to(PRE.dtype.element_ty).to(tl.float32)  # as the forward stored it
    tl.store(DW_PART + rows.to(tl.int64) * stride_dw + tl.program_id(0), tl.sum(acc * act, 1), mask=row_ok)
    weight = tl.load(WEIGHTS + slot, mask=row_ok, other=0.0).to(tl.float32)
    dact = acc * weight[:, None]
    tl.store(DPRE + r64 * stride_dpre + cols[None, :], (dact * u * s * (1 + g * (1 - s))).to(DPRE.dtype.element_ty),
             mask=mask)
    tl.store(DPRE + r64 * stride_dpre + I + cols[None, :], (dact * g * s).to(DPRE.dtype.element_ty), mask=mask)


@triton.jit
def _moe_wgrad_kernel(G, X, ORDER, OFFSETS, WEIGHTS, DW, E, NOUT, K, I, stride_g, stride_x, stride_dwe, stride_dwn,
                      TOP_K: tl.constexpr, G_GATHER: tl.constexpr, X_GATHER: tl.constexpr, X_SWIGLU: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """``dW[e, n, k] = sum over expert e's sorted rows p of G[p, n] * X[p, k]`` in fp32, the rows in
    order (deterministic); an expert with no row gets zeros. G rows are ``G[token]`` when G_GATHER,
    else ``G[p]``; X rows are ``X[token]`` when X_GATHER, or with X_SWIGLU the weighted activation
    ``weights[slot] * silu(g) * u`` recomputed from the pre-activations ``X[p] = [g; u]``."""
    expert = tl.program_id(1)
    n_blocks = tl.cdiv(NOUT, BLOCK_N)
    ns = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    kk = (tl.program_id(0) // n_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok, k_ok = ns < NOUT, kk < K
    row_lo = tl.load(OFFSETS + expert)
    row_hi = tl.load(OFFSETS + expert + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    offs_m = tl.arange(0, BLOCK_M)
    for r0 in range(row_lo, row_hi, BLOCK_M):
        rows = r0 + offs_m
        row_ok = rows < row_hi
        slot = tl.load(ORDER + rows, mask=row_ok, other=0)
        token = (slot // TOP_K).to(tl.int64)
        if G_GATHER:
            g_rows = token
        else:
            g_rows = rows.to(tl.int64)
        if X_GATHER:
            x_rows = token
        else:
            x_rows = rows.to(tl.int64)
        g = tl.load(G + g_rows[None, :] * stride_g + ns[:, None], mask=n_ok[:, None] & row_ok[None, :], other=0.0)
        x_mask = row_ok[:, None] & k_ok[None, :]
        if X_SWIGLU:
            gate = tl.load(X + x_rows[:, None] * stride_x + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
            up = tl.load(X + x_rows[:, None] * stride_x + I + kk[None, :], mask=x_mask, other=0.0).to(tl.float32)
            act = (gate * tl.sigmoid(gate) * up).to(G.dtype.element_ty).to(tl.float32)  # as the forward stored it
            weight = tl.load(WEIGHTS + slot, mask=row_ok, other=0.0).to(tl.float32)
            x = (act * weight[:, None]).to(G.dtype.element_ty)
        else:
            x = tl.load(X + x_rows[:, None] * stride_x + kk[None, :], mask=x_mask, other=0.0)
        acc = tl.dot(g, x, acc, input_precision=DOT_PRECISION)
    tl.store(DW + expert.to(tl.int64) * stride_dwe + ns[:, None].to(tl.int64) * stride_dwn + kk[None, :],
             acc.to(DW.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _next_largest(x, free, e, BLOCK_E: tl.constexpr):
    """The index of the largest ``x`` among the ``free`` entries, the lowest index among equal ones;
    NaN counts as the largest (as in ``torch.topk``), so an id is always in [0, E)."""
    cand = tl.where(free, tl.where(x != x, float("inf"), x), float("-inf"))
    return tl.min(tl.where(free & (cand == tl.max(cand, 0)), e, BLOCK_E), 0)


@triton.jit
def _moe_route_fwd_kernel(LOGITS, WEIGHTS, IDS, E, stride_l, TOP_K: tl.constexpr, NORM: tl.constexpr,
                          BLOCK_E: tl.constexpr):
    """``p = softmax(logits)`` in fp32; the k largest logits (the lowest index first among equal
    ones), largest first; ``w_j = p[id_j]``, divided by ``sum_j p[id_j]`` when NORM."""
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    x = tl.load(LOGITS + row * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.where(ok, tl.exp(x - tl.max(x, 0)), 0.0)
    p = p / tl.sum(p, 0)
    total = 1.0
    if NORM:  # a first pass for the sum of the k chosen probabilities
        total = 0.0
        taken = e < 0
        for j in tl.static_range(TOP_K):
            idx = _next_largest(x, ok & ~taken, e, BLOCK_E)
            total += tl.sum(tl.where(e == idx, p, 0.0), 0)
            taken = taken | (e == idx)
    taken = e < 0
    for j in tl.static_range(TOP_K):
        idx = _next_largest(x, ok & ~taken, e, BLOCK_E)
        tl.store(IDS + row * TOP_K + j, idx.to(tl.int64))
        weight = tl.sum(tl.where(e == idx, p, 0.0), 0) / total
        tl.store(WEIGHTS + row * TOP_K + j, weight.to(WEIGHTS.dtype.element_ty))
        taken = taken | (e == idx)


@triton.jit
def _moe_route_bwd_kernel(DWEIGHTS, LOGITS, IDS, DLOGITS, E, stride_l, stride_dl, TOP_K: tl.constexpr,
                          NORM: tl.constexpr, BLOCK_E: tl.constexpr):
    """With ``p = softmax(logits)``, ``S = sum_j p[id_j]`` and ``w_j = p[id_j] / S`` (NORM):
    ``dp[id_j] = (dw_j - sum_l dw_l w_l) / S`` (``dw_j`` without NORM), 0 elsewhere;
    ``dlogits = p * (dp - sum(p * dp))``."""
    row = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    ok = e < E
    x = tl.load(LOGITS + row * stride_l + e, mask=ok, other=float("-inf")).to(tl.float32)
    p = tl.where(ok, tl.exp(x - tl.max(x, 0)), 0.0)
    p = p / tl.sum(p, 0)
    chosen = tl.zeros((BLOCK_E,), dtype=tl.float32)  # dw_j at id_j
    total = 0.0
    dot = 0.0  # sum_j dw_j p[id_j]
    for j in tl.static_range(TOP_K):
        idx = tl.load(IDS + row * TOP_K + j)
        dw = tl.load(DWEIGHTS + row * TOP_K + j).to(tl.float32)
        pj = tl.sum(tl.where(e == idx, p, 0.0), 0)
        chosen = tl.where(e == idx, dw, chosen)
        total += pj
        dot += dw * pj
    if NORM:
        dp = tl.zeros((BLOCK_E,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            idx = tl.load(IDS + row * TOP_K + j)
            dw = tl.load(DWEIGHTS + row * TOP_K + j).to(tl.float32)
            dp = tl.where(e == idx, (dw - dot / total) / total, dp)
    else:
        dp = chosen
    dx = p * (dp - tl.sum(p * dp, 0))
    tl.store(DLOGITS + row * stride_dl + e, dx.to(DLOGITS.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 must not silently run as TF32 (about 1e-3 off eager fp32)
    return "ieee" if dtype == torch.float32 else "tf32"


def gemm_config(arch: int, rows: int, experts: int, dtype: torch.dtype) -> dict:
    """Tiles of the row-gathering grouped GEMMs for ``rows`` = N*k sorted rows over ``experts``.
    Few rows per expert (decode: a few tokens x 8 experts) take 16-row tiles, so a one-token expert
    wastes 15 rows instead of 127, and narrow column blocks, so the weight stream is spread over
    enough programs to fill the GPU; many rows per expert (prefill, training) take 64/128-row tiles.
    fp32 takes at most 64 x 64 tiles at a quarter of the K depth (registers: without tensor cores
    bigger ones spilled). The interpreter (arch 0) takes small tiles that still
    cover several column blocks and K steps at test shapes."""
    if arch == 0:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    per_expert = rows / max(1, experts)
    wide = dtype == torch.float32
    if per_expert < 32:
        cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)
    elif per_expert < 256:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3)
    elif arch >= 90:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, num_warps=8, num_stages=4)
    if wide:  # no tensor cores in IEEE fp32: the product tiles live in registers (bigger ones spilled)
        cfg.update(BLOCK_M=min(cfg["BLOCK_M"], 64), BLOCK_N=min(cfg["BLOCK_N"], 64),
                   BLOCK_K=max(16, cfg["BLOCK_K"] // 4), num_warps=4 if cfg["BLOCK_M"] == 16 else 8)
    return cfg


def gemm_candidates(arch: int, rows: int, experts: int, dtype: torch.dtype) -> list[dict]:
    """What the tuner ranks on the GPU for the row-tile GEMMs (gate/up, down, dact, dx): the default
    (``gemm_config``) first, then tiles of the same size class a card may prefer (narrower or
    shorter, deeper pipelines). fp32 and the interpreter have only the default."""
    default = gemm_config(arch, rows, experts, dtype)
    if arch == 0 or dtype == torch.float32:
        return [default]
    if default["BLOCK_M"] == 16:
        others = [dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4),
                  dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=128, num_warps=4, num_stages=4)]
    elif default["BLOCK_M"] == 64:
        others = [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3),
                  dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)]
    else:
        others = [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=4),
                  dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)]
    return [default] + others


TUNED_OP = "moe experts tiles"


def config_name(cfg: dict) -> str:
    """A row-tile config's name in the tuning cache and the logs: '128x128x64 w8 s3'."""
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} w{cfg['num_warps']} s{cfg['num_stages']}"


def _measure(run) -> float:
    return attention._measure(run)


def _outputs_agree(ref: tuple, got: tuple) -> tuple[bool, str]:
    """Within 4 units in the last place of the output's largest value (at least 1): other tile
    depths change the order of fp32 sums and may move a rounding by one unit, nothing more."""
    return attention.close_in_ulps(got[0], ref[0], 4, floor=1.0)


def tuned_gemm_config(device: torch.device, dtype: torch.dtype, hidden: int, inter: int, experts: int, top_k: int,
                      rows: int, launch=None) -> dict:
    """The row-tile config for these shapes: the fastest agreeing candidate, timed once on the GPU
    with ``launch(cfg)`` (the forward's three kernels) and remembered across processes (``tuning``),
    as the attention tiles are. Without ``launch`` (the backward) or while a CUDA graph is captured
    only a remembered choice is used; the interpreter, ``QWEN3_KERNELS_AUTOTUNE=0`` and a rank other
    than 0 before ``tuning.sync()`` get the default."""
    arch = device_arch(device)
    candidates = gemm_candidates(arch, rows, experts, dtype)
    mode = "off" if len(candidates) == 1 else attention._tuning_mode(device)
    if mode == "off":
        return candidates[0]
    bucket = dict(arch=arch, dtype=str(dtype).removeprefix("torch."), hidden=hidden, inter=inter, experts=experts,
                  top_k=top_k, rows=triton.next_power_of_2(rows))
    by_name = {config_name(c): c for c in candidates}
    if mode == "lookup" or launch is None:
        return by_name.get(tuning.lookup(device, TUNED_OP, bucket), candidates[0])

    def tune():
        return attention.race(candidates, launch, _measure, what="moe experts", name=config_name,
                              agree=_outputs_agree)

    return by_name.get(tuning.tuned(device, TUNED_OP, bucket, tune, valid=lambda n: n in by_name), candidates[0])


def wgrad_config(arch: int, dtype: torch.dtype) -> dict:
    """Output tile (BLOCK_N x BLOCK_K) of a weight gradient and the rows (BLOCK_M) it reads per step."""
    if arch == 0:
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=1)
    cfg = dict(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3)
    if dtype == torch.float32:
        cfg.update(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
    return cfg


def _two_tile_meta(meta: dict) -> dict:
    """The gate/up kernel holds two accumulators (gate and up), the dact kernel its accumulator plus
    the gate and up tiles of its epilogue: half the column block keeps them at the registers of one
    full tile (a 128 x 128 tile of each spilled on sm_90)."""
    return dict(meta, BLOCK_N=max(16, meta["BLOCK_N"] // 2))


def _tile_slots(rows: int, experts: int, block_m: int) -> int:
    """An upper bound on the row tiles the experts need, from shapes only: each expert's last tile is
    at most one more than its share of ``cdiv(rows, block_m)``, and at most ``rows`` experts have a row."""
    slots = triton.cdiv(rows, block_m) + min(experts, rows)
    if slots > 65535:  # the tile slots are the grid's y dimension
        raise ValueError(f"moe_experts: {rows} (token, expert) rows in {block_m}-row tiles need {slots} tile slots, "
                         "more than a CUDA grid's y dimension holds (65535)")
    return slots


FUSED_ROUTING_MAX_ROWS = 1024  # up to here one program builds the metadata (decode: one launch, not eight)


def routing(expert_ids: torch.Tensor, num_experts: int, fused: bool | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order, pos, offsets) on the device, no host sync: ``order`` (N*k,) int32, the flat slots
    ``n * k + j`` stably sorted by expert; ``pos`` its inverse (slot -> sorted row); ``offsets``
    (E + 1,) int32, where each expert's rows start (``offsets[E] = N*k`` for valid ids; rows outside
    ``[offsets[0], offsets[E])`` belong to ids outside [0, E)). Up to ``FUSED_ROUTING_MAX_ROWS`` rows
    (or as ``fused`` says) one Triton program counts and ranks them (``_moe_routing_kernel``); more
    rows take a stable device sort."""
    M = expert_ids.numel()
    if fused if fused is not None else M <= FUSED_ROUTING_MAX_ROWS:
        ids = expert_ids.reshape(-1)
        order = torch.empty(M, dtype=torch.int32, device=ids.device)
        pos = torch.empty_like(order)
        offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=ids.device)
        block, chunk = max(16, triton.next_power_of_2(M)), 16
        _moe_routing_kernel[(1,)](ids, order, pos, offsets, M, num_experts, BLOCK=block, CHUNK=min(chunk, block),
                                  BLOCK_E=triton.next_power_of_2(num_experts + 2), num_warps=4)
        return order, pos, offsets
    flat = expert_ids.reshape(-1).to(torch.int32)
    sorted_ids, order = torch.sort(flat, stable=True)
    bounds = torch.arange(num_experts + 1, dtype=torch.int32, device=flat.device)
    offsets = torch.searchsorted(sorted_ids, bounds, out_int32=True)
    order = order.to(torch.int32)
    pos = torch.empty_like(order).scatter_(0, order.long(), torch.arange(order.numel(), dtype=torch.int32,
                                                                         device=order.device))
    return order, pos, offsets


def _block_e(experts: int) -> int:
    return max(16, triton.next_power_of_2(experts))


def _sum_block(hidden: int) -> tuple[int, int]:
    block = min(1024, triton.next_power_of_2(hidden))
    return block, warps_for(block)


def _forward_gemms(cfg: dict, x, gu, dn, w, order, pos, offsets, top_k: int, pre) -> torch.Tensor:
    """The forward's three launches with row-tile config ``cfg``: gate/up + SwiGLU (keeping the
    pre-activations in ``pre`` unless it is None), down, gather-sum. Returns out (N, H)."""
    N, H = x.shape
    E, I = gu.shape[0], gu.shape[1] // 2
    M = N * top_k
    dtype, device = x.dtype, x.device
    meta = dict(BLOCK_E=_block_e(E), DOT_PRECISION=_dot_precision(dtype), **cfg)
    slots = _tile_slots(M, E, cfg["BLOCK_M"])
    act = torch.empty((M, I), dtype=dtype, device=device)
    pre_arg = act if pre is None else pre
    half = _two_tile_meta(meta)
    _moe_gate_up_kernel[(triton.cdiv(I, half["BLOCK_N"]), slots)](
        x, gu, order, offsets, act, pre_arg, E, H, I, x.stride(0), gu.stride(0), gu.stride(1), gu.stride(2),
        act.stride(0), pre_arg.stride(0), TOP_K=top_k, SAVE_PRE=pre is not None, **half)
    y = torch.empty((M, H), dtype=dtype, device=device)
    _moe_grouped_kernel[(triton.cdiv(H, cfg["BLOCK_N"]), slots)](
        act, dn, offsets, y, E, I, H, act.stride(0), dn.stride(0), dn.stride(2), dn.stride(1), y.stride(0), **meta)
    out = torch.empty((N, H), dtype=dtype, device=device)
    block, warps = _sum_block(H)
    _moe_gather_sum_kernel[(N, triton.cdiv(H, block))](y, pos, offsets, w, out, E, H, y.stride(0), out.stride(0),
                                                       TOP_K=top_k, WEIGHTED=True, BLOCK=block, num_warps=warps)
    return out


@on_tensor_device
def moe_experts_forward(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                        gate_up: torch.Tensor, down: torch.Tensor, save_pre: bool, config: dict | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (N, H), pre (N*k, 2I) sorted or empty, order, pos, offsets). An expert id outside [0, E)
    (which ``_checks`` raises on for CPU tensors, where reading the ids is free) contributes nothing
    to its token's output and gets zero gradients, instead of reading rows no kernel wrote.
    ``config`` pins the row-tile config (else ``tuned_gemm_config``)."""
    N, H = hidden.shape
    top_k = expert_ids.shape[1]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    M = N * top_k
    dtype, device = hidden.dtype, hidden.device
    order, pos, offsets = routing(expert_ids, E)
    pre = torch.empty((M, 2 * I) if save_pre else (0,), dtype=dtype, device=device)
    if M == 0 or I == 0:
        return torch.zeros((N, H), dtype=dtype, device=device), pre, order, pos, offsets
    args = (unit_stride(hidden), unit_stride(gate_up), down, weights.contiguous(), order, pos, offsets, top_k)
    if config is None:
        config = tuned_gemm_config(device, dtype, H, I, E, top_k, M,
                                   launch=lambda cfg: (_forward_gemms(cfg, *args, None),))
    out = _forward_gemms(config, *args, pre if save_pre else None)
    return out, pre, order, pos, offsets


@on_tensor_device
def moe_experts_backward(dout: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                         down: torch.Tensor, pre: torch.Tensor, order: torch.Tensor, pos: torch.Tensor,
                         offsets: torch.Tensor, need_hidden: bool = True, need_weights: bool = True,
                         need_gate_up: bool = True, need_down: bool = True, config: dict | None = None) -> tuple:
    """(d hidden, d weights, d gate_up, d down); None for a gradient not asked for. ``config`` pins
    the row-tile config (else the forward's tuned choice, or the default)."""
    N, H = hidden.shape
    top_k = weights.shape[1]
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    M = N * top_k
    dtype, device = hidden.dtype, hidden.device
    if M and I and pre.shape != (M, 2 * I):
        raise RuntimeError("moe_experts backward: the forward did not keep its pre-activations (it ran without "
                           "gradients)")
    # every element is written below (an idle expert's weight gradients as zeros by its own programs)
    fill = torch.zeros if M == 0 or I == 0 else torch.empty
    dhidden = fill((N, H), dtype=dtype, device=device) if need_hidden else None
    dweights = fill(weights.shape, dtype=weights.dtype, device=device) if need_weights else None
    dgate_up = fill(gate_up.shape, dtype=gate_up.dtype, device=device) if need_gate_up else None
    ddown = fill(down.shape, dtype=down.dtype, device=device) if need_down else None
    if M == 0 or I == 0 or not (need_hidden or need_weights or need_gate_up or need_down):
        return dhidden, dweights, dgate_up, ddown
    arch = device_arch(device)
    g = unit_stride(dout)
    x = unit_stride(hidden)
    w = weights.contiguous()
    cfg = config or tuned_gemm_config(device, dtype, H, I, E, top_k, M)
    meta = dict(BLOCK_E=_block_e(E), DOT_PRECISION=_dot_precision(dtype), **cfg)
    slots = _tile_slots(M, E, cfg["BLOCK_M"])
    half = _two_tile_meta(meta)
    col_blocks = triton.cdiv(I, half["BLOCK_N"])
    dpre = torch.empty((M, 2 * I), dtype=dtype, device=device)
    dw_part = torch.zeros((M, col_blocks), dtype=torch.float32, device=device)  # rows no GEMM owns stay 0
    _moe_dact_kernel[(col_blocks, slots)](
        g, down, order, offsets, w, pre, dpre, dw_part, E, H, I, g.stride(0), down.stride(0), down.stride(1),
        down.stride(2), pre.stride(0), dpre.stride(0), dw_part.stride(0), TOP_K=top_k, **half)
    if need_weights:
        dweights.copy_(dw_part.sum(1)[pos.long()].view(N, top_k))
    if need_hidden:
        dx = torch.empty((M, H), dtype=dtype, device=device)
        _moe_grouped_kernel[(triton.cdiv(H, cfg["BLOCK_N"]), slots)](
            dpre, gate_up, offsets, dx, E, 2 * I, H, dpre.stride(0), gate_up.stride(0), gate_up.stride(1),
            gate_up.stride(2), dx.stride(0), **meta)
        block, warps = _sum_block(H)
        _moe_gather_sum_kernel[(N, triton.cdiv(H, block))](dx, pos, offsets, w, dhidden, E, H, dx.stride(0),
                                                           dhidden.stride(0), TOP_K=top_k, WEIGHTED=False,
                                                           BLOCK=block, num_warps=warps)
    wcfg = wgrad_config(arch, dtype)
    wmeta = dict(TOP_K=top_k, DOT_PRECISION=_dot_precision(dtype), **wcfg)
    bn, bk = wcfg["BLOCK_N"], wcfg["BLOCK_K"]
    if need_down:  # d down[e] (H, I) = sum_p dout[token]^T (w * act[p])
        _moe_wgrad_kernel[(triton.cdiv(H, bn) * triton.cdiv(I, bk), E)](
            g, pre, order, offsets, w, ddown, E, H, I, I, g.stride(0), pre.stride(0), ddown.stride(0),
            ddown.stride(1), G_GATHER=True, X_GATHER=False, X_SWIGLU=True, **wmeta)
    if need_gate_up:  # d gate_up[e] (2I, H) = sum_p dpre[p]^T x[token]
        _moe_wgrad_kernel[(triton.cdiv(2 * I, bn) * triton.cdiv(H, bk), E)](
            dpre, x, order, offsets, w, dgate_up, E, 2 * I, H, I, dpre.stride(0), x.stride(0), dgate_up.stride(0),
            dgate_up.stride(1), G_GATHER=False, X_GATHER=True, X_SWIGLU=False, **wmeta)
    return dhidden, dweights, dgate_up, ddown


@on_tensor_device
def moe_route_forward(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    N, E = router_logits.shape
    logits = unit_stride(router_logits)
    weights = torch.empty((N, top_k), dtype=logits.dtype, device=logits.device)
    ids = torch.empty((N, top_k), dtype=torch.int64, device=logits.device)
    if N:
        block = triton.next_power_of_2(E)
        _moe_route_fwd_kernel[(N,)](logits, weights, ids, E, logits.stride(0), TOP_K=top_k, NORM=norm_topk_prob,
                                    BLOCK_E=block, num_warps=warps_for(block))
    return weights, ids


@on_tensor_device
def moe_route_backward(dweights: torch.Tensor, router_logits: torch.Tensor, expert_ids: torch.Tensor,
                       norm_topk_prob: bool) -> torch.Tensor:
    N, E = router_logits.shape
    top_k = expert_ids.shape[1]
    logits = unit_stride(router_logits)
    dw = dweights.contiguous()
    ids = expert_ids.contiguous()
    dlogits = torch.empty((N, E), dtype=logits.dtype, device=logits.device)
    if N:
        block = triton.next_power_of_2(E)
        _moe_route_bwd_kernel[(N,)](dw, logits, ids, dlogits, E, logits.stride(0), dlogits.stride(0), TOP_K=top_k,
                                    NORM=norm_topk_prob, BLOCK_E=block, num_warps=warps_for(block))
    return dlogits


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("qwen3_kernels::moe_experts", mutates_args=())
def _moe_experts_op(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                    down: torch.Tensor, save_pre: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return moe_experts_forward(hidden, expert_ids, weights, gate_up, down, save_pre)


@_moe_experts_op.register_fake
def _(hidden, expert_ids, weights, gate_up, down, save_pre):
    M = expert_ids.shape[0] * expert_ids.shape[1]
    E, I2 = gate_up.shape[0], gate_up.shape[1]
    return (hidden.new_empty(hidden.shape), hidden.new_empty((M, I2) if save_pre else (0,)),
            hidden.new_empty(M, dtype=torch.int32), hidden.new_empty(M, dtype=torch.int32),
            hidden.new_empty(E + 1, dtype=torch.int32))


@torch.library.custom_op("qwen3_kernels::moe_experts_backward", mutates_args=())
def _moe_experts_backward_op(dout: torch.Tensor, hidden: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                             down: torch.Tensor, pre: torch.Tensor, order: torch.Tensor, pos: torch.Tensor,
                             offsets: torch.Tensor, need_hidden: bool, need_weights: bool, need_gate_up: bool,
                             need_down: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = moe_experts_backward(dout, hidden, weights, gate_up, down, pre, order, pos, offsets, need_hidden,
                                 need_weights, need_gate_up, need_down)
    # a custom op returns tensors: an empty one stands for a gradient nobody asked for
    return tuple(t.new_empty(0) if grad is None else grad for grad, t in zip(grads, (hidden, weights, gate_up, down)))


@_moe_experts_backward_op.register_fake
def _(dout, hidden, weights, gate_up, down, pre, order, pos, offsets, need_hidden, need_weights, need_gate_up,
      need_down):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if need else t.new_empty(0)
                 for need, t in zip((need_hidden, need_weights, need_gate_up, need_down),
                                    (hidden, weights, gate_up, down)))


def _setup_moe_experts(ctx, inputs, output):
    hidden, _, weights, gate_up, down, _ = inputs
    _, pre, order, pos, offsets = output
    ctx.save_for_backward(hidden, weights, gate_up, down, pre, order, pos, offsets)


def _backward_moe_experts(ctx, dout, *_unused):
    hidden, weights, gate_up, down, pre, order, pos, offsets = ctx.saved_tensors
    need = ctx.needs_input_grad
    dh, dw, dgu, dd = _moe_experts_backward_op(dout, hidden, weights, gate_up, down, pre, order, pos, offsets,
                                               need[0], need[2], need[3], need[4])
    return (dh if need[0] else None), None, (dw if need[2] else None), (dgu if need[3] else None), \
        (dd if need[4] else None), None


_moe_experts_op.register_autograd(_backward_moe_experts, setup_context=_setup_moe_experts)


@torch.library.custom_op("qwen3_kernels::moe_route", mutates_args=())
def _moe_route_op(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return moe_route_forward(router_logits, top_k, norm_topk_prob)


@_moe_route_op.register_fake
def _(router_logits, top_k, norm_topk_prob):
    N = router_logits.shape[0]
    return router_logits.new_empty((N, top_k)), router_logits.new_empty((N, top_k), dtype=torch.int64)


@torch.library.custom_op("qwen3_kernels::moe_route_backward", mutates_args=())
def _moe_route_backward_op(dweights: torch.Tensor, router_logits: torch.Tensor, expert_ids: torch.Tensor,
                           norm_topk_prob: bool) -> torch.Tensor:
    return moe_route_backward(dweights, router_logits, expert_ids, norm_topk_prob)


@_moe_route_backward_op.register_fake
def _(dweights, router_logits, expert_ids, norm_topk_prob):
    return torch.empty_like(router_logits, memory_format=torch.contiguous_format)


def _setup_moe_route(ctx, inputs, output):
    router_logits, _, norm_topk_prob = inputs
    ctx.save_for_backward(router_logits, output[1])
    ctx.norm_topk_prob = norm_topk_prob


def _backward_moe_route(ctx, dweights, _dids):
    router_logits, expert_ids = ctx.saved_tensors
    return _moe_route_backward_op(dweights, router_logits, expert_ids, ctx.norm_topk_prob), None, None


_moe_route_op.register_autograd(_backward_moe_route, setup_context=_setup_moe_route)


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.moe_route(router_logits, top_k)
    return _moe_route_op(router_logits, top_k, bool(norm_topk_prob))


def moe_experts(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    _checks.moe_experts(hidden, expert_ids, weights, gate_up, down)
    save_pre = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weights, gate_up, down))
    return _moe_experts_op(hidden, expert_ids, weights, gate_up, down, save_pre)[0]
