"""Before the loop: the paths and arguments checked (once per machine under torchrun), the run's
identity that ``--resume`` compares, and the process group (torchrun's, or one of our own)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket

import torch
import torch.distributed as dist

from ..data import check_data_path, data_fingerprint
from .report import check_reporters, parse_report_to


class _ReportedByLocalRank0(Exception):
    """A fault every rank of a machine found alike, which its first rank reports for all of them."""


@contextlib.contextmanager
def _same_on_every_rank(*errors: type[Exception]):
    """For checks every rank makes on the same arguments and files (and for faults the ranks agree on,
    such as a non-finite loss): under torchrun each rank would print the same error; only each
    machine's first rank does (the files are the machine's). Faults a rank may meet alone, such as
    running out of memory, are still reported by that rank."""
    try:
        yield
    except errors or (OSError, ValueError, KeyError, ImportError):
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            raise _ReportedByLocalRank0() from None
        raise


def _check_paths(args) -> None:
    """What would fail late, checked before anything is loaded."""
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no config.json in it")
    check_data_path(args.data, "--data")
    if args.eval_data is not None:
        check_data_path(args.eval_data, "--eval-data")
    check_reporters(parse_report_to(args.report_to))
    _check_lora(args)
    try:
        os.makedirs(args.out, exist_ok=True)
        probe = os.path.join(args.out, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"--out {args.out!r}: cannot write there ({e.strerror or e})") from None
    _check_run(args)


# What makes two runs the same run: a checkpoint continues only the run that wrote it.
_RUN_FILE = "run.json"
_RUN_ARGUMENTS = ("tokens_per_step", "micro_batch_tokens", "lr", "warmup", "lr_scheduler", "max_grad_norm",
                  "weight_decay", "router_aux_loss_coef", "seed", "dtype", "lora_rank", "lora_alpha", "lora_dropout",
                  "lora_targets")
_RUN_OUTPUTS = (_RUN_FILE, "metrics.jsonl", "checkpoints", "loss.png", "tensorboard", "wandb", "adapter_config.json",
                "adapter_model.safetensors", "merged")
# the full model a run exports (a new run in the same --out removes an earlier run's: see Trainer.train)
_EXPORTED_MODEL = re.compile(r"config\.json|model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json")


def _check_lora(args) -> None:
    """The LoRA options mean something only with --lora-rank; the targets must be projections LoRA can
    wrap in this model."""
    if args.lora_rank:
        import importlib.util
        if importlib.util.find_spec("peft") is None:
            raise ImportError("--lora-rank: LoRA runs through PEFT, which is not installed (pip install peft)")
        _lora_targets(args)
        return
    given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-dropout", args.lora_dropout or None),
                                      ("--lora-targets", args.lora_targets), ("--merge", args.merge or None))
             if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: LoRA options, but --lora-rank is 0 (full fine-tuning); give "
                         "--lora-rank R to train LoRA adapters of rank R")


def run_identity(args) -> dict:
    """The model (its directory and config.json), the data (its path and content) and the arguments
    that shape the training, as a dict that ``--resume`` compares with the run's ``run.json``."""
    def digest(path):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()
    identity = {"model": os.path.abspath(args.model),
                "model config.json sha256": digest(os.path.join(args.model, "config.json")),
                "data": os.path.abspath(args.data), "data sha256": data_fingerprint(args.data)}
    identity.update({f"--{name.replace('_', '-')}": getattr(args, name) for name in _RUN_ARGUMENTS})
    # the values the defaults stand for, so spelling a default out does not make another run
    identity["--micro-batch-tokens"] = args.micro_batch_tokens or args.tokens_per_step // _world_size()
    identity["--dtype"] = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.lora_rank:  # the values the LoRA defaults stand for (the targets' default depends on the model)
        identity["--lora-alpha"] = args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_rank
        identity["--lora-targets"] = ",".join(_lora_targets(args))
    return identity


def _lora_targets(args) -> list[str]:
    from ..config import Config
    from .lora import parse_targets
    return parse_targets(args.lora_targets, Config.from_pretrained(args.model))


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's; the process group does not exist yet


def _check_run(args) -> None:
    """A new run refuses an --out that holds another run's outputs (unless --overwrite); --resume
    refuses a run whose model, data or training arguments differ from these."""
    held = [name for name in _RUN_OUTPUTS if os.path.exists(os.path.join(args.out, name))]
    if not args.resume:
        if held and not args.overwrite:
            raise FileExistsError(f"--out {args.out!r} already holds a run ({', '.join(held)}): --resume continues "
                                  "it, --overwrite starts a new one there, or choose another --out")
        return
    if not held:
        raise FileNotFoundError(f"--resume: {args.out!r} holds no run to continue")
    try:
        with open(os.path.join(args.out, _RUN_FILE)) as f:
            before = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--resume: {args.out!r} has no {_RUN_FILE}, so nothing says what it holds was "
                                f"trained with (--overwrite starts a new run there)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"--resume: {os.path.join(args.out, _RUN_FILE)!r} is unreadable ({e})") from None
    now = run_identity(args)
    changed = [f"{key} {before.get(key)!r} -> {value!r}" for key, value in now.items() if before.get(key) != value]
    if changed:
        raise ValueError(f"--resume: the run in {args.out!r} was trained otherwise: {'; '.join(changed)} "
                         "(--resume continues the same run; --overwrite starts a new one)")


def _init_distributed(device_type: str) -> tuple[int, int, torch.device]:
    """torchrun's process group, or a one-process group of our own, so one code path serves both."""
    standalone = {}
    if "RANK" not in os.environ:  # not under torchrun
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            standalone = dict(init_method=f"tcp://127.0.0.1:{s.getsockname()[1]}", rank=0, world_size=1)
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but this torch sees no CUDA device")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **standalone)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **standalone)
    return dist.get_rank(), dist.get_world_size(), device
