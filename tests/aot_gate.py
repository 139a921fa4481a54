"""Ahead-of-time compile gate, runnable without a GPU: ``python tests/aot_gate.py 90`` compiles every
Triton kernel of the package exactly as it is launched on an sm_90 (H100/H200, 132 SMs) or sm_80
(A100, 108 SMs) GPU at Qwen3 shapes, and prints one JSON line per compiled kernel.

"Exactly as launched" means the real launchers run (``rms_norm_forward``, ``attention_forward``, ...)
on meta tensors shaped and strided as the model makes them, and Triton's own runtime binds the
arguments: pointer alignment, integers divisible by 16 and integers equal to 1 are specialised as on
a real launch, and the configs are the ones the launchers pick on that architecture (every forward
autotune candidate included). Only the last step differs: Triton compiles for the named target and
stops before loading the binary. Triton's in-memory cache merges launches that compile to the same
kernel, so each distinct kernel is compiled once; its row lists how many launches share it.

Each row has ptxas's registers and spill bytes, shared memory, resident CTAs per SM, which MMA
instructions the ``tl.dot``s became, the tensor-core work per tile pair (``tensor_core_work``), and
the global load/store vector widths read from the PTX. Every attention backward candidate
(``bwd_candidates``, the atomic designs included) is compiled at a 4096-token prefill and a packed
batch, each launch labelled with its candidate, and ``candidate_summaries`` adds up each
candidate's work, spills, registers and CTAs/SM.
``check(rows)`` names what fails the gate: a compile error, a spill (in a kernel only non-default
backward candidates launch, only where ``bwd_candidates`` does not mark the candidate
``may_spill``: the card ranks a marked one, and drops an unmarked one that spills there), shared
memory over the architecture's per-block limit, a kernel that cannot be resident at all, a default
attention tile with fewer than 64 held rows per warpgroup, or a backward default that does more
tensor-core work than a spill-free deterministic candidate.
``python tests/aot_gate.py --markdown`` prints the tables of both architectures;
``--write-docs`` puts them into docs/compile-table.md.

tests/ops/test_aot_compile.py runs this in subprocesses, because kernels defined under
TRITON_INTERPRET=1 (as in the CPU test session) cannot be compiled."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections import Counter

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.jit import JITFunction

# Per-SM limits (CUDA occupancy calculator): register file, threads, CTAs, and shared memory per SM
# and per block (opt-in maximum); the runtime reserves 1 KB of shared memory per CTA.
ARCH = {
    80: dict(gpu="A100", sms=108, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    90: dict(gpu="H100/H200", sms=132, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}
REGS_PER_SM, THREADS_PER_SM, CTAS_PER_SM, SMEM_RESERVED_PER_CTA = 65536, 2048, 32, 1024
DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # every dtype the dispatcher sends to Triton


class _CompileOnlyDriver:
    """What Triton's runtime asks of the active driver before a launch: the target, a device id
    (one per architecture, so Triton's per-device kernel caches stay apart) and a stream."""

    def __init__(self, arch: int):
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")


ACTIVE: "Recorder | None" = None  # the recorder compiling now (the workloads label candidates on it)


class Recorder:
    """Replaces ``kernel[grid](...)`` with Triton's warm-up path (bind, specialise, compile, no
    launch) and records every compiled kernel with ptxas's report and the launches it serves."""

    def __init__(self):
        self.kernels: dict[int, dict] = {}  # id(compiled kernel) -> row
        self.compiled: list = []  # the compiled kernels, kept alive so their ids stay unique
        self.workload = ""
        self.candidate: dict | None = None  # the backward candidate being launched (backward_candidates)

    @contextlib.contextmanager
    def active(self, arch: int):
        from triton.runtime import driver

        recorder = self

        def compile_only(jit_fn, grid):
            def launch(*args, **kwargs):
                log = io.StringIO()
                with contextlib.redirect_stdout(log):  # ptxas -v, printed by Triton
                    compiled = jit_fn.run(*args, grid=grid, warmup=True, **kwargs)
                    if id(compiled) not in recorder.kernels and not log.getvalue():
                        # compiled before this recorder started: compile again for ptxas's report
                        jit_fn.device_caches.pop(arch, None)
                        compiled = jit_fn.run(*args, grid=grid, warmup=True, **kwargs)
                recorder._record(jit_fn, compiled, args, kwargs, log.getvalue())
            return launch

        global ACTIVE
        ACTIVE = self
        original = JITFunction.__getitem__
        JITFunction.__getitem__ = compile_only
        triton.knobs.nvidia.dump_ptxas_log = True
        previous = driver._active  # None on a machine with no GPU driver
        driver.set_active(_CompileOnlyDriver(arch))
        try:
            from qwen3_kernels.ops.triton import _common
            with _common.simulated_gpu(arch, ARCH[arch]["sms"]):
                yield self
        finally:
            JITFunction.__getitem__ = original
            driver._active = previous
            ACTIVE = None

    def _record(self, jit_fn, compiled, args, kwargs, ptxas_log):
        row = self.kernels.get(id(compiled))
        if row is None:
            tensor = next(a for a in args if isinstance(a, torch.Tensor))
            meta = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
            ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
            row = dict(kernel=jit_fn.fn.__name__.strip("_").removesuffix("_kernel"),
                       dtype=str(tensor.dtype).removeprefix("torch."),
                       config=" ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in meta.items()),
                       num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                       ints_equal_1=sum(a == 1 for a in ints), ints_div_16=sum(a % 16 == 0 and a != 0 for a in ints),
                       shared_bytes=compiled.metadata.shared, **ptxas_report(ptxas_log),
                       **ptx_facts(compiled.asm["ptx"]), launches=0, workloads=[], candidates=[])
            row["tc_work"] = tensor_core_work(row["kernel"], compiled.asm["ptx"], kwargs,
                                              compiled.metadata.num_warps)
            self.kernels[id(compiled)] = row
            self.compiled.append(compiled)
        row["launches"] += 1
        if self.workload not in row["workloads"]:
            row["workloads"].append(self.workload)
        if self.candidate is not None and self.candidate not in row["candidates"]:
            row["candidates"].append(self.candidate)


def ptxas_report(log: str) -> dict:
    regs = re.findall(r"Used (\d+) registers", log)
    if not regs:
        raise RuntimeError(f"no ptxas report in Triton's output (is TRITON_ALWAYS_COMPILE honoured?):\n{log[-2000:]}")
    return dict(registers=int(regs[-1]),
                spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)))


def _widths(ptx: str, op: str) -> str:
    """Bytes per global access of ``op`` (ld/st), as 'bytes x count' from widest to narrowest."""
    counts: Counter = Counter()
    for suffix in re.findall(rf"\b{op}\.global((?:\.[\w:]+)+)", ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu]\d+", p)), 0)
        counts[vec * bits // 8] += 1
    return " ".join(f"{w}Bx{n}" for w, n in sorted(counts.items(), reverse=True)) or "-"


def ptx_facts(ptx: str) -> dict:
    wgmma = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    mma = sorted(set(re.findall(r"\bmma\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
    cp_async = Counter(int(n, 0) for n in re.findall(
        r"cp\.async\.c[ag]\.shared\.global[\w:.]*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)", ptx))
    mma_text = (" ".join(f"wgmma.{s}" for s in wgmma) + " " + " ".join(f"mma.sync.{s}" for s in mma)).strip()
    return dict(mma=mma_text or "-",
                loads=_widths(ptx, "ld"), stores=_widths(ptx, "st"),
                cp_async=" ".join(f"{w}Bx{n}" for w, n in sorted(cp_async.items(), reverse=True)) or "-",
                tma="cp.async.bulk.tensor" in ptx)


# How many copies of its matrix products an attention kernel's PTX holds: the forward and both
# backward kernels run their key (or query) blocks in two loops, unmasked blocks and the masked
# diagonal band; decode runs one masked loop.
PRODUCT_LOOPS = {"attn_fwd": 2, "attn_bwd_dkdv": 2, "attn_bwd_dq": 2, "attn_decode": 1}


def tensor_core_work(kernel: str, ptx: str, meta: dict, num_warps: int) -> float | None:
    """Tensor-core work per (BLOCK_M, BLOCK_N) tile pair, in products of BLOCK_M x BLOCK_N x HEAD_DIM,
    as the PTX shows it: the MMA instructions' m x n x k summed over one copy of the loop body, times
    the executors that run them (every warpgroup runs its wgmma, every warp its mma.sync). A product
    that a second warpgroup repeats over the same rows counts twice, as the tensor cores do it. None
    for kernels without MMA (fp32, elementwise)."""
    loops = PRODUCT_LOOPS.get(kernel)
    if loops is None or "HEAD_DIM" not in meta:
        return None
    wgmma = sum(int(m) * int(n) * int(k) for m, n, k in
                re.findall(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", ptx))
    mma = sum(int(m) * int(n) * int(k) for m, n, k in re.findall(r"\bmma\.sync\.aligned\.m(\d+)n(\d+)k(\d+)", ptx))
    if not wgmma and not mma:
        return None
    executed = wgmma * (num_warps // 4) + mma * num_warps
    return round(executed / (loops * meta["BLOCK_M"] * meta["BLOCK_N"] * meta["HEAD_DIM"]), 2)


def resident_ctas(arch: int, registers: int, shared_bytes: int, num_warps: int) -> int:
    regs_per_warp = math.ceil(registers * 32 / 256) * 256  # registers are allocated per warp, 256 at a time
    by_regs = (REGS_PER_SM // regs_per_warp) // num_warps
    by_smem = ARCH[arch]["smem_per_sm"] // (shared_bytes + SMEM_RESERVED_PER_CTA)
    by_threads = THREADS_PER_SM // (32 * num_warps)
    return min(by_regs, by_smem, by_threads, CTAS_PER_SM)


# ---------------------------------------------------------------------------------------------
# The launches: what the model and its backward issue at Qwen3 shapes
# ---------------------------------------------------------------------------------------------

def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def model_shapes():
    """(name, hidden, heads, kv_heads, head_dim, intermediate) of every Qwen3 size, plus the small head
    dims the tests use; intermediate is None for an MoE size whose every layer is MoE (no dense SwiGLU:
    its experts' launches are moe_workloads')."""
    from qwen3_kernels.config import PRESETS

    for name, c in PRESETS.items():
        dense_ffn = any(not c.is_moe_layer(i) for i in range(c.num_layers))
        yield name, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size if dense_ffn else None
    for d in (16, 32, 64):
        yield f"test-D{d}", 4 * d, 4, 2, d, 6 * d


def _qkv_views(B, T, H, Hkv, D, dtype):
    """q, k, v as the model gets them: strided views of one packed (B, T, (H + 2 Hkv) D) projection."""
    qkv = _meta(B, T, (H + 2 * Hkv) * D, dtype=dtype)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    return q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)


def backward_candidates(attn, arch: int, q, k, out, lse, scale: float, **packing) -> None:
    """Every backward candidate of ``arch`` for these tensors (the atomic designs included), each
    launch labelled with its candidate, so the rows say which candidates a kernel serves."""
    dtype, D = q.dtype, q.shape[-1]
    for i, cand in enumerate(attn.bwd_candidates(arch, D, dtype, deterministic=False)):
        ACTIVE.candidate = dict(name=cand["name"], index=i, default=i == 0, may_spill=cand["may_spill"],
                                deterministic=not cand["design"].endswith("-atomic"),
                                dtype=str(dtype).removeprefix("torch."), head_dim=D, packed=bool(packing))
        try:
            attn.attention_backward(out, q, k, k, out, lse, True, scale, candidate=cand, **packing)
        finally:
            ACTIVE.candidate = None


PREFILL_LENGTHS = (1, 4096, 16384)
VOCAB = 151936  # every dense Qwen3   # one token, and long prompts / training sequences
DECODE_BATCHES = (1, 8, 64)
CACHE_LENGTHS = (1024, 32768)


def workloads(arch: int):
    """(tag, thunk) pairs; each thunk runs real launchers on meta tensors."""
    from qwen3_kernels.ops.triton import attention as attn
    from qwen3_kernels.ops.triton import cross_entropy, rms_norm, rope, swiglu

    for dtype in DTYPES:
        dt = str(dtype).removeprefix("torch.")
        for name, C, H, Hkv, D, inter in model_shapes():
            scale = D ** -0.5
            for T in PREFILL_LENGTHS:
                B = 1
                tag = f"{name} {dt} prefill B={B} T={T}"

                def token_ops(B=B, T=T, C=C, H=H, Hkv=Hkv, D=D, inter=inter, cos_shape=(T, D)):
                    x, w = _meta(B, T, C, dtype=dtype), _meta(C, dtype=dtype)
                    y, summed, rstd = rms_norm.rms_norm_forward(x, w, 1e-6)
                    y, summed, rstd = rms_norm.rms_norm_forward(x, w, 1e-6, residual=x)
                    rms_norm.rms_norm_backward(x, x, w, rstd)
                    rms_norm.rms_norm_backward(x, x, w, rstd, x)
                    q, k, _ = _qkv_views(B, T, H, Hkv, D, dtype)
                    cos = _meta(*cos_shape, dtype=dtype)
                    qw = _meta(D, dtype=dtype)
                    rope.qk_norm_rope_forward(q, k, cos, cos, qw, qw, 1e-6)
                    for t in (q, k):
                        rope.rope_backward(t, t, cos, cos, qw, 1e-6)
                    rope.rope_forward(q, cos, cos)
                    rope.rope_backward(q, q, cos, cos)
                    if inter:
                        g = _meta(B, T, 2 * inter, dtype=dtype)  # the packed gate/up GEMM's output
                        gate, up = g[..., :inter], g[..., inter:]
                        swiglu.swiglu_forward(gate, up)
                        swiglu.swiglu_backward(_meta(B, T, inter, dtype=dtype), gate, up)
                    hidden, head = x.view(-1, C), _meta(VOCAB, C, dtype=dtype)  # the training loss
                    targets = _meta(B * T, dtype=torch.int64)
                    losses, lse = cross_entropy.linear_cross_entropy_forward(hidden, head, targets, -100)
                    cross_entropy.linear_cross_entropy_backward(losses, hidden, head, targets, lse, -100, True, True)

                if not name.startswith("test-"):  # the test shapes exist for their attention head dims
                    yield f"{tag} elementwise", token_ops

                def prefill(B=B, T=T, H=H, Hkv=Hkv, D=D, scale=scale):
                    q, k = _meta(B, T, H, D, dtype=dtype), _meta(B, T, Hkv, D, dtype=dtype)
                    for cfg in attn.fwd_candidates(arch, D, dtype):
                        out, lse = attn.attention_forward(q, k, k, True, scale, config=cfg)
                    if T == 4096:  # every backward candidate once; the default at every length
                        backward_candidates(attn, arch, q, k, out, lse, scale)
                    attn.attention_backward(out, q, k, k, out, lse, True, scale)

                yield f"{tag} attention", prefill

            for B in DECODE_BATCHES:
                for max_len in CACHE_LENGTHS:
                    tag = f"{name} {dt} decode B={B} cache={max_len}"

                    def decode(B=B, max_len=max_len, H=H, Hkv=Hkv, D=D, scale=scale, C=C, inter=inter):
                        cache = _meta(2, B, max_len, Hkv, D, dtype=dtype)  # KVCache.k: (layers, B, max_len, Hkv, D)
                        q = _meta(B, 1, H, D, dtype=dtype)
                        kv_lens = _meta(B, dtype=torch.int32)
                        assert attn.use_decode_kernel(q, cache[1])
                        attn.decode_forward(q, cache[1], cache[1], True, scale, kv_lens)

                    yield f"{tag} attention", decode

                    def decode_tokens(B=B, C=C, H=H, Hkv=Hkv, D=D, inter=inter, max_len=max_len):
                        x, w = _meta(B, 1, C, dtype=dtype), _meta(C, dtype=dtype)
                        rms_norm.rms_norm_forward(x, w, 1e-6)
                        rms_norm.rms_norm_forward(x, w, 1e-6, residual=x)
                        q, k, v = _qkv_views(B, 1, H, Hkv, D, dtype)
                        cos, qw = _meta(B, 1, D, dtype=dtype), _meta(D, dtype=dtype)  # per-sequence positions
                        cache, positions = _meta(2, B, max_len, Hkv, D, dtype=dtype), _meta(B, 1, dtype=torch.int64)
                        rope.qk_norm_rope_forward(q, k, cos, cos, qw, qw, 1e-6, v, cache[1], cache[1], positions)
                        if inter:
                            gate_up = _meta(B, 1, 2 * inter, dtype=dtype)  # one GEMM's output, read as two halves
                            swiglu.swiglu_forward(gate_up[..., :inter], gate_up[..., inter:])

                    if not name.startswith("test-"):
                        yield f"{tag} elementwise", decode_tokens

            def chunked_prefill(H=H, Hkv=Hkv, D=D, scale=scale):  # a prompt chunk appended to a cache
                cache = _meta(2, 1, 32768, Hkv, D, dtype=dtype)
                q, kv_lens = _meta(1, 4096, H, D, dtype=dtype), _meta(1, dtype=torch.int32)
                for cfg in attn.fwd_candidates(arch, D, dtype):
                    attn.attention_forward(q, cache[1], cache[1], True, scale, kv_lens, config=cfg)

            yield f"{name} {dt} chunked prefill T=4096 cache=32768 attention", chunked_prefill

            def packed(H=H, Hkv=Hkv, D=D, scale=scale):  # a padding-free training batch
                q, k = _meta(1, 16384, H, D, dtype=dtype), _meta(1, 16384, Hkv, D, dtype=dtype)
                cu_seqlens = _meta(9, dtype=torch.int32)
                for cfg in attn.fwd_candidates(arch, D, dtype):
                    out, lse = attn.attention_forward(q, k, k, True, scale, config=cfg, cu_seqlens=cu_seqlens,
                                                      max_seqlen=4096)
                backward_candidates(attn, arch, q, k, out, lse, scale, cu_seqlens=cu_seqlens, max_seqlen=4096)

            # Packed batches are how Qwen3 (head dim 128) trains; the test head dims' packed variants
            # are left out: compiling them too doubled the gate's time.
            if not name.startswith("test-"):
                yield f"{name} {dt} packed T=16384 max_seqlen=4096 attention", packed


MOE_TRAIN_TOKENS = 8192
MOE_CHUNK_TOKENS = 2048  # a prompt chunk or a short training batch: the mid-size tiles (128 rows per expert)


def moe_workloads(arch: int):
    """Every MoE launch in every kernel dtype: the router and the experts at an 8k-token prefill (no
    gradients) and training step (forward keeping the pre-activations, then the whole backward), the
    same at 2k tokens (the mid-size tiles), and decode batches 1/8/64 (the small-row tiles), each
    with every row-tile candidate the tuner may pick (``gemm_candidates``). Tags contain "moe":
    ``python tests/aot_gate.py 90 moe`` compiles only these."""
    from qwen3_kernels.config import PRESETS
    from qwen3_kernels.ops.triton import moe

    moe_models = [(name, c.hidden_size, c.moe_intermediate_size, c.num_experts, c.num_experts_per_tok,
                   c.norm_topk_prob) for name, c in PRESETS.items() if c.num_experts]  # 30B-A3B, 235B-A22B
    for dtype, (name, C, inter, E, top_k, norm) in itertools.product(DTYPES, moe_models):
        dt = str(dtype).removeprefix("torch.")
        for T, train in [(MOE_TRAIN_TOKENS, False), (MOE_TRAIN_TOKENS, True), (MOE_CHUNK_TOKENS, False),
                         (MOE_CHUNK_TOKENS, True)] + [(B, False) for B in DECODE_BATCHES]:
            kind = "training" if train else ("prefill" if T >= MOE_CHUNK_TOKENS else "decode")
            tag = f"{name} {dt} moe {kind} tokens={T}"

            def block(T=T, C=C, inter=inter, E=E, top_k=top_k, norm=norm, train=train, dtype=dtype):
                logits = _meta(T, E, dtype=dtype)
                weights, ids = moe.moe_route_forward(logits, top_k, norm)
                hidden, gate_up, down = _meta(T, C, dtype=dtype), _meta(E, 2 * inter, C, dtype=dtype), \
                    _meta(E, C, inter, dtype=dtype)
                for cfg in moe.gemm_candidates(arch, T * top_k, E, dtype):  # the default, then the tuner's others
                    out, pre, order, pos, offsets = moe.moe_experts_forward(hidden, ids, weights, gate_up, down, train,
                                                                            config=cfg)
                    if train:
                        moe.moe_experts_backward(out, hidden, weights, gate_up, down, pre, order, pos, offsets,
                                                 config=cfg)
                if train:
                    moe.moe_route_backward(weights, logits, ids, norm)

            yield tag, block


def run(arch: int, only: str = "", progress: bool = False) -> list[dict]:
    recorder = Recorder()
    with recorder.active(arch):
        for tag, thunk in itertools.chain(workloads(arch), moe_workloads(arch)):
            if only not in tag:
                continue
            recorder.workload = tag
            before, started = len(recorder.kernels), time.perf_counter()
            thunk()
            if progress:
                print(f"{time.perf_counter() - started:6.1f} s {len(recorder.kernels) - before:3d} new kernels  {tag}",
                      file=sys.stderr, flush=True)
    rows = list(recorder.kernels.values())
    for row in rows:
        row["arch"] = arch
        row["ctas_per_sm"] = resident_ctas(arch, row["registers"], row["shared_bytes"], row["num_warps"])
    return rows


def _optional(row: dict) -> bool:
    """A kernel only non-default backward candidates launch: the card may rank it whatever it costs."""
    return bool(row["candidates"]) and not any(c["default"] for c in row["candidates"])


def check(rows: list[dict]) -> list[str]:
    """Why the gate fails, one line per problem (empty: it passes)."""
    problems = []
    for r in rows:
        where = f"sm_{r['arch']} {r['kernel']} [{r['dtype']} {r['config']} warps={r['num_warps']} " \
                f"stages={r['num_stages']}] " \
                f"(e.g. {r['workloads'][0]})"
        if r["spill_bytes"]:
            unmarked = [c["name"] for c in r["candidates"] if not c["may_spill"]]
            if not _optional(r):
                problems.append(f"{where}: {r['spill_bytes']} bytes of register spills")
            elif unmarked:  # the card drops a spilling candidate unless bwd_candidates marks it may_spill
                problems.append(f"{where}: {r['spill_bytes']} bytes of register spills in backward candidate "
                                f"{unmarked[0]!r}, which bwd_candidates does not mark may_spill")
        if r["shared_bytes"] > ARCH[r["arch"]]["smem_per_block"]:
            problems.append(f"{where}: {r['shared_bytes']} bytes of shared memory, over the "
                            f"{ARCH[r['arch']]['smem_per_block']} a block may use")
        if r["ctas_per_sm"] < 1:
            problems.append(f"{where}: cannot be resident on an SM")
        held = HELD_ROWS.get(r["kernel"])
        if held and r["arch"] >= 90 and "wgmma" in r["mma"] and not _optional(r):
            held_rows = int(re.search(rf"\b{held}=(\d+)", r["config"]).group(1))
            if held_rows < 64 * r["num_warps"] // 4:
                problems.append(f"{where}: {held_rows} held rows on {r['num_warps']} warps: a warpgroup's wgmma covers "
                                "64 rows of its own, so the warpgroups compute the same products twice")
    for c in candidate_summaries(rows):
        if c["default"] and c["spill_bytes"]:
            problems.append(f"sm_{c['arch']} backward default {c['name']!r} ({c['dtype']}, head dim {c['head_dim']}"
                            f"{', packed' if c['packed'] else ''}) spills {c['spill_bytes']} bytes")
    by_shape: dict = {}
    for c in candidate_summaries(rows):
        if not c["packed"]:
            by_shape.setdefault((c["arch"], c["dtype"], c["head_dim"]), []).append(c)
    for (arch, dtype, head_dim), cands in by_shape.items():
        default = next(c for c in cands if c["default"])
        if default["work"] is None:
            continue
        for c in cands:
            if (c["deterministic"] and not c["spill_bytes"] and c["work"] is not None
                    and c["work"] < default["work"] - 1e-6):
                problems.append(f"sm_{arch} {dtype} head dim {head_dim}: the backward default {default['name']!r} "
                                f"does {default['work']:g} products per tile pair, but {c['name']!r} does "
                                f"{c['work']:g} without spilling: the default is the least work among spill-free "
                                "deterministic candidates")
    return problems


# The tile dimension an attention kernel's matrix products are M of (wgmma's row count): its
# warpgroups split these rows between them.
HELD_ROWS = {"attn_fwd": "BLOCK_M", "attn_bwd_dq": "BLOCK_M", "attn_bwd_dkdv": "BLOCK_N"}


def candidate_summaries(rows: list[dict]) -> list[dict]:
    """One entry per (arch, dtype, head dim, packed or not, backward candidate), in ``bwd_candidates``
    order: the whole backward's tensor-core work per tile pair (summed over its launches: the split
    design's two dK/dV launches, the dQ launch), its spill bytes (each launch's worst variant,
    summed), the most registers and the fewest CTAs per SM of its kernels. A launch's variants (the
    specialisations other model sizes' arguments compile to) do the same work."""
    summaries: dict = {}
    for r in rows:
        for label in r["candidates"]:
            key = (r["arch"], label["dtype"], label["head_dim"], label["packed"], label["name"])
            entry = summaries.setdefault(key, dict(arch=r["arch"], **label, kernels=[]))
            entry["kernels"].append(r)
    result = []
    for entry in sorted(summaries.values(), key=lambda e: (e["arch"], e["dtype"], -e["head_dim"], e["packed"],
                                                           e["index"])):
        launches: dict = {}
        for r in entry.pop("kernels"):
            launches.setdefault((r["kernel"], r["config"], r["num_warps"], r["num_stages"]), []).append(r)
        works = [max(v["tc_work"] or 0 for v in variants) if all(v["tc_work"] is not None for v in variants) else None
                 for (kernel, *_), variants in launches.items() if kernel != "attn_bwd_delta"]
        result.append(dict(entry, work=None if None in works else round(sum(works), 2),
                           spill_bytes=sum(max(v["spill_bytes"] for v in variants) for variants in launches.values()),
                           registers=max(v["registers"] for variants in launches.values() for v in variants),
                           ctas_per_sm=min(v["ctas_per_sm"] for variants in launches.values() for v in variants),
                           launches=len(launches)))
    return result


def candidate_markdown(rows: list[dict], dtype: str = "bfloat16") -> str:
    """The backward candidates of one architecture in ``dtype``: work per tile pair, registers,
    spills (dense prefill and packed batch) and CTAs/SM, the default first at each head dim."""
    summaries = candidate_summaries(rows)
    packed = {(c["head_dim"], c["name"]): c for c in summaries if c["packed"] and c["dtype"] == dtype}
    lines = ["| head dim | backward candidate | products per tile pair | regs | spill bytes (prefill / packed) | "
             "CTAs/SM | |", "|---|---|---|---|---|---|---|"]
    for c in (c for c in summaries if not c["packed"] and c["dtype"] == dtype):
        p = packed.get((c["head_dim"], c["name"]))
        spills = f"{c['spill_bytes']} / {p['spill_bytes'] if p else '-'}"
        note = ("default: the least work among spill-free deterministic candidates" if c["default"] else
                "atomic dQ: not deterministic" if not c["deterministic"] else "")
        if c["may_spill"]:
            note = (note + "; " if note else "") + "may spill"
        work = "-" if c["work"] is None else f"{c['work']:g}"
        lines.append(f"| {c['head_dim']} | {c['name']} | {work} | {c['registers']} | {spills} | {c['ctas_per_sm']} "
                     f"| {note} |")
    return "\n".join(lines)


COLUMNS = ("kernel", "dtype", "config", "warps", "stages", "regs", "smem KB", "CTAs/SM", "MMA", "TC work",
           "ld.global", "st.global", "cp.async", "variants", "launches")


def _access_widths(values) -> str:
    """'16Bx8 4Bx1' strings of several variants -> the distinct access widths, widest first."""
    widths = {int(w) for v in values for w in re.findall(r"(\d+)Bx", v)}
    return " ".join(f"{w}B" for w in sorted(widths, reverse=True)) or "-"


def _span(values) -> str:
    lo, hi = min(values), max(values)
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _span_work(values) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "-"
    lo, hi = min(known), max(known)
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def markdown(rows: list[dict]) -> str:
    """One row per (kernel, dtype, config, warps, stages); its variants are the distinct
    specialisations (alignment, divisibility, arguments equal to 1) the launches compiled to."""
    arch = rows[0]["arch"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["config"], r["num_warps"], r["num_stages"]), []).append(r)
    lines = [f"**sm_{arch}** ({ARCH[arch]['gpu']}, {ARCH[arch]['sms']} SMs), Triton {triton.__version__}: "
             f"{len(rows)} kernels for {sum(r['launches'] for r in rows)} launches", "",
             "Attention backward candidates in bfloat16 (a causal 4096-token prefill; packed: 16384 tokens in "
             "4096-token sequences); products per tile pair: tensor-core work of the whole backward in "
             "BLOCK_M x BLOCK_N x head-dim products, as the PTX runs them (TC work below, summed over its "
             "launches):", "", candidate_markdown(rows), "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for (kernel, dtype, config, warps, stages), variants in sorted(groups.items()):
        mma = sorted({r["mma"] for r in variants})
        cp_async = _access_widths(r["cp_async"] for r in variants)
        tma = " TMA" if any(r["tma"] for r in variants) else ""
        lines.append("| " + " | ".join(str(v) for v in (
            kernel, dtype, config, warps, stages, _span([r["registers"] for r in variants]),
            f"{max(r['shared_bytes'] for r in variants) / 1024:.1f}", _span([r["ctas_per_sm"] for r in variants]),
            " / ".join(mma), _span_work([r["tc_work"] for r in variants]), _access_widths(r["loads"] for r in variants),
            _access_widths(r["stores"] for r in variants), (cp_async if cp_async != "-" or not tma else "") + tma,
            len(variants), sum(r["launches"] for r in variants))) + " |")
    return "\n".join(lines)


TABLE_DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "compile-table.md")
BEGIN, END = "<!-- compile-table:begin -->", "<!-- compile-table:end -->"


def doc_block(tables: list[str]) -> str:
    return BEGIN + "\n" + "\n".join(f"<details><summary>sm_{arch} compile table</summary>\n\n{table}\n\n</details>\n"
                                    for arch, table in zip((80, 90), tables)) + END


def _run_both() -> list[list[dict]]:
    """Both architectures' rows, compiled at once in two subprocesses (as tests/ops/test_aot_compile.py
    runs them): half the wall time of one after the other on two cores."""
    import subprocess
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), str(arch)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for arch in (80, 90)]
    runs = []
    for arch, proc in zip((80, 90), procs):
        out, err = proc.communicate()
        problems = [line for line in err.splitlines() if line.startswith(f"sm_{arch} ")]
        if proc.returncode and not problems:
            raise RuntimeError(f"the sm_{arch} gate failed:\n{err[-4000:]}")
        for line in problems:
            print(f"gate problem: {line}", file=sys.stderr)
        runs.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
    return runs


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("--markdown", "--write-docs"):
        tables = [markdown(rows) for rows in _run_both()]
        if argv[0] == "--markdown":
            print("\n\n".join(tables))
            return 0
        with open(TABLE_DOC) as f:
            text = f.read()
        start, end = text.index(BEGIN), text.index(END) + len(END)
        with open(TABLE_DOC, "w") as f:
            f.write(text[:start] + doc_block(tables) + text[end:])
        return 0
    rows = run(int(argv[0]), argv[1] if len(argv) > 1 else "", progress=True)
    for row in rows:
        print(json.dumps(row), flush=True)
    problems = check(rows)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    # Set here, not at import: tests import this module for its table code, and the interpreter
    # setting of their process must stay as it is.
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # an on-disk cache hit would skip ptxas and its report
    if os.environ.pop("TRITON_INTERPRET", None) == "1":
        sys.exit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")
    sys.exit(main(sys.argv[1:]))
