"""What the kernel tests share: devices, dtypes, random inputs, and the tolerance rule's atol."""

import pytest
import torch

try:
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# Without a GPU, CPU tensors run the kernels through the interpreter (set up in conftest); with one,
# the kernels are compiled and run on CUDA tensors (CPU tensors cannot run compiled kernels).
DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
KERNEL_DEVICE = DEVICES[0]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Small absolute slack on top of the 2x / 3x eager-error rule, scaled to the data's magnitude.
# The interpreter rounds fp32 -> bf16 by truncation (GPUs round to nearest even), which can cost one
# more bf16 ulp than eager PyTorch on an element.
ATOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rand(*shape, dtype=torch.float32, device="cpu", seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (offset + scale * torch.randn(*shape, generator=g)).to(device=device, dtype=dtype)


def atol(dtype, *tensors):
    magnitude = max(t.detach().double().abs().max().item() for t in tensors)
    return ATOL[dtype] * max(1.0, magnitude)
