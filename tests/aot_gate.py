"""Ahead-of-time compile gate, runnable without a GPU: ``python tests/aot_gate.py 90`` compiles every
Triton kernel of the package at every launch configuration its launcher picks for Qwen3 shapes, for
sm_80 or sm_90a, runs ptxas -v on each, and prints one JSON line per kernel config (registers, spill
bytes, shared memory). tests/ops/test_aot_compile.py runs it in a subprocess, because kernels defined
under TRITON_INTERPRET=1 (as in the CPU test session) cannot be compiled."""

import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TRITON_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
DTYPES = list(TRITON_DTYPES)
# Qwen3 hidden sizes (0.6B .. 32B) plus head_dim rows; query/KV head counts of the presets.
HIDDEN = [1024, 2048, 2560, 4096, 5120, 128]
HEADS = [8, 16, 32, 40, 64]


def signature(kernel, pointers: dict, constexprs: dict, floats=("eps", "qk_scale", "sm_scale")) -> dict:
    """``pointers`` maps pointer args to element types; named float args are fp32, constexprs as
    given, every other argument an i32."""
    unknown = [n for n in [*pointers, *constexprs] if n not in kernel.arg_names]
    if unknown:
        raise KeyError(f"not arguments of {kernel.fn.__name__}: {unknown}")
    return {name: "constexpr" if name in constexprs else "*" + pointers[name] if name in pointers
            else "fp32" if name in floats else "i32" for name in kernel.arg_names}


def _ptxas(arch: int) -> str:
    """The ptxas Triton itself uses for ``arch`` (newer Triton ships a second one for sm_90+)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except ImportError:
        return triton.knobs.nvidia.ptxas.path


def compile_and_report(kernel, pointers, constexprs, arch, num_warps, num_stages=3) -> dict:
    src = ASTSource(kernel, signature(kernel, pointers, constexprs), constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        out = subprocess.run([_ptxas(arch), f"-arch={gpu}", "-v", ptx, "-o",
                              os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    return {"registers": int(re.search(r"Used (\d+) registers", log).group(1)),
            "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
            "shared_bytes": compiled.metadata.shared}


def configs():
    """(name, kernel, pointer dtypes, constexprs, num_warps, num_stages) for every launch config."""
    from qwen3_kernels.ops.triton import _common, rope, swiglu
    from qwen3_kernels.ops.triton import rms_norm as rms

    for dtype in DTYPES:
        t = TRITON_DTYPES[dtype]
        for n in HIDDEN:
            block_n, rows, warps = _common.row_block(n)
            for residual in (False, True):
                yield (f"rms_norm_fwd[{dtype},N={n},residual={residual}]", rms._rms_norm_fwd_kernel,
                       dict(X=t, R=t, W=t, Y=t, S=t, RSTD="fp32"),
                       dict(HAS_RESIDUAL=residual, BLOCK_N=block_n, ROWS=rows), warps, 3)
                yield (f"rms_norm_bwd[{dtype},N={n},ds={residual}]", rms._rms_norm_bwd_kernel,
                       dict(DY=t, X=t, W=t, RSTD="fp32", DS=t, DX=t, DW_PARTIAL="fp32"),
                       dict(HAS_DS=residual, BLOCK_N=block_n, ROWS=rows), warps, 3)
        for h in HEADS:
            for d in (64, 128):
                block = rope._block(h, d)
                warps = block.pop("num_warps")
                for norm in (False, True):
                    yield (f"rope_fwd[{dtype},H={h},D={d},norm={norm}]", rope._rope_fwd_kernel,
                           dict(X=t, W=t, COS=t, SIN=t, Y=t), dict(HAS_NORM=norm, **block), warps, 3)
                    yield (f"rope_bwd[{dtype},H={h},D={d},norm={norm}]", rope._rope_bwd_kernel,
                           dict(DY=t, X=t, W=t, COS=t, SIN=t, DX=t, DW_PARTIAL="fp32"),
                           dict(HAS_NORM=norm, **block), warps, 3)
        yield (f"swiglu_fwd[{dtype}]", swiglu._swiglu_fwd_kernel, dict(G=t, U=t, Y=t),
               dict(BLOCK=swiglu._BLOCK), 4, 3)
        yield (f"swiglu_bwd[{dtype}]", swiglu._swiglu_bwd_kernel, dict(DY=t, G=t, U=t, DG=t, DU=t),
               dict(BLOCK=swiglu._BLOCK), 4, 3)


def attention_configs(arch: int):
    """Every attention kernel at the configs its launcher picks on sm_{arch} for head_dim 64/128,
    each dtype, causal, with and without per-sequence KV lengths, and Qwen3's GQA groups (decode)."""
    from qwen3_kernels.ops.triton import attention as attn
    import torch

    for dtype in DTYPES:
        t = TRITON_DTYPES[dtype]
        torch_dtype = getattr(torch, dtype)
        precision = attn._dot_precision(torch_dtype)
        for d in (64, 128):
            for kv_lens in (False, True):
                flags = dict(CAUSAL=True, HAS_KV_LENS=kv_lens, HEAD_DIM=d, DOT_PRECISION=precision)
                tag = f"{dtype},D={d},kv_lens={kv_lens}"
                for cfg in attn.fwd_candidates(arch, d, torch_dtype):  # the whole autotune set
                    packs = [g for g in (2, 4, 8) if attn.can_pack_group(cfg, g)] if cfg["pack_group"] else [1]
                    for pack in packs:  # Qwen3's GQA groups: 2 (0.6B, 1.7B), 4 (4B, 8B), 8 (32B)
                        blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], PACK=pack)
                        yield (f"attn_fwd[{tag},{cfg['BLOCK_M']}x{cfg['BLOCK_N']},pack={pack}]",
                               attn._attn_fwd_kernel, dict(Q=t, K=t, V=t, O=t, LSE="fp32", KV_LENS="i32"),
                               {**flags, **blocks}, cfg["num_warps"], cfg["num_stages"])
                cfg = attn.bwd_config(arch, d, torch_dtype)
                blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
                yield (f"attn_bwd_dkdv[{tag}]", attn._attn_bwd_dkdv_kernel,
                       dict(Q=t, K=t, V=t, DO=t, LSE="fp32", DELTA="fp32", DK=t, DV=t, KV_LENS="i32"),
                       {**flags, **blocks}, cfg["num_warps"], cfg["num_stages"])
                yield (f"attn_bwd_dq[{tag}]", attn._attn_bwd_dq_kernel,
                       dict(Q=t, K=t, V=t, DO=t, LSE="fp32", DELTA="fp32", DQ=t, KV_LENS="i32"),
                       {**flags, **blocks}, cfg["num_warps"], cfg["num_stages"])
                for group in (1, 2, 4, 5, 8):  # H / Hkv of the Qwen3 presets, and MHA
                    cfg = attn.decode_config(arch, d, torch_dtype, group)
                    blocks = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
                    yield (f"attn_decode[{tag},group={group}]", attn._attn_decode_kernel,
                           dict(Q=t, K=t, V=t, O_PART="fp32", LSE_PART="fp32", KV_LENS="i32"),
                           {**flags, **blocks}, cfg["num_warps"], cfg["num_stages"])
            yield (f"attn_bwd_delta[{dtype},D={d}]", attn._attn_bwd_delta_kernel, dict(O=t, DO=t, DELTA="fp32"),
                   dict(HEAD_DIM=d, BLOCK_M=attn.DELTA_BLOCK_M), 4, 3)
            for block_s in (1, 16, 128):
                yield (f"attn_decode_combine[{dtype},D={d},splits<={block_s}]", attn._attn_decode_combine_kernel,
                       dict(O_PART="fp32", LSE_PART="fp32", O=t), dict(HEAD_DIM=d, BLOCK_M=16, BLOCK_S=block_s),
                       4 if d > 64 else 2, 3)


def all_configs(arch: int) -> list:
    return [*configs(), *attention_configs(arch)]


_worker_configs: list = []


def _compile_one(job: tuple) -> str:
    arch, index = job
    if not _worker_configs:
        _worker_configs.extend(all_configs(arch))
    name, kernel, pointers, constexprs, warps, stages = _worker_configs[index]
    report = compile_and_report(kernel, pointers, constexprs, arch, warps, stages)
    return json.dumps({"name": name, "arch": arch, "num_warps": warps, "num_stages": stages, **report})


def main(arch: int) -> None:
    import multiprocessing

    jobs = [(arch, i) for i in range(len(all_configs(arch)))]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:  # compiling is CPU-bound
        for line in pool.imap(_compile_one, jobs, chunksize=4):
            print(line, flush=True)


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    main(int(sys.argv[1]))
