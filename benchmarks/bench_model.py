"""End to end. On a GPU: Qwen3-0.6B (random weights, bf16) prefill, CUDA-graphed decode and a
training step, fused vs eager vs torch.compile vs transformers. On the CPU: the eager model vs
transformers' Qwen3 on the same weights, prefill and cached decode of a small config."""

import pytest
import torch
from benchmarks.conftest import CUDA, needs_gpu, run, sync

from qwen3_kernels import QWEN, Config

transformers = pytest.importorskip("transformers")

CPU_CONFIG = Config(vocab_size=8192, hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64,
                    intermediate_size=1536, max_position_embeddings=4096)


def _hf_twin(model: QWEN):
    """transformers' Qwen3 with exactly our weights."""
    hf_config = transformers.Qwen3Config(**model.config.to_hf_dict())
    hf_config._attn_implementation = "sdpa"
    device, dtype = model.embeddings.weight.device, model.embeddings.weight.dtype
    with torch.device(device):
        hf = transformers.Qwen3ForCausalLM(hf_config).to(dtype).eval()
    from qwen3_kernels.loading import hf_to_local
    ours = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in hf.named_parameters(remove_duplicate=False):
            p.copy_(ours[hf_to_local(name)])
    return hf


@pytest.fixture(scope="module")
def cpu_pair():
    torch.manual_seed(0)
    model = QWEN(CPU_CONFIG).eval()
    return model, _hf_twin(model)


@pytest.mark.parametrize("provider", ["qwen3_kernels", "transformers"])
def test_cpu_prefill(benchmark, peak, cpu_pair, provider):
    if CUDA:
        pytest.skip("the CPU comparison runs on CPU-only machines; this one has a GPU")
    model, hf = cpu_pair
    ids = torch.randint(0, CPU_CONFIG.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))

    def step(ids):
        with torch.inference_mode():
            model(ids, last_only=True) if provider == "qwen3_kernels" else hf(ids, logits_to_keep=1)

    run(benchmark, step, [(ids,)], op="model prefill (cpu)", shape="1x512", provider=provider, peak=peak,
        rounds=5, warmup=1)
    benchmark.extra_info["tokens_per_s"] = 512 / benchmark.stats.stats.median


@pytest.mark.parametrize("provider", ["qwen3_kernels", "transformers"])
def test_cpu_cached_decode(benchmark, peak, cpu_pair, provider):
    if CUDA:
        pytest.skip("the CPU comparison runs on CPU-only machines; this one has a GPU")
    model, hf = cpu_pair
    ids = torch.randint(0, CPU_CONFIG.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    new = 64

    def step(ids):
        with torch.inference_mode():
            if provider == "qwen3_kernels":
                model.generate(ids, new)
            else:
                hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    run(benchmark, step, [(ids,)], op="model decode (cpu)", shape="1x64+64", provider=provider, peak=peak,
        rounds=3, warmup=1)
    benchmark.extra_info["tokens_per_s"] = new / benchmark.stats.stats.median


@pytest.fixture(scope="module")
def gpu_models():
    torch.manual_seed(0)
    with torch.device("cuda"):
        eager = QWEN(Config.preset("0.6B")).to(torch.bfloat16).eval()
    with torch.device("meta"):
        fused = QWEN(Config.preset("0.6B"), fused=True)
    fused.load_state_dict(eager.state_dict(), assign=True)
    fused.inv_freq = eager.inv_freq
    fused.lm_head.weight = fused.embeddings.weight
    return {"fused": fused.eval(), "eager": eager, "compile": torch.compile(eager), "transformers": _hf_twin(eager)}


GPU_PROVIDERS = ["fused", "eager", "compile", "transformers"]


@needs_gpu
@pytest.mark.parametrize("provider", GPU_PROVIDERS)
@pytest.mark.parametrize("batch, seq", [(1, 4096), (8, 1024)])
def test_gpu_prefill(benchmark, peak, gpu_models, provider, batch, seq):
    model = gpu_models[provider]
    ids = torch.randint(0, 151936, (batch, seq), device="cuda")

    def step(ids):
        with torch.inference_mode():
            model(ids)

    run(benchmark, step, [(ids,)], op="model prefill", shape=f"{batch}x{seq}", provider=provider, peak=peak,
        rounds=10)
    benchmark.extra_info["tokens_per_s"] = batch * seq / benchmark.stats.stats.median


@needs_gpu
@pytest.mark.parametrize("provider", ["fused", "eager", "transformers"])
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_gpu_decode(benchmark, peak, gpu_models, provider, batch):
    model = gpu_models[provider]
    ids = torch.randint(0, 151936, (batch, 128), device="cuda")
    new = 128

    def step(ids):
        with torch.inference_mode():
            if provider == "transformers":
                model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
            else:
                model.generate(ids, new)

    run(benchmark, step, [(ids,)], op="model decode", shape=f"{batch}x128+{new}", provider=provider, peak=peak,
        rounds=3, warmup=1)
    benchmark.extra_info["tokens_per_s"] = batch * new / benchmark.stats.stats.median


@needs_gpu
@pytest.mark.parametrize("provider", ["fused", "eager", "compile"])
def test_gpu_training_step(benchmark, peak, gpu_models, provider):
    model = gpu_models[provider]
    ids = torch.randint(0, 151936, (4, 1024), device="cuda")

    def step(ids):
        logits = model(ids)
        torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    torch.cuda.reset_peak_memory_stats()
    run(benchmark, step, [(ids,)], op="model train step", shape="4x1024", provider=provider, peak=peak, rounds=5)
    sync()
    benchmark.extra_info.update(tokens_per_s=4 * 1024 / benchmark.stats.stats.median,
                                peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
    for p in model.parameters():
        p.grad = None
