import json
import os

import pytest
import torch

# Tests choose their backend explicitly; an inherited setting must not change what they check.
os.environ.pop("QWEN3_KERNELS_BACKEND", None)
# Without a GPU the Triton kernels run through Triton's interpreter on CPU tensors. @triton.jit reads
# this when the kernels are defined, so it must be set before qwen3_kernels.ops.triton is imported.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# Tests pin each kernel's default launch config; autotuning would make GPU runs depend on timing.
os.environ["QWEN3_KERNELS_AUTOTUNE"] = "0"
try:  # define the kernels now, under the setting above, whatever test happens to import them first
    import qwen3_kernels.ops.triton  # noqa: F401,E402
except ImportError:
    pass

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6)


def make_hf_model(tie: bool = True, seed: int = 0, **overrides):
    """A small random transformers Qwen3 with every weight random, norms included."""
    torch.manual_seed(seed)
    kw = {**TINY, "tie_word_embeddings": tie, "rope_theta": 5e6, **overrides}
    config = transformers.Qwen3Config(**kw)
    config._attn_implementation = "eager"
    return randomize(transformers.Qwen3ForCausalLM(config).eval())


# A tiny Qwen3-MoE: one MoE layer (0) and one dense layer (1), 6 experts, top 2
TINY_MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True,
                decoder_sparse_step=1, mlp_only_layers=[1], router_aux_loss_coef=0.05)


def make_hf_moe_model(seed: int = 0, router_std: float = 0.5, **overrides):
    """A small random transformers Qwen3-MoE (untied head), every weight random; the routers drawn
    wider (``router_std``) so they prefer some experts, as trained ones do."""
    torch.manual_seed(seed)
    config = transformers.Qwen3MoeConfig(**{**TINY, **TINY_MOE, "tie_word_embeddings": False, "rope_theta": 5e6,
                                            **overrides})
    config._attn_implementation = "eager"
    return randomize(transformers.Qwen3MoeForCausalLM(config).eval(), router_std=router_std)


def randomize(model, std: float = 0.1, router_std: float | None = None):
    """Every weight of a transformers model drawn afresh: norms around 1, the rest N(0, std) (MoE
    routers N(0, router_std) where given)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, router_std if router_std is not None and name.endswith("mlp.gate.weight") else std)
    return model


def loss_and_grads(model, **inputs):
    """A training forward + backward: (outputs, {parameter name: its gradient})."""
    model.train()
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def load_hf(path, dtype=torch.float32, attn="sdpa"):
    """transformers' own load of a checkpoint: the ground truth the tests compare against."""
    return transformers.Qwen3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


@pytest.fixture
def triton_everywhere(monkeypatch):
    """Every op forced through Triton (on the CPU, its interpreter), choices made afresh."""
    from qwen3_kernels import ops
    pytest.importorskip("triton")
    monkeypatch.setattr(ops, "_choices", {})
    monkeypatch.setenv(ops.BACKEND_ENV, "triton")


@pytest.fixture(params=["reference", "triton"])
def backend(request, monkeypatch):
    """Every op through the eager reference, then forced through Triton."""
    from qwen3_kernels import ops
    monkeypatch.setattr(ops, "_choices", {})
    if request.param == "triton":
        request.getfixturevalue("triton_everywhere")
    return request.param


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Writes a random transformers Qwen3 to disk in ``dtype``; returns (directory, transformers model
    loaded back from it in ``dtype``)."""

    def write(tie=True, dtype=torch.float32, max_shard_size=None, **overrides):
        model = make_hf_model(tie=tie, **overrides).to(dtype)
        path = tmp_path / f"ckpt_tie{tie}_{str(dtype)[6:]}_{max_shard_size}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return path, load_hf(path, dtype)

    return write


def edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = ["Hello world! How are you today?", "héllo wörld, ça va? naïve café", "你好，世界。今天天气很好。",
          "こんにちは世界", "emoji: 🙂🚀✨ and math: ∑ x² ≤ ∞", "The quick brown fox jumps over the lazy dog."] * 20


def write_tokenizer(path, eos="<|im_end|>", generation=True):
    """A small byte-level BPE tokenizer in Qwen3's layout: tokenizer.json, tokenizer_config.json and
    generation_config.json (the real Qwen3 files cannot be downloaded here)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": eos, "pad_token": "<|endoftext|>",
        "added_tokens_decoder": {str(tok.token_to_id(t)): {"content": t, "special": True} for t in SPECIAL_TOKENS}}))
    if generation:
        (path / "generation_config.json").write_text(json.dumps({
            "eos_token_id": [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")],
            "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}))
    return tok
