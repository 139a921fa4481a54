"""The input contract of every op, shared by the reference and the Triton kernels, so that code that
runs on the CPU runs on a GPU: both backends accept the same inputs, and reject the same inputs with
the same message (named op, shape, dtype or value)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, op: str = "rms_norm") -> None:
    if x.dim() == 0:
        raise ValueError(f"{op}: x is 0-d; it needs a last dim to normalise over")
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"{op}: weight shape {tuple(weight.shape)} does not match x's last dim {x.shape[-1]}")
    _norm_weight_dtype(op, "weight", weight)


def _norm_weight_dtype(op: str, name: str, weight: torch.Tensor) -> None:
    # A weight in another float dtype than the activations (fp32 master weights under autocast, as
    # flash-attention's and Liger's norms take them) is fine: the math runs in fp32 either way, and the
    # output keeps the activations' dtype.
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} dtype {weight.dtype} is not a floating-point dtype")


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    rms_norm(x, weight, "add_rms_norm")
    if residual.dtype != x.dtype:
        raise TypeError(f"add_rms_norm: residual dtype {residual.dtype} differs from x dtype {x.dtype}")
    try:
        fits = torch.broadcast_shapes(x.shape, residual.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"add_rms_norm: residual shape {tuple(residual.shape)} does not broadcast to x's shape "
                         f"{tuple(x.shape)}")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, T, H, D), got {tuple(x.shape)}")
    B, T, H, D = x.shape
    if D % 2:
        raise ValueError(f"{name}: head_dim must be even for rotary embeddings, got {D}")
    if cos.shape != sin.shape or cos.shape not in ((T, D), (1, T, D), (B, T, D)):
        raise ValueError(f"cos/sin must have shape (T, D) = {(T, D)}, (1, T, D) or (B, T, D) = {(B, T, D)}, "
                         f"got {tuple(cos.shape)} and {tuple(sin.shape)}")
    # cos/sin may be in another float dtype than x (fp32 tables under autocast): the rotation runs in
    # fp32 either way and the output keeps x's dtype.
    if cos.dtype != sin.dtype or not cos.dtype.is_floating_point:
        raise TypeError(f"cos/sin dtypes ({cos.dtype}, {sin.dtype}) must be one floating-point dtype")


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin) -> None:
    rope(q, cos, sin, "q")
    rope(k, cos, sin, "k")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on (B, T) and head_dim")
    for name, w, x in (("q_weight", q_weight, q), ("k_weight", k_weight, k)):
        if w.shape != (x.shape[-1],):
            raise ValueError(f"{name} shape {tuple(w.shape)} must be (head_dim,) = ({x.shape[-1]},)")
        _norm_weight_dtype("qk_norm_rope", name, w)


def packed_sequences(q, k, kv_lens, cu_seqlens, max_seqlen) -> int:
    """Checks ``cu_seqlens`` against packed q (1, total, H, D) and k; returns ``max_seqlen``, read
    from ``cu_seqlens`` when not given (a host sync on a GPU; passing it avoids that)."""
    if kv_lens is not None:
        raise ValueError("attention: cu_seqlens (packed sequences) and kv_lens (a KV cache) cannot be combined")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.shape[0] < 2:
        raise ValueError(f"attention: cu_seqlens must be an int32 tensor of shape (n + 1,) with n >= 1, got "
                         f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)} "
                         f"{tuple(getattr(cu_seqlens, 'shape', ()))}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention: cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    total = q.shape[1]
    if q.shape[0] != 1 or k.shape[0] != 1 or k.shape[1] != total:
        raise ValueError(f"attention: packed sequences need q (1, total, H, D) and k, v (1, total, Hkv, D), got q "
                         f"{tuple(q.shape)} and k {tuple(k.shape)}")
    read = max_seqlen is None or (cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling())
    if read:
        bounds = cu_seqlens.tolist()
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        if bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(f"attention: cu_seqlens must run from 0 to the {total} packed tokens, got "
                             f"{bounds[0]} .. {bounds[-1]}")
        if min(lengths) < 0:
            raise ValueError(f"attention: cu_seqlens must not decrease, got {bounds}")
        if max_seqlen is not None and max_seqlen < max(lengths):
            raise ValueError(f"attention: max_seqlen={max_seqlen} is shorter than the longest packed sequence "
                             f"({max(lengths)} tokens)")
        return max(lengths) if max_seqlen is None else int(max_seqlen)
    return int(max_seqlen)


def qk_norm_rope_into_cache(q, k, v, q_weight, k_weight, cos, sin, k_cache, v_cache, positions) -> None:
    qk_norm_rope(q, k, q_weight, k_weight, cos, sin)
    if v.shape != k.shape or v.dtype != k.dtype:
        raise ValueError(f"v {v.dtype} {tuple(v.shape)} must match k {k.dtype} {tuple(k.shape)}")
    B, T, Hkv, D = k.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or cache.shape[0] != B or cache.shape[2:] != (Hkv, D):
            raise ValueError(f"{name} must have shape (B={B}, max_len, Hkv={Hkv}, D={D}), got {tuple(cache.shape)}")
        if cache.dtype != k.dtype or cache.device != k.device:
            raise TypeError(f"{name} is {cache.dtype} on {cache.device}, k is {k.dtype} on {k.device}")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along head_dim (it is written in place)")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if positions.shape != (B, T) or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be an int32/int64 tensor of shape (B, T) = {(B, T)}, got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if positions.device != k.device:
        raise ValueError(f"positions is on {positions.device}, k on {k.device}")
    # as for kv_lens: values are read only where that is free (eager CPU tensors)
    if positions.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
        lo, hi = int(positions.min()), int(positions.max())
        if lo < 0 or hi >= k_cache.shape[1]:
            raise ValueError(f"positions must be in [0, max_len={k_cache.shape[1]}), got values from {lo} to {hi}")


def packed_linear(x, weights, biases) -> None:
    if not weights:
        raise ValueError("packed_linear: no weights")
    C = x.shape[-1] if x.dim() else None
    for i, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != C:
            raise ValueError(f"packed_linear: weights[{i}] has shape {tuple(w.shape)}; expected (out, {C}) for x "
                             f"{tuple(x.shape)}")
        if w.dtype != x.dtype or w.device != x.device:
            raise TypeError(f"packed_linear: weights[{i}] is {w.dtype} on {w.device}, x is {x.dtype} on {x.device}")
    if biases is not None:
        if len(biases) != len(weights):
            raise ValueError(f"packed_linear: {len(biases)} biases for {len(weights)} weights")
        for i, (w, b) in enumerate(zip(weights, biases)):
            if b is not None and b.shape != (w.shape[0],):
                raise ValueError(f"packed_linear: biases[{i}] has shape {tuple(b.shape)}, expected ({w.shape[0]},)")


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.dim() == 0:
        raise ValueError("swiglu: gate is 0-d; expected (..., N)")
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate shape {tuple(gate.shape)} != up shape {tuple(up.shape)}")
    if gate.dtype != up.dtype:
        raise TypeError(f"swiglu: gate dtype {gate.dtype} != up dtype {up.dtype}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: torch.Tensor | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"attention expects q (B, Tq, H, D) and k, v (B, Tk, Hkv, D), got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, Tq, H, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} must both be (B={B}, Tk, Hkv, D={D})")
    if k.shape[2] == 0 or H % k.shape[2]:
        raise ValueError(f"attention: query heads ({H}) must be a multiple of KV heads ({k.shape[2]})")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if kv_lens is None:
        return
    if kv_lens.shape != (B,) or kv_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"attention: kv_lens must be an int32/int64 tensor of shape ({B},), got "
                         f"{kv_lens.dtype} {tuple(kv_lens.shape)}")
    if kv_lens.device != q.device:
        raise ValueError(f"attention: kv_lens is on {kv_lens.device}, q on {q.device}")
    # Values are checked where reading them is free (CPU tensors, eager): on a GPU it would cost a
    # host sync per call and break CUDA-graph capture; the model's KV cache keeps them in range.
    if kv_lens.device.type == "cpu" and kv_lens.numel() and not torch.compiler.is_compiling():
        lo, hi = int(kv_lens.min()), int(kv_lens.max())
        if lo < 0 or hi > k.shape[1]:
            raise ValueError(f"attention: kv_lens must be in [0, Tk={k.shape[1]}], got values from {lo} to {hi}")


def linear_cross_entropy(hidden, weight, targets, ignore_index, reduction) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"linear_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"linear_cross_entropy: hidden (..., C) and weight (V, C) must agree on C, got hidden "
                         f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: targets shape {tuple(targets.shape)} must be hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_cross_entropy: targets must be int64 (or int32) class ids, got {targets.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"linear_cross_entropy: weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device or targets.device != hidden.device:
        raise ValueError(f"linear_cross_entropy: hidden on {hidden.device}, weight on {weight.device}, targets on "
                         f"{targets.device}")
    # as for kv_lens: target values are read only where that is free (eager CPU tensors); on a GPU an
    # out-of-range target makes its loss NaN
    if targets.device.type == "cpu" and targets.numel() and not torch.compiler.is_compiling():
        counted = targets[targets != ignore_index]
        V = weight.shape[0]
        if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= V):
            bad = counted[(counted < 0) | (counted >= V)][0].item()
            raise ValueError(f"linear_cross_entropy: target {bad} is outside [0, vocab size {V}) and is not "
                             f"ignore_index ({ignore_index})")


def moe_route(router_logits: torch.Tensor, top_k: int) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"moe_route: router_logits must be (tokens, experts), got shape {tuple(router_logits.shape)}")
    if not router_logits.dtype.is_floating_point:
        raise TypeError(f"moe_route: router_logits dtype {router_logits.dtype} is not a floating-point dtype")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"moe_route: top_k must be an integer in [1, {num_experts}] (the number of experts), "
                         f"got {top_k!r}")


def moe_experts(hidden, expert_ids, weights, gate_up, down) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"moe_experts: hidden must be (tokens, hidden_size), got shape {tuple(hidden.shape)}")
    N, H = hidden.shape
    if gate_up.dim() != 3 or gate_up.shape[2] != H or gate_up.shape[1] % 2:
        raise ValueError(f"moe_experts: gate_up must be (experts, 2 * intermediate, hidden_size={H}), got "
                         f"{tuple(gate_up.shape)}")
    E, I = gate_up.shape[0], gate_up.shape[1] // 2
    if down.shape != (E, H, I):
        raise ValueError(f"moe_experts: down must be (experts={E}, hidden_size={H}, intermediate={I}) to match "
                         f"gate_up {tuple(gate_up.shape)}, got {tuple(down.shape)}")
    if expert_ids.dim() != 2 or expert_ids.shape[0] != N:
        raise ValueError(f"moe_experts: expert_ids must be (tokens={N}, top_k), got {tuple(expert_ids.shape)}")
    if expert_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_experts: expert_ids must be int32 or int64, got {expert_ids.dtype}")
    if weights.shape != expert_ids.shape:
        raise ValueError(f"moe_experts: weights shape {tuple(weights.shape)} != expert_ids shape "
                         f"{tuple(expert_ids.shape)}")
    for name, t in (("weights", weights), ("gate_up", gate_up), ("down", down)):
        if t.dtype != hidden.dtype:
            raise TypeError(f"moe_experts: {name} dtype {t.dtype} differs from hidden dtype {hidden.dtype}")
    for name, t in (("expert_ids", expert_ids), ("weights", weights), ("gate_up", gate_up), ("down", down)):
        if t.device != hidden.device:
            raise ValueError(f"moe_experts: {name} is on {t.device}, hidden on {hidden.device}")
    # as for kv_lens: ids are read only where that is free (eager CPU tensors)
    if expert_ids.device.type == "cpu" and expert_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(expert_ids.min()), int(expert_ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"moe_experts: expert_ids must be in [0, {E}) (the number of experts), got values "
                             f"from {lo} to {hi}")
