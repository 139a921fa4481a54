"""Triton kernels, one file per op. ``KERNELS`` maps an op name of ``qwen3_kernels.ops`` to its
Triton implementation; ops missing here run the reference."""

import triton  # noqa: F401  (ImportError here tells the dispatcher Triton is unavailable)

from . import attention, cross_entropy, linear, moe, rms_norm, rope, swiglu

KERNELS: dict = {
    "rms_norm": rms_norm.rms_norm,
    "add_rms_norm": rms_norm.add_rms_norm,
    "apply_rope": rope.apply_rope,
    "qk_norm_rope": rope.qk_norm_rope,
    "qk_norm_rope_into_cache": rope.qk_norm_rope_into_cache,
    "packed_linear": linear.packed_linear,
    "swiglu": swiglu.swiglu,
    "attention": attention.attention,
    "linear_cross_entropy": cross_entropy.linear_cross_entropy,
    "moe_route": moe.moe_route,
    "moe_experts": moe.moe_experts,
}
