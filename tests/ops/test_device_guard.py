"""Triton launches on the current CUDA device, not on the tensors' device, and torch.library adds no
guard: every launcher must make its tensors' device current. Proven without a GPU: fake CUDA tensors
on cuda:1 (FakeTensorMode), a stand-in for ``torch.cuda.device`` that tracks the current device, and
kernels whose launch records which device was current instead of running."""

import pytest
import torch

pytest.importorskip("triton")
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from qwen3_kernels.ops.triton import _common, attention, rms_norm, rope, swiglu  # noqa: E402

KERNELS = [rms_norm._rms_norm_fwd_kernel, rms_norm._rms_norm_bwd_kernel, rope._rope_fwd_kernel, rope._rope_bwd_kernel,
           swiglu._swiglu_fwd_kernel, swiglu._swiglu_bwd_kernel, attention._attn_fwd_kernel,
           attention._attn_bwd_delta_kernel, attention._attn_bwd_dkdv_kernel, attention._attn_bwd_dq_kernel,
           attention._attn_decode_kernel, attention._attn_decode_combine_kernel]


class CurrentDevice:
    """Stands in for ``torch.cuda.device``: a context manager that makes a device current."""
    index = 0

    def __init__(self, device):
        self.device = torch.device(device)

    def __enter__(self):
        self.previous, CurrentDevice.index = CurrentDevice.index, self.device.index

    def __exit__(self, *exc):
        CurrentDevice.index = self.previous


@pytest.fixture
def launches(monkeypatch):
    """(kernel name, device current at its launch) of every launch, none of which runs."""
    seen = []
    monkeypatch.setattr(torch.cuda, "device", CurrentDevice)
    for kernel_class in {type(k) for k in KERNELS}:  # JITFunction, or InterpretedFunction under the interpreter
        monkeypatch.setattr(kernel_class, "__getitem__", lambda kernel, grid: lambda *args, **kwargs: seen.append(
            (_name(kernel), CurrentDevice.index)))
    return seen


def _name(kernel):
    return kernel.fn.__name__


def _launch_everything(device, dtype=torch.float16):
    B, T, H, Hkv, D, C = 2, 8, 4, 2, 64, 256
    x, w = torch.randn(B, T, C, device=device, dtype=dtype), torch.ones(C, device=device, dtype=dtype)
    _, _, rstd = rms_norm.rms_norm_forward(x, w, 1e-6, residual=x)
    rms_norm.rms_norm_backward(x, x, w, rstd, x)
    q, k = torch.randn(B, T, H, D, device=device, dtype=dtype), torch.randn(B, T, Hkv, D, device=device, dtype=dtype)
    cos, qw = torch.randn(T, D, device=device, dtype=dtype), torch.ones(D, device=device, dtype=dtype)
    rope.rope_forward(q, cos, cos, qw, 1e-6)
    rope.rope_backward(q, q, cos, cos, qw, 1e-6)
    g = torch.randn(B, T, 96, device=device, dtype=dtype)
    swiglu.swiglu_forward(g, g)
    swiglu.swiglu_backward(g, g, g)
    out, lse = attention.attention_forward(q, k, k, True, 0.125)
    attention.attention_backward(out, q, k, k, out, lse, True, 0.125)
    cache = torch.randn(B, 1024, Hkv, D, device=device, dtype=dtype)
    one = torch.randn(B, 1, H, D, device=device, dtype=dtype)
    attention.decode_forward(one, cache, cache, True, 0.125, torch.full((B,), 9, device=device, dtype=torch.int32))


def test_every_launch_runs_on_its_tensors_device(launches):
    with FakeTensorMode(), _common.simulated_gpu(90, 132):
        _launch_everything("cuda:1")
    assert {name for name, _ in launches} == {_name(k) for k in KERNELS}
    assert all(device == 1 for _, device in launches), launches
    assert CurrentDevice.index == 0  # and the caller's current device is back afterwards


def test_cpu_tensors_need_no_guard(launches, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device", lambda device: pytest.fail("a CPU launch entered a CUDA device guard"))
    with FakeTensorMode(), _common.simulated_gpu(90, 132):
        _launch_everything("cpu")
    assert launches
