"""Triton MoE router and experts (forward and backward) against float64 and eager PyTorch, under the
flash-attention rule. On the CPU the kernels run in Triton's interpreter, which cannot do tl.dot on
bfloat16: the experts' bf16 cases run where the kernels are compiled, the router (no tl.dot) runs
bf16 everywhere."""

import math

import pytest
import torch
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import DEVICES, DTYPES, atol, needs_triton, rand

from qwen3_kernels import ops
from qwen3_kernels.ops import reference

pytestmark = needs_triton

EXPERT_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


def _moe():
    from qwen3_kernels.ops.triton import moe
    return moe


# ---- float64 ground truth, written independently of ops.reference ----

def route64(logits, top_k, norm):
    probs = torch.softmax(logits.double(), -1)
    weights, ids = torch.topk(probs, top_k, -1)
    return (weights / weights.sum(-1, keepdim=True) if norm else weights), ids


def experts64(hidden, expert_ids, weights, gate_up, down):
    """Token by token, slot by slot: sum_j w * down[e] @ (silu(g) * u), [g; u] = gate_up[e] @ x."""
    I = down.shape[2]
    rows = []
    for n in range(hidden.shape[0]):
        acc = hidden.new_zeros(hidden.shape[1], dtype=torch.float64)
        for j in range(expert_ids.shape[1]):
            e = int(expert_ids[n, j])
            gu = gate_up[e].double() @ hidden[n].double()
            g, u = gu[:I], gu[I:]
            acc = acc + weights[n, j].double() * (down[e].double() @ (g * torch.sigmoid(g) * u))
        rows.append(acc)
    return torch.stack(rows)


# ---- inputs ----

def _routing(N, E, top_k, idle=(), hot=None, seed=0, dtype=torch.int64):
    """(N, k) distinct expert ids per token: never an ``idle`` expert, the ``hot`` one (if any) in every
    row (an uneven load: several row tiles for it, one or none for the others)."""
    g = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(E) if e not in idle]
    rows = []
    for _ in range(N):
        perm = [allowed[i] for i in torch.randperm(len(allowed), generator=g).tolist()]
        if hot is not None:
            perm = [hot] + [e for e in perm if e != hot]
        rows.append(perm[:top_k])
    return torch.tensor(rows, dtype=dtype)


def _inputs(N, H, I, E, top_k, dtype, device, idle=(), hot=None, ids_dtype=torch.int64):
    hidden = rand(N, H, dtype=dtype, device=device, seed=1).requires_grad_()
    gate_up = rand(E, 2 * I, H, dtype=dtype, device=device, seed=2, scale=1 / math.sqrt(H)).requires_grad_()
    down = rand(E, H, I, dtype=dtype, device=device, seed=3, scale=1 / math.sqrt(I)).requires_grad_()
    ids = _routing(N, E, top_k, idle, hot, dtype=ids_dtype).to(device)
    w = torch.softmax(rand(N, top_k, seed=4), -1).to(device=device, dtype=dtype).requires_grad_()
    return hidden, ids, w, gate_up, down


def _check_experts(N, H, I, E, top_k, dtype, device, **routing):
    moe = _moe()
    hidden, ids, w, gate_up, down = _inputs(N, H, I, E, top_k, dtype, device, **routing)
    leaves = (hidden, w, gate_up, down)
    out = moe.moe_experts(hidden, ids, w, gate_up, down)
    eager = reference.moe_experts(hidden, ids, w, gate_up, down)
    leaves64 = [t.detach().cpu().double().requires_grad_() for t in leaves]
    exact = experts64(leaves64[0], ids.cpu(), *leaves64[1:])
    assert out.dtype == dtype and out.shape == (N, H)
    assert_within_rule(out, eager, exact.to(device), 2, atol(dtype, exact), "out")
    dout = rand(N, H, dtype=dtype, device=device, seed=5)
    grads = torch.autograd.grad(out, leaves, dout)
    grads_eager = torch.autograd.grad(eager, leaves, dout)
    grads64 = torch.autograd.grad(exact, leaves64, dout.cpu().double())
    for name, g, ge, g64 in zip(("d hidden", "d weights", "d gate_up", "d down"), grads, grads_eager, grads64):
        assert g.dtype == dtype and g.shape == g64.shape, name
        assert_within_rule(g, ge, g64.to(device), 3, atol(dtype, g64), name)
    return grads


# ---- experts ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", EXPERT_DTYPES)
@pytest.mark.parametrize("N, H, I, E, top_k, routing", [
    (37, 48, 40, 6, 2, dict(idle=(4,), hot=0)),            # uneven load (expert 0: 37 rows), one idle expert
    (37, 48, 40, 6, 3, dict(idle=(1, 5), ids_dtype=torch.int32)),
    (1, 48, 40, 6, 2, dict()),                              # decode: one token
    (5, 32, 24, 4, 4, dict()),                              # top_k = E
    (9, 64, 16, 8, 2, dict(idle=(0, 1, 2, 3, 4, 5))),       # every token on the same two experts
])
def test_experts_forward_and_gradients(device, dtype, N, H, I, E, top_k, routing):
    _check_experts(N, H, I, E, top_k, dtype, device, **routing)


@pytest.mark.parametrize("device", DEVICES)
def test_idle_experts_get_zero_weight_gradients(device):
    moe = _moe()
    hidden, ids, w, gate_up, down = _inputs(11, 32, 16, 5, 2, torch.float32, device, idle=(2,))
    out = moe.moe_experts(hidden, ids, w, gate_up, down)
    dgu, dd = torch.autograd.grad(out, (gate_up, down), torch.ones_like(out))
    assert torch.equal(dgu[2], torch.zeros_like(dgu[2])) and torch.equal(dd[2], torch.zeros_like(dd[2]))
    assert dgu[0].abs().sum() > 0 and dd[0].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    moe = _moe()
    hidden, ids, w, gate_up, down = _inputs(37, 48, 40, 6, 3, torch.float16, device, hot=1)
    dout = rand(37, 48, dtype=torch.float16, device=device, seed=5)
    runs = [torch.autograd.grad(moe.moe_experts(hidden, ids, w, gate_up, down), (hidden, w, gate_up, down), dout)
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_forward_equals_the_training_forward(device):
    """Without gradients the forward keeps no pre-activations; its output is the same."""
    moe = _moe()
    args = _inputs(13, 32, 24, 4, 2, torch.float32, device)
    with torch.no_grad():
        plain = moe.moe_experts(*args)
    assert torch.equal(plain, moe.moe_experts(*args).detach())


@pytest.mark.parametrize("fused", [True, False], ids=["one-program", "device-sort"])
def test_routing_metadata_and_tile_bound(fused):
    moe = _moe()
    ids = torch.tensor([[3, 0], [0, 3], [2, 0], [3, 2]])
    order, pos, offsets = moe.routing(ids, 5, fused=fused)
    assert offsets.tolist() == [0, 3, 3, 5, 8, 8]  # expert 1 and 4: no row
    assert order.tolist() == [1, 2, 5, 4, 7, 0, 3, 6]  # stable: slots of each expert in token order
    assert torch.equal(order[pos.long()], torch.arange(8, dtype=torch.int32))
    bad = torch.tensor([[3, 0], [0, -1], [2, 7], [3, 2]])  # ids outside [0, 5): rows outside [offsets[0], offsets[5])
    order, pos, offsets = moe.routing(bad, 5, fused=fused)
    assert torch.equal(order[pos.long()], torch.arange(8, dtype=torch.int32))
    assert int(offsets[5]) - int(offsets[0]) == 6
    assert not ((pos[[3, 5]] >= offsets[0]) & (pos[[3, 5]] < offsets[5])).any()
    g = torch.Generator().manual_seed(0)
    for block_m in (16, 64, 128):
        for _ in range(200):
            E = int(torch.randint(1, 200, (1,), generator=g))
            counts = torch.randint(0, 300, (E,), generator=g) * (torch.rand(E, generator=g) < 0.5)
            rows = int(counts.sum())
            needed = int(((counts + block_m - 1) // block_m).sum())
            assert needed <= moe._tile_slots(rows, E, block_m)


def test_one_program_routing_equals_the_device_sort():
    moe = _moe()
    g = torch.Generator().manual_seed(0)
    for rows, experts in [(1, 4), (8, 128), (111, 6), (512, 128), (1000, 7)]:
        for dtype in (torch.int32, torch.int64):
            ids = torch.randint(0, experts, (rows, 1), generator=g).to(dtype)
            one, sort = moe.routing(ids, experts, fused=True), moe.routing(ids, experts, fused=False)
            assert all(torch.equal(a, b) for a, b in zip(one, sort)), (rows, experts, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_experts_with_the_device_sort_routing(device, monkeypatch):
    """Above FUSED_ROUTING_MAX_ROWS the metadata comes from a device sort; the same experts result."""
    monkeypatch.setattr(_moe(), "FUSED_ROUTING_MAX_ROWS", 0)
    _check_experts(37, 48, 40, 6, 2, torch.float32, device, idle=(4,), hot=0)


def test_decode_and_prefill_configs():
    moe = _moe()
    for arch in (80, 90):
        assert moe.gemm_config(arch, 8, 128, torch.bfloat16)["BLOCK_M"] == 16      # 1 token x 8 experts
        assert moe.gemm_config(arch, 512, 128, torch.bfloat16)["BLOCK_M"] == 16    # 64 tokens x 8 experts
        assert moe.gemm_config(arch, 65536, 128, torch.bfloat16)["BLOCK_M"] == 128  # 8k-token prefill


def test_tuner_ranks_tiles_and_the_backward_reuses_the_choice(monkeypatch, tmp_path):
    """sm_90's decode-class candidates on the interpreter (``simulated_gpu``) with a fake clock: the
    fastest agreeing one is chosen once, remembered, served to the backward, and computes within
    the rule; while a graph is captured (lookup) nothing is timed."""
    from qwen3_kernels.ops.triton import _common, attention, tuning
    moe = _moe()
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    monkeypatch.delenv(tuning.LOG_ENV, raising=False)
    tuning.forget()
    monkeypatch.setattr(attention, "_tuning_mode", lambda device: "tune")
    N, H, I, E, k = 24, 64, 48, 4, 2  # 12 rows per expert: the 16-row class
    names = [moe.config_name(c) for c in moe.gemm_candidates(90, N * k, E, torch.float16)]
    assert len(names) == 3
    launched, timed = [], []
    forward_gemms = moe._forward_gemms

    def spy(cfg, *args):
        launched.append(moe.config_name(cfg))
        return forward_gemms(cfg, *args)

    def clock(run):
        run()
        timed.append(launched[-1])
        return {names[2]: 1.0}.get(launched[-1], 5.0)

    monkeypatch.setattr(moe, "_forward_gemms", spy)
    monkeypatch.setattr(moe, "_measure", clock)
    try:
        with _common.simulated_gpu(90, 4):
            _check_experts(N, H, I, E, k, torch.float16, "cpu", hot=0)
            assert sorted(timed) == sorted(names) and launched[-1] == names[2]
            chosen = moe.tuned_gemm_config(torch.device("cpu"), torch.float16, H, I, E, k, N * k)
            assert moe.config_name(chosen) == names[2]  # what the backward used
            timed.clear()
            _check_experts(N, H, I, E, k, torch.float16, "cpu", hot=0)
            assert timed == [] and launched[-1] == names[2]  # remembered: nothing timed again
            monkeypatch.setattr(attention, "_tuning_mode", lambda device: "lookup")

            def looked_up():
                return moe.config_name(moe.tuned_gemm_config(torch.device("cpu"), torch.float16, H, I, E, k, N * k))

            tuning.forget()
            assert looked_up() == names[2]  # read back from the cache file, as a new process would
            monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path / "empty"))
            tuning.forget()
            assert looked_up() == names[0] and timed == []  # nothing remembered: the default, nothing timed
    finally:
        tuning.forget()


# ---- router ----

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, E, top_k, norm", [(37, 6, 2, True), (37, 6, 3, False), (5, 128, 8, True),
                                               (1, 128, 8, True), (4, 7, 7, True)])
def test_route_forward_and_gradient(device, dtype, N, E, top_k, norm):
    moe = _moe()
    logits = rand(N, E, dtype=dtype, device=device, scale=2.0).requires_grad_()
    weights, ids = moe.moe_route(logits, top_k, norm)
    eager_w, eager_ids = reference.moe_route(logits, top_k, norm)
    logits64 = logits.detach().cpu().double().requires_grad_()
    exact_w, exact_ids = route64(logits64, top_k, norm)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    assert torch.equal(ids.cpu(), exact_ids) and torch.equal(ids, eager_ids)
    assert_within_rule(weights, eager_w, exact_w.to(device), 2, atol(dtype, exact_w), "weights")
    dw = rand(N, top_k, dtype=dtype, device=device, seed=7)
    grad, = torch.autograd.grad(weights, logits, dw)
    grad_eager, = torch.autograd.grad(eager_w, logits, dw)
    grad64, = torch.autograd.grad(exact_w, logits64, dw.cpu().double())
    assert_within_rule(grad, grad_eager, grad64.to(device), 3, atol(dtype, grad64), "d router_logits")


def test_route_ids_stay_in_range_with_nan_or_infinite_logits():
    moe = _moe()
    logits = torch.tensor([[0.0, float("nan"), 1.0, -1.0], [float("-inf")] * 4, [float("inf"), 0.0, float("inf"), 2.0]])
    weights, ids = moe.moe_route(logits, 2, False)
    assert ((ids >= 0) & (ids < 4)).all() and (ids[:, 0] != ids[:, 1]).all()
    assert ids[0].tolist() == [1, 2]  # NaN counts as the largest, then the largest number
    assert ids[2].tolist() == [0, 2]  # equal logits: the lowest index first
    assert torch.isnan(weights).all()  # what the softmax makes of them (torch's too)
    assert torch.isnan(reference.moe_route(logits, 2, False)[0]).all()


# ---- registration, compile, dispatch, bad inputs ----

def test_opcheck():
    moe = _moe()  # noqa: F841  (registers the ops)
    hidden, ids, w, gate_up, down = _inputs(7, 32, 16, 4, 2, torch.float32, DEVICES[0])
    torch.library.opcheck(torch.ops.qwen3_kernels.moe_experts.default, (hidden, ids, w, gate_up, down, True))
    logits = rand(7, 6, device=DEVICES[0]).requires_grad_()
    torch.library.opcheck(torch.ops.qwen3_kernels.moe_route.default, (logits, 2, True))


def test_compiles_with_fullgraph():
    moe = _moe()
    hidden, ids, w, gate_up, down = _inputs(9, 32, 16, 4, 2, torch.float32, DEVICES[0])
    router = rand(32, 4, seed=9, device=DEVICES[0]).requires_grad_()

    def block(x, router, gate_up, down):
        weights, ids = moe.moe_route(x @ router, 2)
        return moe.moe_experts(x, ids, weights, gate_up, down)

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    leaves = (hidden, router, gate_up, down)
    eager_out, out = block(*leaves), compiled(*leaves)
    assert torch.equal(out, eager_out)
    dout = torch.ones_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(eager_out, leaves, dout)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="30B-A3B shapes need a GPU")
@pytest.mark.parametrize("tokens", [16, 512, 4096])  # the decode, mid-size and prefill tiles
def test_30b_a3b_shapes_bf16_on_gpu(tokens):
    """fp32 stands in for float64 at these sizes: every tile config on real shapes, under the rule."""
    moe = _moe()
    H, I, E, k = 2048, 768, 128, 8
    hidden = rand(tokens, H, dtype=torch.bfloat16, device="cuda", seed=1).requires_grad_()
    gate_up = rand(E, 2 * I, H, dtype=torch.bfloat16, device="cuda", seed=2, scale=H ** -0.5).requires_grad_()
    down = rand(E, H, I, dtype=torch.bfloat16, device="cuda", seed=3, scale=I ** -0.5).requires_grad_()
    w32, ids = reference.moe_route(rand(tokens, E, device="cuda", seed=4), k)
    w = w32.to(torch.bfloat16).requires_grad_()
    leaves = (hidden, w, gate_up, down)
    out, eager = moe.moe_experts(hidden, ids, w, gate_up, down), reference.moe_experts(hidden, ids, w, gate_up, down)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    exact = reference.moe_experts(leaves32[0], ids, *leaves32[1:])
    assert_within_rule(out, eager, exact, 2, atol(torch.bfloat16, exact), "out")
    dout = rand(tokens, H, dtype=torch.bfloat16, device="cuda", seed=5)
    for name, g, ge, g32 in zip(("d hidden", "d weights", "d gate_up", "d down"),
                                torch.autograd.grad(out, leaves, dout), torch.autograd.grad(eager, leaves, dout),
                                torch.autograd.grad(exact, leaves32, dout.float())):
        assert_within_rule(g, ge, g32, 3, atol(torch.bfloat16, g32), name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_decode_step_is_cuda_graph_capturable():
    """No host sync in the routing: one token's block is captured once, and replays with other
    expert ids written into the captured input give the eager result."""
    moe = _moe()
    hidden, ids, w, gate_up, down = (t.detach() for t in _inputs(1, 256, 128, 16, 4, torch.bfloat16, "cuda"))
    static = [t.clone() for t in (hidden, ids, w)]
    moe.moe_experts(*static, gate_up, down)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe.moe_experts(*static, gate_up, down)
    for seed in range(3):
        new_ids = _routing(1, 16, 4, seed=seed + 10).cuda()
        static[1].copy_(new_ids)
        graph.replay()
        torch.testing.assert_close(out, moe.moe_experts(hidden, new_ids, w, gate_up, down), rtol=0, atol=0)


def test_dispatcher_runs_the_kernels(triton_everywhere):
    hidden, ids, w, gate_up, down = _inputs(5, 32, 16, 4, 2, torch.float32, DEVICES[0])
    for op in ("moe_route", "moe_experts"):
        assert ops.choose(op, hidden.device, torch.float32).fn is getattr(_moe(), op)
    torch.testing.assert_close(ops.moe_experts(hidden, ids, w, gate_up, down),
                               reference.moe_experts(hidden, ids, w, gate_up, down))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_inputs_are_named(backend):
    impl = reference if backend == "reference" else _moe()
    hidden, ids, w, gate_up, down = (t.detach() for t in _inputs(3, 16, 8, 4, 2, torch.float32, "cpu"))
    with pytest.raises(ValueError, match=r"expert_ids must be in \[0, 4\)"):
        impl.moe_experts(hidden, ids + 3, w, gate_up, down)
    with pytest.raises(ValueError, match="down must be"):
        impl.moe_experts(hidden, ids, w, gate_up, down[:, :, :4])
    with pytest.raises(TypeError, match="expert_ids must be int32 or int64"):
        impl.moe_experts(hidden, ids.float(), w, gate_up, down)
    with pytest.raises(TypeError, match="weights dtype torch.float16 differs"):
        impl.moe_experts(hidden, ids, w.half(), gate_up, down)
    with pytest.raises(ValueError, match=r"weights shape \(3, 1\) != expert_ids shape \(3, 2\)"):
        impl.moe_experts(hidden, ids, w[:, :1], gate_up, down)
    with pytest.raises(ValueError, match=r"top_k must be an integer in \[1, 4\]"):
        impl.moe_route(torch.randn(3, 4), 5)
    with pytest.raises(ValueError, match=r"router_logits must be \(tokens, experts\)"):
        impl.moe_route(torch.randn(3), 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_fused_rows", [1024, 0], ids=["one-program", "device-sort"])
def test_out_of_range_expert_ids_contribute_nothing(device, max_fused_rows, monkeypatch):
    """On the GPU the ids are not read on the host (no sync), so an id outside [0, E) is not an error
    there: its slot adds nothing and gets no gradient (rows no GEMM wrote are never read)."""
    moe = _moe()
    monkeypatch.setattr(moe, "FUSED_ROUTING_MAX_ROWS", max_fused_rows)
    hidden, ids, w, gate_up, down = _inputs(11, 32, 16, 4, 2, torch.float32, device)
    bad = ids.clone()
    bad[3, 1], bad[7, 0] = 4, -1
    out, pre, order, pos, offsets = moe.moe_experts_forward(hidden, bad, w, gate_up, down, True)
    keep = torch.ones_like(w)
    keep[3, 1] = keep[7, 0] = 0
    expected = reference.moe_experts(hidden, ids, w * keep, gate_up, down)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grads = moe.moe_experts_backward(torch.ones_like(out), hidden, w, gate_up, down, pre, order, pos, offsets)
    assert all(torch.isfinite(g).all() for g in grads)
    assert grads[1][3, 1] == 0 and grads[1][7, 0] == 0
