"""torch.compile(fullgraph=True) of the reference model (fused=False), which every CPU user runs:
dynamic sequence lengths and a forward over a KV cache must trace without graph breaks and match eager."""

import torch

from qwen3_kernels import QWEN, Config

CONFIG = Config(vocab_size=101, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                intermediate_size=96, max_position_embeddings=64)


def _model():
    torch.manual_seed(0)
    return QWEN(CONFIG).eval()


def test_reference_model_compiles_for_several_lengths():
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True, backend="aot_eager")
    ids = torch.randint(0, 101, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for T in (5, 9, 13, 1):
            torch.testing.assert_close(compiled(ids[:, :T]), model(ids[:, :T]), rtol=1e-5, atol=1e-5)


def test_reference_model_compiles_over_a_kv_cache():
    torch._dynamo.reset()
    model = _model()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    ids = torch.randint(0, 101, (2, 12), generator=torch.Generator().manual_seed(2))
    eager_cache, compiled_cache = model.new_cache(2, 32), model.new_cache(2, 32)
    with torch.no_grad():
        for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:9], ids[:, 9:12]):  # prefill, two decode steps, a chunk
            torch.testing.assert_close(compiled(chunk, compiled_cache), model(chunk, eager_cache), rtol=1e-5, atol=1e-5)
    assert torch.equal(compiled_cache.lens, eager_cache.lens)
