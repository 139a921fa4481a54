"""The public functional API: every op the model calls, dispatched per (device, dtype).

``qwen3_kernels.ops.reference`` holds the eager PyTorch ground truth with the same signatures; the
Triton kernels live in ``qwen3_kernels.ops.triton``. Which one runs is decided once per
(op, device, dtype) and can be forced with the environment variable ``QWEN3_KERNELS_BACKEND``:

- ``auto`` (default): Triton where the device supports it, the reference elsewhere;
- ``reference``: always the eager reference;
- ``triton``: always Triton, and a clear error where it cannot run. CPU tensors run the kernels
  through Triton's interpreter when ``TRITON_INTERPRET=1`` (how the tests exercise them here).
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple

import torch

from . import reference
from .packing import pack_parameters  # noqa: F401  (the layout packed_linear is fastest on)

BACKEND_ENV = "QWEN3_KERNELS_BACKEND"
BACKENDS = ("auto", "reference", "triton")
OPS = ("rms_norm", "add_rms_norm", "apply_rope", "qk_norm_rope", "qk_norm_rope_into_cache", "swiglu", "attention",
       "packed_linear", "linear_cross_entropy", "moe_route", "moe_experts")
_TL_DOT_OPS = ("attention", "moe_experts")  # ops whose kernels multiply matrices with tl.dot


class Choice(NamedTuple):
    backend: str  # "triton" or "reference"
    reason: str
    fn: Callable


def _requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return value


def _triton_kernels() -> tuple[dict[str, Callable], str]:
    """The Triton implementations that exist, or why there are none."""
    try:
        from . import triton as triton_ops
    except ImportError as e:  # triton is not installed (macOS, Windows)
        return {}, f"Triton is not importable ({e})"
    return triton_ops.KERNELS, ""


def _device_supports_triton(device: torch.device, dtype: torch.dtype, requested: str) -> tuple[bool, str]:
    if device.type == "cpu":
        if requested == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
            return True, "CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)"
        return False, "CPU: the Triton kernels need a GPU (tests force them through TRITON_INTERPRET=1)"
    if device.type != "cuda":
        return False, f"{device.type}: no Triton backend for this device"
    if not torch.cuda.is_available():
        return False, f"{device}: this torch ({torch.__version__}) sees no CUDA device"
    if torch.version.hip:
        return True, "ROCm GPU"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:
        return True, f"CUDA sm_{major}{minor}"
    if major == 7 and dtype != torch.bfloat16:
        return True, f"CUDA sm_{major}{minor}"
    if major == 7:
        return False, f"CUDA sm_{major}{minor} has no native bfloat16"
    return False, f"CUDA sm_{major}{minor} is older than Triton supports (needs sm_70)"


_choices: dict[tuple, Choice] = {}


def choose(op: str, device: torch.device | str, dtype: torch.dtype) -> Choice:
    """Which implementation ``op`` uses for tensors on ``device`` of ``dtype``, and why."""
    if op not in OPS:
        raise KeyError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    requested = _requested_backend()
    key = (op, device, dtype, requested, os.environ.get("TRITON_INTERPRET"))
    choice = _choices.get(key)
    if choice is None:
        choice = _choices[key] = _decide(op, device, dtype, requested)
    return choice


def _decide(op: str, device: torch.device, dtype: torch.dtype, requested: str) -> Choice:
    reference_fn = getattr(reference, op)
    if requested == "reference":
        return Choice("reference", f"forced by {BACKEND_ENV}=reference", reference_fn)
    kernels, why_none = _triton_kernels()
    supported, why = _device_supports_triton(device, dtype, requested)
    if op not in kernels:
        why_not = why_none or "no Triton kernel for this op yet"
    elif dtype not in (torch.float32, torch.float16, torch.bfloat16):
        why_not = f"{dtype} is not a kernel dtype"
    elif not supported:
        why_not = why
    elif op in _TL_DOT_OPS and dtype == torch.bfloat16 and device.type == "cpu":
        # not an error to raise under a forced backend: the op is exact through the reference, and
        # the interpreter's bf16 tl.dot returns garbage (Triton stores bf16 as uint16 there)
        return Choice("reference", "Triton's interpreter cannot run tl.dot on bfloat16 (it returns wrong "
                      "numbers); the reference runs instead", reference_fn)
    else:
        return Choice("triton", why if requested == "auto" else f"forced by {BACKEND_ENV}=triton; {why}", kernels[op])
    if requested == "triton":
        raise RuntimeError(f"{BACKEND_ENV}=triton, but {op} cannot run Triton on {device} in {dtype}: {why_not}")
    return Choice("reference", why_not, reference_fn)


def report(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, Choice]:
    """The per-op choice on ``device`` in ``dtype``: ``{op: Choice(backend, reason, fn)}``. Where the
    Triton attention (or the MoE experts' GEMM tiles) was autotuned in this process, its reason goes
    on with one line per tuned bucket: which candidate won (a Triton tile, a backward design, or an
    SDPA backend in the race against the Triton kernels) and by how much."""
    choices = {op: choose(op, device, dtype) for op in OPS}
    rows = tuning_report()
    for op in ("attention", "moe_experts"):  # the tuned ops; a row's op names its kernel ("moe experts tiles")
        if choices[op].backend != "triton":
            continue
        tuned = [_tuning().describe(row) for row in rows if row["op"].startswith(op.replace("_", " "))]
        if tuned:
            choices[op] = choices[op]._replace(reason=choices[op].reason + "; tuned here:\n    " + "\n    ".join(tuned))
    return choices


def _tuning():
    from .triton import tuning
    return tuning


def tuning_report() -> list[dict]:
    """Every autotuned (op, shape bucket) this process ran or read back: the winner, each timed
    candidate's milliseconds (fastest first), the dropped ones and why (``qwen3_kernels.ops.triton.
    tuning.report``). Empty where Triton is not installed."""
    try:
        return _tuning().report()
    except ImportError:
        return []


def sync_tuning() -> None:
    """Under ``torch.distributed``: every rank takes rank 0's autotuning choices, so all ranks run
    the same kernels. A collective: call it on every rank at the same point (after
    ``init_process_group`` for the choices rank 0's cache holds, and after the first step for those
    it tuned then); outside a distributed job it does nothing."""
    try:
        tuning = _tuning()
    except ImportError:
        return
    tuning.sync()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return choose("rms_norm", x.device, x.dtype).fn(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return choose("add_rms_norm", x.device, x.dtype).fn(x, residual, weight, eps)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return choose("apply_rope", x.device, x.dtype).fn(x, cos, sin)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    return choose("qk_norm_rope", q.device, q.dtype).fn(q, k, q_weight, k_weight, cos, sin, eps)


def qk_norm_rope_into_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor,
                            k_weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, positions: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return choose("qk_norm_rope_into_cache", q.device, q.dtype).fn(q, k, v, q_weight, k_weight, cos, sin, k_cache,
                                                                  v_cache, positions, eps)


def packed_linear(x: torch.Tensor, weights, biases=None) -> torch.Tensor:
    return choose("packed_linear", x.device, x.dtype).fn(x, weights, biases)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return choose("swiglu", gate.device, gate.dtype).fn(gate, up)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
              softmax_scale: float | None = None, kv_lens: torch.Tensor | None = None,
              cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
    return choose("attention", q.device, q.dtype).fn(q, k, v, causal, softmax_scale, kv_lens, cu_seqlens, max_seqlen)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    return choose("linear_cross_entropy", hidden.device, hidden.dtype).fn(hidden, weight, targets, ignore_index,
                                                                          reduction)


def moe_route(router_logits: torch.Tensor, top_k: int, norm_topk_prob: bool = True
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return choose("moe_route", router_logits.device, router_logits.dtype).fn(router_logits, top_k, norm_topk_prob)


def moe_experts(hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                down: torch.Tensor) -> torch.Tensor:
    return choose("moe_experts", hidden.device, hidden.dtype).fn(hidden, expert_ids, weights, gate_up, down)


for _name in OPS:  # the dispatchers document themselves with the reference's contract
    globals()[_name].__doc__ = getattr(reference, _name).__doc__
del _name
