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
    """Times ``fn(*inputs)`` over rotating input ``sets`` and records the roofline numbers."""
    state = {"i": 0}

    def call():
        inputs = sets[state["i"] % len(sets)]
        state["i"] += 1
        fn(*inputs)
        sync()

    for _ in range(warmup):
        call()
    benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=1)
    seconds = benchmark.stats.stats.median
    info = {"op": op, "shape": shape, "provider": provider, "device": peak["device"]}
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
