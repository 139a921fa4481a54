"""``qwen3-kernels train``'s step on one GPU against transformers on the same data: Qwen3-0.6B (random
weights), 8 examples of 4096 tokens packed into one row, bf16 compute over fp32 weights and AdamW
state for both (transformers under autocast, as Trainer's ``bf16=True`` runs it). Tokens/s and peak
memory; the goal (issue "Fine-tuning that scales past one GPU") is >= 1.5x the tokens/s at <= 50%
of the peak memory."""

import json

import pytest
import torch
from benchmarks.conftest import needs_gpu, run, sync

from qwen3_kernels import QWEN, Config
from qwen3_kernels.data import pack_examples

transformers = pytest.importorskip("transformers")
pytestmark = needs_gpu
EXAMPLES, LENGTH = 8, 4096


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Qwen3-0.6B on disk, with a stand-in tokenizer (the step never tokenises)."""
    from tokenizers import Tokenizer, models

    from qwen3_kernels.train import save_hf_checkpoint
    path = tmp_path_factory.mktemp("bench_train")
    config = Config.preset("0.6B")
    torch.manual_seed(0)
    save_hf_checkpoint(QWEN(config).state_dict(), config, str(path), dtype=torch.bfloat16)
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "x": 3}
    Tokenizer(models.WordLevel(vocab, unk_token="x")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    (path / "data.jsonl").write_text(json.dumps({"text": "x x x"}) + "\n")
    return path


def _batch():
    g = torch.Generator().manual_seed(1)
    examples = [torch.randint(0, 151936, (LENGTH,), generator=g).tolist() for _ in range(EXAMPLES)]
    return next(pack_examples(examples, EXAMPLES * LENGTH)).to("cuda")


@pytest.mark.parametrize("provider", ["qwen3_kernels", "transformers"])
def test_train_step(benchmark, peak, checkpoint, tmp_path, provider):
    batch = _batch()
    if provider == "qwen3_kernels":
        import torch.distributed as dist

        from qwen3_kernels import train
        from qwen3_kernels.__main__ import _parser
        # the command line's own defaults, so every option the trainer reads is there
        args = _parser().parse_args(["train", "--model", str(checkpoint), "--data", str(checkpoint / "data.jsonl"),
                                     "--out", str(tmp_path), "--steps", str(10**6), "--tokens-per-step",
                                     str(EXAMPLES * LENGTH), "--lr", "1e-5", "--dtype", "bfloat16", "--device", "cuda",
                                     "--fused"])
        trainer = train.Trainer(args, *train._init_distributed("cuda"))
        trainer.micro_batches = lambda step: [batch]
        state = {"step": 0}

        def step():
            state["step"] += 1
            trainer.train_step(state["step"])
    else:
        model = transformers.Qwen3ForCausalLM.from_pretrained(checkpoint, dtype=torch.float32,
                                                              attn_implementation="sdpa").cuda().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), fused=True)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=batch.input_ids, labels=batch.labels, position_ids=batch.position_ids,
                             use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    try:
        step()  # optimizer state, kernel tuning, allocator
        sync()
        torch.cuda.reset_peak_memory_stats()
        run(benchmark, lambda: step(), [()], op="train step", shape=f"{EXAMPLES}x{LENGTH}", provider=provider,
            peak=peak, rounds=5, warmup=1)
        sync()
    except torch.OutOfMemoryError:
        pytest.skip(f"{provider} runs out of memory on {EXAMPLES} x {LENGTH} packed tokens")
    finally:
        if provider == "qwen3_kernels":
            dist.destroy_process_group()
    benchmark.extra_info.update(tokens_per_s=EXAMPLES * LENGTH / benchmark.extra_info["median_s"],
                                peak_extra_bytes=torch.cuda.max_memory_allocated(),
                                peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9)
