"""Compile gate on the CPU (tests/aot_gate.py): every kernel, bound by Triton's own launcher path on
the real launch arguments at Qwen3 shapes with the configs the launchers pick, compiles for sm_80 and
sm_90a without spills and within the shared-memory limit; docs/compile-table.md's table is what the gate
prints. Both architectures compile at once, one subprocess each (kernels defined under
TRITON_INTERPRET=1, as in this session, cannot be compiled)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import aot_gate  # noqa: E402

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = os.path.join(TESTS, "aot_gate.py")
TABLE_DOC = os.path.join(os.path.dirname(TESTS), "docs", "compile-table.md")
ARCHES = (80, 90)


@pytest.fixture(scope="module")
def gate_runs():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {arch: subprocess.Popen([sys.executable, GATE, str(arch)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, env=env) for arch in ARCHES}
    runs = {}
    for arch, proc in procs.items():
        out, err = proc.communicate(timeout=1200)
        runs[arch] = (proc.returncode, [json.loads(line) for line in out.splitlines() if line.startswith("{")], err)
    return runs


@pytest.mark.parametrize("arch", ARCHES)
def test_every_launched_kernel_compiles_without_spills(gate_runs, arch):
    returncode, rows, err = gate_runs[arch]
    problems = [line for line in err.splitlines() if line.startswith(f"sm_{arch} ")]
    assert returncode == 0 and not problems, f"compile gate failed for sm_{arch}:\n" + "\n".join(problems or [err[-4000:]])
    kernels = {r["kernel"] for r in rows}
    assert kernels >= {"rms_norm_fwd", "rms_norm_bwd", "rope_fwd", "rope_bwd", "swiglu_fwd", "swiglu_bwd", "attn_fwd",
                       "attn_bwd_delta", "attn_bwd_dkdv", "attn_bwd_dq", "attn_decode", "attn_decode_combine"}
    assert kernels >= {"moe_routing", "moe_route_fwd", "moe_route_bwd", "moe_gate_up", "moe_grouped", "moe_gather_sum",
                       "moe_dact", "moe_wgrad"}
    assert all(r["ctas_per_sm"] >= 1 for r in rows)
    # every half-precision MoE product on tensor cores; on sm_90 every tile of 64 rows or more on wgmma
    moe_gemms = [r for r in rows if r["kernel"] in ("moe_gate_up", "moe_grouped", "moe_dact", "moe_wgrad")
                 and r["dtype"] != "float32"]
    assert moe_gemms and all(r["mma"] != "-" for r in moe_gemms)
    if arch == 90:
        tall = [r for r in moe_gemms if r["kernel"] != "moe_wgrad"
                and int(re.search(r"\bBLOCK_M=(\d+)", r["config"]).group(1)) >= 64]
        assert tall and all("wgmma" in r["mma"] for r in tall)
    # a spill only where every candidate a kernel serves is a non-default one marked may_spill
    assert all(r["spill_bytes"] == 0 or (aot_gate._optional(r) and all(c["may_spill"] for c in r["candidates"]))
               for r in rows)
    # bound like the runtime: half-precision attention tiles come in through 16-byte accesses
    fwd = [r for r in rows if r["kernel"] == "attn_fwd" and r["dtype"] == "bfloat16" and "HEAD_DIM=128" in r["config"]]
    assert fwd and all(r["loads"].startswith("16B") for r in fwd)
    # and the RoPE kernels' half-head tiles too (warps sized on the half head)
    rope = [r for r in rows if r["kernel"] in ("rope_fwd", "rope_bwd") and r["dtype"] == "bfloat16"]
    assert rope and all(r["loads"].startswith("16B") and r["stores"].startswith("16B") for r in rope)
    if arch == 90:  # every half-precision attention product at head dim 128 on wgmma (replication: the gate)
        bwd = [r for r in rows if r["kernel"] in ("attn_bwd_dkdv", "attn_bwd_dq") and r["dtype"] == "bfloat16"
               and "HEAD_DIM=128" in r["config"] and not aot_gate._optional(r)]  # the default backward
        assert bwd and all("wgmma" in r["mma"] and "mma.sync" not in r["mma"] for r in fwd + bwd)
        # the TMA candidates load K/V through the tensor-memory accelerator, with no cp.async left
        tma = [r for r in fwd if "TMA=1" in r["config"]]
        assert tma and all(r["tma"] and r["cp_async"] == "-" for r in tma)
    # the norm backward: two CTAs per SM at every size, and its double-buffered rows really load by cp.async
    norm_bwd = [r for r in rows if r["kernel"] == "rms_norm_bwd"]
    assert norm_bwd and all(r["ctas_per_sm"] >= 2 for r in norm_bwd)
    prefetched = [r for r in norm_bwd if "PREFETCH=2" in r["config"]]
    assert prefetched and all(r["cp_async"] != "-" for r in prefetched)


@pytest.mark.parametrize("arch", ARCHES)
def test_every_backward_candidate_is_compiled_and_costed(gate_runs, arch):
    """Every backward candidate of the architecture (atomic designs included) compiles in both half
    dtypes at every head dim, at head dim 128 in packed batches too, with its tensor-core work per
    tile pair read from the PTX; the gate itself (check) fails a default that spills or does more
    work than a spill-free deterministic candidate, and an unmarked candidate that spills."""
    from qwen3_kernels.ops.triton import attention

    _, rows, _ = gate_runs[arch]
    summaries = {(c["dtype"], c["head_dim"], c["packed"], c["name"]): c for c in aot_gate.candidate_summaries(rows)}
    for dtype in ("float16", "bfloat16"):
        for head_dim in (16, 32, 64, 128):
            names = [c["name"] for c in attention.bwd_candidates(arch, head_dim, getattr(torch, dtype), False)]
            for packed in (False, True) if head_dim == 128 else (False,):
                found = [summaries.get((dtype, head_dim, packed, name)) for name in names]
                assert all(found), (dtype, head_dim, packed, [n for n, f in zip(names, found) if not f])
                assert all(c["work"] and c["work"] >= 5 for c in found)  # at least P, dP, dV, dK, dQ
                assert [c["default"] for c in found] == [True] + [False] * (len(found) - 1)


@pytest.mark.parametrize("arch", ARCHES)
def test_compile_table_is_the_gates_output(gate_runs, arch):
    """docs/compile-table.md shows what the gate prints for the pinned Triton; regenerate it with
    ``python tests/aot_gate.py --write-docs`` after changing a kernel or a config."""
    _, rows, _ = gate_runs[arch]
    with open(TABLE_DOC) as f:
        doc = f.read()
    match = re.search(rf"\*\*sm_{arch}\*\* .*?Triton ([\d.]+)", doc)
    assert match, "docs/compile-table.md has no compile table for sm_%d" % arch
    if match.group(1) != triton.__version__:
        pytest.skip(f"docs/compile-table.md's table is for Triton {match.group(1)}; this is Triton {triton.__version__}")
    assert aot_gate.markdown(rows) in doc, \
        "docs/compile-table.md's compile table is stale: run python tests/aot_gate.py --write-docs"
