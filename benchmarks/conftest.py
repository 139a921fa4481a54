"""Shared machinery: device, the card's measured peaks, honest timing and roofline extra_info.

GPU timing synchronises inside the timed call, warms up (compilation and autotuning happen before
any round is timed), rotates several input sets when they would fit in L2, and pytest-benchmark
reports the median. Every benchmark stores op, shape, provider, bytes or FLOPs, achieved GB/s or
TFLOP/s and % of the card's measured peak in ``extra_info``; ``python -m benchmarks.report`` turns
the JSON into the table, speedups and goal checks."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()

# The benchmarks the goals are judged on (benchmarks/report.py's GOALS), by test id: run first by
# scripts/gpu_check.sh (`--tier goals`), the rest after (`--tier rest`) while its time budget lasts.
GOAL_CASES = (
    r"test_prefill\[fwd(\+bwd)?-(4096|16384)-(triton|sdpa)",  # attention at S 4k/16k vs the best SDPA backend
    r"test_decode\[32768-1-(triton|sdpa)",                    # decode at batch 1 over 32k of cache
    r"test_(rms_norm|qk_norm_rope|swiglu)\[.*-16384-.*-?(triton|compile)\]",  # memory-bound ops, >= 64 MB
    r"test_gpu_decode\[1-fused",                              # end-to-end batch-1 decode
    r"test_gpu_prefill\[8-1024-(fused|transformers)",         # end-to-end prefill vs transformers
    r"test_linear_cross_entropy\[8192-1024-",                # the fused loss vs eager, compile, Liger
    r"test_train_step\[",                                     # qwen3-kernels train vs transformers
    r"test_moe_experts\[(8192-fwd\+bwd|1-fwd)-",               # the 30B-A3B MoE block vs Liger, grouped_mm
    r"test_gpu_moe_decode",                                   # batch-1 decode of a 30B-A3B-shaped model
)


def pytest_addoption(parser):
    parser.addoption("--tier", choices=("all", "goals", "rest"), default="all",
                     help="goals: only the cases the goals are judged on; rest: all the others")


def pytest_collection_modifyitems(config, items):
    import re
    tier = config.getoption("--tier")
    if tier == "all":
        return
    is_goal = [any(re.search(p, item.nodeid) for p in GOAL_CASES) for item in items]
    keep = [item for item, goal in zip(items, is_goal) if goal == (tier == "goals")]
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = keep
needs_gpu = pytest.mark.skipif(not CUDA, reason="GPU case: needs a CUDA device (this machine has none)")
L2_BYTES = 50 * 2**20  # H100: 50 MiB; inputs smaller than this are rotated so L2 does not flatter them


def sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def peak():
    """The card's measured peaks: bandwidth (a large device-to-device copy) and bf16 matmul FLOP/s."""
    if not CUDA:
        return {"gbps": None, "tflops": None, "device": "cpu"}
    result = {"gbps": _copy_gbps(1 << 30), "tflops": _matmul_tflops(8192), "device": torch.cuda.get_device_name()}
    torch.cuda.empty_cache()
    return result


def _copy_gbps(n: int) -> float:
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * n / _cuda_median_ms(lambda: dst.copy_(src)) / 1e6  # read + write


def _matmul_tflops(n: int) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / _cuda_median_ms(lambda: a @ b) / 1e9


def _cuda_median_ms(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def input_sets(make, bytes_per_set: int, max_sets: int = 8) -> list:
    """Enough independent input sets that cycling through them does not run from L2."""
    count = 1 if not CUDA or bytes_per_set >= L2_BYTES else min(max_sets, -(-2 * L2_BYTES // bytes_per_set))
    return [make(seed) for seed in range(count)]


def run(benchmark, fn, sets: list, *, op: str, shape: str, provider: str, peak: dict,
        bytes: int | None = None, flops: float | None = None, rounds: int = 20, warmup: int = 3):
    """Times ``fn(*inputs)`` over rotating input ``sets`` and records the roofline numbers. On a GPU
    each call is timed with CUDA events (device time, no host overhead of the timer) and their
    median is the result (``median_s``); pytest-benchmark's wall-clock stats stay alongside."""
    state = {"i": 0}
    event_ms: list[float] = []

    def call():
        inputs = sets[state["i"] % len(sets)]
        state["i"] += 1
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*inputs)
            end.record()
            end.synchronize()
            event_ms.append(start.elapsed_time(end))
        else:
            fn(*inputs)

    for _ in range(warmup):
        call()
    event_ms.clear()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    event_ms[:] = event_ms[1:]  # pedantic's warm-up round
    seconds = sorted(event_ms)[len(event_ms) // 2] / 1e3 if event_ms else benchmark.stats.stats.median
    info = {"op": op, "shape": shape, "provider": provider, "device": peak["device"], "median_s": seconds,
            "timer": "cuda events" if event_ms else "wall clock"}
    if bytes is not None:
        info.update(bytes=bytes, gbps=bytes / seconds / 1e9)
        if peak["gbps"]:
            info.update(peak_gbps=peak["gbps"], pct_peak=100 * info["gbps"] / peak["gbps"])
    if flops is not None:
        info.update(flops=flops, tflops=flops / seconds / 1e12)
        if peak["tflops"]:
            info.update(peak_tflops=peak["tflops"], pct_peak=100 * info["tflops"] / peak["tflops"])
    benchmark.extra_info.update(info)
    benchmark.group = f"{op} {shape}"


_compiled: dict = {}


def compiled(fn):
    """``torch.compile`` of a reference op, built once per function."""
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn)
    return _compiled[fn]
