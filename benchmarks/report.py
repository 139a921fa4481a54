"""``python -m benchmarks.report results.json [more.json ...] [--out DIR] [--no-plots]``: pytest-benchmark's JSON (from
``pytest benchmarks --benchmark-only --benchmark-json results.json``) as a markdown table (op, shape,
provider, median time, GB/s or TFLOP/s, % of peak, speedup over every other provider), the goals
the kernels are held to marked met or not, and PNG plots of throughput against size per op."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import defaultdict

# (op pattern, shape pattern, metric, comparison) -> the goals of the kernel issues (H100 bf16).
GOALS = [
    ("RMSNorm, add+RMSNorm, QK-norm+RoPE, SwiGLU fwd >= 85% of HBM bandwidth",
     r"^(rms_norm|add_rms_norm|qk_norm_rope|swiglu) fwd$", None, "pct_peak", 85.0),
    ("... and >= 1.2x torch.compile", r"^(rms_norm|add_rms_norm|qk_norm_rope|swiglu) fwd$", None, "vs_compile", 1.2),
    ("Norm/RoPE/SwiGLU bwd >= 75% of HBM bandwidth", r"^(rms_norm|add_rms_norm|qk_norm_rope|swiglu) bwd$", None,
     "pct_peak", 75.0),
    ("... and >= 1.2x torch.compile", r"^(rms_norm|add_rms_norm|qk_norm_rope|swiglu) bwd$", None, "vs_compile", 1.2),
    ("Causal attention fwd, S 4k-16k, >= 1.3x SDPA", r"^attention fwd$", r"x(4096|8192|16384)$", "vs_sdpa", 1.3),
    ("Causal attention fwd, S 4k-16k, >= 450 TFLOP/s", r"^attention fwd$", r"x(4096|8192|16384)$", "tflops", 450.0),
    ("Attention fwd+bwd >= 1.1x SDPA", r"^attention fwd\+bwd$", None, "vs_sdpa", 1.1),
    ("Decode attention, batch 1, 32k context, >= 2.1 TB/s", r"^attention decode$", r"^1x32768$", "gbps", 2100.0),
    ("End-to-end decode, batch 1, >= 1,000 tokens/s", r"^model decode$", r"^1x", "tokens_per_s", 1000.0),
    ("End-to-end prefill 8x1024 >= 2.5x transformers", r"^model prefill$", r"^8x1024$", "vs_transformers", 2.5),
    ("Linear cross-entropy fwd+bwd: peak extra memory <= 10% of eager's", r"^linear_cross_entropy",
     None, "mem_vs_eager", 10.0),
    ("... time no worse than eager", r"^linear_cross_entropy", None, "vs_eager", 1.0),
    ("... >= 1.2x Liger's speed", r"^linear_cross_entropy", None, "vs_liger", 1.2),
    ("... at no more memory than Liger", r"^linear_cross_entropy", None, "mem_vs_liger", 1.0),
    ("qwen3-kernels train step >= 1.5x transformers' tokens/s", r"^train step$", None, "vs_transformers", 1.5),
    ("... at <= 50% of transformers' peak memory", r"^train step$", None, "mem_vs_transformers", 2.0),
    ("MoE experts fwd+bwd, 30B-A3B shapes, 8k tokens, >= 1.2x Liger's fused MoE", r"^moe_experts fwd\+bwd$", None,
     "vs_liger", 1.2),
    ("MoE decode, 30B-A3B shape, batch 1, >= 60% of the weight-streaming limit", r"^moe model decode$", None,
     "pct_peak", 60.0),
    ("CPU prefill >= 1.0x transformers", r"^model prefill \(cpu\)$", None, "vs_transformers", 1.0),
    ("CPU cached decode >= 1.0x transformers", r"^model decode \(cpu\)$", None, "vs_transformers", 1.0),
]
FUSED = ("triton", "fused", "qwen3_kernels")
# A bandwidth goal counts only where the op moves enough bytes that launch latency and caches do
# not decide the time.
BANDWIDTH_METRICS = ("pct_peak", "gbps")
MIN_BANDWIDTH_BYTES = 64 * 2**20


def load_rows(paths: str | list[str]) -> tuple[list[dict], dict]:
    benchmarks, machine = [], {}
    for path in [paths] if isinstance(paths, str) else paths:
        with open(path) as f:
            data = json.load(f)
        benchmarks += data.get("benchmarks", [])
        machine = machine or data.get("machine_info", {})
    rows = []
    for bench in benchmarks:
        info = bench.get("extra_info", {})
        if "op" not in info:
            continue
        # CUDA-event median where the benchmark recorded one, pytest-benchmark's wall clock otherwise
        rows.append({"median_s": bench["stats"]["median"], **info})
    # speedup of each provider over every other provider of the same op and shape; "vs_sdpa" is over
    # the fastest SDPA backend measured (sdpa-cudnn, sdpa-flash, ...)
    groups = defaultdict(list)
    for row in rows:
        groups[(row["op"], row["shape"])].append(row)
    for group in groups.values():
        sdpa = [r["median_s"] for r in group if r["provider"].startswith("sdpa")]
        for row in group:
            for other in group:
                if other is not row:
                    row[f"vs_{other['provider']}"] = other["median_s"] / row["median_s"]
                if other is not row and row.get("peak_extra_bytes") and "peak_extra_bytes" in other:
                    row[f"mem_vs_{other['provider']}"] = other["peak_extra_bytes"] / row["peak_extra_bytes"]
            if sdpa and not row["provider"].startswith("sdpa"):
                row["vs_sdpa"] = min(sdpa) / row["median_s"]
    return rows, machine


def throughput(row: dict) -> str:
    memory = f", peak +{row['peak_extra_bytes'] / 2**20:,.0f} MiB" if "peak_extra_bytes" in row else ""
    if "tflops" in row:
        return f"{row['tflops']:.1f} TFLOP/s{memory}"
    if "gbps" in row:
        return f"{row['gbps']:.0f} GB/s{memory}"
    if "tokens_per_s" in row:
        return f"{row['tokens_per_s']:,.0f} tok/s{memory}"
    return memory.removeprefix(", ")


def markdown(rows: list[dict]) -> str:
    lines = ["| op | shape | provider | median | throughput | % of peak | speedup |",
             "|---|---|---|---:|---:|---:|---|"]
    for row in sorted(rows, key=lambda r: (r["op"], _size(r["shape"]), r["shape"], r["provider"])):
        speedups = ", ".join(f"{k[3:]} {v:.2f}x" for k, v in sorted(row.items()) if k.startswith("vs_"))
        pct = f"{row['pct_peak']:.0f}%" if "pct_peak" in row else ""
        lines.append(f"| {row['op']} | {row['shape']} | {row['provider']} | {_time(row['median_s'])} | "
                     f"{throughput(row)} | {pct} | {speedups} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    lines = ["| goal | measured (ours) | met |", "|---|---|---|"]
    for text, op_re, shape_re, metric, target in GOALS:
        hits = [r for r in rows if r["provider"] in FUSED and re.search(op_re, r["op"])
                and (shape_re is None or re.search(shape_re, r["shape"])) and metric in r
                and (metric not in BANDWIDTH_METRICS or r.get("bytes", 0) >= MIN_BANDWIDTH_BYTES)]
        if not hits:
            lines.append(f"| {text} | not measured | - |")
            continue
        worst = min(hits, key=lambda r: r[metric])
        ok = all(r[metric] >= target for r in hits)
        lines.append(f"| {text} | worst {worst[metric]:.2f} ({worst['op']} {worst['shape']}) | "
                     f"{'yes' if ok else 'NO'} |")
    return "\n".join(lines)


def plots(rows: list[dict], out_dir: str) -> list[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    os.makedirs(out_dir, exist_ok=True)
    by_op = defaultdict(list)
    for row in rows:
        if throughput(row):
            by_op[row["op"]].append(row)
    files = []
    for op, op_rows in sorted(by_op.items()):
        fig, ax = plt.subplots(figsize=(6, 4))
        metric = next(m for m in ("tflops", "gbps", "tokens_per_s") if m in op_rows[0])
        for provider in sorted({r["provider"] for r in op_rows}):
            pts = sorted((_size(r["shape"]), r[metric], r["shape"]) for r in op_rows if r["provider"] == provider)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
        ax.set_xscale("log")
        ax.set_xlabel("problem size (elements of the shape)")
        ax.set_ylabel({"tflops": "TFLOP/s", "gbps": "GB/s", "tokens_per_s": "tokens/s"}[metric])
        ax.set_title(op)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out_dir, re.sub(r"[^a-z0-9]+", "_", op.lower()).strip("_") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    return files


def _size(shape: str) -> int:
    size = 1
    for n in re.findall(r"\d+", shape):
        size *= int(n)
    return size


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 1 else f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    p.add_argument("results", nargs="+", help="pytest-benchmark JSON files (one run, in parts)")
    p.add_argument("--out", default=None, help="folder for report.md and the plots (default: next to the JSON)")
    p.add_argument("--no-plots", action="store_true", help="write report.md only")
    args = p.parse_args(argv)
    missing = [path for path in args.results if not os.path.exists(path)]
    if missing:
        print(f"error: no such file {missing[0]!r}", file=sys.stderr)
        return 1
    rows, machine = load_rows(args.results)
    if not rows:
        print(f"error: {', '.join(args.results)} holds no benchmark with roofline extra_info", file=sys.stderr)
        return 1
    out_dir = args.out or os.path.dirname(os.path.abspath(args.results[0]))
    device = rows[0].get("device", "?")
    text = (f"## Benchmarks on {device}\n\n{markdown(rows)}\n\n### Goals\n\n{goals(rows)}\n")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(text)
    for path in [] if args.no_plots else plots(rows, os.path.join(out_dir, "plots")):
        print(f"plot: {path}", file=sys.stderr)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
