"""Padding-free batches: the packing helper, and the model on packed examples (position_ids or
cu_seqlens) against the same examples run one by one: logits, loss and every gradient; position_ids
read as transformers reads them; the context limiting each example, not the row."""

import pytest
import torch
from conftest import TINY, load_hf
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import ATOL, KERNEL_DEVICE

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


def _assert_packed_logits_equal_each_example_alone(model, examples, max_tokens):
    batch = next(pack_examples(examples, max_tokens=max_tokens)).to(KERNEL_DEVICE)
    with torch.no_grad():
        alone = torch.cat([model(torch.tensor([e], device=KERNEL_DEVICE)) for e in examples], dim=1)
        by_positions = model(batch.input_ids, position_ids=batch.position_ids)
        by_cu_seqlens = model(batch.input_ids, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
    torch.testing.assert_close(by_positions, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(by_cu_seqlens, alone, rtol=1e-5, atol=1e-5)
    return batch


def test_packed_logits_equal_each_example_alone(model):
    _assert_packed_logits_equal_each_example_alone(model, _examples(), 64)


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
    batch = _assert_packed_logits_equal_each_example_alone(model, examples, 96)
    assert batch.input_ids.shape[1] > CONFIG.max_position_embeddings


# position_ids as transformers reads them: a sequence starts at each row's first token and wherever
# the position does not go up by one; (rows of positions, batch size): one row may serve every row
POSITION_IDS = {
    "one row continued from 3": ([list(range(3, 19))], 1),
    "a jump starts a sequence": ([[*range(7), *range(10, 19)]], 1),
    "two rows, the first packed": ([[*range(7), *range(9)], list(range(2, 18))], 2),
    "one row of positions for two": ([[*range(5), *range(11)]], 2),
}


@pytest.mark.parametrize("rows, batch", POSITION_IDS.values(), ids=POSITION_IDS.keys())
def test_position_ids_mark_sequences_as_in_transformers(backend, hf_checkpoint, rows, batch):
    """position_ids 3..18 on one row are one sequence continued from position 3 (rotary positions 3..18,
    causal over the row), not a malformed packed batch; a jump in the positions starts a sequence, in
    any row. Logits and loss are transformers' for the same input (Qwen3ForCausalLM without a cache,
    as in training), within the rule against float64."""
    path, _ = hf_checkpoint()
    model = QWEN.from_pretrained(path, device=KERNEL_DEVICE, fused=backend == "triton")
    exact, eager = (load_hf(path, dtype).to(KERNEL_DEVICE) for dtype in (torch.float64, torch.float32))
    positions = torch.tensor(rows, device=KERNEL_DEVICE)
    ids = torch.randint(0, TINY["vocab_size"], (batch, positions.shape[1]), generator=torch.Generator().manual_seed(6))
    ids = ids.to(KERNEL_DEVICE)
    with torch.no_grad():
        ours = model(ids, position_ids=positions), model(ids, position_ids=positions, labels=ids)
        theirs, truth = ((out.logits, out.loss) for out in (
            m(input_ids=ids, position_ids=positions, labels=ids, use_cache=False) for m in (eager, exact)))
    for name, mine, their, true in zip(("logits", "loss"), ours, theirs, truth):
        assert_within_rule(mine, their, true, atol=ATOL[torch.float32], name=name)


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
    with pytest.raises(ValueError, match="sequence length 70 exceeds the model's max context"):
        model(too_long, position_ids=torch.arange(70)[None])  # one sequence, nothing packed
    with pytest.raises(ValueError, match=r"position_ids reach 69, beyond the model's max context "
                                         r"\(max_position_embeddings=64: positions 0 .. 63\)"):
        model(ids, position_ids=torch.arange(64, 70)[None])
    with pytest.raises(ValueError, match="position_ids must not be negative, got -2"):
        model(ids, position_ids=torch.arange(-2, 4)[None])
    with pytest.raises(TypeError, match="position_ids must be an int64 .* got torch.float32"):
        model(ids, position_ids=torch.arange(6.0)[None])
    with pytest.raises(ValueError, match=r"cu_seqlens packs examples into one row: input_ids must be \(1, total\), "
                                         r"got \(2, 6\)"):
        model(ids.expand(2, -1), cu_seqlens=torch.tensor([0, 6], dtype=torch.int32))
    with pytest.raises(ValueError, match="position_ids and cu_seqlens cannot continue a KV cache"), torch.no_grad():
        model(ids.expand(2, -1), model.new_cache(2, 16), position_ids=torch.arange(6).expand(2, -1))
