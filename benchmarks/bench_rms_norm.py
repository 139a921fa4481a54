"""RMSNorm and add+RMSNorm, forward and backward, at Qwen3 hidden sizes and 1k-16k tokens."""

import pytest
import torch
from benchmarks.conftest import compiled, input_sets, needs_gpu, run

from benchmarks.roofline import rms_norm_bytes
from qwen3_kernels.ops import reference

pytestmark = needs_gpu
PROVIDERS = ["triton", "eager", "compile"]
SHAPES = [(1024, 1024), (16384, 1024), (4096, 4096)]  # (tokens, hidden): 0.6B and 8B


def _impl(provider, residual):
    if provider == "triton":
        from qwen3_kernels.ops.triton import rms_norm as k
        return k.add_rms_norm if residual else k.rms_norm
    ref = reference.add_rms_norm if residual else reference.rms_norm
    return ref if provider == "eager" else compiled(ref)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens, hidden", SHAPES)
@pytest.mark.parametrize("residual", [False, True], ids=["rms_norm", "add_rms_norm"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_rms_norm(benchmark, peak, provider, tokens, hidden, residual, backward):
    fn = _impl(provider, residual)
    nbytes = rms_norm_bytes(tokens, hidden, 2, residual, backward)

    def make(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=backward)
        w = torch.randn(hidden, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=backward)
        args = (x, torch.randn_like(x), w) if residual else (x, w)
        if not backward:
            return (args,)
        out = fn(*args)
        out = out[0] if isinstance(out, tuple) else out
        return (out, torch.randn_like(out), args)

    sets = input_sets(make, nbytes)
    if backward:
        def step(out, grad, args):
            torch.autograd.grad(out, [a for a in args if a.requires_grad], grad, retain_graph=True)
    else:
        def step(args):
            with torch.no_grad():
                fn(*args)
    name = ("add_rms_norm" if residual else "rms_norm") + (" bwd" if backward else " fwd")
    run(benchmark, step, sets, op=name, shape=f"{tokens}x{hidden}", provider=provider, peak=peak, bytes=nbytes)
