"""How many kernels one decode step launches per layer. At batch 1 a step is launch-bound: each
launch costs ~1-2 us even inside a CUDA graph, so the count is held here (issue: <= 10 per layer).
On the CPU the count is taken at the dispatcher (every aten op that computes, and every Triton
kernel, inside qwen3_kernels ops too); on a GPU, from the profiler's kernel records."""

import collections

import pytest
import torch
from qwen3_kernels_testing.dispatch import IntoCustomOps
from qwen3_kernels_testing.kernels import KERNEL_DEVICE, needs_triton

from qwen3_kernels import QWEN, Config

pytestmark = needs_triton

MAX_LAUNCHES_PER_LAYER = 10


def _config(num_layers):
    return Config(vocab_size=97, hidden_size=64, num_layers=num_layers, num_heads=4, num_kv_heads=2, head_dim=16,
                  intermediate_size=80, max_position_embeddings=64)


class _CountingMode(IntoCustomOps):
    def __init__(self, launches: "Launches"):
        super().__init__()
        self.launches = launches

    def nested(self):
        return _CountingMode(self.launches)

    def aten(self, func, args, kwargs, out):
        self.launches.count(func, args, out)


class Launches:
    """Counts by name what would launch a GPU kernel while inside: aten ops other than views,
    allocations and metadata, and Triton kernels, inside qwen3_kernels ops too (so the GEMMs inside
    ``packed_linear`` count); what the Triton interpreter does with torch inside a launch does not.
    A host read (``item``) uncounts the op that produced its input: on CPU tensors the ops check
    index values that way (ops/_checks.py), which on a GPU they skip."""

    FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
            "alias", "set_", "resize_"}
    HOST_READS = {"_local_scalar_dense", "item"}
    GEMMS = {"linear": "mm", "matmul": "mm"}  # seen undecomposed inside an op's body: one GEMM each

    def __init__(self):
        self.counts = collections.Counter()
        self._producers = {}
        self._in_kernel = 0

    def __enter__(self):
        from triton.runtime.jit import KernelInterface
        self._getitem = getitem = KernelInterface.__getitem__
        launches = self

        def counted(kernel, grid):
            launch = getitem(kernel, grid)

            def run(*args, **kwargs):
                launches.counts[f"triton.{kernel.fn.__name__}"] += 1
                launches._in_kernel += 1
                try:
                    return launch(*args, **kwargs)
                finally:
                    launches._in_kernel -= 1
            return run

        KernelInterface.__getitem__ = counted
        self._mode = _CountingMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        from triton.runtime.jit import KernelInterface
        self._mode.__exit__(*exc)
        KernelInterface.__getitem__ = self._getitem

    def count(self, func, args, out):
        if self._in_kernel:
            return
        op = func._schema.name.split("::")[1]
        if op in self.HOST_READS:
            producer = self._producers.pop(id(args[0]), None)
            if producer is not None:
                self.counts[producer] -= 1
        elif op not in self.FREE and not self._is_view(func):
            name = "aten." + self.GEMMS.get(op, op)
            self.counts[name] += 1
            if isinstance(out, torch.Tensor) and out.dim() == 0:
                self._producers[id(out)] = name

    @staticmethod
    def _is_view(func) -> bool:
        returns = func._schema.returns
        return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _decode_step_model(num_layers, batch=2, prompt=5):
    torch.manual_seed(0)
    model = QWEN(_config(num_layers), fused=True).to(KERNEL_DEVICE).eval()
    cache = model.new_cache(batch, 32)
    with torch.inference_mode():
        model._forward(torch.randint(0, 97, (batch, prompt), device=KERNEL_DEVICE), cache)
    return model, cache


@pytest.mark.skipif(KERNEL_DEVICE != "cpu", reason="the dispatcher count is the CPU's; GPUs use the profiler")
def test_decode_step_launches_at_most_ten_kernels_per_layer(triton_everywhere):
    counts = {}
    for layers in (2, 3):
        model, cache = _decode_step_model(layers)
        token = torch.randint(0, 97, (2, 1))
        with torch.inference_mode(), Launches() as launches:
            model._forward(token, cache, last_only=True)
        counts[layers] = +launches.counts
    per_layer = counts[3] - counts[2]
    assert not (counts[2] - counts[3]), f"ops that ran less often with more layers: {counts[2] - counts[3]}"
    assert per_layer["triton._rope_fwd_kernel"] == 1, "q, k and the cache writes are one launch"
    assert per_layer["aten.mm"] == 4, f"qkv, o, gate/up and down: four GEMMs, got {dict(per_layer)}"
    total = sum(per_layer.values())
    assert total <= MAX_LAUNCHES_PER_LAYER, f"{total} launches per layer: {dict(per_layer)}"


@pytest.mark.skipif(KERNEL_DEVICE != "cuda", reason="counts CUDA kernels with the profiler")
def test_decode_step_launches_at_most_ten_cuda_kernels_per_layer():
    from torch.profiler import ProfilerActivity, profile

    kernels = {}
    for layers in (2, 3):
        model, cache = _decode_step_model(layers)
        token = torch.randint(0, 97, (2, 1), device="cuda")
        with torch.inference_mode():
            model._forward(token, cache, last_only=True)  # compile and tune first
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                model._forward(token, cache, last_only=True)
                torch.cuda.synchronize()
        kernels[layers] = collections.Counter(
            e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    per_layer = kernels[3] - kernels[2]
    total = sum(per_layer.values())
    assert total <= MAX_LAUNCHES_PER_LAYER, f"{total} kernels per layer: {dict(per_layer)}"
