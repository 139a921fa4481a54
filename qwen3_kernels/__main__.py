"""``python -m qwen3_kernels`` (also the ``qwen3-kernels`` command).

Bare: build Qwen3 (0.6B random weights, or ``--model DIR``), show what it is and which
implementation each op uses here, and time one forward pass.
``generate --model DIR --prompt TEXT``: stream a completion, then prefill and decode tokens/s.
``chat --model DIR``: an interactive multi-turn chat on stdin.
``train --model DIR --data FILE.jsonl --out DIR``: fine-tune (FSDP2; ``torchrun ... -m qwen3_kernels
train`` for several GPUs).
``tune --model DIR | --preset NAME``: rank the attention kernels on this GPU ahead of time."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time

import torch

from . import ops
from .config import PRESETS, Config
from .model import QWEN

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return value


def _seed(text: str) -> int:
    value = int(text)
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**63), got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return value


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every option's default, where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        shown = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if shown and "%(default)" not in text and action.option_strings:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


# A value that starts with '-' (--lr -1e-3) reads as an option to argparse unless it is written
# --lr=-1e-3; numbers are joined to their option before parsing, so both spellings work.
_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _join_negative_numbers(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        if out and _NUMBER.fullmatch(a) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={a}"
        else:
            out.append(a)
    return out


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def _common(p: argparse.ArgumentParser, model_required: bool) -> None:
    p.add_argument("--model", metavar="DIR", required=model_required,
                   help="Hugging Face Qwen3 checkpoint directory" + ("" if model_required else
                                                                       " (default: random weights)"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where to run")
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default: float32 on CPU, bfloat16 on GPU")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="use the Triton kernels where the device supports them (default: on a GPU)")


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=256,
                   help="at most this many tokens per reply (clamped to what the context leaves)")
    p.add_argument("--temperature", type=_non_negative_float, help="0 is greedy (default: the checkpoint's)")
    p.add_argument("--top-k", type=_positive_int, help="default: the checkpoint's")
    p.add_argument("--top-p", type=_probability, help="default: the checkpoint's")
    p.add_argument("--seed", type=_seed, default=0, help="the sampling generator's seed")
    p.add_argument("--think", action=argparse.BooleanOptionalAction, default=True,
                   help="let the model think before answering (chat prompts)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen3-kernels", description=__doc__, formatter_class=_HelpFormatter)
    _common(p, model_required=False)
    p.add_argument("--preset", default="0.6B", choices=sorted(PRESETS), help="size for random weights")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences in the timed forward")
    p.add_argument("--seq-len", type=_positive_int, default=64, help="tokens per sequence in the timed forward")
    sub = p.add_subparsers(dest="command")
    gen = sub.add_parser("generate", help="complete a prompt, streaming the text", formatter_class=_HelpFormatter)
    _common(gen, model_required=True)
    gen.add_argument("--prompt", required=True, help="the text to complete")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template as a user turn")
    _sampling(gen)
    chat = sub.add_parser("chat", help="interactive multi-turn chat (one user message per line of stdin)",
                          formatter_class=_HelpFormatter)
    _common(chat, model_required=True)
    chat.add_argument("--system", help="a system message to start the conversation with (default: none)")
    _sampling(chat)
    from . import tune
    tune.add_arguments(sub.add_parser("tune", help="rank the attention kernels on this GPU ahead of time for a model "
                                      "(writes the tuning cache)", formatter_class=_HelpFormatter))
    _train_arguments(sub.add_parser("train", help="fine-tune on JSONL data (FSDP2; under torchrun on several GPUs)",
                                    formatter_class=_HelpFormatter))
    return p


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", required=True, help="Hugging Face Qwen3 checkpoint to start from")
    p.add_argument("--data", metavar="FILE", required=True,
                   help='JSONL: {"messages": [...]} (trained on assistant replies) or {"text": "..."} per line')
    p.add_argument("--eval-data", metavar="FILE", default=None,
                   help="held-out examples (as --data): metrics.jsonl gets their loss, eval_loss (default: no eval)")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="steps between evaluations (default: at every --save-every checkpoint and at the end)")
    p.add_argument("--out", metavar="DIR", required=True, help="metrics, checkpoints and the fine-tuned model")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None,
                        help="optimizer steps; without it, 100 or what --epochs amounts to")
    length.add_argument("--epochs", type=_positive_float, default=None,
                        help="passes over the data, as an alternative to --steps (a fraction counts its share)")
    p.add_argument("--tokens-per-step", type=_positive_int, default=65536,
                   help="tokens per optimizer step, over all ranks and micro-batches")
    p.add_argument("--micro-batch-tokens", type=_positive_int, default=None,
                   help="tokens per forward (default: --tokens-per-step over the ranks); smaller accumulates")
    p.add_argument("--lr", type=_positive_float, default=1e-5, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=_non_negative_int, default=0, help="steps of linear warmup before the schedule")
    p.add_argument("--lr-scheduler", choices=("cosine", "linear", "constant"), default="cosine",
                   help="after warmup: cosine or linear decay to 0 at the last step, or constant")
    p.add_argument("--max-grad-norm", type=_non_negative_float, default=1.0,
                   help="clip the gradient norm to this; 0 does not clip")
    p.add_argument("--weight-decay", type=_non_negative_float, default=0.0, help="AdamW's decoupled weight decay")
    p.add_argument("--router-aux-loss-coef", type=_non_negative_float, default=None,
                   help="Qwen3-MoE: weight of the load-balancing loss added to the training loss (on in training; "
                        "default: the checkpoint's router_aux_loss_coef; 0 turns it off)")
    p.add_argument("--seed", type=_seed, default=0, help="data order (and a LoRA run's initial adapters)")
    p.add_argument("--dtype", choices=sorted(_DTYPES),
                   help="compute dtype (default: bfloat16 on GPUs, float32 on CPUs)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu",
                   help="GPUs (NCCL) or CPUs (gloo)")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=None,
                   help="the Triton kernels (default: on GPUs)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    p.add_argument("--save-every", type=_positive_int, default=None,
                   help="steps between resumable checkpoints (default: one at the end and on Ctrl-C only)")
    p.add_argument("--save-total-limit", type=_positive_int, default=None,
                   help="keep only the newest K checkpoints in --out/checkpoints (default: keep all)")
    p.add_argument("--report-to", default="none",
                   help="where else the metrics go: none, tensorboard, wandb (comma-separated; WANDB_MODE=offline "
                        "works without a network)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds another run's outputs, deleting them")

    def probability(text: str) -> float:
        value = float(text)
        if not 0 <= value < 1:
            raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
        return value

    lora = p.add_argument_group("LoRA (through PEFT; the output is a PEFT adapter for transformers' Qwen3)")
    lora.add_argument("--lora-rank", type=_non_negative_int, default=0,
                      help="train LoRA adapters of this rank on a frozen base; 0 fine-tunes every weight")
    lora.add_argument("--lora-alpha", type=_positive_float, default=None,
                      help="the adapters' scale is alpha / rank (default: twice the rank, a scale of 2)")
    lora.add_argument("--lora-dropout", type=probability, default=0.0,
                      help="dropout on the adapters' input in training")
    lora.add_argument("--lora-targets", metavar="NAMES", default=None,
                      help="comma-separated projections to adapt, among q_proj, k_proj, v_proj, o_proj, gate_proj, "
                           "up_proj, down_proj (default: all seven; on Qwen3-MoE, whose experts are not Linear "
                           "layers, the four attention ones)")
    lora.add_argument("--merge", action="store_true",
                      help="also write the base with the adapters merged into it, a full checkpoint in --out/merged")


COMMANDS = ("generate", "chat", "train", "tune")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    argv = _join_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    command_at = next((i for i, a in enumerate(argv) if a in COMMANDS), None)
    if command_at and any(a.startswith("-") for a in argv[:command_at]):
        # the subcommand's own options would silently override these
        parser.error(f"options go after the command: qwen3-kernels {argv[command_at]} "
                     f"{' '.join(argv[:command_at])} ...")
    args = parser.parse_args(argv)
    try:
        if args.command == "generate":
            return _generate(args)
        if args.command == "chat":
            return _chat(args)
        if args.command == "tune":
            from .tune import run
            return run(args)
        if args.command == "train":
            from .train import run
            return run(args)
        return _demo(args)
    except (FileNotFoundError, FileExistsError, PermissionError, ValueError, KeyError, TypeError, RuntimeError,
            ImportError, MemoryError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `qwen3-kernels generate ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


def _fused(args, device: torch.device) -> bool:
    return device.type == "cuda" if args.fused is None else args.fused


def _dtype(args, device: torch.device) -> torch.dtype:
    if args.dtype:
        return _DTYPES[args.dtype]
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def _device(args) -> torch.device:
    from .loading import check_device

    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r} is not a device: {e}") from None
    check_device(device)
    return device


def _load(args):
    from .loading import check_vocabulary
    from .tokenizer import Tokenizer

    if not os.path.isdir(args.model):  # before the tokenizer, so the message is about the model
        raise FileNotFoundError(f"checkpoint directory {args.model!r} does not exist")
    device = _device(args)
    tokenizer = Tokenizer.from_pretrained(args.model)
    model = QWEN.from_pretrained(args.model, dtype=_dtype(args, device), device=device, fused=_fused(args, device))
    check_vocabulary(tokenizer, model.config, args.model)
    return model, tokenizer, device


def _note(text: str) -> None:
    print(f"note: {text}", file=sys.stderr, flush=True)


def _new_token_budget(prompt_tokens: int, context: int, asked: int) -> int:
    """``asked``, or what the context leaves after the prompt (with a notice); an error if nothing."""
    room = context - prompt_tokens
    if room < 1:
        raise ValueError(f"the prompt's {prompt_tokens} tokens fill the model's {context}-token context")
    if asked > room:
        _note(f"max new tokens {asked} clamped to {room}: the prompt's {prompt_tokens} tokens and the model's "
              f"{context}-token context leave room for {room}")
    return min(asked, room)


def _complete(model, tokenizer, device, prompt: str, args, out=None, interruptible: bool = False
              ) -> tuple[str, dict]:
    """Streams the completion of ``prompt`` to ``out`` (stdout); returns the text and timing. With
    ``interruptible``, Ctrl-C ends the reply (the text so far is returned, ``stats['interrupted']``)."""
    out = out or sys.stdout
    defaults = tokenizer.generation
    temperature = defaults.temperature if args.temperature is None else args.temperature
    token_ids = tokenizer.encode(prompt)
    if not token_ids:
        raise ValueError("the prompt is empty: give some text (or --chat, whose template adds tokens)")
    ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    max_new = _new_token_budget(ids.shape[1], model.config.max_position_embeddings, args.max_new_tokens)
    generator = torch.Generator(device).manual_seed(args.seed)
    decoder = tokenizer.stream_decoder()
    start = time.perf_counter()
    first = None
    count = 0
    interrupted = False
    try:
        for tokens in model.generate_stream(ids, max_new, temperature=temperature,
                                            top_k=args.top_k if args.top_k is not None else defaults.top_k,
                                            top_p=args.top_p if args.top_p is not None else defaults.top_p,
                                            eos_token_id=defaults.eos_token_ids, generator=generator,
                                            vocab_size=min(len(tokenizer), model.config.vocab_size)):
            token = int(tokens[0])
            if first is None:
                first = time.perf_counter()
            count += 1
            if token in defaults.eos_token_ids:
                break
            out.write(decoder.push(token))
            out.flush()
    except KeyboardInterrupt:
        if not interruptible:
            raise
        interrupted = True
    end = time.perf_counter()
    text = tokenizer.decode(decoder.tokens, skip_special_tokens=True)
    stats = {"prompt_tokens": ids.shape[1], "prefill_s": (first or end) - start,
             "new_tokens": count, "decode_s": end - (first or end), "interrupted": interrupted}
    return text, stats


def _report(stats: dict) -> None:
    prefill = stats["prompt_tokens"] / stats["prefill_s"] if stats["prefill_s"] else float("nan")
    decoded = stats["new_tokens"] - 1
    decode = decoded / stats["decode_s"] if decoded > 0 and stats["decode_s"] else float("nan")
    print(f"\n[prefill {stats['prompt_tokens']} tokens: {prefill:,.1f} tokens/s | "
          f"decode {stats['new_tokens']} tokens: {decode:,.1f} tokens/s]", file=sys.stderr)


def _generate(args) -> int:
    model, tokenizer, device = _load(args)
    # argv bytes that are not UTF-8 arrive as lone surrogates (PEP 383); replace them, as chat does stdin
    prompt = args.prompt.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    if args.chat:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], enable_thinking=args.think)
    _, stats = _complete(model, tokenizer, device, prompt, args)
    print()
    _report(stats)
    return 0


def _read_line(stream) -> str | None:
    """One line of the user's input, None at EOF. Bytes that are not UTF-8 are replaced (with a
    notice) rather than ending the chat."""
    raw = stream.buffer.readline() if hasattr(stream, "buffer") else stream.readline()
    if not raw:
        return None
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        _note("the input line is not valid UTF-8; undecodable bytes were replaced with U+FFFD")
        return raw.decode("utf-8", errors="replace")


def _fit_conversation(messages: list[dict], tokenizer, args, context: int) -> str | None:
    """The chat prompt of ``messages``, dropping the oldest turns (never the system message or the
    newest user message) until it leaves room for a reply; None if even the newest message alone
    does not fit. ``messages`` is edited in place."""
    reply_room = min(args.max_new_tokens, max(1, context // 4))
    dropped = 0
    while True:
        prompt = tokenizer.apply_chat_template(messages, enable_thinking=args.think)
        if len(tokenizer.encode(prompt)) + reply_room <= context:
            break
        first = 1 if messages[0]["role"] == "system" else 0
        if len(messages) - first <= 1:
            return None
        del messages[first]  # the oldest message after the system one
        dropped += 1
    if dropped:
        _note(f"dropped the {dropped} oldest message(s) to fit the model's {context}-token context")
    return prompt


def _chat(args) -> int:
    model, tokenizer, device = _load(args)
    context = model.config.max_position_embeddings
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = _read_line(sys.stdin)  # Ctrl-C here (at the prompt) ends the chat
        if line is None or line.strip() in ("/exit", "/quit"):
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        prompt = _fit_conversation(messages, tokenizer, args, context)
        if prompt is None:
            messages.pop()
            print(f"error: that message does not fit the model's {context}-token context with room for a reply; "
                  f"send a shorter one", file=sys.stderr)
            continue
        reply, stats = _complete(model, tokenizer, device, prompt, args, interruptible=True)
        print()
        if stats["interrupted"]:
            _note("reply stopped (Ctrl-C); Ctrl-C at the prompt or end of input exits")
        _report(stats)
        messages.append({"role": "assistant", "content": reply})


def _demo(args) -> int:
    device = _device(args)
    dtype = _dtype(args, device)
    args.fused = _fused(args, device)
    t0 = time.perf_counter()
    if args.model:
        model = QWEN.from_pretrained(args.model, dtype=dtype, device=device, fused=args.fused)
        source = args.model
    else:
        torch.manual_seed(0)
        with torch.device("meta"):  # no memory, no init: allocated once below, in the final dtype
            model = QWEN(Config.preset(args.preset), fused=args.fused)
        model = model.to(dtype).to_empty(device=device).reset_parameters().eval()
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
    print(f"\nops on {device} in {dtype} (what QWEN(fused=True) runs here, and why):")
    for op, choice in ops.report(device, dtype).items():
        print(f"  {op:<14} {choice.backend:<10} {choice.reason}")
    if not args.fused:
        print("this model was built with fused=False: every op runs the eager reference")

    if args.seq_len > config.max_position_embeddings:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max context {config.max_position_embeddings}")
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    with torch.inference_mode():
        # warm-up at the timed shape: first-call allocations, kernel compilation and (on a GPU) the
        # attention autotuning of this shape bucket stay out of the timing
        model(ids)
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
    for op, choice in ops.report(device, dtype).items():  # which designs this card chose
        if args.fused and "tuned here" in choice.reason:
            print(f"{op} {choice.backend}: {choice.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
