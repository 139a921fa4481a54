"""The benchmark suite's byte/FLOP formulas and its report script (on a recorded JSON)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import report, roofline  # noqa: E402

SAMPLE = ROOT / "tests" / "data" / "benchmark_sample.json"


def test_memory_bound_byte_counts():
    assert roofline.rms_norm_bytes(4096, 1024, 2) == 2 * 4096 * 1024 * 2 + 1024 * 2
    assert roofline.rms_norm_bytes(4096, 1024, 2, residual=True) == 4 * 4096 * 1024 * 2 + 1024 * 2
    assert roofline.rms_norm_bytes(10, 8, 4, backward=True) == 3 * 10 * 8 * 4 + 8 * 4
    assert roofline.swiglu_bytes(100, 30, 2) == 3 * 100 * 30 * 2
    assert roofline.swiglu_bytes(100, 30, 2, backward=True) == 5 * 100 * 30 * 2
    assert roofline.qk_norm_rope_bytes(5, 16, 8, 128, 2) == 2 * 5 * 24 * 128 * 2 + 2 * 5 * 128 * 2
    assert roofline.decode_kv_bytes(1, 8, 32768, 128, 2) == 2 * 8 * 32768 * 128 * 2


def test_attention_flops():
    full = 4 * 2 * 16 * 1024 * 1024 * 128
    assert roofline.attention_flops(2, 16, 1024, 1024, 128, causal=False) == full
    assert roofline.attention_flops(2, 16, 1024, 1024, 128) == full / 2          # causal: the unmasked half
    assert roofline.attention_flops(2, 16, 1024, 1024, 128, backward=True) == 2.5 * full / 2
    assert roofline.attention_flops(1, 16, 1, 4096, 128) == 4 * 16 * 4096 * 128  # decode is not halved


def test_report_table_speedups_and_goals(tmp_path, capsys):
    assert report.main([str(SAMPLE), "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert text == capsys.readouterr().out.rstrip("\n") + "\n"
    assert "## Benchmarks on NVIDIA H100" in text
    row = next(line for line in text.splitlines() if line.startswith("| rms_norm fwd | 4096x1024 | triton"))
    assert "1.000 ms" in row and "17 GB/s" in row and "compile 2.00x" in row and "eager 3.00x" in row
    goal = next(line for line in text.splitlines() if "S 4k-16k, >= 1.3x SDPA" in line)
    assert goal.endswith("| NO |")  # 1.25x
    goal = next(line for line in text.splitlines() if ">= 450 TFLOP/s" in line)
    assert goal.endswith("| yes |")
    assert "| End-to-end decode, batch 1, >= 1,000 tokens/s | worst 256.00" in text
    if any((tmp_path / "plots").glob("*.png")):
        assert (tmp_path / "plots" / "rms_norm_fwd.png").exists()


def test_report_errors(tmp_path, capsys):
    assert report.main([str(tmp_path / "missing.json")]) == 1
    empty = tmp_path / "empty.json"
    empty.write_text('{"benchmarks": []}')
    assert report.main([str(empty)]) == 1
    assert "holds no benchmark" in capsys.readouterr().err


def test_gpu_check_script_is_valid_bash():
    import subprocess
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def _bench(op, shape, provider, median_s, **info):
    return {"stats": {"median": 1.0}, "extra_info": {"op": op, "shape": shape, "provider": provider, "device": "H200",
                                                      "median_s": median_s, **info}}


def test_report_uses_event_times_best_sdpa_backend_and_64mb_floor(tmp_path):
    import json
    data = {"benchmarks": [
        _bench("attention fwd", "1x16384", "triton", 0.010, tflops=500.0),
        _bench("attention fwd", "1x16384", "sdpa-flash", 0.020),
        _bench("attention fwd", "1x16384", "sdpa-cudnn", 0.012),       # the best SDPA backend sets vs_sdpa
        _bench("rms_norm fwd", "1024x1024", "triton", 0.001, bytes=4 << 20, pct_peak=10.0),   # 4 MB: no goal
        _bench("rms_norm fwd", "16384x1024", "triton", 0.001, bytes=64 << 20, pct_peak=90.0),
    ]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    rows, _ = report.load_rows([str(path)])
    triton_fwd = next(r for r in rows if r["op"] == "attention fwd" and r["provider"] == "triton")
    assert triton_fwd["median_s"] == 0.010  # the CUDA-event median, not pytest-benchmark's wall clock
    assert abs(triton_fwd["vs_sdpa"] - 1.2) < 1e-9
    goals = report.goals(rows)
    assert "| Causal attention fwd, S 4k-16k, >= 1.3x SDPA | worst 1.20" in goals
    assert "fwd >= 85% of HBM bandwidth | worst 90.00 (rms_norm fwd 16384x1024) | yes |" in goals


def test_gpu_check_without_a_gpu_exits_cleanly_and_says_why(tmp_path):
    import os
    import subprocess
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "60", "CUDA_VISIBLE_DEVICES": "",
           "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    assert "no CUDA device here: skipped tier 1" in summary
    assert len(list(tmp_path.iterdir())) <= 8


def test_report_compares_peak_memory_of_the_fused_loss(tmp_path):
    import json
    shape = "8192x1024x151936"
    data = {"benchmarks": [
        _bench("linear_cross_entropy fwd+bwd", shape, "triton", 0.010, peak_extra_bytes=200 << 20),
        _bench("linear_cross_entropy fwd+bwd", shape, "eager", 0.012, peak_extra_bytes=9000 << 20),
        _bench("linear_cross_entropy fwd+bwd", shape, "liger", 0.011, peak_extra_bytes=800 << 20),
    ]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    rows, _ = report.load_rows([str(path)])
    ours = next(r for r in rows if r["provider"] == "triton")
    assert ours["mem_vs_eager"] == 45.0 and ours["mem_vs_liger"] == 4.0
    assert "peak +200 MiB" in report.throughput(ours)
    text = report.goals(rows)
    assert "peak extra memory <= 10% of eager's | worst 45.00" in text
    assert next(line for line in text.splitlines() if "1.2x Liger" in line).endswith("| NO |")  # 1.10x
