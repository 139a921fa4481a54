"""The fine-tuned model written as a transformers Qwen3 checkpoint."""

from __future__ import annotations

import json
import os

import torch

from ..config import Config

MAX_SHARD_BYTES = 5 * 2**30


def save_hf_checkpoint(state: dict[str, torch.Tensor], config: Config, out: str, dtype: torch.dtype,
                       keep: dict | None = None) -> None:
    """Our state dict written as a transformers Qwen3 checkpoint in ``dtype``. Its config.json spells
    the model both as the published checkpoints do (which transformers 4 reads) and as transformers 5
    writes it; the keys of ``keep`` (the input checkpoint's config.json) that the model does not define,
    such as its token ids, are kept."""
    from safetensors.torch import save_file

    from ..loading import local_to_hf_tensors
    # the published layout (MoE experts one tensor per expert and projection: views of the stacked
    # parameters, copied out one by one since safetensors stores no shared memory)
    tensors = {}
    for name, t in local_to_hf_tensors(state, config):
        t = t.detach().to("cpu", dtype).contiguous()
        tensors[name] = t.clone() if t.untyped_storage().nbytes() != t.nbytes else t
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    with open(os.path.join(out, "config.json"), "w") as f:
        name = str(dtype).removeprefix("torch.")
        json.dump({**(keep or {}), **config.to_published_hf_dict(), "dtype": name, "torch_dtype": name}, f,
                  indent=2)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
