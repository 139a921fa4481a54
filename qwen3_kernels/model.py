"""Qwen3, top to bottom: token embedding -> N x [pre-norm GQA attention, pre-norm SwiGLU FFN] ->
final RMSNorm -> LM head (tied to the embedding in the small sizes).

Every computation goes through ``qwen3_kernels.ops``: ``fused=True`` uses the dispatcher there
(Triton kernels where the device supports them), ``fused=False`` the eager reference. The model
itself never looks at which backend runs.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn as nn

from . import ops
from .config import Config, rope_frequencies

log = logging.getLogger(__name__)


def calculate_sin_cos(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float = 1.0,
                      dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables for ``positions`` (shape (T,) or (B, T)): returns ``(sin, cos)`` of shape
    (..., T, head_dim) in ``dtype``. Angles are computed in fp32 and cast last, as transformers does."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)  # (..., T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (..., T, D), half-split layout
    return (angles.sin() * scaling).to(dtype), (angles.cos() * scaling).to(dtype)


def rotate(x: torch.Tensor) -> torch.Tensor:
    """The half-split rotation RoPE pairs with sin: ``[x1, x2] -> [-x2, x1]``."""
    return ops.reference.rotate_half(x)


class RMSNORM(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, kernels=ops.reference):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = kernels

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)`` in one fused pass."""
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class FFN(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: Config, kernels=ops.reference):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.ops = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class GQA(nn.Module):
    """Causal grouped-query attention with per-head RMSNorm of q and k before RoPE."""

    def __init__(self, config: Config, kernels=ops.reference):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, D, bias = config.hidden_size, config.head_dim, config.attention_bias
        self.q_proj = nn.Linear(C, self.num_heads * D, bias=bias)
        self.k_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.v_proj = nn.Linear(C, self.num_kv_heads * D, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * D, C, bias=False)
        self.q_norm = RMSNORM(D, config.rms_norm_eps, kernels)
        self.k_norm = RMSNORM(D, config.rms_norm_eps, kernels)
        self.ops = kernels

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim)     # (B, T, H, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q, k = self.ops.qk_norm_rope(q, k, self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps)
        out = self.ops.attention(q, k, v, causal=True)                   # (B, T, H, D)
        return self.o_proj(out.reshape(B, T, self.num_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + ffn(norm(x))``."""

    def __init__(self, config: Config, kernels=ops.reference):
        super().__init__()
        self.attn_norm = RMSNORM(config.hidden_size, config.rms_norm_eps, kernels)
        self.attn = GQA(config, kernels)
        self.ffn_norm = RMSNORM(config.hidden_size, config.rms_norm_eps, kernels)
        self.ffn = FFN(config, kernels)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        attn_out = self.attn(self.attn_norm(x), cos, sin)
        h, x = self.ffn_norm(attn_out, residual=x)  # x = x + attn_out and h = norm(x), fused
        return x + self.ffn(h)


class QWEN(nn.Module):
    def __init__(self, config: Config | None = None, *, fused: bool = False):
        super().__init__()
        self.config = config = config if config is not None else Config()
        self.fused = fused
        kernels = ops if fused else ops.reference
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, kernels) for _ in range(config.num_layers))
        self.norm = RMSNORM(config.hidden_size, config.rms_norm_eps, kernels)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embeddings.weight
        inv_freq, self.rope_scaling = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._warned_devices: set = set()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) for token ids (B, T)."""
        if not torch.compiler.is_compiling():
            self._check_input(input_ids)
        B, T = input_ids.shape
        x = self.embeddings(input_ids)                                   # (B, T, C)
        positions = torch.arange(T, device=input_ids.device)
        sin, cos = calculate_sin_cos(positions, self.inv_freq, self.rope_scaling, x.dtype)  # (T, D)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))                                # (B, T, vocab)

    def _check_input(self, input_ids: torch.Tensor) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        T, limit = input_ids.shape[1], self.config.max_position_embeddings
        if T == 0:
            raise ValueError("input_ids is empty: seq_len is 0")
        if T > limit:
            raise ValueError(f"sequence length {T} exceeds the model's max context "
                             f"(max_position_embeddings={limit})")
        lo, hi = input_ids.min().item(), input_ids.max().item()
        if lo < 0:
            raise ValueError(f"input_ids contains negative token id {lo}")
        if hi >= self.config.vocab_size:
            raise ValueError(f"input_ids contains token id {hi} >= vocab_size {self.config.vocab_size}")
        if self.fused:
            self._warn_fallbacks(input_ids.device, self.embeddings.weight.dtype)

    def _warn_fallbacks(self, device: torch.device, dtype: torch.dtype) -> None:
        if (device, dtype) in self._warned_devices:
            return
        self._warned_devices.add((device, dtype))
        fallbacks = {op: c.reason for op, c in ops.report(device, dtype).items() if c.backend != "triton"}
        if fallbacks:
            log.warning("QWEN(fused=True) on %s in %s: these ops fall back to the eager reference: %s",
                        device, dtype, "; ".join(f"{op} ({why})" for op, why in fallbacks.items()))

    def num_parameters(self, unique: bool = True) -> int:
        """Parameter count; ``unique`` counts a tied embedding/LM head once."""
        params = self.parameters() if unique else (p for _, p in self.named_parameters(remove_duplicate=False))
        return sum(p.numel() for p in params)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: torch.device | str | None = None, fused: bool = False) -> "QWEN":
        """Loads a Hugging Face Qwen3 checkpoint directory (config.json + safetensors)."""
        from .loading import load_pretrained
        return load_pretrained(cls, path, dtype=dtype, device=device, fused=fused)
