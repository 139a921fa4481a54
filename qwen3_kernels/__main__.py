"""``python -m qwen3_kernels``: build Qwen3 (0.6B random weights, or ``--model DIR``), show what it is
and which implementation each op uses here, and time one forward pass."""

from __future__ import annotations

import argparse
import sys
import time

import torch

from . import ops
from .config import PRESETS, Config
from .model import QWEN

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3-kernels", description=__doc__)
    p.add_argument("--model", metavar="DIR", help="Hugging Face Qwen3 checkpoint directory (default: random weights)")
    p.add_argument("--preset", default="0.6B", choices=sorted(PRESETS), help="size for random weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True,
                   help="use the Triton kernels where the device supports them")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _demo(args)
    except (FileNotFoundError, ValueError, KeyError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _demo(args) -> int:
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    if args.batch < 1 or args.seq_len < 1:
        raise ValueError(f"--batch and --seq-len must be positive, got {args.batch} and {args.seq_len}")
    t0 = time.perf_counter()
    if args.model:
        model = QWEN.from_pretrained(args.model, dtype=dtype, device=device, fused=args.fused)
        source = args.model
    else:
        torch.manual_seed(0)
        with torch.device(device):
            model = QWEN(Config.preset(args.preset), fused=args.fused).to(dtype).eval()
        source = f"Qwen3-{args.preset}, random weights"
    build_s = time.perf_counter() - t0
    config = model.config

    print(f"Qwen3 ({source}), built in {build_s:.1f} s on {device} in {dtype}")
    print(model)
    print(f"config: {config}")
    total = model.num_parameters(unique=False)
    unique = model.num_parameters(unique=True)
    print(f"parameters: {total:,} total, {unique:,} unique"
          + (" (LM head tied to the embedding)" if config.tie_word_embeddings else ""))
    print(f"\nops on {device} in {dtype} ({'fused' if args.fused else 'reference, --no-fused'}):")
    for op, choice in ops.report(device, dtype).items():
        backend = choice.backend if args.fused else "reference"
        reason = choice.reason if args.fused else "fused=False"
        print(f"  {op:<14} {backend:<10} {reason}")

    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max context {config.max_position_embeddings}")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    with torch.inference_mode():
        model(ids[:, :8])  # warm-up: first-call allocations and kernel compilation stay out of the timing
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
    tokens = args.batch * args.seq_len
    print(f"\nforward ({args.batch} x {args.seq_len} tokens) -> logits {tuple(logits.shape)} in "
          f"{elapsed * 1e3:.1f} ms ({tokens / elapsed:,.0f} tokens/s); "
          f"next-token argmax of sequence 0: {logits[0, -1].argmax().item()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
