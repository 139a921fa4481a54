"""``qwen3-kernels train`` on a tiny Qwen3-MoE checkpoint (CPU, gloo): the load-balancing loss on by
default and logged with the expert load, two ranks (which route their different tokens to different
experts) equal to one process, and the output in the published per-expert layout that transformers'
Qwen3MoeForCausalLM loads with our logits."""

import json

import pytest
import torch
from conftest import TINY, write_tokenizer
from test_train import STEPS, _metrics, _torchrun_2_ranks, _train, _weights, data  # noqa: F401

from qwen3_kernels import QWEN

transformers = pytest.importorskip("transformers")

MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=40, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[1], router_aux_loss_coef=0.02)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-moe") / "qwen3-moe-tiny"
    tok = write_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(**{**TINY, **MOE, "vocab_size": tok.get_vocab_size(),
                                            "max_position_embeddings": 128, "tie_word_embeddings": False})
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1 if "gate.weight" not in name else 0.5)
    model.save_pretrained(path)
    write_tokenizer(path)
    return path


def test_moe_run_logs_the_aux_loss_and_the_expert_load(moe_checkpoint, data, tmp_path):
    out = tmp_path / "out"
    assert _train(moe_checkpoint, data, out, "--steps", "2") == 0
    for m in _metrics(out):
        assert m["aux_loss"] >= 0.99  # E * sum f_e P_e is at least about 1 (1 for an even router)
        assert 0.0 <= m["expert_load_min"] <= 1 / MOE["num_experts"] <= m["expert_load_max"] <= 1 / MOE[
            "num_experts_per_tok"]
    # the published per-expert layout, which transformers reads with our logits
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"] \
        if (out / "model.safetensors.index.json").exists() else _weights(out)
    assert "model.layers.0.mlp.experts.5.down_proj.weight" in keys and "model.layers.0.mlp.gate.weight" in keys
    ours = QWEN.from_pretrained(out)
    theirs = transformers.Qwen3MoeForCausalLM.from_pretrained(out).eval()
    theirs.config._experts_implementation = "eager"
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_the_aux_loss_coefficient_moves_the_router_only(moe_checkpoint, data, tmp_path):
    """--router-aux-loss-coef 0 and a large one: the same LM loss at step 1 (the aux loss is not in
    the logged loss), different router weights after it, the same embedding gradient path untouched
    by the coefficient at step 1."""
    runs = {}
    for coef in ("0", "5"):
        out = tmp_path / coef
        assert _train(moe_checkpoint, data, out, "--steps", "1", "--router-aux-loss-coef", coef) == 0
        runs[coef] = (_metrics(out)[0], _weights(out))
    (m0, w0), (m5, w5) = runs["0"], runs["5"]
    assert m0["loss"] == pytest.approx(m5["loss"], rel=1e-6)
    assert not torch.equal(w0["model.layers.0.mlp.gate.weight"], w5["model.layers.0.mlp.gate.weight"])


def test_two_ranks_route_differently_and_match_one_process(moe_checkpoint, data, tmp_path):
    """Each rank's micro-batches send tokens to experts the other rank's do not use as much: every
    rank still gathers every expert (one stacked parameter per block), so nothing waits, and the
    losses, aux losses and weights equal one process's."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(moe_checkpoint, data, one, "--steps", "2") == 0
    result = _torchrun_2_ranks(moe_checkpoint, data, two, "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        for key in ("loss", "aux_loss", "expert_load_max", "expert_load_min"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
    mine, theirs = _weights(one), _weights(two)
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-5, atol=1e-5, msg=name)


def test_router_aux_loss_coef_on_a_dense_model_is_refused(data, tmp_path, capsys):
    from test_train import checkpoint as _  # noqa: F401
    import conftest
    path = tmp_path / "dense"
    tok = write_tokenizer(path)
    conftest.make_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=128).save_pretrained(path)
    write_tokenizer(path)
    assert _train(path, data, tmp_path / "out", "--router-aux-loss-coef", "0.01") == 1
    assert "is a dense Qwen3 (no Mixture-of-Experts layer)" in capsys.readouterr().err
