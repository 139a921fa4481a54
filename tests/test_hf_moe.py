"""qwen3_kernels.hf on transformers' Qwen3-MoE: a patched tiny random Qwen3MoeForCausalLM (one MoE
layer, one dense layer) against the same model unpatched and in float64: logits, the loss with the
load-balancing term, every gradient (router and stacked experts included); the router and experts
running the ops; the experts implementation registered with transformers; generate; the class patch."""

import logging

import pytest
import torch
from conftest import TINY, TINY_MOE, loss_and_grads, make_hf_moe_model
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import ATOL, KERNEL_DEVICE

from qwen3_kernels import hf, ops

transformers = pytest.importorskip("transformers")
modeling = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe")

def _model(dtype=torch.float32, patched=False, attn="sdpa", **overrides):
    model = make_hf_moe_model(**overrides).to(device=KERNEL_DEVICE, dtype=dtype)
    model.config._attn_implementation = attn
    model.config._experts_implementation = "eager"  # transformers' loop (its grouped_mm takes no float64)
    return hf.apply_kernels(model) if patched else model


def _batch(B=2, T=13, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids.to(KERNEL_DEVICE), labels.to(KERNEL_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_patched_moe_model_follows_the_rule(backend, dtype):
    """Logits, the training loss with the load-balancing loss added, the aux loss itself and every
    gradient against float64 transformers: the patched model's error at most 2x (3x for gradients)
    the unpatched model's in the same dtype."""
    exact, eager, ours = _model(torch.float64, attn="eager"), _model(dtype), _model(dtype, patched=True)
    ids, labels = _batch()
    with torch.no_grad():
        logits = [m.eval()(ids).logits for m in (exact, eager, ours)]
    assert_within_rule(logits[2], logits[1], logits[0], atol=ATOL[dtype], name="logits")
    runs = [loss_and_grads(m, input_ids=ids, labels=labels, output_router_logits=True) for m in (exact, eager, ours)]
    assert runs[2][0].logits is None                        # trained without building the logits
    assert runs[2][0].aux_loss is not None and len(runs[2][0].router_logits) == 1  # one MoE layer of two
    for name in ("loss", "aux_loss"):
        values = [getattr(out, name) for out, _ in runs]
        assert_within_rule(values[2], values[1], values[0], atol=ATOL[dtype], name=name)
    assert set(runs[2][1]) == set(runs[0][1])
    assert any("experts.gate_up_proj" in n for n in runs[2][1]) and any("mlp.gate.weight" in n for n in runs[2][1])
    for name, grad in runs[0][1].items():
        assert_within_rule(runs[2][1][name], runs[1][1][name], grad, factor=3.0, atol=ATOL[dtype], name=name)


def test_the_moe_block_runs_the_ops(monkeypatch, backend):
    """The router through ops.moe_route and the experts through ops.moe_experts (transformers'
    experts loop never runs), besides the dense modules' kernels; the experts implementation is
    registered with transformers under "qwen3_kernels"."""
    model = _model(patched=True)
    calls = {op: 0 for op in ("moe_route", "moe_experts", "swiglu", "attention", "linear_cross_entropy")}
    for op in calls:
        original = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _op=op, _f=original, **k: calls.__setitem__(_op, calls[_op] + 1)
                            or _f(*a, **k))
    loop = []
    monkeypatch.setitem(hf._ORIGINAL, "Qwen3MoeExperts.loop", lambda *a: loop.append(1))
    ids, labels = _batch()
    model.train()(input_ids=ids, labels=labels).loss.backward()
    assert calls == {"moe_route": 1, "moe_experts": 1, "swiglu": 1, "attention": 2, "linear_cross_entropy": 1}
    assert not loop
    assert model.config._experts_implementation == hf.ATTENTION


def test_state_dict_and_parameter_names_are_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hf.apply_kernels(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_generate_token_for_token(backend):
    eager, ours = _model().eval(), _model(patched=True).eval()
    ids, _ = _batch(T=7)
    kw = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))


def test_experts_that_do_not_fit_run_transformers_loop(caplog):
    """Routing weights in another dtype than the experts' (a caller's choice the kernel does not
    take): transformers' loop runs, said once, and the output is transformers'."""
    model = _model(patched=True)
    experts = model.model.layers[0].mlp.experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, TINY["hidden_size"], generator=g).to(KERNEL_DEVICE)
    ids = torch.randint(0, TINY_MOE["num_experts"], (5, 2), generator=g).to(KERNEL_DEVICE)
    weights = torch.rand(5, 2, generator=g, dtype=torch.float64).to(KERNEL_DEVICE)
    with caplog.at_level(logging.WARNING, logger="qwen3_kernels.hf"):
        hf._logged.clear()
        out = experts(hidden, ids, weights)
    assert any("the MoE experts run transformers' loop: dtypes differ" in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(out, hf._ORIGINAL["Qwen3MoeExperts.loop"](experts, hidden, ids, weights))


@pytest.fixture
def class_patch():
    hf.apply_kernels()
    yield
    hf.remove_kernels()


def test_class_patch_reaches_moe_models_built_afterwards(class_patch, tmp_path):
    """apply_kernels() with no model: a Qwen3-MoE from from_pretrained runs the kernels, with the
    "qwen3_kernels" attention and experts; remove_kernels() puts transformers' forwards back."""
    make_hf_moe_model().save_pretrained(tmp_path)
    loaded = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").to(KERNEL_DEVICE)
    assert loaded.config._attn_implementation == hf.ATTENTION
    assert loaded.config._experts_implementation == hf.ATTENTION
    assert modeling.Qwen3MoeTopKRouter.forward is hf._router_forward
    ids, _ = _batch()
    with torch.no_grad():
        ours = loaded.eval()(ids).logits
    hf.remove_kernels()
    assert modeling.Qwen3MoeTopKRouter.forward is hf._ORIGINAL["Qwen3MoeTopKRouter"]
    assert modeling.Qwen3MoePreTrainedModel.post_init is hf._ORIGINAL["Qwen3MoePreTrainedModel.post_init"]
    loaded.config._attn_implementation = "sdpa"
    loaded.config._experts_implementation = "eager"
    with torch.no_grad():
        torch.testing.assert_close(ours, loaded(ids).logits, rtol=1e-5, atol=1e-5)
