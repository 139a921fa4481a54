"""Hugging Face Qwen3 and Qwen3-MoE checkpoints: config.json plus one safetensors file or an indexed set
of shards.

Tensors are read one at a time (``safetensors.safe_open``) and converted straight to the target
device and dtype, so no full-precision copy of the model ever sits in host memory. An MoE layer's
experts are read in either layout: the published one, a tensor per expert and projection
(``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``, ``up_proj``, ``down_proj``: what transformers
4 and 5, vLLM and SGLang read and write), each copied into its slice of the model's stacked
parameter, or transformers 5's stacked one (``mlp.experts.gate_up_proj``, ``mlp.experts.down_proj``).
``local_to_hf_tensors`` gives a state dict back in the published layout."""

from __future__ import annotations

import json
import os
import re
import sys

import torch

from .config import Config, rope_frequencies

_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.q_proj.bias": "attn.q_proj.bias",
    "self_attn.k_proj.bias": "attn.k_proj.bias",
    "self_attn.v_proj.bias": "attn.v_proj.bias",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "self_attn.o_proj.bias": "attn.o_proj.bias",
    "self_attn.q_norm.weight": "attn.q_norm.weight",
    "self_attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate_proj.weight": "ffn.gate_proj.weight",
    "mlp.up_proj.weight": "ffn.up_proj.weight",
    "mlp.down_proj.weight": "ffn.down_proj.weight",
    "mlp.gate.weight": "ffn.gate.weight",                   # an MoE layer's router
    "mlp.experts.gate_up_proj": "ffn.experts.gate_up_proj",  # its experts, stacked (transformers 5's names)
    "mlp.experts.down_proj": "ffn.experts.down_proj",
}
# The published per-expert layout: each expert's projections, which the model keeps stacked.
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_STACKED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
_TOP_NAMES = {"model.embed_tokens.weight": "embeddings.weight", "model.norm.weight": "norm.weight",
              "lm_head.weight": "lm_head.weight"}


# Buffers some checkpoints carry that the model recomputes (transformers ignores them too).
_IGNORED = re.compile(r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq")


class CheckpointError(ValueError):
    """A checkpoint that does not fit its config: the message names the tensors as the checkpoint does."""


def hf_to_local(key: str) -> str | None:
    """Our parameter name for a Hugging Face tensor name, or None if the name is not Qwen3's."""
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    m = _LAYER_KEY.fullmatch(key)
    if m and m.group(2) in _LAYER_NAMES:
        return f"blocks.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    return None


def expert_part(key: str, config: Config) -> tuple[str, tuple[int, str]] | None:
    """For a published per-expert tensor name, the stacked parameter it is part of and which part:
    ``("blocks.{i}.ffn.experts.gate_up_proj", (expert, "gate_proj"))``; None for any other name, an
    expert index the config does not have included."""
    m = _EXPERT_KEY.fullmatch(key)
    if m is None or int(m.group(2)) >= config.num_experts:
        return None
    layer, expert, proj = int(m.group(1)), int(m.group(2)), m.group(3)
    return f"blocks.{layer}.ffn.experts.{_STACKED[proj]}", (expert, proj)


def _part_index(part: tuple[int, str], config: Config) -> tuple:
    """Where an expert's projection sits in its stacked parameter: gate rows first, then up."""
    expert, proj = part
    I = config.moe_intermediate_size
    return {"gate_proj": (expert, slice(0, I)), "up_proj": (expert, slice(I, 2 * I)), "down_proj": (expert,)}[proj]


def _expert_key(name: str, part: tuple[int, str]) -> str:
    layer = re.fullmatch(r"blocks\.(\d+)\..+", name).group(1)
    return f"model.layers.{layer}.mlp.experts.{part[0]}.{part[1]}.weight"


def _expert_parts(name: str, config: Config) -> list[tuple[int, str]]:
    projs = ("gate_proj", "up_proj") if name.endswith("gate_up_proj") else ("down_proj",)
    return [(e, proj) for e in range(config.num_experts) for proj in projs]


def local_to_hf_tensors(state: dict[str, torch.Tensor], config: Config):
    """``(name, tensor)`` pairs of a checkpoint in the published layout from our state dict: the
    Hugging Face names, each MoE layer's stacked experts split into one tensor per expert and
    projection (views of the stacked ones, no copy), a tied LM head left out (it is the embedding)."""
    for name, tensor in state.items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue
        if re.fullmatch(r"blocks\.\d+\.ffn\.experts\.(gate_up_proj|down_proj)", name):
            for part in _expert_parts(name, config):
                yield _expert_key(name, part), tensor[_part_index(part, config)]
        else:
            yield local_to_hf(name), tensor


def local_to_hf(name: str) -> str:
    """The Hugging Face tensor name of one of our parameter names (an MoE layer's experts: transformers
    5's stacked names, those of its parameters)."""
    for hf, local in _TOP_NAMES.items():
        if local == name:
            return hf
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
    hf_suffix = next(hf for hf, local in _LAYER_NAMES.items() if local == m.group(2))
    return f"model.layers.{m.group(1)}.{hf_suffix}"


def summarize(names, shown: int = 5) -> str:
    """A list of names short enough for one error line: all of a few, else the count and the first few."""
    names = sorted(names)
    if len(names) <= shown:
        return ", ".join(names)
    return f"{len(names)} tensors, e.g. {', '.join(names[:shown])}"


def checkpoint_files(path: str) -> dict[str, str]:
    """``{tensor name: file}`` for the checkpoint in directory ``path``."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = {name: os.path.join(path, file) for name, file in weight_map.items()}
        missing = sorted({f for f in files.values() if not os.path.exists(f)})
        if missing:
            raise FileNotFoundError(f"{index} lists shard files that do not exist: "
                                    f"{', '.join(os.path.basename(f) for f in missing)}")
        return files
    if os.path.exists(single):
        names = _open(single).keys()
        return {name: single for name in names}
    found = sorted(os.listdir(path))
    raise FileNotFoundError(f"no weights in {path!r}: expected model.safetensors or "
                            f"model.safetensors.index.json (found {found})")


def _is_deserialization_error(e: Exception) -> bool:
    """safetensors' own parse errors: the one case where a file is really corrupt or truncated."""
    return type(e).__name__ == "SafetensorError"


def _open(file: str, device: str = "cpu"):
    from safetensors import safe_open
    try:
        return safe_open(file, framework="pt", device=device)
    except Exception as e:
        if _is_deserialization_error(e):
            raise ValueError(f"{file}: corrupt or truncated safetensors file ({e})") from None
        raise


def check_device(device: torch.device) -> None:
    """A clear error for a device this torch cannot use, before any tensor is read."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} is not available: this torch ({torch.__version__}) sees no CUDA "
                               f"GPU; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} is not available: this machine has {torch.cuda.device_count()} "
                               f"CUDA device(s)")
    elif device.type not in ("cpu", "meta"):
        try:
            torch.empty(0, device=device)
        except Exception as e:
            raise RuntimeError(f"device {device} is not available: {e}") from None


def check_vocabulary(tokenizer, config: Config, path: str) -> None:
    """The tokenizer must not produce ids the model has no embedding for."""
    size = len(tokenizer)
    if size > config.vocab_size:
        raise CheckpointError(f"{path}: the tokenizer has {size} tokens but the model's vocab_size is "
                              f"{config.vocab_size}: they are not from the same checkpoint")


def _read_tensor(handle, file: str, key: str, keys_in_file, index_used: bool):
    if key not in keys_in_file:
        where = "the index puts it in" if index_used else "expected it in"
        raise CheckpointError(f"tensor {key!r}: {where} {os.path.basename(file)}, which does not contain it")
    try:
        return handle.get_tensor(key)
    except torch.OutOfMemoryError as e:
        raise MemoryError(f"out of memory loading {key!r} from {os.path.basename(file)}: {e}") from None
    except Exception as e:
        if _is_deserialization_error(e):
            raise ValueError(f"{file}: cannot read tensor {key!r}, the file is corrupt or truncated ({e})") from None
        raise


def _allocate(name: str, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A stacked expert parameter, filled expert by expert as the checkpoint's tensors are read."""
    try:
        return torch.empty(shape, device=device, dtype=dtype)
    except torch.OutOfMemoryError as e:
        size = shape.numel() * dtype.itemsize
        raise MemoryError(f"out of memory on {device} allocating {local_to_hf(name)!r} ({tuple(shape)}, "
                          f"{size / 2**20:.1f} MiB in {dtype}): {e}") from None


def load_pretrained(cls, path, *, dtype=None, device=None, fused=False):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    config = Config.from_pretrained(path)
    device = torch.device(device if device is not None else "cpu")
    check_device(device)
    files = checkpoint_files(path)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    dtype = dtype or config.torch_dtype or torch.float32
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")

    with torch.device("meta"):
        model = cls(config, fused=fused)
    expected = {name: p.shape for name, p in model.named_parameters()}  # a tied head appears once

    # each checkpoint tensor's destination: (our name, None) for a whole tensor, (our name, (expert,
    # projection)) for one expert's part of a stacked parameter
    local_names: dict[str, tuple[str, tuple[int, str] | None]] = {}
    unexpected = []
    for key in files:
        if _IGNORED.fullmatch(key):
            continue
        name, part = hf_to_local(key), None
        if name is None and (found := expert_part(key, config)) is not None:
            name, part = found
        if name is None or name not in expected and name != "lm_head.weight":
            unexpected.append(key)
        elif not (config.tie_word_embeddings and name == "lm_head.weight"):  # tied: the embedding is the head
            local_names[key] = (name, part)
    whole = {name for name, part in local_names.values() if part is None}
    parts: dict[str, set] = {}
    for name, part in local_names.values():
        if part is not None:
            parts.setdefault(name, set()).add(part)
    both = sorted(whole & set(parts))
    if both:
        raise CheckpointError(f"checkpoint {path!r} stores experts both stacked and one tensor per expert: "
                              f"{summarize(local_to_hf(n) for n in both)} and its per-expert tensors")
    missing = sorted(set(expected) - whole - set(parts))
    missing_keys = [local_to_hf(n) for n in missing if n not in parts]
    for name, found in parts.items():  # an expert layout must be complete: name the experts it lacks
        missing_keys += [_expert_key(name, p) for p in _expert_parts(name, config) if p not in found]
    if unexpected or missing_keys:
        problems = []
        if missing_keys:
            problems.append(f"missing {summarize(missing_keys)}")
        if unexpected:
            problems.append(f"unexpected {summarize(unexpected)}")
        layers = {int(m.group(1)) for key in files if (m := _LAYER_KEY.fullmatch(key))}
        if layers and max(layers) + 1 != config.num_layers:
            problems.append(f"the checkpoint has {max(layers) + 1} layers, config.json's num_hidden_layers says "
                            f"{config.num_layers}")
        raise CheckpointError(f"checkpoint {path!r} does not match its config: " + "; ".join(problems))

    by_file: dict[str, list[str]] = {}
    for key in local_names:
        by_file.setdefault(files[key], []).append(key)
    state = {}
    show_progress = len(by_file) > 1
    try:
        for i, (file, keys) in enumerate(sorted(by_file.items())):
            if show_progress:
                print(f"\rloading shard {i + 1}/{len(by_file)}: {os.path.basename(file)}", end="", file=sys.stderr,
                      flush=True)
            handle = _open(file, device=str(device) if device.type == "cuda" else "cpu")
            keys_in_file = set(handle.keys())
            for key in keys:
                name, part = local_names[key]
                tensor = _read_tensor(handle, file, key, keys_in_file, show_progress)
                if part is not None:  # one expert's projection, into its slice of the stacked parameter
                    if name not in state:
                        state[name] = _allocate(name, expected[name], device, dtype)
                    target = state[name][_part_index(part, config)]
                    if tensor.shape != target.shape:
                        raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} does not match the "
                                              f"config's shape {tuple(target.shape)}")
                    target.copy_(tensor)
                    del tensor
                    continue
                if tuple(tensor.shape) != tuple(expected[name]):
                    raise CheckpointError(f"{key}: checkpoint shape {tuple(tensor.shape)} does not match the "
                                          f"config's shape {tuple(expected[name])}")
                try:
                    state[name] = tensor.to(device=device, dtype=dtype)
                except torch.OutOfMemoryError as e:
                    size = tensor.numel() * dtype.itemsize
                    raise MemoryError(f"out of memory on {device} loading {key!r} ({tuple(tensor.shape)}, "
                                      f"{size / 2**20:.1f} MiB in {dtype}): {e}") from None
                del tensor
    finally:
        if show_progress:
            print(file=sys.stderr)  # end the progress line, so what follows (an error too) starts clean

    # Names were checked above; a tied head is absent from `state` and re-tied below.
    model.load_state_dict(state, strict=False, assign=True)
    state.clear()  # the model holds the only reference now: packing frees each tensor it replaces
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embeddings.weight
    model.pack_projections()
    model.inv_freq = rope_frequencies(config)[0].to(device)  # the meta model's buffer holds no values
    return model.eval()
