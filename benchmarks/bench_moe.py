"""The Qwen3-MoE experts at 30B-A3B shapes (hidden 2048, expert FFN 768, 128 experts, top 8, bf16):
an 8,192-token block forward and forward+backward, and decode-sized blocks (1 and 64 tokens)
forward, against the eager expert loop (``ops.reference.moe_experts``, transformers' rounding
order), ``torch._grouped_mm`` where this torch has it, and Liger-Kernel's fused MoE when
``liger_kernel`` is installed. Routing is fixed per case (softmax top-k of random router logits), so
every provider computes the same experts."""

import pytest
import torch
from benchmarks.conftest import needs_gpu, run

from qwen3_kernels.ops import reference

pytestmark = needs_gpu
HIDDEN, INTER, EXPERTS, TOP_K = 2048, 768, 128, 8
PROVIDERS = ["triton", "eager", "grouped_mm", "liger"]


def _grouped_mm_experts(hidden, expert_ids, weights, gate_up, down):
    """The experts through ``torch._grouped_mm``: rows sorted by expert, one grouped GEMM per
    projection, SwiGLU between, then the weighted rows summed back per token."""
    N, k = expert_ids.shape
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    x = hidden[order // k]
    gu = torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs)
    gate, up = gu.chunk(2, dim=-1)
    y = torch._grouped_mm(torch.nn.functional.silu(gate) * up, down.transpose(-2, -1), offs=offs)
    y = y * weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden).index_add_(0, order // k, y)


def _impl(provider):
    if provider == "triton":
        from qwen3_kernels.ops.triton import moe
        return moe.moe_experts
    if provider == "eager":
        return reference.moe_experts
    if provider == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
        return _grouped_mm_experts
    fused_moe = pytest.importorskip("liger_kernel.ops.fused_moe")
    return lambda h, ids, w, gu, dn: fused_moe.LigerFusedMoEFunction.apply(h, gu, dn, ids.to(torch.int32), w)


def _inputs(tokens, grads):
    g = torch.Generator("cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    hidden = torch.randn(tokens, HIDDEN, generator=g, **kw)
    gate_up = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g, **kw) * HIDDEN ** -0.5
    down = torch.randn(EXPERTS, HIDDEN, INTER, generator=g, **kw) * INTER ** -0.5
    logits = torch.randn(tokens, EXPERTS, generator=g, device="cuda")
    weights, expert_ids = reference.moe_route(logits, TOP_K)
    leaves = [t.requires_grad_(grads) for t in (hidden, weights.to(torch.bfloat16), gate_up, down)]
    return leaves[0], expert_ids, leaves[1], leaves[2], leaves[3]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("tokens, backward", [(8192, False), (8192, True), (1, False), (64, False)],
                         ids=["8192-fwd", "8192-fwd+bwd", "1-fwd", "64-fwd"])
def test_moe_experts(benchmark, peak, provider, tokens, backward):
    fn = _impl(provider)
    hidden, expert_ids, weights, gate_up, down = _inputs(tokens, backward)
    if backward:
        leaves = (hidden, weights, gate_up, down)

        def step(*args):
            out = fn(*args)
            torch.autograd.grad(out, leaves, torch.ones_like(out))
    else:
        def step(*args):
            with torch.no_grad():
                fn(*args)

    try:
        step(hidden, expert_ids, weights, gate_up, down)  # compile, and the check that the provider runs here
    except (RuntimeError, NotImplementedError) as e:  # torch._grouped_mm needs sm_90 (or newer torch on sm_80)
        if provider != "grouped_mm":
            raise
        pytest.skip(f"torch._grouped_mm does not run here: {e}")
    rows = tokens * TOP_K
    flops = 6.0 * rows * HIDDEN * INTER * (3 if backward else 1)  # two GEMMs forward; backward twice that
    run(benchmark, step, [(hidden, expert_ids, weights, gate_up, down)],
        op="moe_experts " + ("fwd+bwd" if backward else "fwd"),
        shape=f"{tokens}x{HIDDEN}x{INTER}x{EXPERTS}/top{TOP_K}", provider=provider, peak=peak, flops=flops,
        rounds=10 if tokens > 64 else 50)


def _active_bytes_per_token(config) -> int:
    """The weights one decode token reads from a 30B-A3B-shaped model: every layer's attention
    projections, QK norms, router and k of its E experts, the final norm and the LM head (the
    embedding row is negligible), in bf16."""
    C, D, H, Hkv = config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads
    attention = C * (H + 2 * Hkv) * D + H * D * C
    experts = config.num_experts_per_tok * 3 * config.moe_intermediate_size * C
    per_layer = attention + config.num_experts * C + experts
    return 2 * (config.num_layers * per_layer + config.vocab_size * C)


@needs_gpu
def test_gpu_moe_decode(benchmark, peak):
    """Batch-1 greedy decode of a whole 30B-A3B-shaped model (random bf16 weights, 48 layers, 61 GB):
    tokens/s, and the bandwidth of its active weights (about 6 GB a token); goal: >= 60% of the
    weight-streaming limit."""
    from qwen3_kernels import QWEN, Config
    config = Config.preset("30B-A3B")
    total = torch.cuda.get_device_properties(0).total_memory
    if total < 72 * 2**30:
        pytest.skip(f"a 30B-A3B-shaped model needs about 62 GB; this GPU has {total / 2**30:.0f} GiB")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = QWEN(config, fused=True)
    model = model.to(torch.bfloat16).to_empty(device="cuda").reset_parameters().eval()
    ids = torch.randint(0, config.vocab_size, (1, 128), device="cuda")
    new = 64

    def step(ids):
        with torch.inference_mode():
            model.generate(ids, new)

    run(benchmark, step, [(ids,)], op="moe model decode", shape=f"1x128+{new}", provider="triton", peak=peak,
        bytes=_active_bytes_per_token(config) * new, rounds=3, warmup=1)
    benchmark.extra_info["tokens_per_s"] = new / benchmark.stats.stats.median
