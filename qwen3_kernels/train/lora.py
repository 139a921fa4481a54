"""LoRA fine-tuning through PEFT: the adapters PEFT puts on this package's projections (``lora.Linear``
around each targeted ``nn.Linear``; the model then runs that projection's own forward instead of
the packed GEMM), the base frozen, and the result written as PEFT writes an adapter for transformers'
Qwen3 (``adapter_config.json`` + ``adapter_model.safetensors`` under transformers' module names),
or merged into the base weights (``W + alpha / r * B @ A``) as a full checkpoint.

Targets are the seven projections of a Qwen3 block. A Qwen3-MoE model's sparse layers keep their
experts as stacked parameters (``Experts.gate_up_proj``, ``down_proj``), not Linear layers, so there
LoRA goes on the attention projections only."""

from __future__ import annotations

import copy
import os
import re

import torch

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
FFN_TARGETS = ("gate_proj", "up_proj", "down_proj")
ADAPTER_NAME = "default"  # PEFT's name for a model's one adapter, in its parameter names, not in the files
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
MERGED_DIR = "merged"  # --merge: the base with the adapter merged, a full checkpoint in --out/merged


def default_targets(config) -> tuple[str, ...]:
    """The seven projections; a Mixture-of-Experts model's four attention projections."""
    return ATTENTION_TARGETS if _is_moe(config) else ATTENTION_TARGETS + FFN_TARGETS


def parse_targets(text: str | None, config) -> list[str]:
    """``--lora-targets`` (comma-separated projection names) checked against the model; ValueError
    naming the first that LoRA cannot go on."""
    if text is None:
        return list(default_targets(config))
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ValueError(f"--lora-targets {text!r}: no projection named (choose from "
                         f"{', '.join(ATTENTION_TARGETS + FFN_TARGETS)})")
    for name in names:
        if name not in ATTENTION_TARGETS + FFN_TARGETS:
            raise ValueError(f"--lora-targets: {name!r} is not a projection of a Qwen3 block (choose from "
                             f"{', '.join(ATTENTION_TARGETS + FFN_TARGETS)})")
        if name in FFN_TARGETS and _is_moe(config):
            raise ValueError(f"--lora-targets: {name!r} is in the feed-forward layers, which in this Qwen3-MoE model "
                             "are stacked experts (parameters, not Linear layers) that LoRA cannot wrap; choose "
                             f"among {', '.join(ATTENTION_TARGETS)}")
    return list(dict.fromkeys(names))


def _is_moe(config) -> bool:
    return any(config.is_moe_layer(i) for i in range(config.num_layers))


def resolved_alpha(args) -> float:
    """``--lora-alpha``, by default twice the rank (a scale alpha / r of 2)."""
    return args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank


def lora_config(args, targets: list[str], base_model: str | None = None):
    """PEFT's ``LoraConfig`` of the run: the one that adds the adapters and the one saved beside them."""
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError("--lora-rank: LoRA runs through PEFT, which is not installed (pip install peft)") from None
    alpha = resolved_alpha(args)
    return LoraConfig(r=args.lora_rank, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha,
                      lora_dropout=args.lora_dropout, target_modules=list(targets), bias="none",
                      task_type="CAUSAL_LM", base_model_name_or_path=base_model)


def add_adapters(model: torch.nn.Module, config) -> torch.nn.Module:
    """PEFT's LoRA layers around the targeted projections of ``model`` (in place, on any device, meta
    included); every other parameter frozen. PEFT draws lora_A from the global generator (lora_B
    starts at zero, so the model's output is unchanged)."""
    from peft import inject_adapter_in_model
    inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter(name))
    return model


def _is_adapter(name: str) -> bool:
    return re.search(rf"\.lora_[AB]\.{ADAPTER_NAME}\.weight$", name) is not None


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of our (full) state dict under the names PEFT gives them on transformers' Qwen3:
    ``blocks.3.attn.q_proj.lora_A.default.weight`` -> ``base_model.model.model.layers.3.self_attn.
    q_proj.lora_A.weight``."""
    from ..loading import local_to_hf
    tensors = {}
    for name, tensor in state.items():
        m = re.fullmatch(rf"(.+)\.(lora_[AB])\.{ADAPTER_NAME}\.weight", name)
        if m:
            module = local_to_hf(f"{m.group(1)}.weight").removesuffix(".weight")
            tensors[f"base_model.model.{module}.{m.group(2)}.weight"] = tensor
    return tensors


def merged_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """Our plain state dict (the names of a model without adapters) with each adapter merged into its
    projection: ``W + scaling * B @ A``, computed in fp32 and returned in W's dtype."""
    merged = {}
    for name, tensor in state.items():
        if re.search(r"\.lora_[AB]\.", name):
            continue
        m = re.fullmatch(r"(.+)\.base_layer\.(weight|bias)", name)
        if m is None:
            merged[name] = tensor
            continue
        prefix, kind = m.groups()
        if kind == "weight":
            a = state[f"{prefix}.lora_A.{ADAPTER_NAME}.weight"].float()
            b = state[f"{prefix}.lora_B.{ADAPTER_NAME}.weight"].float()
            tensor = (tensor.float() + scaling * (b @ a)).to(tensor.dtype)
        merged[f"{prefix}.{kind}"] = tensor
    return merged


def save_adapter(state: dict[str, torch.Tensor], config, out: str) -> None:
    """``adapter_config.json`` and ``adapter_model.safetensors`` (fp32, as trained) in ``out``: what
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out)`` loads."""
    from safetensors.torch import save_file
    saved = copy.copy(config)
    saved.inference_mode = True  # as PEFT saves a trained adapter
    saved.save_pretrained(out)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in adapter_tensors(state).items()}
    save_file(tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})


def dropout_seed(seed: int, micro_batch: int) -> int:
    """The generator seed of the adapters' dropout in one micro-batch (its index over the whole run):
    drawn from the run's seed and the micro-batch alone, so the masks do not depend on how many ranks
    share the step, nor on where a resumed run restarted."""
    return (seed * 1_000_003 + micro_batch) % (2**63)
