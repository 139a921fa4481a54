"""Fused linear cross-entropy, forward + backward, over Qwen3's 151,936-token vocabulary: time and
peak extra memory against eager (logits + F.cross_entropy, what transformers does), torch.compile of
it, and Liger-Kernel's fused linear cross-entropy when ``liger_kernel`` is installed."""

import pytest
import torch
from benchmarks.conftest import compiled, needs_gpu, run

from qwen3_kernels.ops import reference

pytestmark = needs_gpu
VOCAB = 151936
PROVIDERS = ["triton", "eager", "compile", "liger"]
SHAPES = [(8192, 1024), (32768, 1024), (8192, 4096), (32768, 4096)]  # (tokens, hidden): 0.6B and 8B


def _loss_fn(provider):
    if provider == "triton":
        from qwen3_kernels.ops.triton import cross_entropy
        return cross_entropy.linear_cross_entropy
    if provider == "liger":
        liger = pytest.importorskip("liger_kernel.transformers.functional")
        return lambda h, w, t: liger.liger_fused_linear_cross_entropy(h, w, t, ignore_index=-100)
    return reference.linear_cross_entropy if provider == "eager" else compiled(reference.linear_cross_entropy)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens, hidden_size", SHAPES)
def test_linear_cross_entropy(benchmark, peak, provider, tokens, hidden_size):
    loss_fn = _loss_fn(provider)
    g = torch.Generator("cuda").manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (0.02 * torch.randn(VOCAB, hidden_size, device="cuda", dtype=torch.bfloat16, generator=g)
              ).requires_grad_()
    targets = torch.randint(0, VOCAB, (tokens,), device="cuda", generator=g)
    targets[::7] = -100  # some prompt tokens, as in fine-tuning data

    def step(hidden, weight, targets):
        torch.autograd.grad(loss_fn(hidden, weight, targets), (hidden, weight))

    try:
        step(hidden, weight, targets)  # compile, tune, and settle the allocator
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(hidden, weight, targets)
        torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of memory at {tokens} x {VOCAB} logits")
    # beyond the inputs: the gradients themselves (N x C + V x C) plus whatever the loss holds
    peak_extra = torch.cuda.max_memory_allocated() - before
    flops = 3 * 2 * tokens * VOCAB * hidden_size  # the three useful GEMMs (recomputation not counted)
    run(benchmark, step, [(hidden, weight, targets)], op="linear_cross_entropy fwd+bwd",
        shape=f"{tokens}x{hidden_size}x{VOCAB}", provider=provider, peak=peak, flops=flops, rounds=10)
    benchmark.extra_info.update(peak_extra_bytes=peak_extra)
