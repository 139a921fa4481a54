"""Weights that multiply the same input (q, k and v; gate and up) kept back to back in one buffer, so
``ops.packed_linear`` runs them as one GEMM. Each stays its own Parameter under its transformers
name: loading, saving, ``state_dict`` and optimisers see exactly what they saw before; only the
storage is shared. The model packs at construction and again after every move or load (``.to``,
``to_empty``, ``load_state_dict(assign=True)``), which give each parameter its own storage."""

from __future__ import annotations

from typing import Sequence

import torch


def pack_parameters(params: Sequence[torch.nn.Parameter]) -> None:
    """Moves ``params`` (same dtype, device and row length) into one contiguous buffer, in order, by
    reassigning each one's ``.data``: Parameter objects, names, ``requires_grad`` and values are kept."""
    first = params[0]
    if first.device.type == "meta" or any(type(p) is not torch.nn.Parameter for p in params):
        return  # nothing to place yet, or a wrapper (a DTensor under FSDP) that owns its own layout
    if any(p.dim() != 2 or p.shape[1] != first.shape[1] or p.dtype != first.dtype or p.device != first.device
           for p in params):
        return  # cannot form one matrix: packed_linear concatenates per call instead
    if packed_view(params) is not None:
        return
    buffer = torch.empty((sum(p.shape[0] for p in params), first.shape[1]), dtype=first.dtype, device=first.device)
    start = 0
    for p in params:
        rows = buffer[start:start + p.shape[0]]
        rows.copy_(p.data)
        p.data = rows
        start += p.shape[0]


def packed_view(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """One (sum of rows, C) tensor over ``weights`` if they lie back to back in one buffer, else None."""
    first = weights[0]
    if first.dim() != 2 or first.layout != torch.strided or first.device.type == "meta":
        return None
    C = first.shape[1]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for w in weights:
        if (w.dim() != 2 or w.shape[1] != C or w.dtype != first.dtype or not w.is_contiguous()
                or w.untyped_storage().data_ptr() != storage or w.storage_offset() != offset):
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.detach().as_strided((rows, C), (C, 1), first.storage_offset())
