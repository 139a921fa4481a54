"""Triton flash attention (forward, backward, split-KV decode) against float64 and eager PyTorch,
under the flash-attention rule. On the CPU the kernels run in Triton's interpreter, which cannot do
tl.dot on bfloat16, so bf16 is covered by the CUDA cases."""

from qwen3_kernels_testing import float64
import pytest
import torch
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import DEVICES, atol, needs_triton, rand

from qwen3_kernels.ops import reference

pytestmark = needs_triton

# bf16 only where the kernels are compiled: the interpreter cannot run tl.dot on bf16
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
HEADS = [(16, 8), (8, 1), (4, 4)]


def _attention():
    from qwen3_kernels.ops.triton import attention
    return attention


def _inputs(B, Tq, Tk, H, Hkv, D, dtype, device, grad=True):
    q = rand(B, Tq, H, D, dtype=dtype, device=device, seed=0)
    k = rand(B, Tk, Hkv, D, dtype=dtype, device=device, seed=1)
    v = rand(B, Tk, Hkv, D, dtype=dtype, device=device, seed=2)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _check(B, Tq, Tk, H, Hkv, D, dtype, device, grads=True, kv_lens=None):
    attn = _attention()
    q, k, v = _inputs(B, Tq, Tk, H, Hkv, D, dtype, device, grads)
    with torch.set_grad_enabled(grads):
        out = attn.attention(q, k, v, causal=True, kv_lens=kv_lens)
        eager = reference.attention(q, k, v, causal=True, kv_lens=kv_lens)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = float64.attention(*leaves64, kv_lens=kv_lens.cpu() if kv_lens is not None else None)
    assert out.dtype == dtype
    assert_within_rule(out, eager, exact.to(out.device), 2, atol(dtype, exact), "out")
    if not grads:
        return
    _assert_grads_within_rule(out, eager, exact, (q, k, v), leaves64)


def _assert_grads_within_rule(out, eager, exact, leaves, leaves64):
    """dq, dk, dv of ``out`` against float64 (``exact`` over ``leaves64``), 3x eager's error."""
    dout = rand(*out.shape, dtype=out.dtype, device=out.device, seed=3)
    grads = torch.autograd.grad(out, leaves, dout)
    grads_eager = torch.autograd.grad(eager, leaves, dout)
    grads64 = torch.autograd.grad(exact, leaves64, dout.double().cpu())
    for name, g, ge, g64 in zip(("dq", "dk", "dv"), grads, grads_eager, grads64):
        assert_within_rule(g, ge, g64.to(g.device), 3, atol(out.dtype, g64), name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 77, 130, 256])
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_prefill_forward_and_backward(device, dtype, T, H, Hkv):
    D = 128 if (H, Hkv) == (16, 8) else 64
    _check(1 if T > 100 else 2, T, T, H, Hkv, D, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_chunked_prefill_bottom_right_causal(device, dtype, H, Hkv):
    _check(2, 19, 83, H, Hkv, 64, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("Tk", [1, 1000])
@pytest.mark.parametrize("H, Hkv", HEADS)
def test_decode_split_kv(device, dtype, Tk, H, Hkv):
    attn = _attention()
    q, k, _ = _inputs(2, 1, Tk, H, Hkv, 128, dtype, device, grad=False)
    assert attn.use_decode_kernel(q, k) == (Tk >= 4)
    _check(2, 1, Tk, H, Hkv, 128, dtype, device, grads=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Tq", [1, 3])
def test_batch_of_mixed_kv_lengths(device, Tq):
    kv_lens = torch.tensor([300, 1, 77, 2], device=device, dtype=torch.int32)
    _check(4, Tq, 300, 8, 2, 64, torch.float32, device, grads=False, kv_lens=kv_lens)  # split-KV decode
    _check(4, Tq, 300, 8, 2, 64, torch.float32, device, grads=True, kv_lens=kv_lens)   # flash fwd + bwd


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("grads", [False, True])
def test_rows_that_see_no_key_are_zero_not_nan(device, grads):
    attn = _attention()
    q, k, v = _inputs(1, 40, 9, 4, 2, 64, torch.float32, device, grads)  # Tq > Tk: the first 31 rows see nothing
    out = attn.attention(q, k, v)
    assert not out.isnan().any()
    assert torch.equal(out[:, :31], torch.zeros_like(out[:, :31]))
    if grads:
        dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        assert not any(g.isnan().any() for g in (dq, dk, dv))
        assert torch.equal(dq[:, :31], torch.zeros_like(dq[:, :31]))
    _check(1, 40, 9, 4, 2, 64, torch.float32, device, grads)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    attn = _attention()
    q, k, v = _inputs(2, 70, 70, 8, 2, 64, torch.float16, device)
    dout = rand(2, 70, 8, 64, dtype=torch.float16, device=device, seed=3)
    first = torch.autograd.grad(attn.attention(q, k, v), (q, k, v), dout)
    second = torch.autograd.grad(attn.attention(q, k, v), (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("packed", [False, True])
def test_split_backward_equals_the_joint_one(device, packed, monkeypatch):
    """The dK/dV kernel run as two launches (dV, then dK: the split design) gives the joint launch's
    gradients exactly: each element is the same sum in the same order."""
    attn = _attention()
    q, k, v = _inputs(1, 70, 70, 8, 2, 32, torch.float16, device)
    dout = rand(1, 70, 8, 32, dtype=torch.float16, device=device, seed=3)
    packing = dict(cu_seqlens=torch.tensor([0, 33, 70], dtype=torch.int32, device=device), max_seqlen=37) \
        if packed else {}
    default = attn.bwd_candidates(attn.device_arch(q.device), 32, torch.float16)[0]
    joint = attn.bwd_candidate("joint", default["dkdv"], default["dq"])
    split = attn.bwd_candidate("split", default["dkdv"], default["dq"])
    with torch.no_grad():
        out, lse = attn.attention_forward(q, k, v, True, 32 ** -0.5, **packing)
    together = attn.attention_backward(dout, q, k, v, out, lse, True, 32 ** -0.5, candidate=joint, **packing)
    launches = []
    kernel = attn._attn_bwd_dkdv_kernel
    monkeypatch.setattr(attn, "_attn_bwd_dkdv_kernel", type("Spy", (), {
        "__getitem__": lambda self, grid: lambda *a, **kw: launches.append(kw) or kernel[grid](*a, **kw)})())
    apart = attn.attention_backward(dout, q, k, v, out, lse, True, 32 ** -0.5, candidate=split, **packing)
    assert [(kw["WITH_DK"], kw["WITH_DV"]) for kw in launches] == [(False, True), (True, False)]
    assert all(torch.equal(a, b) for a, b in zip(together, apart))


def _candidate_ids(arch_dims):
    return [(arch, D, i) for arch, D in arch_dims
            for i in range(len(_attention().bwd_candidates(arch, D, torch.float16, deterministic=False)))]


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs sm_80/sm_90 candidates in the CPU interpreter")
@pytest.mark.parametrize("arch, D, index", _candidate_ids([(90, 128), (90, 64), (90, 32), (80, 128), (80, 64),
                                                           (80, 32)]),
                         ids=lambda x: str(x))
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_every_backward_candidate_is_within_the_rule(arch, D, index, packed):
    """Each backward candidate of sm_90 and sm_80 (its own tiles, launches and, for the atomic
    designs, fp32 atomic adds into dQ) run in the interpreter as that GPU would launch it: dq, dk,
    dv against float64 within 3x eager's error, on a causal GQA batch of odd length (several key
    and query blocks, the masked band and the unmasked blocks) or on packed sequences."""
    from qwen3_kernels.ops.triton import _common
    attn = _attention()
    cand = attn.bwd_candidates(arch, D, torch.float16, deterministic=False)[index]
    dtype, H, Hkv = torch.float16, 4, 2
    if packed:
        (q, k, v), cu_seqlens = _packed([9, 70, 1, 50], H, Hkv, D, dtype, "cpu")
        packing = dict(cu_seqlens=cu_seqlens, max_seqlen=70)
    else:
        q, k, v = _inputs(2, 83, 83, H, Hkv, D, dtype, "cpu")
        packing = {}
    scale = D ** -0.5
    dout = rand(*q.shape, dtype=dtype, seed=3)
    with torch.no_grad(), _common.simulated_gpu(arch, 4):
        out, lse = attn.attention_forward(q, k, v, True, scale, config=attn.fwd_candidates(arch, D, dtype)[0],
                                          **packing)
        grads = attn.attention_backward(dout, q, k, v, out, lse, True, scale, candidate=cand, **packing)
    eager = reference.attention(q, k, v, softmax_scale=scale, **packing)
    grads_eager = torch.autograd.grad(eager, (q, k, v), dout)
    leaves64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if packed:
        bounds = packing["cu_seqlens"].tolist()
        exact = torch.cat([float64.attention(*(t[:, a:b] for t in leaves64), scale=scale)
                           for a, b in zip(bounds, bounds[1:])], dim=1)
    else:
        exact = float64.attention(*leaves64, scale=scale)
    grads64 = torch.autograd.grad(exact, leaves64, dout.double())
    for name, g, ge, g64 in zip(("dq", "dk", "dv"), grads, grads_eager, grads64):
        assert g.dtype == dtype and g.shape == g64.shape
        assert_within_rule(g, ge, g64, 3, atol(dtype, g64), f"{cand['name']} {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_non_causal_and_custom_scale(device):
    attn = _attention()
    q, k, v = _inputs(1, 21, 33, 4, 2, 32, torch.float32, device, grad=False)
    out = attn.attention(q, k, v, causal=False, softmax_scale=0.2)
    exact = float64.attention(q.cpu(), k.cpu(), v.cpu(), causal=False, scale=0.2)
    eager = reference.attention(q, k, v, causal=False, softmax_scale=0.2)
    assert_within_rule(out, eager, exact.to(device), 2, atol(torch.float32, exact), "out")


@pytest.mark.parametrize("device", DEVICES)
def test_strided_projection_views(device):
    """q/k/v as views of one fused projection output, read in place."""
    attn = _attention()
    qkv = rand(2, 17, (4 + 2 + 2) * 64, device=device)
    q = qkv[..., :256].view(2, 17, 4, 64)
    k = qkv[..., 256:384].view(2, 17, 2, 64)
    v = qkv[..., 384:].view(2, 17, 2, 64)
    torch.testing.assert_close(attn.attention(q, k, v), reference.attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_unsupported_head_dim_falls_back_with_a_warning(caplog, monkeypatch):
    attn = _attention()
    monkeypatch.setattr(attn, "_warned_head_dims", set())
    q, k, v = _inputs(1, 5, 5, 2, 1, 24, torch.float32, "cpu", grad=False)
    out = attn.attention(q, k, v)
    torch.testing.assert_close(out, reference.attention(q, k, v))
    assert any("head_dim 24 has no Triton kernel" in r.getMessage() for r in caplog.records)


def test_bad_inputs_are_named():
    attn = _attention()
    q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 4, 4, 16), torch.randn(1, 4, 4, 16)
    with pytest.raises(ValueError, match=r"query heads \(6\) must be a multiple of KV heads \(4\)"):
        attn.attention(q, k, v)
    with pytest.raises(ValueError, match=r"kv_lens must be an int32/int64 tensor of shape \(1,\)"):
        attn.attention(torch.randn(1, 4, 4, 16), k, v, kv_lens=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="must both be"):
        attn.attention(torch.randn(1, 4, 4, 16), k, v[..., :8])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="long sequences need a GPU")
@pytest.mark.parametrize("S, grads", [(4096, True), (16384, False)])
def test_long_sequences_bf16_on_gpu(S, grads):
    """fp32 SDPA stands in for float64 at these lengths."""
    attn = _attention()
    q, k, v = _inputs(1, S, 16, 8, 128, torch.bfloat16, "cuda", grads)
    out = attn.attention(q, k, v)
    eager = reference.attention(q, k, v)
    leaves32 = [t.detach().float().requires_grad_(grads) for t in (q, k, v)]
    exact = reference.attention(*leaves32)
    assert_within_rule(out, eager, exact, 2, atol(torch.bfloat16, exact), "out")
    if grads:
        dout = rand(1, S, 16, 128, dtype=torch.bfloat16, device="cuda", seed=3)
        for name, g, ge, g32 in zip(("dq", "dk", "dv"), torch.autograd.grad(out, (q, k, v), dout),
                                    torch.autograd.grad(eager, (q, k, v), dout),
                                    torch.autograd.grad(exact, leaves32, dout.float())):
            assert_within_rule(g, ge, g32, 3, atol(torch.bfloat16, g32), name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("H, Hkv, Tq, Tk", [(16, 8, 77, 77), (8, 1, 19, 83), (8, 2, 130, 130), (4, 4, 33, 33)])
def test_group_packed_forward(device, dtype, H, Hkv, Tq, Tk):
    """The autotune candidate that tiles all query heads of a KV group together gives the same
    attention (forward, LSE) as the one-head tiles."""
    attn = _attention()
    q, k, v = _inputs(2, Tq, Tk, H, Hkv, 64, dtype, device, grad=False)
    base = attn.fwd_candidates(attn.device_arch(q.device), 64, dtype)[0]
    packed = {**base, "pack_group": True}
    assert attn.can_pack_group(packed, H // Hkv)
    out, lse = attn.attention_forward(q, k, v, True, 0.125, config=packed)
    ref_out, ref_lse = attn.attention_forward(q, k, v, True, 0.125, config=base)
    # the tiles split the online softmax at other keys: equal up to summation order
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-5 if dtype == torch.float32 else 2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    exact = float64.attention(q.double(), k.double(), v.double(), scale=0.125)
    assert_within_rule(out, reference.attention(q, k, v, softmax_scale=0.125), exact, 2, atol(dtype, exact), "out")


def _tma_config(attn, device, D, dtype, **extra):
    """The default forward tile of this device with K/V read through TMA descriptors."""
    arch = attn.device_arch(torch.device(device))
    if device == "cuda" and arch < 90:
        pytest.skip("the TMA candidates are offered on sm_90 only (fwd_candidates); below it Triton lowers "
                    "descriptors to plain loads, a path the package never launches")
    base = {**attn.fwd_candidates(arch, D, dtype)[0], **extra}
    return base, {**base, "tma": True}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["batch", "group-packed", "cache", "packed"])
def test_tma_forward_equals_the_pointer_forward(device, dtype, case):
    """The TMA candidates (K/V through tensor descriptors over all batch rows) compute what the
    cp.async ones do: tiles that run past a sequence read the next sequence's rows or a cache's
    unwritten (here NaN) slots, and the masks must make those count for nothing."""
    attn = _attention()
    H, Hkv, D = 8, 2, 64
    base, tma = _tma_config(attn, device, D, dtype, **({"pack_group": True} if case == "group-packed" else {}))
    q, k, v = _inputs(2, 45, 45, H, Hkv, D, dtype, device, grad=False)
    kwargs, exact = {}, None
    if case == "cache":  # a 19-token chunk appended to caches of 45 and 30 tokens, NaN past them
        cache_k = torch.full((2, 64, Hkv, D), float("nan"), dtype=dtype, device=device)
        cache_v = cache_k.clone()
        kv_lens = torch.tensor([45, 30], dtype=torch.int32, device=device)
        for b, n in enumerate(kv_lens.tolist()):
            cache_k[b, :n], cache_v[b, :n] = k[b, :n], v[b, :n]
        q, k, v, kwargs = q[:, -19:], cache_k, cache_v, {"kv_lens": kv_lens}
        exact = torch.cat([float64.attention(*(t[b:b + 1, :n].double().cpu() for t in (q[:, -min(19, n):], k, v)))
                           for b, n in enumerate(kv_lens.tolist())])
    elif case == "packed":  # 90 tokens as sequences of 7, 40, 1 and 42
        q, k, v = (t.reshape(1, 90, *t.shape[2:]) for t in (q, k, v))
        kwargs = {"cu_seqlens": torch.tensor([0, 7, 47, 48, 90], dtype=torch.int32, device=device), "max_seqlen": 42}
        bounds = kwargs["cu_seqlens"].tolist()
        exact = torch.cat([float64.attention(*(t[:, a:b].double().cpu() for t in (q, k, v)))
                           for a, b in zip(bounds, bounds[1:])], dim=1)
    out, lse = attn.attention_forward(q, k, v, True, D ** -0.5, config=tma, **kwargs)
    ref_out, ref_lse = attn.attention_forward(q, k, v, True, D ** -0.5, config=base, **kwargs)
    assert not out.isnan().any()
    # the same tiles and sums: equal but for the interpreter's fp32 matmul, which sums a transposed
    # K operand in another order (1 ulp)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=2e-6 if dtype == torch.float32 else 0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=2e-6)
    if exact is None:
        exact = float64.attention(q.double().cpu(), k.double().cpu(), v.double().cpu())
    # eager attention multiplies the NaN slots by zero weights: it gets zeros there instead
    eager = reference.attention(q, k.nan_to_num(0.0), v.nan_to_num(0.0), **kwargs)
    assert_within_rule(out, eager, exact.to(out.device), 2, atol(dtype, exact), "out")


def test_tma_needs_unit_stride_heads_and_aligned_rows():
    attn = _attention()
    q, k, v = _inputs(2, 9, 9, 4, 2, 32, torch.float16, "cpu", grad=False)
    assert attn.can_use_tma(k, v)
    wide = torch.zeros(2, 9, 2, 40, dtype=torch.float16)
    assert not attn.can_use_tma(wide[..., :32], v)  # heads 40 apart: the descriptor's columns are not the heads
    odd = torch.zeros(2, 9 * 2 * 32 + 1, dtype=torch.float16)[:, 1:].view(2, 9, 2, 32)
    assert not attn.can_use_tma(k, odd)  # base 2 bytes past 16-byte alignment
    _, tma = _tma_config(attn, "cpu", 32, torch.float16)
    with pytest.raises(ValueError, match=r"TMA descriptors.*strides \(720, 80, 40, 1\)"):
        attn.attention_forward(q, wide[..., :32], v, True, 0.2, config=tma)


def test_autotune_drops_candidates_that_disagree_or_fail(caplog):
    """The forward autotuner only lets a candidate win on speed if its output agrees with the
    default's: a fast candidate computing something else, or one that fails to launch, is dropped
    and named in a warning."""
    attn = _attention()
    out, lse = rand(2, 5, 4, 8, dtype=torch.bfloat16), rand(2, 4, 5, seed=1)
    ulp = torch.finfo(torch.bfloat16).eps * out.abs().max().item()
    results = {"default": (out, lse), "wrong": (out + 8 * ulp, lse), "reordered": (out + ulp, lse + 1e-4)}
    times = {"default": 3.0, "wrong": 1.0, "reordered": 2.0, "broken": 0.5}

    launched, timed = [], []

    def launch(cfg):
        launched.append(cfg["name"])
        if cfg["name"] == "broken":
            raise RuntimeError("TMA descriptor rejected")
        return results[cfg["name"]]

    def measure(run):
        run()
        timed.append(launched[-1])
        return times[launched[-1]]

    candidates = [{"name": n} for n in ("default", "wrong", "broken", "reordered")]
    assert attn.fastest_agreeing(candidates, launch, measure) == {"name": "reordered"}
    assert timed == ["default", "reordered"]  # the dropped ones are never timed
    messages = [r.getMessage() for r in caplog.records]
    assert any("dropped {'name': 'wrong'}" in m and "disagrees" in m for m in messages)
    assert any("dropped {'name': 'broken'}" in m and "TMA descriptor rejected" in m for m in messages)


def _packed(lengths, H, Hkv, D, dtype, device):
    total = sum(lengths)
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return _inputs(1, total, total, H, Hkv, D, dtype, device), cu_seqlens


# one token, odd lengths, longer than a tile (the interpreter's tiles are 16), many short ones
PACKINGS = [[1, 5, 40, 3, 17], [70], [2] * 9 + [33], [1, 1, 1]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lengths", PACKINGS, ids=lambda lens: "-".join(map(str, lens)))
@pytest.mark.parametrize("causal", [True, False])
def test_packed_sequences_attend_only_to_themselves(device, dtype, lengths, causal):
    """Varlen attention against each sequence alone in float64 (and the eager reference), forward
    and backward, GQA included."""
    attn = _attention()
    H, Hkv, D = (4, 2, 64) if len(lengths) > 1 else (16, 8, 128)
    (q, k, v), cu_seqlens = _packed(lengths, H, Hkv, D, dtype, device)
    out = attn.attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens, max_seqlen=max(lengths))
    eager = reference.attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens)
    leaves64 = [t.detach().double().cpu().requires_grad_() for t in (q, k, v)]
    bounds = cu_seqlens.tolist()
    exact = torch.cat([float64.attention(*(t[:, a:b] for t in leaves64), causal=causal)
                       for a, b in zip(bounds, bounds[1:])], dim=1)
    assert_within_rule(out, eager, exact.to(out.device), 2, atol(dtype, exact), "out")
    _assert_grads_within_rule(out, eager, exact, (q, k, v), leaves64)


@pytest.mark.parametrize("device", DEVICES)
def test_packed_sequences_without_max_seqlen_and_deterministic(device):
    attn = _attention()
    (q, k, v), cu_seqlens = _packed([9, 30, 4], 4, 1, 32, torch.float32, device)
    first = attn.attention(q, k, v, cu_seqlens=cu_seqlens)  # max_seqlen read from cu_seqlens
    again = attn.attention(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=30)
    assert torch.equal(first, again)
    dout = rand(*first.shape, device=device, seed=5)
    g1 = torch.autograd.grad(first, (q, k, v), dout)
    g2 = torch.autograd.grad(again, (q, k, v), dout)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def test_bad_cu_seqlens_are_named():
    attn = _attention()
    (q, k, v), cu = _packed([3, 4], 2, 1, 16, torch.float32, "cpu")
    for fn in (attn.attention, reference.attention):
        with pytest.raises(ValueError, match="cu_seqlens must not decrease"):
            fn(q, k, v, cu_seqlens=torch.tensor([0, 5, 3, 7], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"cu_seqlens must run from 0 to the 7 packed tokens, got 0 \.\. 6"):
            fn(q, k, v, cu_seqlens=torch.tensor([0, 3, 6], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"cu_seqlens must be an int32 tensor of shape \(n \+ 1,\)"):
            fn(q, k, v, cu_seqlens=cu.long())
        with pytest.raises(ValueError, match="cannot be combined"):
            fn(q, k, v, cu_seqlens=cu, kv_lens=torch.tensor([7], dtype=torch.int32))
        with pytest.raises(ValueError, match=r"max_seqlen=3 is shorter than the longest packed sequence \(4"):
            fn(q, k, v, cu_seqlens=cu, max_seqlen=3)
        with pytest.raises(ValueError, match=r"packed sequences need q \(1, total, H, D\)"):
            fn(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), cu_seqlens=cu)
