"""QK-norm + RoPE (one kernel for Qwen3's attention prologue), forward and backward."""

import pytest
import torch
from benchmarks.conftest import compiled, input_sets, needs_gpu, run

from benchmarks.roofline import qk_norm_rope_bytes
from qwen3_kernels import calculate_sin_cos
from qwen3_kernels.ops import reference

pytestmark = needs_gpu
PROVIDERS = ["triton", "eager", "compile"]
SHAPES = [(1024, 16, 8), (16384, 16, 8), (4096, 32, 8)]  # (tokens, H, Hkv): 0.6B and 8B
D = 128


def _impl(provider):
    if provider == "triton":
        from qwen3_kernels.ops.triton import rope
        return rope.qk_norm_rope
    return reference.qk_norm_rope if provider == "eager" else compiled(reference.qk_norm_rope)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens, H, Hkv", SHAPES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_qk_norm_rope(benchmark, peak, provider, tokens, H, Hkv, backward):
    fn = _impl(provider)
    nbytes = qk_norm_rope_bytes(tokens, H, Hkv, D, 2, backward)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    sin, cos = calculate_sin_cos(torch.arange(tokens, device="cuda"), inv_freq, dtype=torch.bfloat16)

    def make(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        proj = torch.randn(1, tokens, (H + 2 * Hkv) * D, device="cuda", dtype=torch.bfloat16, generator=g)
        q = proj[..., : H * D].view(1, tokens, H, D).requires_grad_(backward)  # strided, as from the projection
        k = proj[..., H * D: (H + Hkv) * D].view(1, tokens, Hkv, D).requires_grad_(backward)
        qw = torch.ones(D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        kw = torch.ones(D, device="cuda", dtype=torch.bfloat16, requires_grad=backward)
        args = (q, k, qw, kw, cos, sin, 1e-6)
        if not backward:
            return (args,)
        out = fn(*args)
        return (out, tuple(torch.randn_like(o) for o in out), args)

    sets = input_sets(make, nbytes)
    if backward:
        def step(out, grads, args):
            torch.autograd.grad(out, args[:4], grads, retain_graph=True)
    else:
        def step(args):
            with torch.no_grad():
                fn(*args)
    run(benchmark, step, sets, op="qk_norm_rope " + ("bwd" if backward else "fwd"), shape=f"{tokens}x{H}/{Hkv}x{D}",
        provider=provider, peak=peak, bytes=nbytes)
