"""``qwen3-kernels tune --model DIR | --preset NAME [--tokens N]``: ranks the attention kernels on this
GPU, ahead of time, at the shapes the model will run, and writes the choices to the tuning cache
(``$QWEN3_KERNELS_CACHE_DIR``, default ``~/.cache/qwen3_kernels/``), so later runs tune nothing.

The shapes: prompts without a cache (the dense causal attention where SDPA's backends race the
Triton kernels) and into a KV cache (``kv_lens``: the Triton tiles), at every power-of-two length up
to ``--max-len``; decode steps at batch 1, 8 and 64 over a short and a long cache; and training at
``--tokens`` tokens per micro-batch: dense forward + backward (SDPA in the race again) and packed
batches of sequences of every power-of-two length (the Triton forward tiles and backward designs).
The table printed has, per tuned (shape, op): the winner and its time, the runner-up and its time,
and SDPA's best time where SDPA raced. Without a CUDA device it says so in one line and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import NamedTuple

import torch

from .config import PRESETS, Config

DECODE_BATCHES = (1, 8, 64)
CACHE_LENGTHS = (1024, 32768)  # short and long caches (capped at the model's context)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="a Hugging Face Qwen3 checkpoint directory (its config.json)")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a published dense Qwen3 size")
    parser.add_argument("--tokens", type=_positive_int, default=16384,
                        help="training tokens per micro-batch: the forward + backward shapes tuned")
    parser.add_argument("--max-len", type=_positive_int, default=16384,
                        help="the longest prompt tuned (capped at the model's context)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bfloat16", help="the compute dtype")
    parser.add_argument("--device", default="cuda", help="the CUDA device to tune")


class Shape(NamedTuple):
    """One attention call the model makes: ``kind`` prefill | cache prefill | decode | train | packed."""
    kind: str
    batch: int
    q_len: int
    kv_len: int
    grad: bool = False
    sequence: int = 0  # packed: each sequence's length (the row holds q_len tokens)

    @property
    def label(self) -> str:
        if self.kind == "packed":
            return f"train packed {self.q_len} tokens, sequences of {self.sequence}"
        if self.kind in ("cache prefill", "decode"):
            return f"{self.kind} B={self.batch} T={self.q_len} cache={self.kv_len}"
        return f"{self.kind} B={self.batch} T={self.q_len}" + (" fwd+bwd" if self.grad else "")


def _powers_of_two(limit: int, start: int = 128) -> list[int]:
    """start, 2 start, ... up to ``limit``, and ``limit`` itself (the tuning buckets are powers of two:
    a length between two of them shares the larger one's bucket)."""
    lengths = [n for n in (start << i for i in range(32)) if n <= limit]
    if not lengths or lengths[-1] != limit:
        lengths.append(limit)
    return lengths


def plan(config: Config, tokens: int, max_len: int) -> list[Shape]:
    """The attention shapes ``config`` runs: prompts up to ``max_len`` without and with a KV cache,
    decode steps, and training at ``tokens`` per micro-batch (dense and packed)."""
    context = config.max_position_embeddings
    shapes = []
    for T in _powers_of_two(min(max_len, context)):
        shapes.append(Shape("prefill", 1, T, T))
        shapes.append(Shape("cache prefill", 1, T, min(2 * T, context)))
    for B in DECODE_BATCHES:
        for cache in sorted({min(n, context) for n in CACHE_LENGTHS}):
            shapes.append(Shape("decode", B, 1, cache))
    train = min(tokens, context)
    shapes.append(Shape("train", 1, train, train, grad=True))
    for sequence in _powers_of_two(train, start=min(512, train)):
        shapes.append(Shape("packed", 1, tokens, tokens, grad=True, sequence=sequence))
    return shapes


def run_shape(shape: Shape, config: Config, dtype: torch.dtype, device: torch.device) -> None:
    """Calls the attention op as the model does at ``shape`` (random inputs): it tunes what is not
    remembered."""
    from . import ops

    H, Hkv, D = config.num_heads, config.num_kv_heads, config.head_dim
    g = torch.Generator(device).manual_seed(0)

    def randn(*size):
        return torch.randn(*size, dtype=dtype, device=device, generator=g).requires_grad_(shape.grad)

    q = randn(shape.batch, shape.q_len, H, D)
    k, v = randn(shape.batch, shape.kv_len, Hkv, D), randn(shape.batch, shape.kv_len, Hkv, D)
    kwargs = {}
    if shape.kind in ("cache prefill", "decode"):
        kwargs["kv_lens"] = torch.full((shape.batch,), shape.kv_len, dtype=torch.int32, device=device)
    if shape.kind == "packed":
        bounds = list(range(0, shape.q_len, shape.sequence)) + [shape.q_len]
        kwargs["cu_seqlens"] = torch.tensor(bounds, dtype=torch.int32, device=device)
        kwargs["max_seqlen"] = shape.sequence
    with torch.set_grad_enabled(shape.grad):
        out = ops.attention(q, k, v, causal=True, **kwargs)
        if shape.grad:
            torch.autograd.grad(out, (q, k, v), torch.randn_like(out))


def tune_shapes(shapes: list[Shape], config: Config, dtype: torch.dtype, device: torch.device,
                rows: list | None = None) -> list[dict]:
    """Runs every shape; returns one row per (shape, tuned op): the tuning report's row with the
    shape's label, appended to ``rows`` as each shape ends (what an interrupted run has). A bucket
    an earlier shape already settled is not listed again."""
    from .ops.triton import tuning

    rows, seen = [] if rows is None else rows, set()
    for i, shape in enumerate(shapes):
        if sys.stderr.isatty():
            print(f"[{i + 1}/{len(shapes)}] {shape.label}", file=sys.stderr, flush=True)
        run_shape(shape, config, dtype, device)
        for row in tuning.report():
            key = (row["op"], json.dumps(row["bucket"], sort_keys=True))
            if key not in seen:
                seen.add(key)
                rows.append({"shape": shape.label, **row})
        if not any(r["shape"] == shape.label for r in rows) and shape.kind == "decode":
            rows.append({"shape": shape.label, "op": "attention decode", "bucket": {}, "choice": "split-KV kernel",
                         "ms": {}, "dropped": {}, "tuned_here": False, "note": "one config: nothing to rank"})
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def table(rows: list[dict]) -> str:
    """shape | op | winner | ms | runner-up (ms) | SDPA's best (ms), one line per tuned (shape, op)."""
    lines = [("shape", "op", "winner", "ms", "runner-up", "SDPA ms")]
    for row in rows:
        ms = row["ms"]
        winner = row["choice"]
        others = sorted((t, name) for name, t in ms.items() if name != winner)
        runner_up = f"{others[0][1]} ({_ms(others[0][0])})" if others else row.get("note", "-")
        sdpa = [(t, name) for name, t in ms.items() if name.startswith("sdpa-")]
        sdpa_text = f"{_ms(min(sdpa)[0])} ({min(sdpa)[1]})" if sdpa else "-"
        raced = [why for name, why in row["dropped"].items() if name.startswith("sdpa-")]
        if not sdpa and raced:  # SDPA raced, none of its backends was timed
            sdpa_text = "disagreed" if any(why.startswith("disagrees") for why in raced) else "none runs here"
        op = row["op"].removeprefix("attention ") + ("" if row.get("tuned_here", True) else " (cached)")
        lines.append((row["shape"], op, winner, _ms(ms.get(winner)), runner_up, sdpa_text))
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("tune: no CUDA device here, nothing to tune (the kernels are ranked on the GPU that runs them)")
        return 0
    if os.environ.get("QWEN3_KERNELS_AUTOTUNE", "1") == "0":
        print("error: QWEN3_KERNELS_AUTOTUNE=0 turns autotuning off; unset it to tune", file=sys.stderr)
        return 1
    # a parent parser's defaults stay where a subcommand's are not applied over them (argparse)
    model, preset = getattr(args, "model", None), getattr(args, "preset", None) or "0.6B"
    config = Config.from_pretrained(model) if model else Config.preset(preset)
    dtype_name = getattr(args, "dtype", None) or "bfloat16"
    if dtype_name not in _DTYPES:
        raise ValueError(f"--dtype {dtype_name}: tuning is for the half-precision dtypes ({', '.join(_DTYPES)})")
    device = torch.device(getattr(args, "device", None) or "cuda")
    if device.type != "cuda":
        raise ValueError(f"--device {device}: tuning ranks kernels on a CUDA device")
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return tune_model(config, _DTYPES[dtype_name], device, getattr(args, "tokens", 16384),
                      getattr(args, "max_len", 16384), model or f"Qwen3-{preset}")


def tune_model(config: Config, dtype: torch.dtype, device: torch.device, tokens: int, max_len: int,
               name: str) -> int:
    """Tunes every shape of ``plan`` on ``device`` and prints the table (what an interrupted run
    tuned, on SIGINT / Ctrl-C: exit 130)."""
    from . import ops
    from .ops.triton import tuning

    choice = ops.choose("attention", device, dtype)
    if choice.backend != "triton":
        raise RuntimeError(f"attention runs the {choice.backend} on {device} in {dtype} ({choice.reason}): "
                           "nothing to tune")
    shapes = plan(config, tokens, max_len)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"tuning attention for {name} (heads {config.num_heads}/{config.num_kv_heads}, head dim "
          f"{config.head_dim}) in {str(dtype).removeprefix('torch.')} on {where}: {len(shapes)} shapes", flush=True)
    rows: list[dict] = []
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            tune_shapes(shapes, config, dtype, device, rows)
    except KeyboardInterrupt:  # a time budget ran out (SIGINT): what was tuned is cached and shown
        done = len({r["shape"] for r in rows})
        print(table(rows))
        print(f"interrupted: shown the tunings of {done} of {len(shapes)} shapes; cache: {tuning.cache_file()}")
        return 130
    print(table(rows))
    print(f"cache: {tuning.cache_file()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen3-kernels tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
