"""qwen3_kernels.hf: the kernels inside a transformers Qwen3ForCausalLM. A patched tiny random model
against the same model unpatched (and in float64): logits, loss, every gradient; packed batches from
transformers' own collator; generate; a Trainer step with gradient accumulation; PEFT LoRA;
torch.compile; the class patch; what is refused."""

import logging
import sys

import pytest
import torch
from conftest import TINY, loss_and_grads, make_hf_model
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import ATOL, KERNEL_DEVICE

from qwen3_kernels import hf, ops

transformers = pytest.importorskip("transformers")

LENGTHS = (5, 1, 19, 7)  # one token, odd lengths, one longer than the interpreter's 16-token tiles


def _model(dtype=torch.float32, patched=False, attn="sdpa", **overrides):
    model = make_hf_model(**overrides).to(device=KERNEL_DEVICE, dtype=dtype)
    model.config._attn_implementation = attn
    return hf.apply_kernels(model) if patched else model


def _batch(B=2, T=19, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY["vocab_size"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100          # a prompt that is not trained on
    labels[-1, 11:] = -100        # the end of a shorter example
    return ids.to(KERNEL_DEVICE), labels.to(KERNEL_DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_patched_model_follows_the_rule(backend, dtype):
    """Logits at inference, and the training loss and every gradient, against float64 transformers;
    the patched model's error at most 2x (3x for gradients) the unpatched model's in the same dtype."""
    exact, eager, ours = _model(torch.float64, attn="eager"), _model(dtype), _model(dtype, patched=True)
    ids, labels = _batch()
    with torch.no_grad():
        logits = [m.eval()(ids).logits for m in (exact, eager, ours)]
    assert_within_rule(logits[2], logits[1], logits[0], atol=ATOL[dtype], name="logits")
    runs = [loss_and_grads(m, input_ids=ids, labels=labels) for m in (exact, eager, ours)]
    assert runs[2][0].logits is None                        # trained without building the logits
    assert_within_rule(runs[2][0].loss, runs[1][0].loss, runs[0][0].loss, atol=ATOL[dtype], name="loss")
    for name, grad in runs[0][1].items():
        assert_within_rule(runs[2][1][name], runs[1][1][name], grad, factor=3.0, atol=ATOL[dtype], name=name)


def test_every_qwen3_module_runs_a_kernel(monkeypatch, triton_everywhere):
    """Norms (q_norm and k_norm too, inside the fused QK-norm + RoPE), MLP, attention and loss all go
    through qwen3_kernels.ops; transformers' RMSNorm forward never runs."""
    model = _model(patched=True)
    calls = {op: 0 for op in ("rms_norm", "qk_norm_rope", "swiglu", "attention", "linear_cross_entropy")}
    for op in calls:
        original = getattr(ops, op)
        monkeypatch.setattr(ops, op, lambda *a, _op=op, _f=original, **k: calls.__setitem__(_op, calls[_op] + 1)
                            or _f(*a, **k))
    hf_norm = []
    monkeypatch.setitem(hf._ORIGINAL, "Qwen3RMSNorm", lambda *a: hf_norm.append(1))
    ids, labels = _batch()
    model.train()(input_ids=ids, labels=labels).loss.backward()
    layers = TINY["num_hidden_layers"]
    assert calls == {"rms_norm": 2 * layers + 1, "qk_norm_rope": layers, "swiglu": layers, "attention": layers,
                     "linear_cross_entropy": 1}
    assert not hf_norm
    assert [p.grad is not None for p in model.parameters()] == [True] * len(list(model.parameters()))


def test_state_dict_and_parameter_names_are_untouched():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    hf.apply_kernels(model)
    after = model.state_dict()
    assert list(after) == list(before) and [n for n, _ in model.named_parameters()] == names
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("flash_kwargs", [True, False], ids=["cu_seq_lens", "position_ids"])
def test_packed_batch_from_the_flattening_collator(backend, flash_kwargs):
    """transformers' DataCollatorWithFlattening, with and without its flash-attention kwargs: the
    patched model's logits equal each example run alone; loss and gradients equal the unpatched model
    on the same packed batch."""
    g = torch.Generator().manual_seed(5)
    examples = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=flash_kwargs)
    batch = {k: v.to(KERNEL_DEVICE) if torch.is_tensor(v) else v
             for k, v in collate([{"input_ids": e, "labels": e} for e in examples]).items()}
    assert ("cu_seq_lens_q" in batch) == flash_kwargs
    eager, ours = _model(), _model(patched=True)
    with torch.no_grad():
        alone = torch.cat([eager.eval()(torch.tensor([e], device=KERNEL_DEVICE)).logits for e in examples], dim=1)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        packed = ours.eval()(**inputs, use_cache=False).logits
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    (theirs, their_grads), (mine, my_grads) = (loss_and_grads(m, **batch, use_cache=False) for m in (eager, ours))
    torch.testing.assert_close(mine.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for name, grad in their_grads.items():
        torch.testing.assert_close(my_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("qk_norm_rope", [True, False], ids=["fused_qk_norm_rope", "transformers_qk_norm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_batch_under_autocast(backend, dtype, qk_norm_rope, monkeypatch):
    """fp32 weights under torch.autocast (Trainer's bf16=True on an fp32 model, TRL's default), packed
    by DataCollatorWithFlattening: q/k meet fp32 norm weights and cos/sin beside a half v (with
    transformers' own QK-norm, q/k come out fp32 and are cast to the autocast dtype, as SDPA would).
    Every layer's attention runs the kernel and every packed example keeps to itself: the patched
    model's logits, loss and gradients are within the rule of the fp32 packed run, against the
    unpatched model's under the same autocast."""
    if backend == "triton" and dtype == torch.bfloat16 and KERNEL_DEVICE == "cpu":
        pytest.skip("Triton's interpreter computes tl.dot on bfloat16 wrongly; fp16 covers the interpreter")
    g = torch.Generator().manual_seed(7)
    examples = [torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist() for n in LENGTHS]
    collate = transformers.DataCollatorWithFlattening()
    batch = {k: v.to(KERNEL_DEVICE) for k, v in collate([{"input_ids": e, "labels": e} for e in examples]).items()}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    eager, ours = _model(), hf.apply_kernels(_model(), qk_norm_rope=qk_norm_rope)
    with torch.no_grad():
        alone = torch.cat([eager.eval()(torch.tensor([e], device=KERNEL_DEVICE)).logits for e in examples], dim=1)
        exact = eager(**inputs, use_cache=False).logits
    torch.testing.assert_close(exact, alone, rtol=1e-5, atol=1e-5)  # the fp32 packed run is the truth
    runs = [loss_and_grads(eager, **batch, use_cache=False)]
    attention_calls = []
    kernel = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **k: attention_calls.append(1) or kernel(*a, **k))
    with torch.autocast(torch.device(KERNEL_DEVICE).type, dtype=dtype):
        with torch.no_grad():
            theirs = eager.eval()(**inputs, use_cache=False).logits
            mine = ours.eval()(**inputs, use_cache=False).logits
        runs += [loss_and_grads(m, **batch, use_cache=False) for m in (eager, ours)]
    assert mine.dtype == theirs.dtype
    assert_within_rule(mine.float(), theirs.float(), exact, atol=ATOL[dtype], name="packed logits under autocast")
    (truth, true_grads), (their_run, their_grads), (my_run, my_grads) = runs
    assert_within_rule(my_run.loss.float(), their_run.loss.float(), truth.loss, atol=ATOL[dtype], name="loss")
    for name, grad in true_grads.items():
        assert my_grads[name].dtype == grad.dtype, name
        assert_within_rule(my_grads[name], their_grads[name], grad, factor=3.0, atol=ATOL[dtype], name=name)
    assert len(attention_calls) == 2 * TINY["num_hidden_layers"]  # no layer fell back to SDPA


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                              (torch.float32, torch.bfloat16), (torch.bfloat16, torch.float16)])
def test_patched_norm_promotes_as_transformers(backend, x_dtype, w_dtype, monkeypatch):
    """A norm weight in another dtype than its input (fp32 weights beside bf16 activations under
    autocast): the patched Qwen3RMSNorm runs the kernel and gives transformers' promoted dtype
    (fp32 weight * bf16 -> fp32) and value (within the rule against float64); the weight's gradient
    in its own dtype, the input's in its own."""
    model = _model(hidden_size=100, patched=True)  # 100: not a power of two
    norm = model.model.norm.to(w_dtype)
    calls = []
    kernel = ops.rms_norm
    monkeypatch.setattr(ops, "rms_norm", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    x = (2.0 * torch.randn(3, 7, 100, generator=torch.Generator().manual_seed(9))).to(KERNEL_DEVICE, x_dtype)
    x = x.requires_grad_()
    w = norm.weight
    mine = norm(x)
    assert calls == [1]
    theirs = hf._ORIGINAL["Qwen3RMSNorm"](norm, x)
    assert mine.dtype == theirs.dtype == torch.promote_types(x_dtype, w_dtype)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    exact = w64 * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon))
    assert_within_rule(mine, theirs, exact, atol=ATOL[x_dtype] * exact.abs().max().item(), name="y")
    dy = torch.randn(mine.shape, generator=torch.Generator().manual_seed(10)).to(KERNEL_DEVICE, mine.dtype)
    grads, their_grads = (torch.autograd.grad(y, (x, w), dy) for y in (mine, theirs))
    true_grads = torch.autograd.grad(exact, (x64, w64), dy.double())
    assert [g.dtype for g in grads] == [x_dtype, w_dtype]
    # dw is rounded to w's dtype, dx to x's; both sum over values rounded to x's dtype
    tolerances = ATOL[x_dtype], max(ATOL[x_dtype], ATOL[w_dtype])
    for name, g, ge, g64, tol in zip(("dx", "dw"), grads, their_grads, true_grads, tolerances):
        assert_within_rule(g, ge, g64, factor=3.0, atol=tol * max(1.0, g64.abs().max().item()), name=name)


def test_the_sdpa_fallback_keeps_packed_examples_apart(backend):
    """A call the kernels cannot take (here output_attentions) runs transformers' SDPA path; with
    packed sequences it gets their block-diagonal causal mask, so each example still sees itself only."""
    module = torch.nn.Module()
    module.is_causal, module.num_key_value_groups = True, 2
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, h, sum(LENGTHS), 16, generator=g).to(KERNEL_DEVICE) for h in (4, 2, 2))  # (B, H, T, D)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).to(KERNEL_DEVICE)[None]
    packed, _ = hf.attention_forward(module, q, k, v, None, scaling=0.25, position_ids=positions,
                                     output_attentions=True)
    starts = [0, *torch.tensor(LENGTHS).cumsum(0).tolist()]
    alone = torch.cat([ops.attention(*(t[:, :, a:b].transpose(1, 2) for t in (q, k, v)), softmax_scale=0.25)
                       for a, b in zip(starts, starts[1:])], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_generate_token_for_token(backend, caplog):
    """Greedy generate over transformers' DynamicCache: the same tokens; a left-padded batch takes
    the SDPA path, said once in the log."""
    eager, ours = _model().eval(), _model(patched=True).eval()
    ids, _ = _batch(T=9)
    kw = dict(max_new_tokens=7, do_sample=False)
    assert torch.equal(ours.generate(ids, **kw), eager.generate(ids, **kw))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with caplog.at_level(logging.WARNING, logger="qwen3_kernels.hf"):
        hf._logged.clear()
        assert torch.equal(ours.generate(ids, attention_mask=mask, **kw), eager.generate(ids, attention_mask=mask, **kw))
    padded = [r for r in caplog.records if "the batch is padded" in r.getMessage()]
    assert len(padded) == 1


def test_logits_to_keep_and_num_items_in_batch(backend):
    """Trainer's gradient accumulation divides the sum by the whole batch's count; logits_to_keep
    scores only the kept positions (labels given for those)."""
    eager, ours = _model().train(), _model(patched=True).train()
    ids, labels = _batch()
    with torch.no_grad():
        for kw in (dict(num_items_in_batch=torch.tensor(71)), dict(logits_to_keep=6, labels=labels[:, -6:])):
            kw = {"labels": labels, **kw}
            torch.testing.assert_close(ours(ids, **kw).loss, eager(ids, **kw).loss, rtol=1e-5, atol=1e-6)
        out = ours(ids, labels=labels, skip_logits=False)
        assert out.logits.shape == (*ids.shape, TINY["vocab_size"])
        torch.testing.assert_close(out.loss, eager(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
        assert ours.eval()(ids, labels=labels).logits is not None   # eval keeps the logits for metrics


def test_trainer_step_with_gradient_accumulation(backend, tmp_path):
    """The README's recipe: Trainer, packed batches from DataCollatorWithFlattening, 2 micro-batches
    per optimiser step. The same logged loss and the same weights after the step (SGD: Adam's first
    step is sign(gradient), which turns rounding noise in near-zero gradients into whole steps)."""
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(7)
    rows = [{"input_ids": torch.randint(0, TINY["vocab_size"], (n,), generator=g).tolist()} for n in (9, 4, 13, 6)]
    for row in rows:
        row["labels"] = row["input_ids"]
    collate = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    results = []
    for patched in (False, True):
        model = _model(patched=patched)
        model.config.use_cache = False  # with a cache, transformers' SDPA path does not look for packed sequences
        args = transformers.TrainingArguments(output_dir=str(tmp_path / str(patched)), per_device_train_batch_size=2,
                                              gradient_accumulation_steps=2, max_steps=1, learning_rate=0.1, optim="sgd",
                                              logging_steps=1, report_to=[], save_strategy="no", use_cpu=not
                                              torch.cuda.is_available(), dataloader_num_workers=0, seed=0)
        trainer = transformers.Trainer(model, args, collate, rows)
        loss = trainer.train().training_loss
        results.append((loss, {n: p.detach().clone() for n, p in model.named_parameters()}))
    (their_loss, theirs), (my_loss, mine) = results
    assert my_loss == pytest.approx(their_loss, rel=1e-5)
    for name, weight in theirs.items():
        torch.testing.assert_close(mine[name], weight, rtol=1e-4, atol=1e-6, msg=name)


def test_peft_lora_model(backend):
    """A LoRA model from PEFT (adapters on attention and MLP projections): apply_kernels on the
    wrapper patches the Qwen3 inside; LoRA gradients match the unpatched adapter model."""
    peft = pytest.importorskip("peft")
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.0,
                init_lora_weights=False)   # random B too, so the adapters change the output
    torch.manual_seed(11)
    theirs = peft.get_peft_model(_model(), peft.LoraConfig(**lora))
    torch.manual_seed(11)
    mine = hf.apply_kernels(peft.get_peft_model(_model(), peft.LoraConfig(**lora)))
    assert mine.base_model.model.config._attn_implementation == hf.ATTENTION
    ids, labels = _batch()
    (their_out, their_grads), (my_out, my_grads) = (loss_and_grads(m, input_ids=ids, labels=labels)
                                                    for m in (theirs, mine))
    assert set(my_grads) == set(their_grads) and all("lora_" in n for n in my_grads)
    torch.testing.assert_close(my_out.loss, their_out.loss, rtol=1e-5, atol=1e-6)
    for name, grad in their_grads.items():
        torch.testing.assert_close(my_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_torch_compile_of_the_patched_model(backend):
    torch._dynamo.reset()
    model = _model(patched=True)
    compiled = torch.compile(model, backend="aot_eager")
    ids, labels = _batch()
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(compiled.train()(ids, labels=labels).loss, model.train()(ids, labels=labels).loss,
                                   rtol=1e-5, atol=1e-6)


@pytest.fixture
def class_patch():
    hf.apply_kernels()
    yield
    hf.remove_kernels()


def test_class_patch_reaches_models_built_afterwards(class_patch, tmp_path):
    """apply_kernels() with no model: a model built afterwards, and one from from_pretrained, run the
    kernels and "qwen3_kernels" attention; remove_kernels() puts transformers' forwards back."""
    make_hf_model().save_pretrained(tmp_path)
    loaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").to(KERNEL_DEVICE)
    built = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY))
    m = transformers.models.qwen3.modeling_qwen3
    for model in (loaded, built):
        assert model.config._attn_implementation == hf.ATTENTION
    assert m.Qwen3RMSNorm.forward is hf._rms_norm_forward and m.Qwen3Attention.forward is hf._attention_forward
    ids, _ = _batch()
    with torch.no_grad():
        ours = loaded.eval()(ids).logits
    hf.remove_kernels()
    assert m.Qwen3RMSNorm.forward is hf._ORIGINAL["Qwen3RMSNorm"]
    loaded.config._attn_implementation = "sdpa"
    with torch.no_grad():
        torch.testing.assert_close(ours, loaded(ids).logits, rtol=1e-5, atol=1e-5)


def test_attn_implementation_by_name(tmp_path):
    """Registered, "qwen3_kernels" is a transformers attention implementation like any other."""
    hf.register_attention()
    make_hf_model().save_pretrained(tmp_path)
    model = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation=hf.ATTENTION).eval()
    reference = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cpu()).logits, reference(ids.cpu()).logits, rtol=1e-5, atol=1e-5)


def test_what_apply_kernels_refuses(monkeypatch):
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                                   num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(TypeError, match="got a LlamaForCausalLM with no Qwen3 model inside"):
        hf.apply_kernels(llama)
    model = _model(patched=True).train()
    ids, labels = _batch()
    with pytest.raises(ValueError, match=r"labels give \(2, 19\) targets for \(2, 6\) hidden states"):
        model(ids, labels=labels, logits_to_keep=6)
    with pytest.raises(ValueError, match="skip_logits=True needs labels"):
        model(ids, skip_logits=True)
    # transformers' lazy module object is replaced in sys.modules once submodules load
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "4.57.1")
    hf._qwen3.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"supports transformers 5.x .* transformers 4.57.1 is installed"):
            hf.apply_kernels(_model())
    finally:
        monkeypatch.undo()
        hf._qwen3.cache_clear()
