"""A transformers Qwen3-0.6B training step (bf16, random weights, 8 examples of 4096 tokens packed
padding-free into one row, as DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them):
forward with labels, backward and an AdamW step. transformers as it comes (SDPA attention, the
packed sequences as a block mask), with ``qwen3_kernels.hf.apply_kernels``, and with Liger-Kernel's
``apply_liger_kernel_to_qwen3`` when ``liger_kernel`` is installed: tokens/s and peak memory."""

import pytest
import torch
from benchmarks.conftest import needs_gpu, run, sync

from qwen3_kernels import Config, hf

transformers = pytest.importorskip("transformers")
pytestmark = needs_gpu
EXAMPLES, LENGTH = 8, 4096


def _model(provider: str):
    config = transformers.Qwen3Config(**Config.preset("0.6B").to_hf_dict())
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = transformers.Qwen3ForCausalLM(config).to(torch.bfloat16).train()
    if provider == "qwen3_kernels":
        hf.apply_kernels(model)
    elif provider == "liger":
        liger = pytest.importorskip("liger_kernel.transformers")
        liger.apply_liger_kernel_to_qwen3(model=model)
    return model


@pytest.mark.parametrize("provider", ["qwen3_kernels", "transformers", "liger"])
def test_hf_training_step(benchmark, peak, provider):
    model = _model(provider)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator("cuda").manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, EXAMPLES * LENGTH), device="cuda", generator=g)
    labels = ids.clone()
    labels[0, ::LENGTH] = -100   # the collator's separator: no example predicts the next one's first token
    cu_seqlens = torch.arange(0, EXAMPLES * LENGTH + 1, LENGTH, device="cuda", dtype=torch.int32)
    batch = dict(input_ids=ids, labels=labels, position_ids=torch.arange(LENGTH, device="cuda").repeat(EXAMPLES)[None],
                 cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=LENGTH, max_length_k=LENGTH,
                 use_cache=False)

    def step(batch):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    try:
        step(batch)  # optimizer states, kernel tuning, allocator
        sync()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(batch)
        sync()
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of memory on {EXAMPLES} x {LENGTH} packed tokens")
    peak_extra = torch.cuda.max_memory_allocated() - before
    run(benchmark, step, [(batch,)], op="transformers train step", shape=f"{EXAMPLES}x{LENGTH}", provider=provider,
        peak=peak, rounds=5, warmup=1)
    benchmark.extra_info.update(tokens_per_s=EXAMPLES * LENGTH / benchmark.extra_info["median_s"],
                                peak_extra_bytes=peak_extra, peak_memory_gb=(before + peak_extra) / 1e9)
