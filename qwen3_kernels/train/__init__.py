"""``qwen3-kernels train``: fine-tune a Qwen3 (or Qwen3-MoE) checkpoint with FSDP2, in full or with
LoRA adapters.

One process runs it as is; ``torchrun --nproc_per_node N -m qwen3_kernels train ...`` runs it
data-parallel with the weights, gradients and optimizer state sharded (``fully_shard``: one group per
block, and the tied embedding + final norm + LM head together in the root group, since a tied
parameter cannot sit in two groups). NCCL on GPUs, gloo on CPUs. The parts:

- ``launch``: what is checked before anything loads (paths, data format, reporters, ``run.json``
  for ``--resume``/``--overwrite``), once per machine under torchrun; the process group.
- ``loop``: the ``Trainer``. The model is built on the meta device, sharded, materialised, and filled
  from the checkpoint read on rank 0 only; weights and optimizer state stay fp32, ``--dtype`` is the
  compute dtype, gradients are reduced in fp32. Each step sees ``--tokens-per-step`` tokens in
  micro-batches of ``--micro-batch-tokens`` (``qwen3_kernels.data``: any supported format,
  tokenised once into ``--out/tokenized``, packed padding-free, shuffled per epoch from ``--seed``),
  dealt out to the ranks; the fused loss is summed and divided by the step's counted tokens, so the
  gradient does not depend on the split. AdamW, warmup then ``--lr-scheduler``, clipping, eval
  loss, Qwen3-MoE's load-balancing loss, ``torch.distributed.checkpoint`` checkpoints that
  ``--resume`` continues exactly.
- ``lora``: PEFT adapters on the frozen, sharded base (``--lora-rank``), written as a PEFT adapter.
- ``export``: the fine-tuned model in transformers' format (config.json in both spellings,
  safetensors sharded above 5 GB, MoE experts per expert).
- ``report``: progress (tqdm or a line per step), TensorBoard/W&B, ``loss.png``.
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
