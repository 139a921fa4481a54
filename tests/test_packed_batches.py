"""Padding-free batches: the packing helper, and the model on packed examples (position_ids or
cu_seqlens) against the same examples run one by one: logits, loss and every gradient."""

import pytest
import torch
from qwen3_kernels_testing.kernels import KERNEL_DEVICE

from qwen3_kernels import QWEN, Config
from qwen3_kernels.data import pack_examples

CONFIG = Config(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=80, max_position_embeddings=64)
LENGTHS = (5, 1, 19, 7, 2)  # one token, odd lengths, one longer than the interpreter's 16-token tiles


def _examples():
    g = torch.Generator().manual_seed(4)
    return [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in LENGTHS]


@pytest.fixture
def model(backend):
    torch.manual_seed(0)
    return QWEN(CONFIG, fused=backend == "triton").to(KERNEL_DEVICE)


def test_pack_examples_fills_a_token_budget():
    examples = _examples()
    prompt_masked = [[-100] * min(2, len(e)) + e[2:] for e in examples]
    batches = list(pack_examples(examples, max_tokens=20, labels=prompt_masked))
    assert [b.cu_seqlens.tolist() for b in batches] == [[0, 5, 6], [0, 19], [0, 7, 9]]
    first = batches[0]
    assert first.input_ids.tolist() == [examples[0] + examples[1]]
    assert first.position_ids.tolist() == [[0, 1, 2, 3, 4, 0]]
    assert first.labels.tolist() == [[-100, -100] + examples[0][2:] + [-100]]  # -100 at each example's start
    assert first.max_seqlen == 5 and first.cu_seqlens.dtype == torch.int32
    with pytest.raises(ValueError, match="example 2 has 19 tokens, more than max_tokens=10"):
        list(pack_examples(examples, max_tokens=10))
    with pytest.raises(ValueError, match="example 0: 5 tokens but 4 labels"):
        list(pack_examples(examples, max_tokens=64, labels=[e[1:] for e in examples]))


def test_packed_logits_equal_each_example_alone(model):
    examples = _examples()
    batch = next(pack_examples(examples, max_tokens=64)).to(KERNEL_DEVICE)
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([e], device=KERNEL_DEVICE)) for e in examples], dim=1)
        by_positions = model(batch.input_ids, position_ids=batch.position_ids)
        by_cu_seqlens = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_cu_seqlens, alone, rtol=1e-5, atol=1e-5)


def test_packed_loss_and_gradients_equal_the_examples_one_by_one(model):
    """Summed over the examples (num_items_in_batch: one normaliser for all), the packed loss and every
    parameter gradient are those of the examples run alone: no loss crosses an example boundary."""
    examples = _examples()
    batch = next(pack_examples(examples, max_tokens=64)).to(KERNEL_DEVICE)
    counted = int((batch.labels[:, 1:] != -100).sum())
    packed = model(batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
                   num_items_in_batch=counted)
    packed_grads = torch.autograd.grad(packed, list(model.parameters()))
    alone = sum(model(ids, labels=ids, num_items_in_batch=counted)
                for ids in (torch.tensor([e], device=KERNEL_DEVICE) for e in examples))
    alone_grads = torch.autograd.grad(alone, list(model.parameters()))
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-6)
    for (name, _), g, e in zip(model.named_parameters(), packed_grads, alone_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6, msg=name)


def test_the_context_limits_each_packed_example_not_the_row(model):
    """Three examples of 30, 29 and 23 tokens packed into one 82-token row of a model whose context is
    64 tokens (the trainer packs 65,536 tokens for a 40,960-token Qwen3): each gets its logits alone."""
    g = torch.Generator().manual_seed(5)
    examples = [torch.randint(0, CONFIG.vocab_size, (n,), generator=g).tolist() for n in (30, 29, 23)]
    batch = next(pack_examples(examples, max_tokens=96)).to(KERNEL_DEVICE)
    assert batch.input_ids.shape[1] > CONFIG.max_position_embeddings
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([e], device=KERNEL_DEVICE)) for e in examples], dim=1)
        by_positions = model(batch.input_ids, position_ids=batch.position_ids)
        by_cu_seqlens = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_cu_seqlens, alone, rtol=1e-5, atol=1e-5)


def test_one_row_of_positions_not_starting_at_0_is_one_sequence(model):
    """position_ids 3..18 on one row continue a sequence from position 3 (transformers: rotary positions
    3..18, causal over the row), exactly what the same row gives in a batch of two, where the positions
    are never read as packing."""
    ids = torch.randint(0, CONFIG.vocab_size, (1, 16), generator=torch.Generator().manual_seed(6))
    ids = ids.to(KERNEL_DEVICE)
    positions = torch.arange(3, 19, device=KERNEL_DEVICE)[None]
    with torch.no_grad():
        one_row = model(ids, position_ids=positions)
        in_a_batch = model(ids.expand(2, -1), position_ids=positions.expand(2, -1))[:1]
    torch.testing.assert_close(one_row, in_a_batch, rtol=1e-5, atol=1e-5)


def test_bad_packed_inputs_are_named():
    model = QWEN(CONFIG)
    ids = torch.randint(0, CONFIG.vocab_size, (1, 6))
    too_long = torch.randint(0, CONFIG.vocab_size, (1, 70))
    with pytest.raises(ValueError, match=r"a packed example of 65 tokens exceeds the model's max context "
                                         r"\(max_position_embeddings=64\)"):
        model(too_long, cu_seqlens=torch.tensor([0, 5, 70], dtype=torch.int32), max_seqlen=65)
    with pytest.raises(ValueError, match="a packed example of 65 tokens exceeds"):
        model(too_long, position_ids=torch.cat([torch.arange(5), torch.arange(65)])[None])
    with pytest.raises(ValueError, match="sequence length 70 exceeds the model's max context"):
        model(too_long)
    with pytest.raises(ValueError, match=r"position_ids shape \(1, 5\) must equal input_ids shape \(1, 6\)"):
        model(ids, position_ids=torch.arange(5)[None])
    with pytest.raises(ValueError, match="cannot continue a KV cache"), torch.no_grad():
        model(ids, model.new_cache(1, 16), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens must run from 0 to the 6 packed tokens"):
        model(ids, cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32))
