"""Fused linear cross-entropy: the next-token loss ``cross_entropy(hidden @ weight.T, targets)`` and
its gradients without ever holding the (N x V) logits or their gradient.

How: the vocabulary is walked in chunks of ``vocab_chunk`` rows of the weight. Each chunk's logits
(N x vc) come from one cuBLAS GEMM in the input dtype (the rounding eager PyTorch and transformers
apply), and a Triton kernel folds them into a running log-sum-exp per token and picks out the target
logit. The backward recomputes each chunk's logits (one more GEMM: the price of never storing them),
turns them in place into ``dlogits = scale * (softmax - onehot)`` with the saved log-sum-exp, and
then:

- ``dW[chunk] = dlogits.T @ hidden``: the chunk's whole weight gradient in one GEMM over all tokens
  (fp32 accumulation inside cuBLAS, one rounding), written straight into the gradient, so no
  (V x C) fp32 buffer exists at any time (Liger-Kernel holds one from forward to backward);
- ``dhidden += dlogits @ W[chunk]`` into an fp32 (N x C) accumulator (activation-sized), cast once.

Why chunk the vocabulary and not the tokens (as Liger does): a token chunk has whole rows, so its
softmax needs no second pass, but every token chunk then adds into all of dW, which needs the (V x C)
fp32 accumulator. Chunking the vocabulary makes dW exact per chunk and moves the accumulation to
dhidden, which is N x C: 16 MB per 1k tokens at C = 4096, against 2.5 GB for dW of Qwen3-8B. The
cost is the recomputed GEMM: 4 GEMM passes over N x V x C instead of 3, while eager also writes and
reads the logits several times in fp32 (memory-bound, ~12 bytes per logit).

Peak extra memory (beyond inputs, the loss and the gradients themselves), with ``vc`` =
``vocab_chunk(N, V, element_size)`` (about ``LOGITS_CHUNK_BYTES / (N * element_size)``, rounded to
256): ``N * vc * element_size`` for a logits chunk, plus in the backward ``N * C * 4`` for the fp32
dhidden accumulator and, for fp16/bf16 on CUDA, ``N * C * 4`` for one chunk's fp32 partial product,
plus ``16 * N`` bytes of per-token state. Nothing syncs with the host (chunk sizes come from shapes;
the count of counted tokens stays on the device), so the loss can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import _checks, reference
from ._common import on_tensor_device

LOGITS_CHUNK_BYTES = 256 * 2**20  # one chunk of logits; the rest of the extra memory is per token


@triton.jit
def _lse_chunk_kernel(LOGITS, TARGETS, MAX, SUMEXP, TARGET_LOGIT, V_CHUNK, v0, stride, ignore_index,
                      BLOCK: tl.constexpr):
    """One token's logits over vocab rows [v0, v0 + V_CHUNK): folds ``max`` and ``sum(exp(l - max))``
    into the running MAX/SUMEXP (fp32, log-sum-exp = MAX + log(SUMEXP)) and, if the target lies in
    the chunk, stores its logit (fp32, as rounded in the input dtype) in TARGET_LOGIT."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    offs = tl.arange(0, BLOCK)
    m = tl.load(MAX + row)
    s = tl.load(SUMEXP + row)
    for start in range(0, V_CHUNK, BLOCK):
        cols = start + offs
        x = tl.load(base + cols, mask=cols < V_CHUNK, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    target = tl.load(TARGETS + row)
    local = target - v0
    if (target != ignore_index) & (local >= 0) & (local < V_CHUNK):
        tl.store(TARGET_LOGIT + row, tl.load(base + local).to(tl.float32))


@triton.jit
def _dlogits_chunk_kernel(LOGITS, TARGETS, LSE, SCALE, V_CHUNK, v0, stride, ignore_index, BLOCK: tl.constexpr):
    """In place, for one token: ``l <- scale * (exp(l - lse) - [v0 + j == target])`` over the chunk's
    columns j (0 for an ignored token): the gradient of ``scale * (lse - l[target])``."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride
    offs = tl.arange(0, BLOCK)
    target = tl.load(TARGETS + row)
    lse = tl.load(LSE + row)
    scale = tl.where(target == ignore_index, 0.0, tl.load(SCALE + row))
    local = target - v0
    for start in range(0, V_CHUNK, BLOCK):
        cols = start + offs
        mask = cols < V_CHUNK
        x = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        grad = tl.exp(x - lse) - tl.where(cols == local, 1.0, 0.0)
        tl.store(base + cols, (scale * grad).to(LOGITS.dtype.element_ty), mask=mask)


def vocab_chunk(n_tokens: int, vocab: int, element_size: int) -> int:
    """Vocab rows per chunk: a (n_tokens x chunk) logits block of about LOGITS_CHUNK_BYTES, a multiple
    of 256 (GEMM-friendly), at least 256, at most the vocabulary."""
    rows = LOGITS_CHUNK_BYTES // max(1, n_tokens * element_size)
    return int(min(vocab, max(256, rows // 256 * 256)))


_BLOCK, _WARPS = 2048, 8  # one token's chunk row, 8 elements per thread per step


def _logits_chunk(buffer: torch.Tensor, hidden: torch.Tensor, weight_rows: torch.Tensor) -> torch.Tensor:
    """hidden @ weight_rows.T into the front of ``buffer``, as a contiguous (N, rows) tensor."""
    N, rows = hidden.shape[0], weight_rows.shape[0]
    logits = buffer.view(-1)[:N * rows].view(N, rows)
    return torch.mm(hidden, weight_rows.t(), out=logits)


_half_mm_to_fp32 = True  # torch.mm(..., out_dtype=torch.float32) on CUDA (torch >= 2.8); probed on first use


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc += a @ b`` with fp32 accumulation throughout (acc is fp32; a, b may be half precision)."""
    global _half_mm_to_fp32
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _half_mm_to_fp32:  # half-precision inputs, fp32 output: the partial is not rounded
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):
            _half_mm_to_fp32 = False
        acc.add_(a @ b)  # rounded to a's dtype once per chunk, then accumulated in fp32
    elif a.is_cuda:
        acc.add_(a @ b)
    else:  # CPU: exact
        acc.addmm_(a.float(), b.float())


@on_tensor_device
def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                 ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (N, C), weight (V, C), targets (N,) -> (per-token losses (N,), log-sum-exp (N,)), fp32.
    An ignored token's loss is 0; a target outside [0, V) gives NaN (checked with an error on CPU
    tensors, where reading the targets costs no sync)."""
    N, V = hidden.shape[0], weight.shape[0]
    device = hidden.device
    running_max = torch.full((N,), float("-inf"), dtype=torch.float32, device=device)
    sumexp = torch.zeros(N, dtype=torch.float32, device=device)
    target_logit = torch.zeros(N, dtype=torch.float32, device=device)
    if N:
        chunk = vocab_chunk(N, V, hidden.element_size())
        buffer = torch.empty((N, chunk), dtype=hidden.dtype, device=device)
        for v0 in range(0, V, chunk):
            logits = _logits_chunk(buffer, hidden, weight[v0:v0 + chunk])
            _lse_chunk_kernel[(N,)](logits, targets, running_max, sumexp, target_logit, logits.shape[1], v0,
                                    logits.stride(0), ignore_index, BLOCK=_BLOCK, num_warps=_WARPS)
    lse = running_max + torch.log(sumexp)
    counted = targets != ignore_index
    in_range = (targets >= 0) & (targets < V)
    losses = torch.where(counted, torch.where(in_range, lse - target_logit, float("nan")), 0.0)
    return losses, lse


@on_tensor_device
def linear_cross_entropy_backward(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                  targets: torch.Tensor, lse: torch.Tensor, ignore_index: int, need_hidden: bool,
                                  need_weight: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(dhidden (N, C) or None, dweight (V, C) or None) for the per-token loss gradients (N,)."""
    N, C = hidden.shape
    V = weight.shape[0]
    scale = grad_losses.to(torch.float32).contiguous()
    dhidden = torch.zeros((N, C), dtype=torch.float32, device=hidden.device) if need_hidden else None
    dweight = None
    if need_weight:
        dweight = torch.empty_like(weight) if N else torch.zeros_like(weight)
    if N:
        chunk = vocab_chunk(N, V, hidden.element_size())
        buffer = torch.empty((N, chunk), dtype=hidden.dtype, device=hidden.device)
        for v0 in range(0, V, chunk):
            rows = weight[v0:v0 + chunk]
            dlogits = _logits_chunk(buffer, hidden, rows)  # recomputed, then turned into its gradient
            _dlogits_chunk_kernel[(N,)](dlogits, targets, lse, scale, dlogits.shape[1], v0, dlogits.stride(0),
                                        ignore_index, BLOCK=_BLOCK, num_warps=_WARPS)
            if dweight is not None:
                torch.mm(dlogits.t(), hidden, out=dweight[v0:v0 + chunk])
            if dhidden is not None:
                _add_product(dhidden, dlogits, rows)
    return (None if dhidden is None else dhidden.to(hidden.dtype)), dweight


# --- torch.library registration ---

@torch.library.custom_op("qwen3_kernels::linear_cross_entropy", mutates_args=())
def _linear_cross_entropy_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    return linear_cross_entropy_forward(hidden, weight, targets, ignore_index)


@_linear_cross_entropy_op.register_fake
def _(hidden, weight, targets, ignore_index):
    N = hidden.shape[0]
    return hidden.new_empty(N, dtype=torch.float32), hidden.new_empty(N, dtype=torch.float32)


@torch.library.custom_op("qwen3_kernels::linear_cross_entropy_backward", mutates_args=())
def _linear_cross_entropy_backward_op(grad_losses: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                                      targets: torch.Tensor, lse: torch.Tensor, ignore_index: int,
                                      need_hidden: bool, need_weight: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dhidden, dweight = linear_cross_entropy_backward(grad_losses, hidden, weight, targets, lse, ignore_index,
                                                     need_hidden, need_weight)
    # a custom op returns tensors: an empty one stands for a gradient nobody asked for
    return (hidden.new_empty(0) if dhidden is None else dhidden), (weight.new_empty(0) if dweight is None else dweight)


@_linear_cross_entropy_backward_op.register_fake
def _(grad_losses, hidden, weight, targets, lse, ignore_index, need_hidden, need_weight):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0))


def _setup_linear_cross_entropy(ctx, inputs, output):
    hidden, weight, targets, ignore_index = inputs
    ctx.save_for_backward(hidden, weight, targets, output[1])
    ctx.ignore_index = ignore_index


def _backward_linear_cross_entropy(ctx, grad_losses, _grad_lse):
    hidden, weight, targets, lse = ctx.saved_tensors
    need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dhidden, dweight = _linear_cross_entropy_backward_op(grad_losses, hidden, weight, targets, lse,
                                                         ctx.ignore_index, need_hidden, need_weight)
    return (dhidden if need_hidden else None), (dweight if need_weight else None), None, None


_linear_cross_entropy_op.register_autograd(_backward_linear_cross_entropy, setup_context=_setup_linear_cross_entropy)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean") -> torch.Tensor:
    _checks.linear_cross_entropy(hidden, weight, targets, ignore_index, reduction)
    C = hidden.shape[-1]
    losses, _ = _linear_cross_entropy_op(hidden.reshape(-1, C), weight, targets.reshape(-1).long(), int(ignore_index))
    return reference.reduce_token_losses(losses, targets, ignore_index, reduction)
