"""Causal GQA attention: prefill forward and forward+backward at S = 512..16k with B*S = 16k, and
split-KV decode at batch 1/8/64 over 1k..32k of context. Qwen3-0.6B heads (16 query, 8 KV, D 128).
Providers: ``triton`` the Triton kernels themselves (their autotuned forward tile and backward
design, recorded in extra_info), ``served`` what ``ops.attention`` serves (the Triton kernels or
the SDPA backend that won the race on that shape, recorded too), every SDPA backend (cuDNN, flash,
memory-efficient) with native GQA, flash_attn when installed, and the eager reference."""

import pytest
import torch
import torch.nn.functional as F
from benchmarks.conftest import input_sets, needs_gpu, run

from benchmarks.roofline import attention_flops, decode_kv_bytes
from qwen3_kernels.ops import reference

pytestmark = needs_gpu
H, HKV, D = 16, 8, 128
PREFILL = [512, 2048, 4096, 8192, 16384]
try:
    import flash_attn  # noqa: F401
    HAS_FLASH_ATTN = True
except ImportError:
    HAS_FLASH_ATTN = False


SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}


def _sdpa(backend_name):
    """SDPA pinned to one backend, K/V shared across each query group by SDPA itself
    (``enable_gqa``), never expanded inside the timed call. The report compares against the fastest
    backend the card offers (cuDNN attention is usually it on Hopper). One query over a cache sees
    every key, which SDPA's top-left causal mask would not allow, so decode runs non-causal."""
    backend = getattr(torch.nn.attention.SDPBackend, backend_name)

    def sdpa(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        with torch.nn.attention.sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True).transpose(1, 2)
    return sdpa


def _impl(provider):
    from qwen3_kernels.ops.triton import attention
    if provider == "triton":  # the Triton kernels even where SDPA won the race (decode: the split-KV kernel)
        def triton_kernels(q, k, v):
            if attention.use_decode_kernel(q, k) and not torch.is_grad_enabled():
                return attention.attention(q, k, v)
            return attention._flash_attention_op(q, k, v, None, True, q.shape[-1] ** -0.5, None, 0)[0]
        return triton_kernels
    if provider == "served":
        return attention.attention
    if provider in SDPA_BACKENDS:
        return _sdpa(SDPA_BACKENDS[provider])
    if provider == "flash_attn":
        if not HAS_FLASH_ATTN:
            pytest.skip("flash_attn is not installed")
        from flash_attn import flash_attn_func
        return lambda q, k, v: flash_attn_func(q, k, v, causal=True)
    return reference.attention


def _runs(fn, inputs, backward: bool) -> None:
    """Skips an SDPA backend this card, dtype or shape does not offer (SDPA raises 'No available kernel')."""
    try:
        with torch.set_grad_enabled(backward):
            fn(*inputs[:3])
    except RuntimeError as e:
        pytest.skip(f"backend unavailable here: {str(e).splitlines()[0][:200]}")


PROVIDERS = ["triton", *SDPA_BACKENDS, "flash_attn", "eager"]


@pytest.mark.parametrize("provider", PROVIDERS + ["served"])
@pytest.mark.parametrize("S", PREFILL)
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
def test_prefill(benchmark, peak, provider, S, backward):
    fn = _impl(provider)
    B = 16384 // S

    def make(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        q = torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=backward)
        k, v = (torch.randn(B, S, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=backward)
                for _ in range(2))
        return (q, k, v, torch.randn_like(q))

    def step(q, k, v, grad):
        with torch.set_grad_enabled(backward):
            out = fn(q, k, v)
            if backward:
                torch.autograd.grad(out, (q, k, v), grad)

    flops = attention_flops(B, H, S, S, D) + (attention_flops(B, H, S, S, D, backward=True) if backward else 0)
    sets = input_sets(make, 1 << 40)
    if provider in SDPA_BACKENDS:
        _runs(fn, sets[0], backward)
    run(benchmark, step, sets, op="attention " + ("fwd+bwd" if backward else "fwd"),
        shape=f"{B}x{S}", provider=provider, peak=peak, flops=flops, rounds=10)
    from qwen3_kernels.ops.triton import attention, tuning
    q, k, v = sets[0][:3]  # tuned during the runs: the remembered choices come back, nothing is launched
    if provider == "triton":  # which forward tile and backward design the autotuner chose here
        benchmark.extra_info["forward_config"] = str(attention.tuned_fwd_config(q, k, v, True, launch=None))
        if backward:
            benchmark.extra_info["backward_design"] = tuning.lookup(q.device, "attention backward",
                                                                    attention.bwd_bucket(q, k, True))
    if provider == "served":  # the Triton kernels or the SDPA backend that won this bucket's race
        benchmark.extra_info["served_by"] = attention.race_winner(q, k, v, True, D ** -0.5, backward)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "flash_attn"])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("context", [1024, 8192, 32768])
def test_decode(benchmark, peak, provider, batch, context):
    if batch * context > 64 * 8192:
        pytest.skip("cache larger than this benchmark's memory budget")
    fn = _impl(provider)
    nbytes = decode_kv_bytes(batch, HKV, context, D, 2)

    def make(seed):
        g = torch.Generator("cuda").manual_seed(seed)
        q = torch.randn(batch, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k, v = (torch.randn(batch, context, HKV, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        return (q, k, v)

    def step(q, k, v):
        with torch.no_grad():
            fn(q, k, v)

    sets = input_sets(make, nbytes)
    if provider in SDPA_BACKENDS:
        _runs(fn, sets[0], False)
    run(benchmark, step, sets, op="attention decode", shape=f"{batch}x{context}",
        provider=provider, peak=peak, bytes=nbytes)


def _length_mix(total_tokens: int = 32768, max_len: int = 4096) -> list[int]:
    """Fine-tuning-like example lengths, drawn once (fixed seed) from a log-normal with mean ~600,
    capped at 4096, until ~32k tokens: the mix the packed-vs-padded comparison runs on."""
    g = torch.Generator().manual_seed(0)
    lengths, used = [], 0
    while True:
        n = int(min(max_len, max(1, torch.empty(1).log_normal_(6.0, 0.8, generator=g).item())))
        if used + n > total_tokens:
            return lengths
        lengths.append(n)
        used += n


@pytest.mark.parametrize("provider", ["triton-packed", "triton-padded", "sdpa-padded", "flash_attn-packed"])
def test_varlen(benchmark, peak, provider):
    """Forward + backward over one padding-free batch of the length mix (``cu_seqlens``), against the
    same examples padded to the longest (what a batch without packing costs) and flash-attention's
    varlen kernel. Tokens/s counts real tokens only."""
    lengths = _length_mix()
    total, longest = sum(lengths), max(lengths)
    g = torch.Generator("cuda").manual_seed(0)
    if provider.endswith("packed"):
        shape_q, shape_kv = (1, total, H, D), (1, total, HKV, D)
    else:
        shape_q, shape_kv = (len(lengths), longest, H, D), (len(lengths), longest, HKV, D)
    q = torch.randn(*shape_q, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
    k, v = (torch.randn(*shape_kv, device="cuda", dtype=torch.bfloat16, generator=g, requires_grad=True)
            for _ in range(2))
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    if provider == "triton-packed":
        from qwen3_kernels.ops.triton import attention
        fn = lambda q, k, v: attention.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=longest)  # noqa: E731
    elif provider == "flash_attn-packed":
        if not HAS_FLASH_ATTN:
            pytest.skip("flash_attn is not installed")
        from flash_attn import flash_attn_varlen_func
        fn = lambda q, k, v: flash_attn_varlen_func(q[0], k[0], v[0], cu_seqlens, cu_seqlens, longest,  # noqa: E731
                                                    longest, causal=True)[None]
    elif provider == "triton-padded":
        fn = _impl("triton")
    else:
        fn = _sdpa("FLASH_ATTENTION")
    _runs(fn, (q, k, v), True)
    dout = torch.randn_like(fn(q, k, v))

    def step(q, k, v):
        torch.autograd.grad(fn(q, k, v), (q, k, v), dout)

    useful = sum(attention_flops(1, H, n, n, D, backward=True) for n in lengths)
    run(benchmark, step, [(q, k, v)], op="attention varlen fwd+bwd", shape=f"{len(lengths)} seqs, {total} tokens",
        provider=provider, peak=peak, flops=useful)
    benchmark.extra_info.update(tokens_per_s=total / benchmark.extra_info["median_s"])
