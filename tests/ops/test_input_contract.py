"""Both backends take the same inputs: what the reference accepts the kernels accept (with results
under the flash-attention rule), and what one rejects the other rejects with the same message."""

import pytest
import torch
from qwen3_kernels_testing.kernels import KERNEL_DEVICE, needs_triton, rand

from qwen3_kernels.ops import reference

pytestmark = needs_triton


def _triton():
    from qwen3_kernels.ops import triton as kernels
    return kernels.KERNELS


def _same_outcome(op, *args):
    """Runs ``op`` on both backends; returns both results, or asserts both raised alike."""
    outcomes = []
    for fn in (getattr(reference, op), _triton()[op]):
        try:
            outcomes.append(("ok", fn(*args)))
        except (TypeError, ValueError) as e:
            outcomes.append((type(e), str(e)))
    (kind_ref, ref), (kind_tri, tri) = outcomes
    assert kind_ref == kind_tri, f"{op}: reference {kind_ref} {ref if kind_ref != 'ok' else ''} vs triton " \
                                 f"{kind_tri} {tri if kind_tri != 'ok' else ''}"
    if kind_ref != "ok":
        assert ref == tri, f"{op}: different messages:\n  reference: {ref}\n  triton:    {tri}"
    return kind_ref, ref, tri


def _close(ref, tri, tol):
    for a, b in zip(ref if isinstance(ref, tuple) else (ref,), tri if isinstance(tri, tuple) else (tri,)):
        assert a.shape == b.shape
        torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)


D = KERNEL_DEVICE


@pytest.mark.parametrize("residual_shape", [(24,), (1, 5, 24), (2, 1, 24)])
def test_add_rms_norm_accepts_broadcast_residuals(residual_shape):
    x, w = rand(2, 5, 24, device=D), rand(24, device=D, seed=1)
    kind, ref, tri = _same_outcome("add_rms_norm", x, rand(*residual_shape, device=D, seed=2), w, 1e-6)
    assert kind == "ok"
    _close(ref, tri, 1e-5)


def test_add_rms_norm_broadcast_residual_gradient():
    x = rand(2, 5, 24, device=D).requires_grad_()
    r = rand(24, device=D, seed=2).requires_grad_()
    w = rand(24, device=D, seed=1)
    grads = []
    for fn in (reference.add_rms_norm, _triton()["add_rms_norm"]):
        y, s = fn(x, r, w, 1e-6)
        grads.append(torch.autograd.grad((y * rand(2, 5, 24, device=D, seed=3)).sum() + s.sum(), (x, r)))
    for g_ref, g_tri in zip(*grads):
        torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-4)


def test_rope_accepts_1_t_d_tables():
    x = rand(3, 7, 4, 16, device=D)
    cos, sin = rand(1, 7, 16, device=D, seed=1), rand(1, 7, 16, device=D, seed=2)
    kind, ref, tri = _same_outcome("apply_rope", x, cos, sin)
    assert kind == "ok"
    _close(ref, tri, 1e-5)
    q, k = rand(3, 7, 4, 16, device=D, seed=3), rand(3, 7, 2, 16, device=D, seed=4)
    kind, ref, tri = _same_outcome("qk_norm_rope", q, k, rand(16, device=D, seed=5), rand(16, device=D, seed=6),
                                   cos, sin, 1e-6)
    assert kind == "ok"
    _close(ref, tri, 1e-5)


@pytest.mark.parametrize("op, make", [
    ("rms_norm", lambda: (rand(4, 8, device=D, dtype=torch.float16), torch.ones(8, device=D, dtype=torch.int32),
                          1e-6)),
    ("rms_norm", lambda: (torch.tensor(3.0, device=D), rand(1, device=D), 1e-6)),
    ("rms_norm", lambda: (rand(4, 8, device=D), rand(7, device=D), 1e-6)),
    ("add_rms_norm", lambda: (rand(4, 8, device=D), rand(3, 8, device=D), rand(8, device=D), 1e-6)),
    ("add_rms_norm", lambda: (rand(4, 8, device=D), rand(4, 8, device=D, dtype=torch.float16), rand(8, device=D),
                              1e-6)),
    ("apply_rope", lambda: (rand(2, 5, 4, 16, device=D), rand(5, 16, device=D, dtype=torch.float16),
                            rand(5, 16, device=D))),
    ("apply_rope", lambda: (rand(2, 5, 4, 16, device=D), rand(3, 5, 16, device=D), rand(3, 5, 16, device=D))),
    ("swiglu", lambda: (torch.tensor(1.0, device=D), torch.tensor(2.0, device=D))),
    ("swiglu", lambda: (rand(3, 8, device=D), rand(3, 8, device=D, dtype=torch.float16))),
    ("attention", lambda: (rand(1, 4, 4, 16, device=D), rand(1, 4, 2, 16, device=D, dtype=torch.float16),
                           rand(1, 4, 2, 16, device=D, dtype=torch.float16))),
    ("attention", lambda: (rand(1, 4, 3, 16, device=D), rand(1, 4, 2, 16, device=D), rand(1, 4, 2, 16, device=D))),
])
def test_bad_inputs_get_the_same_error(op, make):
    kind, message, _ = _same_outcome(op, *make())
    assert kind in (TypeError, ValueError) and op.split("_")[0] in message or "cos/sin" in message or "head" in message


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="kv_lens values are checked where reading them is free: CPU")
@pytest.mark.parametrize("lens", [[3, 9], [-1, 2]])
def test_kv_lens_out_of_range(lens):
    q, k = rand(2, 1, 4, 16), rand(2, 8, 2, 16, seed=1)
    kv_lens = torch.tensor(lens, dtype=torch.int32)
    kind, message, _ = _same_outcome("attention", q, k, k, True, None, kv_lens)
    assert kind is ValueError and "kv_lens must be in [0, Tk=8]" in message


def test_kernels_keep_no_reference_to_their_inputs():
    """A launcher that cached its inputs (a memoised helper taking tensors) would hold every batch's
    activations alive for the life of the process."""
    import gc
    import weakref
    q, k, v = (rand(1, 5, 2, 16, device=KERNEL_DEVICE, seed=s) for s in range(3))
    w = rand(16, device=KERNEL_DEVICE, seed=3)
    cos, sin = rand(5, 16, device=KERNEL_DEVICE, seed=4), rand(5, 16, device=KERNEL_DEVICE, seed=5)
    seen = [weakref.ref(t) for t in (q, k, v)]
    out = _triton()["attention"](q, k, v, True, None, None, None, None)
    out = _triton()["qk_norm_rope"](q, k, w, w, cos, sin, 1e-6)
    del q, k, v, out
    gc.collect()
    assert [r() for r in seen] == [None, None, None]
