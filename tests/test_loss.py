"""model(input_ids, labels=...) against transformers' Qwen3ForCausalLM(labels=...): the loss and every
parameter gradient, eager and fused (the fused loss never builds the logits)."""

import pytest
import torch
from conftest import TINY, load_hf
from qwen3_kernels_testing.kernels import KERNEL_DEVICE, needs_triton

from qwen3_kernels import QWEN
from qwen3_kernels.loading import local_to_hf


def _batch(seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (2, 19), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100          # a prompt that is not trained on
    labels[1, 11:] = -100         # padding at the end
    return ids, labels


@pytest.mark.parametrize("tie", [True, False])
def test_loss_and_every_gradient_match_transformers(hf_checkpoint, backend, tie):
    path, _ = hf_checkpoint(tie=tie)
    hf = load_hf(path, torch.float32, attn="eager").to(KERNEL_DEVICE)
    model = QWEN.from_pretrained(path, fused=backend == "triton", device=KERNEL_DEVICE)
    ids, labels = (t.to(KERNEL_DEVICE) for t in _batch())
    ours, theirs = model(ids, labels=labels), hf(input_ids=ids, labels=labels).loss
    assert ours.shape == () and ours.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    ours.backward()
    theirs.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[local_to_hf(name)].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_divides_the_sum(hf_checkpoint, backend):
    """Gradient accumulation as transformers' Trainer does it: the sum over this micro-batch divided
    by the count over the whole accumulated batch."""
    path, _ = hf_checkpoint(tie=True)
    hf = load_hf(path, torch.float32, attn="eager").to(KERNEL_DEVICE)
    model = QWEN.from_pretrained(path, fused=backend == "triton", device=KERNEL_DEVICE)
    ids, labels = (t.to(KERNEL_DEVICE) for t in _batch())
    with torch.no_grad():
        ours = model(ids, labels=labels, num_items_in_batch=71)
        theirs = hf(input_ids=ids, labels=labels, num_items_in_batch=71).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@needs_triton
def test_fused_loss_never_builds_logits(hf_checkpoint, monkeypatch, triton_everywhere):
    """With fused=True the LM head never runs its (tokens x vocab) matmul."""
    path, _ = hf_checkpoint(tie=True)
    model = QWEN.from_pretrained(path, fused=True, device=KERNEL_DEVICE)
    calls = []
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: calls.append(self) or x @ self.weight.T)
    ids, labels = (t.to(KERNEL_DEVICE) for t in _batch())
    model(ids, labels=labels).backward()
    assert model.lm_head not in calls


def test_bad_labels_are_named(hf_checkpoint):
    path, _ = hf_checkpoint(tie=True)
    model = QWEN.from_pretrained(path)
    ids, labels = _batch()
    with pytest.raises(ValueError, match=r"labels shape \(2, 18\) must equal input_ids shape \(2, 19\)"):
        model(ids, labels=labels[:, 1:])
    with pytest.raises(TypeError, match="labels must be an int64 tensor"):
        model(ids, labels=labels.float())
    with pytest.raises(ValueError, match="cannot be combined with a KV cache or last_only"):
        model(ids, labels=labels, last_only=True)


@needs_triton
def test_compiled_fused_loss_traces_whole_and_matches_eager(hf_checkpoint, triton_everywhere):
    """torch.compile(fullgraph=True) through the loss: the op is one opaque custom op, forward and
    backward, so the graph has no break and the gradients are the eager ones."""
    torch._dynamo.reset()
    path, _ = hf_checkpoint(tie=True)
    model = QWEN.from_pretrained(path, fused=True, device=KERNEL_DEVICE)
    ids, labels = (t.to(KERNEL_DEVICE) for t in _batch())
    eager = model(ids, labels=labels)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = compiled(ids, labels=labels)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)
    for g, e in zip(torch.autograd.grad(loss, list(model.parameters())), eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
