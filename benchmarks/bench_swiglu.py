"""SwiGLU forward and backward at Qwen3 intermediate sizes."""

import pytest
import torch
from benchmarks.conftest import compiled, input_sets, needs_gpu, run

from benchmarks.roofline import swiglu_bytes
from qwen3_kernels.ops import reference

pytestmark = needs_gpu
PROVIDERS = ["triton", "eager", "compile"]
SHAPES = [(1024, 3072), (16384, 3072), (4096, 12288)]  # (tokens, intermediate): 0.6B and 8B


def _impl(provider):
    if provider == "triton":
        from qwen3_kernels.ops.triton import swiglu
        return swiglu.swiglu
    return reference.swiglu if provider == "eager" else compiled(reference.swiglu)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens, inter", SHAPES)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_swiglu(benchmark, peak, provider, tokens, inter, backward):
    fn = _impl(provider)
    nbytes = swiglu_bytes(tokens, inter, 2, backward)

    def make(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        gate, up = (torch.randn(tokens, inter, device="cuda", dtype=torch.bfloat16, generator=g,
                                requires_grad=backward) for _ in range(2))
        if not backward:
            return (gate, up)
        out = fn(gate, up)
        return (out, torch.randn_like(out), gate, up)

    sets = input_sets(make, nbytes)
    if backward:
        def step(out, grad, gate, up):
            torch.autograd.grad(out, (gate, up), grad, retain_graph=True)
    else:
        def step(gate, up):
            with torch.no_grad():
                fn(gate, up)
    run(benchmark, step, sets, op="swiglu " + ("bwd" if backward else "fwd"), shape=f"{tokens}x{inter}",
        provider=provider, peak=peak, bytes=nbytes)
