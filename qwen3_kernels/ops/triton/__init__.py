"""Triton kernels, one file per op. ``KERNELS`` maps an op name of ``qwen3_kernels.ops`` to its
Triton implementation; ops missing here run the reference."""

import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is unavailable)

KERNELS: dict = {}
