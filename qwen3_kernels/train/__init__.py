"""``qwen3-kernels train``: fine-tune a Qwen3 checkpoint on JSONL data with FSDP2.

One process runs it as is; ``torchrun --nproc_per_node N -m qwen3_kernels train ...`` runs it
data-parallel with the weights, gradients and optimizer state sharded (``fully_shard``: one group per
block, and the tied embedding + final norm + LM head together in the root group, since a tied
parameter cannot sit in two groups). NCCL on GPUs, gloo on CPUs.

- The model is built on the meta device, sharded, materialised, and filled from the checkpoint read
  on rank 0 only (broadcast shard by shard). Weights and optimizer state stay fp32; ``--dtype``
  (default bf16 on GPUs) is the compute dtype, and gradients are reduced in fp32.
- Each step sees ``--tokens-per-step`` tokens in micro-batches of ``--micro-batch-tokens``: examples
  packed padding-free (``qwen3_kernels.data.pack_examples``), shuffled per epoch from ``--seed``, the
  micro-batches of a step dealt out to the ranks. The loss is the fused linear cross-entropy, summed
  and divided by the number of counted tokens in the whole step (all micro-batches, all ranks), so
  the gradient does not depend on how the step is split.
- AdamW, linear warmup then cosine decay to 0, gradient clipping at ``--max-grad-norm``.
- In ``--out``: ``metrics.jsonl`` (one line per step), ``loss.png``, ``checkpoints/step_N``
  (``torch.distributed.checkpoint``, every ``--save-every`` steps, on Ctrl-C and at the end), from
  which ``--resume`` continues exactly; and at the end the fine-tuned model in transformers' format
  (config.json, safetensors sharded above 5 GB, tokenizer and generation files copied).
"""

from __future__ import annotations

import argparse

import torch.distributed as dist

from .export import save_hf_checkpoint  # noqa: F401
from .launch import (_check_paths, _init_distributed, _ReportedByLocalRank0, _same_on_every_rank,  # noqa: F401
                     run_identity)
from .loop import NonFiniteStep, Trainer  # noqa: F401
from .report import plot_loss  # noqa: F401


def run(args: argparse.Namespace) -> int:
    """The whole run, on every rank. Returns the exit code (130 after Ctrl-C)."""
    try:
        with _same_on_every_rank():
            _check_paths(args)
        rank, world, device = _init_distributed(args.device)
        try:
            return Trainer(args, rank, world, device).train()
        finally:
            dist.destroy_process_group()
    except _ReportedByLocalRank0:
        return 1  # its error is printed by local rank 0
