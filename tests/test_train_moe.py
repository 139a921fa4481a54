"""``qwen3-kernels train`` on a tiny Qwen3-MoE checkpoint (CPU, gloo): the load-balancing loss on by
default and logged with the expert load, two ranks (which route their different tokens to different
experts) equal to one process, and the output in the published per-expert layout that transformers'
Qwen3MoeForCausalLM loads with our logits."""

import json
import os

import pytest
import torch
from conftest import TINY_MOE, make_hf_model, make_hf_moe_model, write_tokenizer
from test_train import _metrics, _torchrun_2_ranks, _train, _weights, data  # noqa: F401

from qwen3_kernels import QWEN

transformers = pytest.importorskip("transformers")

MOE = dict(TINY_MOE, router_aux_loss_coef=0.02)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-moe") / "qwen3-moe-tiny"
    vocab = write_tokenizer(path).get_vocab_size()
    make_hf_moe_model(vocab_size=vocab, max_position_embeddings=128, router_aux_loss_coef=0.02).save_pretrained(path)
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
    path = tmp_path / "dense"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=128).save_pretrained(path)
    write_tokenizer(path)
    assert _train(path, data, tmp_path / "out", "--router-aux-loss-coef", "0.01") == 1
    assert "is a dense Qwen3 (no Mixture-of-Experts layer)" in capsys.readouterr().err


# --- disjoint routing under FSDP2 --------------------------------------------------------------------

DISJOINT = dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                intermediate_size=48, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
                moe_intermediate_size=24)


def _routing_by_parity():
    """A model whose router sends even token ids to experts {0, 1} and odd ones to {2, 3} in every
    layer: attention adds nothing (o_proj is zero), each embedding's first feature is +5 (even) or -5
    (odd), and the routers score experts 0, 1 by that feature and 2, 3 by its negative."""
    from qwen3_kernels import Config
    torch.manual_seed(0)
    model = QWEN(Config(**DISJOINT))
    with torch.no_grad():
        sign = torch.tensor([1.0 if t % 2 == 0 else -1.0 for t in range(DISJOINT["vocab_size"])])
        model.embeddings.weight[:, 0] = 5.0 * sign
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.ffn.experts.down_proj.mul_(0.01)  # the residual stream keeps its first feature's sign
            block.ffn.gate.weight.zero_()
            block.ffn.gate.weight[:2, 0], block.ffn.gate.weight[2:, 0] = 10.0, -10.0
    return model


def _rank_ids(rank: int) -> torch.Tensor:
    return torch.arange(rank, DISJOINT["vocab_size"], 2)[:13][None]  # even ids on rank 0, odd on rank 1


def _disjoint_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _routing_by_parity()
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        ids = _rank_ids(rank)
        loss, stats = model(ids, labels=ids, output_router_logits=True, return_aux=True)
        loss.backward()
        grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
        if rank == 0:
            torch.save(grads, os.path.join(out, "grads.pt"))
        torch.save(stats.tokens_per_expert, os.path.join(out, f"counts{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_routing_to_disjoint_experts_equal_one_process(tmp_path):
    """Rank 0's tokens go only to experts 0 and 1, rank 1's only to 2 and 3: FSDP2 gathers each block's
    stacked experts on both ranks all the same, so the step completes (nothing waits on an expert
    another rank never used) and the averaged gradients equal one process's over both batches."""
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_disjoint_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    counts = [torch.load(tmp_path / f"counts{r}.pt") for r in (0, 1)]
    assert (counts[0][:, 2:] == 0).all() and (counts[0][:, :2] > 0).all()   # disjoint, in every MoE layer
    assert (counts[1][:, :2] == 0).all() and (counts[1][:, 2:] > 0).all()
    model = _routing_by_parity()
    for rank in (0, 1):
        ids = _rank_ids(rank)
        (model(ids, labels=ids, output_router_logits=True) / 2).backward()  # FSDP averages over the ranks
    grads = torch.load(tmp_path / "grads.pt")
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6, msg=name)
