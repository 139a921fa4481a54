"""Bytes moved and FLOPs of each op: the denominators of every GB/s and TFLOP/s the suite reports.
Memory-bound ops count each tensor read or written once (the ideal a fused kernel aims at); weights
and cos/sin tables are counted too. Attention counts 4·B·H·Tq·Tk·D FLOPs for the two matmuls, the
unmasked half when causal with Tq == Tk, and 2.5x that for the backward (FlashAttention's
convention)."""

from __future__ import annotations


def rms_norm_bytes(rows: int, hidden: int, elem: int, residual: bool = False, backward: bool = False) -> int:
    tensor = rows * hidden * elem
    if backward:  # read dy, x (+ d_sum), write dx; dweight partials are small
        return tensor * (3 + residual) + hidden * elem
    return tensor * (2 + 2 * residual) + hidden * elem  # read x (+ r), write y (+ x + r)


def qk_norm_rope_bytes(tokens: int, heads: int, kv_heads: int, head_dim: int, elem: int,
                       backward: bool = False) -> int:
    qk = tokens * (heads + kv_heads) * head_dim * elem
    tables = 2 * tokens * head_dim * elem
    return qk * (3 if backward else 2) + tables  # fwd: read q,k write q,k; bwd: read dq,dk,q,k write dq,dk


def rope_bytes(tokens: int, heads: int, head_dim: int, elem: int) -> int:
    return 2 * tokens * heads * head_dim * elem + 2 * tokens * head_dim * elem


def swiglu_bytes(tokens: int, intermediate: int, elem: int, backward: bool = False) -> int:
    n = tokens * intermediate * elem
    return n * (5 if backward else 3)  # fwd: read gate, up, write y; bwd: read dy, gate, up, write both grads


def attention_flops(batch: int, heads: int, q_len: int, kv_len: int, head_dim: int, causal: bool = True,
                    backward: bool = False) -> float:
    flops = 4.0 * batch * heads * q_len * kv_len * head_dim
    if causal and q_len == kv_len:
        flops /= 2
    return flops * 2.5 if backward else flops


def decode_kv_bytes(batch: int, kv_heads: int, kv_len: int, head_dim: int, elem: int) -> int:
    """K and V read once: what split-KV decode is bound by."""
    return 2 * batch * kv_heads * kv_len * head_dim * elem
