"""Model configuration: Qwen3-0.6B by default, every Qwen3 size as a preset (the dense ones and the
Mixture-of-Experts 30B-A3B and 235B-A22B), and a reader for Hugging Face ``config.json`` files
(``qwen3`` and ``qwen3_moe``) that refuses what the model cannot honour."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class Config:
    vocab_size: int = 151936
    hidden_size: int = 1024
    num_layers: int = 28
    num_heads: int = 16
    num_kv_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 3072
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    # Only YaRN is supported: {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768, ...}
    rope_scaling: dict | None = None
    # The dtype the checkpoint was published in ("bfloat16", ...); None for random models.
    dtype: str | None = None
    # Mixture of Experts (transformers' qwen3_moe); num_experts = 0 is the dense Qwen3. A layer is MoE
    # when it is not in mlp_only_layers and (index + 1) % decoder_sparse_step == 0 (see is_moe_layer);
    # the others have the dense SwiGLU of intermediate_size.
    num_experts: int = 0
    num_experts_per_tok: int = 0            # top-k experts per token
    moe_intermediate_size: int = 0          # each expert's SwiGLU width
    norm_topk_prob: bool = False            # renormalise the k routing weights to sum to 1 (transformers' default: no)
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001     # weight of the load-balancing loss added to the training loss
    output_router_logits: bool = False      # add it by default when labels are given (QWEN.forward)
    extra: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "intermediate_size", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"Config.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"Config.num_heads ({self.num_heads}) must be a multiple of "
                             f"Config.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"Config.head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not self.rope_theta > 0:
            raise ValueError(f"Config.rope_theta must be positive, got {self.rope_theta!r}")
        if self.rope_scaling is not None:
            _check_yarn(self.rope_scaling)
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise ValueError(f"Config.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        self._check_moe()

    def _check_moe(self) -> None:
        def whole(name, lowest):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
                raise ValueError(f"Config.{name} must be an integer >= {lowest}, got {value!r}")

        whole("num_experts", 0)
        whole("decoder_sparse_step", 1)
        if not isinstance(self.mlp_only_layers, (list, tuple)):
            raise ValueError(f"Config.mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}")
        self.mlp_only_layers = tuple(self.mlp_only_layers)  # a list from JSON; a tuple keeps presets immutable
        for i in self.mlp_only_layers:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.num_layers:
                raise ValueError(f"Config.mlp_only_layers must hold layer indices in [0, {self.num_layers}), "
                                 f"got {i!r}")
        if not isinstance(self.router_aux_loss_coef, (int, float)) or isinstance(self.router_aux_loss_coef, bool) \
                or not self.router_aux_loss_coef >= 0:
            raise ValueError(f"Config.router_aux_loss_coef must be a number >= 0, got {self.router_aux_loss_coef!r}")
        self.router_aux_loss_coef = float(self.router_aux_loss_coef)
        if self.num_experts == 0:
            return
        whole("moe_intermediate_size", 1)
        whole("num_experts_per_tok", 1)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"Config.num_experts_per_tok ({self.num_experts_per_tok}) must not exceed "
                             f"Config.num_experts ({self.num_experts})")

    def is_moe_layer(self, index: int) -> bool:
        """Whether layer ``index`` (0-based) is a Mixture-of-Experts layer (else it has the dense FFN)."""
        return (self.num_experts > 0 and index not in self.mlp_only_layers
                and (index + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @classmethod
    def preset(cls, name: str) -> "Config":
        """One of the published Qwen3 sizes: ``Config.preset("8B")``, ``Config.preset("30B-A3B")``."""
        key = name.upper().removeprefix("QWEN3-")
        if key not in PRESETS:
            raise KeyError(f"unknown Qwen3 preset {name!r}; choose one of {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key])

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "Config":
        """Reads a Hugging Face Qwen3 or Qwen3-MoE ``config.json`` (a file or the directory holding it)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"no config.json at {file!r}")
        try:
            with open(file) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf_dict(hf, source=file)

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "Config":
        def need(key):
            if key not in hf:
                raise KeyError(f"{source}: missing required key {key!r}")
            return hf[key]

        model_type = hf.get("model_type", "qwen3")
        if model_type not in ("qwen3", "qwen3_moe"):
            raise ValueError(f"{source}: model_type {model_type!r} is not a Qwen3 ('qwen3') or a Qwen3-MoE "
                             "('qwen3_moe')")
        if hf.get("use_sliding_window", False):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (no Qwen3 release uses it)")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported, only 'silu'")
        layer_types = hf.get("layer_types")
        if layer_types and any(t != "full_attention" for t in layer_types):
            raise ValueError(f"{source}: layer_types {sorted(set(layer_types))} include sliding attention, "
                             "which is not supported")

        # Published files spell the base `rope_theta` with `rope_scaling`; newer transformers writes
        # `rope_parameters: {rope_type, rope_theta, ...}`.
        rope = dict(hf.get("rope_parameters") or {})
        legacy_scaling = hf.get("rope_scaling")
        if legacy_scaling:
            rope = {**legacy_scaling, **rope}
        theta = rope.pop("rope_theta", None)
        if theta is None:
            theta = hf.get("rope_theta")
        if theta is None:
            raise KeyError(f"{source}: no RoPE base: neither 'rope_theta' nor 'rope_parameters.rope_theta'")
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor={partial} is not supported "
                             "(Qwen3 rotates all of head_dim)")
        if rope_type == "default":
            leftover = {k: v for k, v in rope.items() if v is not None}
            if leftover:
                raise ValueError(f"{source}: RoPE parameters {leftover} are not used by default RoPE")
            scaling = None
        elif rope_type == "yarn":
            scaling = {"rope_type": "yarn", **rope}
            if "original_max_position_embeddings" not in scaling and "original_max_position_embeddings" in hf:
                scaling["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
            scaling.setdefault("original_max_position_embeddings", need("max_position_embeddings"))
        else:
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only default and 'yarn')")

        num_heads = need("num_attention_heads")
        dtype = hf.get("dtype", hf.get("torch_dtype"))
        moe = {}
        if model_type == "qwen3_moe":
            # keys a file leaves out take transformers' Qwen3MoeConfig defaults, as transformers reads it;
            # transformers 5 writes num_experts as num_local_experts
            num_experts = hf.get("num_experts", hf.get("num_local_experts", 128))
            if hf.get("shared_expert_intermediate_size"):
                raise ValueError(f"{source}: shared_expert_intermediate_size="
                                 f"{hf['shared_expert_intermediate_size']}: Qwen3-MoE has no shared expert")
            moe = dict(num_experts=num_experts, num_experts_per_tok=hf.get("num_experts_per_tok", 8),
                       moe_intermediate_size=hf.get("moe_intermediate_size", 768),
                       norm_topk_prob=_flag(hf, "norm_topk_prob", False, source),
                       decoder_sparse_step=hf.get("decoder_sparse_step", 1),
                       mlp_only_layers=hf.get("mlp_only_layers") or (),
                       router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.001),
                       output_router_logits=_flag(hf, "output_router_logits", False, source))
        return cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or need("hidden_size") // num_heads,
            intermediate_size=need("intermediate_size"),
            max_position_embeddings=need("max_position_embeddings"),
            rope_theta=float(theta),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            rope_scaling=scaling,
            dtype=dtype,
            **moe,
        )

    def to_hf_dict(self) -> dict:
        """The transformers ``config.json`` of this model (``from_hf_dict``'s inverse), as
        transformers 5 writes it: ``transformers.Qwen3Config(**config.to_hf_dict())`` builds its twin."""
        rope = {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta}
        hf = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": self.vocab_size,
              "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
              "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
              "head_dim": self.head_dim, "intermediate_size": self.intermediate_size, "hidden_act": "silu",
              "max_position_embeddings": self.max_position_embeddings, "rms_norm_eps": self.rms_norm_eps,
              "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
              "rope_parameters": rope}
        if self.num_experts:
            hf.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", num_experts=self.num_experts,
                      num_experts_per_tok=self.num_experts_per_tok, moe_intermediate_size=self.moe_intermediate_size,
                      norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=self.decoder_sparse_step,
                      mlp_only_layers=list(self.mlp_only_layers), router_aux_loss_coef=self.router_aux_loss_coef,
                      output_router_logits=self.output_router_logits)
        if self.dtype is not None:
            hf["dtype"] = self.dtype
        return hf

    def to_published_hf_dict(self) -> dict:
        """``to_hf_dict`` plus the spelling the published Qwen3 checkpoints use (``rope_theta``,
        ``rope_scaling``, ``torch_dtype``): transformers 4 reads only that one (and would fall back
        to rope_theta 10000 without it), transformers 5 reads either, vLLM and SGLang the published one."""
        hf = {**self.to_hf_dict(), "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
              "use_sliding_window": False}  # as every release says (from_hf_dict refuses a sliding window)
        if self.dtype is not None:
            hf["torch_dtype"] = self.dtype
        return hf

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.dtype] if self.dtype else None


def _flag(hf: dict, key: str, default: bool, source: str) -> bool:
    value = hf.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    return value


_YARN_KEYS = {"rope_type", "factor", "original_max_position_embeddings", "attention_factor", "beta_fast",
              "beta_slow", "mscale", "mscale_all_dim", "truncate"}


def _check_yarn(scaling: dict) -> None:
    if scaling.get("rope_type") != "yarn":
        raise ValueError(f"rope_scaling {scaling} is not supported: only rope_type 'yarn'")
    unknown = set(scaling) - _YARN_KEYS
    if unknown:
        raise ValueError(f"rope_scaling has keys the YaRN implementation does not honour: {sorted(unknown)}")
    if "original_max_position_embeddings" not in scaling:
        raise ValueError("rope_scaling of type 'yarn' needs 'original_max_position_embeddings'")


def rope_frequencies(config: Config) -> tuple[torch.Tensor, float]:
    """The rotary inverse frequencies (fp32, ``head_dim // 2``) and the factor cos/sin are scaled by.

    YaRN follows transformers' ``_compute_yarn_parameters`` step for step, including its attention
    scaling (``0.1 * ln(factor) + 1`` unless the file gives one), so logits match it exactly."""
    dim, base = config.head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    pos_freqs = base ** exponents
    if config.rope_scaling is None:
        return 1.0 / pos_freqs, 1.0

    s = config.rope_scaling
    original_max = s["original_max_position_embeddings"]
    factor = s.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original_max

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = float(mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"]))
        else:
            attention_factor = mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, attention_factor


def _preset(**kw) -> Config:
    return Config(dtype="bfloat16", **kw)


# Published config.json values of the Qwen3 releases (vocab 151936, head_dim 128, RoPE base 1e6, eps 1e-6
# and 40960 positions are shared by all of them; the dense ones have 8 KV heads).
PRESETS: dict[str, Config] = {
    "0.6B": _preset(hidden_size=1024, num_layers=28, num_heads=16, intermediate_size=3072, tie_word_embeddings=True),
    "1.7B": _preset(hidden_size=2048, num_layers=28, num_heads=16, intermediate_size=6144, tie_word_embeddings=True),
    "4B": _preset(hidden_size=2560, num_layers=36, num_heads=32, intermediate_size=9728, tie_word_embeddings=True),
    "8B": _preset(hidden_size=4096, num_layers=36, num_heads=32, intermediate_size=12288, tie_word_embeddings=False),
    "14B": _preset(hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=17408, tie_word_embeddings=False),
    "32B": _preset(hidden_size=5120, num_layers=64, num_heads=64, intermediate_size=25600, tie_word_embeddings=False),
    # The MoE releases: 4 KV heads, 128 experts of which each token uses 8 (weights renormalised), every
    # layer MoE, untied head; their dense intermediate_size is in the file though no layer uses it.
    "30B-A3B": _preset(hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4, intermediate_size=6144,
                       tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                       norm_topk_prob=True),
    "235B-A22B": _preset(hidden_size=4096, num_layers=94, num_heads=64, num_kv_heads=4, intermediate_size=12288,
                         tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                         moe_intermediate_size=1536, norm_topk_prob=True),
}
