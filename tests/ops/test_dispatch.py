"""Which implementation runs where, torch.library registration (opcheck), and compile-cleanliness."""

import os

import pytest
import torch
from qwen3_kernels_testing.float64 import assert_within_rule
from qwen3_kernels_testing.kernels import KERNEL_DEVICE, atol, needs_triton, rand

from qwen3_kernels import ops


@pytest.fixture
def fresh_choices(monkeypatch):
    monkeypatch.setattr(ops, "_choices", {})


@pytest.mark.parametrize("capability, dtype, backend", [
    ((9, 0), torch.bfloat16, "triton"), ((8, 0), torch.float16, "triton"), ((8, 6), torch.float32, "triton"),
    ((7, 5), torch.float16, "triton"), ((7, 0), torch.float32, "triton"), ((7, 5), torch.bfloat16, "reference"),
    ((6, 1), torch.float16, "reference"),
])
@needs_triton
def test_choice_by_cuda_capability(monkeypatch, fresh_choices, capability, dtype, backend):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None)
    for op, choice in ops.report("cuda:0", dtype).items():
        assert choice.backend == backend, (op, choice)
        assert choice.reason


@needs_triton
def test_rocm_uses_triton(monkeypatch, fresh_choices):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert ops.choose("rms_norm", "cuda:0", torch.bfloat16).backend == "triton"


def test_cpu_and_other_devices_use_the_reference(fresh_choices):
    for device in ("cpu", "meta"):
        for op, choice in ops.report(device, torch.float32).items():
            assert choice.backend == "reference", (device, op)
    assert "GPU" in ops.choose("rms_norm", "cpu", torch.float32).reason


@needs_triton
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter is on only in CPU-only runs")
def test_forcing_triton(monkeypatch, fresh_choices):
    monkeypatch.setenv("QWEN3_KERNELS_BACKEND", "triton")
    choice = ops.choose("swiglu", "cpu", torch.float32)  # the interpreter is on (conftest)
    assert choice.backend == "triton" and "interpreter" in choice.reason
    x, w = rand(3, 64), rand(64, seed=1)
    torch.testing.assert_close(ops.rms_norm(x, w), ops.reference.rms_norm(x, w), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="QWEN3_KERNELS_BACKEND=triton, but rms_norm cannot run Triton on "
                                           "meta in torch.float32"):
        ops.choose("rms_norm", "meta", torch.float32)
    with pytest.raises(RuntimeError, match="int64 is not a kernel dtype"):
        ops.choose("swiglu", "cpu", torch.int64)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="cannot run Triton on cpu"):
        ops.choose("swiglu", "cpu", torch.float32)


def test_forcing_reference(monkeypatch, fresh_choices):
    monkeypatch.setenv("QWEN3_KERNELS_BACKEND", "reference")
    assert all(c.backend == "reference" and "forced" in c.reason for c in ops.report("cpu").values())


def test_unknown_op_is_named():
    with pytest.raises(KeyError, match="unknown op 'layer_norm'"):
        ops.choose("layer_norm", "cpu", torch.float32)


@needs_triton
@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm", "apply_rope", "qk_norm_rope", "qk_norm_rope_into_cache",
                                  "swiglu", "flash_attention", "decode_attention", "packed_linear",
                                  "linear_cross_entropy"])
def test_opcheck(name):
    import qwen3_kernels.ops.triton  # noqa: F401  (registers the ops)
    B, T, H, Hkv, D = 2, 3, 4, 2, 16
    dev = dict(device=KERNEL_DEVICE)
    cos, sin = rand(T, D, seed=5, **dev), rand(T, D, seed=6, **dev)
    args = {
        "rms_norm": (rand(5, 48, **dev).requires_grad_(), rand(48, seed=1, **dev).requires_grad_(), 1e-6),
        "add_rms_norm": (rand(5, 48, **dev).requires_grad_(), rand(5, 48, seed=1, **dev).requires_grad_(),
                         rand(48, seed=2, **dev).requires_grad_(), 1e-6),
        "apply_rope": (rand(B, T, H, D, **dev).requires_grad_(), cos, sin),
        "qk_norm_rope": (rand(B, T, H, D, **dev).requires_grad_(),
                         rand(B, T, Hkv, D, seed=1, **dev).requires_grad_(),
                         rand(D, seed=2, **dev).requires_grad_(), rand(D, seed=3, **dev).requires_grad_(),
                         cos, sin, 1e-6),
        "qk_norm_rope_into_cache": (rand(B, T, H, D, **dev), rand(B, T, Hkv, D, seed=1, **dev),
                                    rand(B, T, Hkv, D, seed=4, **dev), rand(D, seed=2, **dev), rand(D, seed=3, **dev),
                                    cos, sin, rand(B, 11, Hkv, D, seed=7, **dev), rand(B, 11, Hkv, D, seed=8, **dev),
                                    torch.tensor([[0, 1, 2], [5, 6, 7]], **dev), 1e-6),
        "swiglu": (rand(5, 40, **dev).requires_grad_(), rand(5, 40, seed=1, **dev).requires_grad_()),
        "packed_linear": (rand(B, T, 24, **dev).requires_grad_(),
                          [rand(n, 24, seed=s, **dev).requires_grad_() for s, n in enumerate((16, 8, 8))]),
        "linear_cross_entropy": (rand(13, 24, **dev).requires_grad_(), rand(300, 24, seed=1, **dev).requires_grad_(),
                                 torch.tensor([5, -100, 299, 0, 7, 7, -100, 1, 2, 3, 250, 11, 12], **dev), -100),
        "flash_attention": (rand(B, 19, H, D, **dev).requires_grad_(),
                            rand(B, 23, Hkv, D, seed=1, **dev).requires_grad_(),
                            rand(B, 23, Hkv, D, seed=2, **dev).requires_grad_(), None, True, 0.25),
        "decode_attention": (rand(B, 1, H, D, **dev), rand(B, 40, Hkv, D, seed=1, **dev),
                             rand(B, 40, Hkv, D, seed=2, **dev),
                             torch.tensor([40, 17], dtype=torch.int32, **dev), True, 0.25),
    }[name]
    torch.library.opcheck(getattr(torch.ops.qwen3_kernels, name).default, args)


@needs_triton
def test_interpreter_never_runs_bf16_tl_dot(monkeypatch, fresh_choices):
    """Triton's interpreter returns garbage for bf16 tl.dot: bf16 attention and MoE experts on CPU
    tensors go to the reference even when Triton is forced, and the report says why; the other
    kernels stay."""
    monkeypatch.setenv("QWEN3_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    report = ops.report("cpu", torch.bfloat16)
    for op in ops._TL_DOT_OPS:
        assert report[op].backend == "reference" and "tl.dot on bfloat16" in report[op].reason, op
        assert ops.choose(op, "cpu", torch.float16).backend == "triton", op
    assert all(report[op].backend == "triton" for op in ops.OPS if op not in ops._TL_DOT_OPS)


@needs_triton
def test_bf16_fused_model_under_the_interpreter_is_exact(monkeypatch, fresh_choices):
    from qwen3_kernels import QWEN, Config
    monkeypatch.setenv("QWEN3_KERNELS_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    config = Config(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=96, max_position_embeddings=64)
    torch.manual_seed(0)
    reference = QWEN(config).to(torch.bfloat16)
    fused = QWEN(config, fused=True).to(torch.bfloat16)
    fused.load_state_dict(reference.state_dict())
    ids = torch.randint(0, 97, (2, 11))
    exact = QWEN(config).double()
    exact.load_state_dict(reference.state_dict())
    with torch.no_grad():
        truth = exact(ids)
        # the flash-attention rule against float64; a bf16 tl.dot under the interpreter is off by far more
        assert_within_rule(fused(ids), reference(ids), truth, 2, atol(torch.bfloat16, truth), "logits")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch that sees no CUDA device")
def test_report_for_cuda_without_cuda_says_why(fresh_choices):
    for op, choice in ops.report("cuda", torch.bfloat16).items():
        assert choice.backend == "reference" and "sees no CUDA device" in choice.reason, (op, choice)
