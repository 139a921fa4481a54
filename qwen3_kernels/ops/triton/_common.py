"""Helpers the Triton launchers share: row views, program counts, op registration."""

from __future__ import annotations

import functools

import torch
import triton


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a 2-D (rows, last dim) view with unit stride along the last dim; copies only when no
    such view exists (kernels take the row stride, so strided projections are read in place)."""
    n = x.shape[-1]
    if x.stride(-1) != 1:
        x = x.contiguous()
    try:
        return x.view(-1, n)
    except RuntimeError:
        return x.contiguous().view(-1, n)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in for the CPU interpreter."""
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def row_block(n: int, max_elements: int = 4096) -> tuple[int, int, int]:
    """(BLOCK_N, ROWS, num_warps) for rows of length ``n``: a whole row per tile, several short rows
    per program so each program moves a few KB."""
    block_n = triton.next_power_of_2(n)
    if block_n > 65536:
        raise ValueError(f"rows of {n} elements are longer than the Triton kernels support (65536)")
    rows = max(1, min(64, max_elements // block_n))
    return block_n, rows, warps_for(rows * block_n)


def warps_for(tile: int) -> int:
    """About 8 elements of a tile per thread: enough work per thread to hide memory latency, few
    enough registers that the backward kernels (several live fp32 tiles) do not spill."""
    return max(1, min(16, tile // (32 * 8)))
