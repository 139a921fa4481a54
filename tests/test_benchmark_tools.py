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
