"""generate() against transformers' generate, cached decode against full recompute, batching,
sampling."""

import pytest
import torch
from conftest import TINY
from qwen3_kernels_testing.float64 import assert_greedy_within
from qwen3_kernels_testing.kernels import KERNEL_DEVICE, needs_triton

from qwen3_kernels import QWEN, ops
from qwen3_kernels.generation import sample_next_token


def _ids(batch, seq, seed=0):
    return torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def pair(hf_checkpoint):
    path, hf = hf_checkpoint(tie=True)
    return QWEN.from_pretrained(path), hf


def test_greedy_matches_transformers(pair):
    model, hf = pair
    ids = _ids(2, 7)
    ours = model.generate(ids, 25)
    theirs = hf.generate(ids, max_new_tokens=25, do_sample=False, pad_token_id=0)
    assert ours.shape == (2, 32) and torch.equal(ours, theirs)


def test_greedy_stops_at_eos_and_pads_like_transformers(pair):
    model, hf = pair
    ids = _ids(2, 5, seed=3)
    free_run = model.generate(ids, 12)
    eos = int(free_run[0, 5 + 3])  # the 4th token sequence 0 produces becomes the EOS
    ours = model.generate(ids, 12, eos_token_id=[eos, 9999])
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=[eos, 9999], pad_token_id=eos)
    assert torch.equal(ours, theirs)
    assert (ours[0, 5 + 4:] == eos).all()


def test_left_padded_batch_matches_one_by_one_and_transformers(pair):
    model, hf = pair
    ids = _ids(3, 9, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :8] = 0
    ids = ids.masked_fill(mask == 0, 0)
    batched = model.generate(ids, 8, attention_mask=mask)
    for row, pad in enumerate((0, 4, 8)):
        alone = model.generate(ids[row:row + 1, pad:], 8)
        assert torch.equal(batched[row, pad:], alone[0])
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(batched, theirs)


def test_cached_decode_logits_equal_full_recompute(pair):
    model, _ = pair
    ids = _ids(2, 30, seed=7)
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 40)
        chunks = [model(ids[:, :11], cache)] + [model(ids[:, t:t + 1], cache) for t in range(11, 30)]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.lens.tolist() == [30, 30]


def test_stream_yields_every_token_as_it_comes(pair):
    model, _ = pair
    ids = _ids(1, 4)
    seen = []
    out = model.generate(ids, 6, stream=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 4:].tolist()
    assert [int(t[0]) for t in model.generate_stream(ids, 6)] == seen


def test_seeded_sampling_is_reproducible(pair):
    model, _ = pair
    ids = _ids(2, 4)

    def run(seed):
        return model.generate(ids, 10, temperature=0.8, top_k=20, top_p=0.9,
                              generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


def test_top_k_and_top_p_keep_exactly_the_right_tokens():
    # probabilities 0.4, 0.3, 0.2, 0.1 (and 0 for the rest)
    probs = torch.tensor([[0.1, 0.4, 0.0, 0.2, 0.3]])
    logits = probs.clamp_min(1e-30).log()
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next_token(logits, 1.0, generator=g, **kw)) for _ in range(400)}  # noqa: E731
    assert draws(top_k=2) == {1, 4}
    assert draws(top_p=0.65) == {1, 4}        # 0.4 + 0.3 reaches 0.65
    assert draws(top_p=0.75) == {1, 4, 3}     # needs the 0.2 token as well
    assert draws(top_k=3, top_p=0.5) == {1, 4}
    assert draws() == {0, 1, 3, 4}            # a zero-probability token is never drawn
    assert int(sample_next_token(logits, 0.0)) == 1
    # frequencies follow the distribution
    counts = torch.bincount(torch.stack([sample_next_token(logits, 1.0, generator=g) for _ in range(4000)]).flatten(),
                            minlength=5).float() / 4000
    torch.testing.assert_close(counts, probs[0], atol=0.03, rtol=0)


def test_vocab_size_limits_the_ids_drawn(pair):
    """generate(vocab_size=n) draws only ids below n (the tokenizer's tokens, not the model's spare
    embedding rows, which published Qwen3 checkpoints have); greedy picks the best of those."""
    model, _ = pair
    ids, n = _ids(2, 5), 50

    def hot(**kw):  # a temperature at which nearly every id is likely
        return model.generate(ids, 20, temperature=5.0, generator=torch.Generator().manual_seed(0), **kw)[:, 5:]

    assert hot().max() >= n and hot(vocab_size=n).max() < n
    with torch.no_grad():
        best = model(ids)[:, -1, :n].argmax(-1)
    assert torch.equal(model.generate(ids, 1, vocab_size=n)[:, 5], best)


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
    (dict(max_new_tokens=5, temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(max_new_tokens=5, top_k=0), "top_k must be a positive integer"),
    (dict(max_new_tokens=5, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=5, vocab_size=0), "vocab_size must be a positive integer"),
    (dict(max_new_tokens=60), r"prompt of 7 tokens plus max_new_tokens=60 exceeds .*max_position_embeddings=64"),
])
def test_bad_generate_arguments(pair, kwargs, message):
    model, _ = pair
    with pytest.raises(ValueError, match=message):
        model.generate(_ids(1, 7), **kwargs)


def test_right_padding_is_rejected(pair):
    model, _ = pair
    mask = torch.tensor([[1, 1, 0]])
    with pytest.raises(ValueError, match="attention_mask row 0 is not left-padded"):
        model.generate(_ids(1, 3), 2, attention_mask=mask)


@needs_triton
def test_fused_greedy_matches_reference(pair, monkeypatch):
    model, _ = pair
    monkeypatch.setattr(ops, "_choices", {})
    if KERNEL_DEVICE == "cpu":  # on a GPU, `auto` picks the kernels by itself
        monkeypatch.setattr(ops, "_device_supports_triton", lambda device, dtype, requested: (True, "interpreter"))
    fused = QWEN(model.config, fused=True)
    fused.load_state_dict(model.state_dict())
    fused = fused.to(KERNEL_DEVICE)
    ids = _ids(2, 6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    out = fused.generate(ids.to(KERNEL_DEVICE), 6, attention_mask=mask.to(KERNEL_DEVICE))
    if KERNEL_DEVICE == "cpu":  # the interpreter rounds as eager fp32 does here: token for token
        assert torch.equal(out, model.generate(ids, 6, attention_mask=mask))
    else:  # compiled kernels (approximate exp2/rsqrt, FMA contraction) vs the CPU: by the logits
        assert torch.equal(out[:, :6].cpu(), ids)
        assert_greedy_within(model, out, 6, mask)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the GPU kernels need a GPU")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_graph_decode_matches_eager_decode_on_gpu(hf_checkpoint, fused):
    path, _ = hf_checkpoint(tie=True)
    model = QWEN.from_pretrained(path, device="cuda", fused=fused)
    ids = _ids(3, 9).cuda()
    mask = torch.ones_like(ids)
    mask[2, :5] = 0
    graphed = model.generate(ids, 20, attention_mask=mask, cuda_graph=True)
    eager = model.generate(ids, 20, attention_mask=mask, cuda_graph=False)
    # Exact equality is the contract here: a graph replays the very kernels of the eager step, with
    # the same launch configs on the same inputs, and none of them uses atomics.
    assert torch.equal(graphed, eager)
    # Against the CPU reference, rounding differs (approximate exp2/rsqrt, FMA contraction on the GPU).
    assert_greedy_within(QWEN.from_pretrained(path, device="cpu"), eager, 9, mask)


def test_greedy_rule_accepts_the_reference_and_rejects_a_lesser_token(pair):
    """The check GPU runs use against the CPU reference (float64.assert_greedy_within)."""
    model, _ = pair
    ids = _ids(2, 6)
    out = model.generate(ids, 5)
    assert_greedy_within(model, out, 6)
    with torch.no_grad():
        step = model(out[:1, :8])[0, -1]
    wrong = out.clone()
    wrong[0, 8] = int(step.argmin())  # far below the best logit at that position
    with pytest.raises(AssertionError, match="below the reference's best logit"):
        assert_greedy_within(model, wrong, 6)
