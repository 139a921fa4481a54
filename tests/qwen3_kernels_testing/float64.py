"""Naive float64 formulas for every op, written independently of ``qwen3_kernels.ops.reference``,
and the flash-attention tolerance rule the kernel tests use."""

import math

import torch


def rms_norm(x, weight, eps=1e-6):
    x = x.double()
    return weight.double() * x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


def rope(x, cos, sin):
    x, cos, sin = x.double(), cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def swiglu(gate, up):
    gate = gate.double()
    return gate / (1 + torch.exp(-gate)) * up.double()


def attention(q, k, v, causal=True, scale=None, kv_lens=None):
    """q (B, Tq, H, D), k/v (B, Tk, Hkv, D); causal mask aligned bottom-right (to kv_lens[b] when
    given, keys past it ignored); rows that see no key are 0."""
    if kv_lens is not None:
        return torch.cat([attention(q[b:b + 1], k[b:b + 1, :n], v[b:b + 1, :n], causal, scale)
                          for b, n in enumerate(kv_lens.tolist())])
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    group = H // Hkv
    q, k, v = q.double(), k.double().repeat_interleave(group, 2), v.double().repeat_interleave(group, 2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + (Tk - Tq), float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item()


def assert_within_rule(out, eager, exact, factor=2.0, atol=1e-6, name="output"):
    """The flash-attention rule: ``out``'s error against the float64 ``exact`` is at most ``factor``
    times the error of eager PyTorch (``eager``, same dtype as ``out``) plus ``atol``. NaN never passes."""
    assert not torch.isnan(out).any(), f"{name} has NaN"
    assert out.shape == exact.shape, f"{name} shape {tuple(out.shape)} != {tuple(exact.shape)}"
    err, eager_err = max_err(out, exact), max_err(eager, exact)
    assert err <= factor * eager_err + atol, \
        f"{name}: error {err:.3e} > {factor} x eager error {eager_err:.3e} + {atol:g}"


def assert_greedy_within(reference, out, prompt_len, attention_mask=None, rtol=1e-4):
    """Greedy tokens from two implementations may part ways where the top two logits are closer
    than the implementations' rounding differences, so GPU-vs-CPU runs are not compared token for
    token. Instead every generated token of ``out`` (B, prompt_len + new) must be the argmax of the
    ``reference`` model's logits for the same prefix, up to ``rtol`` of the logits' magnitude.
    Left padding (``attention_mask`` zeros) is dropped row by row, as generate() does."""
    out = out.cpu()
    mask = attention_mask.cpu() if attention_mask is not None else torch.ones_like(out[:, :prompt_len])
    with torch.no_grad():
        for b in range(out.shape[0]):
            pad = int((mask[b] == 0).sum())
            row = out[b, pad:]
            logits = reference(row[None])[0].double()  # (T, vocab): position t predicts token t + 1
            tol = rtol * max(1.0, logits.abs().max().item())
            for t in range(prompt_len - pad, row.numel()):
                step = logits[t - 1]
                shortfall = (step.max() - step[row[t]]).item()
                assert shortfall <= tol, (f"row {b}, generated token {t - prompt_len + pad}: {row[t].item()} is "
                                          f"{shortfall:.3e} below the reference's best logit (tolerance {tol:.1e})")
