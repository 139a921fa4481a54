"""qwen3_kernels: a from-scratch PyTorch Qwen3 whose hot paths run as fused Triton kernels."""

from . import ops
from .config import PRESETS, Config
from .model import (FFN, GQA, QWEN, RMSNORM, Block, Experts, KVCache, LMHead, MoE, RouterStats, calculate_sin_cos,
                    expert_load, rotate)
from .tokenizer import Tokenizer

__all__ = ["QWEN", "Config", "PRESETS", "RMSNORM", "FFN", "MoE", "Experts", "RouterStats", "expert_load", "GQA",
           "Block", "KVCache", "LMHead", "calculate_sin_cos", "rotate", "Tokenizer", "ops"]
__version__ = "0.1.0"
