"""Helpers the Triton launchers share: row views, program counts, op registration."""

from __future__ import annotations

import contextlib
import functools

import torch
import triton


def _squeeze_interpreter_scalars() -> None:
    """Triton's interpreter holds a scalar as a shape-(1,) NumPy array; before Triton 3.7 it converted
    one to a Python int with ``int(array)``, which NumPy >= 2.4 refuses ("only 0-dimensional arrays
    can be converted to Python scalars"), so ``range()`` over a computed bound failed on Triton 3.6.
    Triton 3.7 squeezes the array first; give older interpreters the same conversion. Compiled
    kernels are untouched: this only patches the interpreter's tensor methods."""
    if tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7):
        return
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_lang_tensor


_squeeze_interpreter_scalars()


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


def unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when its last dim is contiguous (the kernels take every other stride), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


# (arch, SM count) that launchers assume for tensors that live on no real GPU: set only by
# ``simulated_gpu``, which the ahead-of-time compile gate uses to bind real launches on meta tensors.
_simulated: tuple[int, int] | None = None


@contextlib.contextmanager
def simulated_gpu(arch: int, sms: int):
    """Inside, launchers pick block sizes, pipelining and split counts as on a CUDA sm_{arch} GPU
    with ``sms`` multiprocessors, whatever device their tensors report: meta tensors in the compile
    gate, fake CUDA tensors in the device-guard test. Nothing is launched on a real GPU inside it."""
    global _simulated
    previous, _simulated = _simulated, (arch, sms)
    try:
        yield
    finally:
        _simulated = previous


def device_arch(device: torch.device) -> int:
    """10 * major + minor of a CUDA device (80 for A100, 90 for H100/H200); 0 for the interpreter."""
    if _simulated is not None:
        return _simulated[0]
    if device.type != "cuda":
        return 0
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; a small stand-in for the CPU interpreter."""
    if _simulated is not None:
        return _simulated[1]
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4


def on_tensor_device(launcher):
    """Triton launches on the *current* CUDA device, whatever device the tensors are on, and
    ``torch.library`` adds no device guard: run ``launcher`` with its first tensor argument's device
    made current, so tensors on cuda:1 are computed on cuda:1."""
    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return launcher(*args, **kwargs)
        with torch.cuda.device(first.device):
            return launcher(*args, **kwargs)
    return guarded


def row_block(n: int, max_elements: int = 4096) -> tuple[int, int, int, int]:
    """(BLOCK_N, TAIL_N, ROWS, num_warps) for rows of length ``n``: a row is a tile of BLOCK_N
    columns plus, where it saves registers, a second tile of TAIL_N columns from BLOCK_N on
    (5120 = 4096 + 1024 rather than one 8192-column tile, 37% of it masked); several short rows
    per program so each program moves a few KB."""
    whole = triton.next_power_of_2(n)
    if whole > 65536:
        raise ValueError(f"rows of {n} elements are longer than the Triton kernels support (65536)")
    block_n = whole if whole == n else whole // 2
    tail_n = triton.next_power_of_2(n - block_n) if n > block_n else 0
    if block_n + tail_n == whole:  # a tail as wide as the tile saves nothing
        block_n, tail_n = whole, 0
    rows = max(1, min(64, max_elements // whole))
    return block_n, tail_n, rows, warps_for(rows * (block_n + tail_n))


def warps_for(tile: int) -> int:
    """About 8 elements of a tile per thread: enough work per thread to hide memory latency, few
    enough registers that the backward kernels (several live fp32 tiles) do not spill. A power of
    two (Triton's requirement), rounded down."""
    warps = max(1, min(16, tile // (32 * 8)))
    return 1 << (warps.bit_length() - 1)
