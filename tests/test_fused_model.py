"""The model with fused=True (Triton kernels through the interpreter) against the reference model,
and torch.compile(fullgraph=True) of both."""

import logging

import pytest
import torch
from qwen3_kernels_testing.kernels import KERNEL_DEVICE, needs_triton

from qwen3_kernels import QWEN, Config, ops

SMALL = Config(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
               intermediate_size=80, max_position_embeddings=64)


def _pair():
    torch.manual_seed(0)
    reference = QWEN(SMALL)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    fused = QWEN(SMALL, fused=True)
    fused.load_state_dict(reference.state_dict())
    return reference.to(KERNEL_DEVICE), fused.to(KERNEL_DEVICE)


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """`auto` dispatch as on a GPU: every op with a Triton kernel runs it (on the CPU, through the
    interpreter; on a GPU this is what `auto` does anyway)."""
    monkeypatch.setattr(ops, "_choices", {})
    if KERNEL_DEVICE == "cpu":
        monkeypatch.setattr(ops, "_device_supports_triton", lambda device, dtype, requested: (True, "interpreter"))
    yield
    monkeypatch.setattr(ops, "_choices", {})


@needs_triton
def test_fused_model_matches_reference_logits_and_gradients(kernels_on_cpu):
    assert all(c.backend == "triton" for c in ops.report(KERNEL_DEVICE).values())
    reference, fused = _pair()
    ids = torch.randint(0, SMALL.vocab_size, (2, 21), generator=torch.Generator().manual_seed(1)).to(KERNEL_DEVICE)
    ref_logits, fused_logits = reference(ids), fused(ids)
    torch.testing.assert_close(fused_logits, ref_logits, rtol=1e-5, atol=1e-5)
    ref_logits.logsumexp(-1).mean().backward()
    fused_logits.logsumexp(-1).mean().backward()
    ref_grads = dict(reference.named_parameters())
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_model_on_cpu_warns_once_which_ops_fall_back(caplog, monkeypatch):
    monkeypatch.setattr(ops, "_choices", {})
    _, fused = _pair()
    fused = fused.cpu()
    ids = torch.randint(0, SMALL.vocab_size, (1, 5))
    with caplog.at_level(logging.WARNING, logger="qwen3_kernels.model"):
        fused(ids)
        fused(ids)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "fall back to the eager reference" in warnings[0] and "rms_norm (CPU" in warnings[0]


def test_compiled_reference_model_matches_eager():
    reference, _ = _pair()
    reference = reference.cpu()
    ids = torch.randint(0, SMALL.vocab_size, (2, 9))
    compiled = torch.compile(reference, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)


@needs_triton
def test_fused_model_traces_without_graph_breaks(kernels_on_cpu):
    reference, fused = _pair()
    ids = torch.randint(0, SMALL.vocab_size, (2, 9), device=KERNEL_DEVICE)
    fused(ids)  # decide the dispatch outside the trace
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids), reference(ids), rtol=1e-5, atol=1e-5)
    compiled(ids).sum().backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_on_gpu_matches_reference(dtype):
    """Whole-model check in the dtypes people train in; bf16 compared by the flash-attention rule
    against the fp32 reference model."""
    from qwen3_kernels_testing.float64 import assert_within_rule
    config = Config(vocab_size=1000, hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=64,
                    intermediate_size=512, max_position_embeddings=512)
    torch.manual_seed(0)
    with torch.device("cuda"):
        exact = QWEN(config)
        reference = QWEN(config).to(dtype)
        fused = QWEN(config, fused=True).to(dtype)
    reference.load_state_dict({k: v.to(dtype) for k, v in exact.state_dict().items()})
    fused.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 1000, (2, 300), device="cuda")
    with torch.no_grad():
        out, eager, truth = fused(ids), reference(ids), exact(ids)
    assert_within_rule(out, eager, truth, 2, 1e-5 if dtype == torch.float32 else 2e-2, "logits")
