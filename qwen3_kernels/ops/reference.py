"""Eager PyTorch ground truth for every op, in the rounding order of transformers' Qwen3.

Each Triton kernel is tested against these functions, and they are what runs wherever a kernel
cannot (CPU, MPS, unsupported dtypes)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from . import _checks


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` over the last dim; normalised in fp32, cast back to
    ``x.dtype`` before the weight multiply (Qwen3RMSNorm's order)."""
    _checks.rms_norm(x, weight)
    return _rms_norm(x, weight, eps)


# The public functions check their inputs once (ops/_checks.py); these bodies, which they share,
# do not check again.
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight * h.to(x.dtype)).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``: the sum is rounded to ``x.dtype`` first, as the
    unfused model's residual stream is. ``residual`` may broadcast to ``x``'s shape."""
    _checks.add_rms_norm(x, residual, weight)
    summed = x + residual
    return _rms_norm(summed, weight, eps), summed


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` over the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout: ``x * cos + rotate_half(x) * sin``.

    x: (B, T, H, D); cos, sin: (T, D), (1, T, D) or (B, T, D)."""
    _checks.rope(x, cos, sin)
    return _rope(x, cos, sin)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q and k (over head_dim), then rotary: Qwen3's attention prologue."""
    _checks.qk_norm_rope(q, k, q_weight, k_weight, cos, sin)
    return _rope(_rms_norm(q, q_weight, eps), cos, sin), _rope(_rms_norm(k, k_weight, eps), cos, sin)


def qk_norm_rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                            k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, positions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``qk_norm_rope`` for tokens that extend a KV cache: writes the normalised, rotated keys and the
    values v (B, T, Hkv, D) into ``k_cache``/``v_cache`` (B, max_len, Hkv, D) at rows ``positions``
    (B, T), in place, and returns the query (B, T, H, D)."""
    _checks.qk_norm_rope_into_cache(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, positions)
    q, k = _rope(_rms_norm(q, q_weight, eps), cos, sin), _rope(_rms_norm(k, k_weight, eps), cos, sin)
    batch = torch.arange(k.shape[0], device=k.device)[:, None]
    k_cache.index_put_((batch, positions), k)
    v_cache.index_put_((batch, positions), v)
    return q


def packed_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                  biases: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
    """``cat([x @ w.T + b for w, b in zip(weights, biases)], -1)``: several projections of the same
    input (q, k and v; gate and up), computed one by one here as transformers does."""
    _checks.packed_linear(x, weights, biases)
    biases = biases or [None] * len(weights)
    return torch.cat([F.linear(x, w, b) for w, b in zip(weights, biases)], dim=-1)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``."""
    _checks.swiglu(gate, up)
    return F.silu(gate) * up


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, kv_lens: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    """Grouped-query attention. q: (B, Tq, H, D); k, v: (B, Tk, Hkv, D) with H % Hkv == 0.

    The causal mask is aligned bottom-right: query i sees keys ``0 .. Tk - Tq + i``, so the same call
    serves prefill (Tq == Tk), chunked prefill and decode over a KV cache (Tq < Tk). ``kv_lens`` (B,)
    int gives each sequence's number of valid keys in a preallocated cache: keys at or past
    ``kv_lens[b]`` are ignored and the causal alignment uses ``kv_lens[b]`` in place of Tk. A query
    that sees no key at all gets a zero output, never NaN. Returns (B, Tq, H, D).

    Packed sequences (padding-free batches): with ``cu_seqlens`` (int32, (n + 1,), prefix sums of the
    n sequence lengths), q is (1, total, H, D), k and v (1, total, Hkv, D), and sequence i, tokens
    ``cu_seqlens[i]:cu_seqlens[i + 1]``, attends to itself only. ``max_seqlen`` (the longest length)
    spares the Triton path reading it from the device; here it is only checked."""
    _checks.attention(q, k, v, kv_lens)
    if cu_seqlens is not None:
        _checks.packed_sequences(q, k, kv_lens, cu_seqlens, max_seqlen)
        bounds = cu_seqlens.tolist()
        return torch.cat([_attention(q[:, a:b], k[:, a:b], v[:, a:b], causal, softmax_scale, None)
                          for a, b in zip(bounds, bounds[1:])], dim=1)
    return _attention(q, k, v, causal, softmax_scale, kv_lens)


def _attention(q, k, v, causal, softmax_scale, kv_lens):
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
    if kv_lens is None and (not causal or Tq == Tk or Tq == 1):  # one query sees every key
        # a Python branch, not `causal and Tq == Tk and Tq > 1`: under torch.compile with dynamic
        # shapes that expression is a SymBool, which SDPA's is_causal rejects
        is_causal = True if causal and Tq == Tk and Tq > 1 else False
        out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=H != Hkv)
        return out.transpose(1, 2)  # (B, Tq, H, D)
    if kv_lens is not None and q.device.type == "cpu" and not torch.compiler.is_compiling():
        # Skip cache slots no sequence has filled yet, and the length mask when every sequence has
        # the same length: reading lengths costs nothing on the CPU (on a GPU it would be a sync, and
        # the static shapes there are what CUDA graphs need).
        lens = kv_lens.tolist()
        Tk = max(max(lens), 1)
        k, v = k[:, :, :Tk], v[:, :, :Tk]
        if min(lens) == Tk:
            return _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, scale, None)
    key_pos = torch.arange(Tk, device=q.device)
    lens = torch.full((B,), Tk, device=q.device) if kv_lens is None else kv_lens.to(q.device)
    visible = key_pos[None, None, :] < lens[:, None, None]                       # (B, 1, Tk)
    if causal:
        last = torch.arange(Tq, device=q.device)[None, :] + (lens[:, None] - Tq)  # (B, Tq)
        visible = visible & (key_pos[None, None, :] <= last[:, :, None])           # (B, Tq, Tk)
    visible = visible[:, None].expand(B, 1, Tq, Tk)
    sees_a_key = visible.any(-1, keepdim=True)                                     # (B, 1, Tq, 1)
    if not (q.requires_grad or k.requires_grad or v.requires_grad):
        # Rows that see no key come out of SDPA as NaN; select zero there. No host sync, so a
        # decode step stays capturable in a CUDA graph.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=H != Hkv)
        out = torch.where(sees_a_key, out, 0.0)
    elif bool(sees_a_key.all()):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale, enable_gqa=H != Hkv)
    else:  # a query sees no key: take the masked softmax apart so no NaN reaches the gradients
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
        scores = (q @ k.transpose(-1, -2)).float() * scale
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        out = probs.to(q.dtype) @ v
    return out.transpose(1, 2)  # (B, Tq, H, D)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits ``hidden @ weight.T`` against class ids ``targets``: hidden (..., C),
    weight (V, C), targets (...) int64; targets equal to ``ignore_index`` count for nothing. The
    logits are computed in hidden's dtype and upcast to fp32 (transformers' order); the result is
    fp32: ``"mean"`` over the counted targets (0, not NaN, when every target is ignored), ``"sum"``,
    or ``"none"`` (per target, shaped like ``targets``). This reference builds the (N x V) logits;
    the Triton path never does."""
    _checks.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction)
    logits = F.linear(hidden, weight).float()
    losses = F.cross_entropy(logits.reshape(-1, weight.shape[0]), targets.reshape(-1).long(),
                             ignore_index=ignore_index, reduction="none")
    return reduce_token_losses(losses, targets, ignore_index, reduction)


def reduce_token_losses(losses: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
                        ) -> torch.Tensor:
    """Per-token losses (N,) -> the ``reduction`` of ``linear_cross_entropy``; the count of counted
    targets stays on the device (no host sync)."""
    if reduction == "none":
        return losses.view(targets.shape)
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != ignore_index).sum().clamp(min=1)


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE's router: softmax over all experts in fp32, the ``top_k`` largest probabilities,
    renormalised to sum to one over those k when ``norm_topk_prob``, cast to the logits' dtype.
    router_logits: (N, E). Returns ``(weights (N, k) in router_logits.dtype, expert_ids (N, k) int64)``,
    largest first. ``expert_ids`` carries no gradient; ``weights`` does, to the logits."""
    _checks.moe_route(router_logits, top_k)
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), expert_ids


def moe_experts(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each token's k SwiGLU experts: for token n,
    ``out[n] = sum_j weights[n, j] * down[e] @ (silu(g) * u)`` with ``e = expert_ids[n, j]`` and
    ``[g; u] = gate_up[e] @ hidden[n]`` (gate rows first).

    hidden: (N, H); expert_ids, weights: (N, k); gate_up: (E, 2I, H); down: (E, H, I) (transformers 5's
    stacked layout). Returns (N, H) in hidden's dtype. This reference loops over the experts that
    received a token, in the rounding order of transformers' ``Qwen3MoeExperts`` (each expert's
    output times its weight, rounded, then added to the token's sum in hidden's dtype)."""
    _checks.moe_experts(hidden, expert_ids, weights, gate_up, down)
    out = torch.zeros_like(hidden)
    for expert in expert_ids.unique().tolist():
        token, slot = torch.where(expert_ids == expert)
        gate, up = F.linear(hidden[token], gate_up[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, down[expert]) * weights[token, slot, None]
        out = out.index_add(0, token, expert_out.to(hidden.dtype))
    return out
