"""``qwen3-kernels train``: fine-tune a Qwen3 checkpoint on JSONL data with FSDP2.

One process runs it as is; ``torchrun --nproc_per_node N -m qwen3_kernels train ...`` runs it
data-parallel with the weights, gradients and optimizer state sharded (``fully_shard``: one group per
block, and the tied embedding + final norm + LM head together in the root group, since a tied
parameter cannot sit in two groups). NCCL on GPUs, gloo on CPUs.

- The model is built on the meta device, sharded, materialised, and filled from the checkpoint read
  on rank 0 only (broadcast shard by shard). Weights and optimizer state stay fp32; ``--dtype``
  (default bf16 on GPUs) is the compute dtype, and gradients are reduced in fp32.
- Each step sees ``--tokens-per-step`` tokens in micro-batches of ``--micro-batch-tokens``: examples
  packed padding-free (``qwen3_kernels.data.pack_examples``), shuffled per epoch from ``--seed``, the
  micro-batches of a step dealt out to the ranks. The loss is the fused linear cross-entropy, summed
  and divided by the number of counted tokens in the whole step (all micro-batches, all ranks), so
  the gradient does not depend on how the step is split.
- AdamW, linear warmup then cosine decay to 0, gradient clipping at ``--max-grad-norm``.
- In ``--out``: ``metrics.jsonl`` (one line per step), ``loss.png``, ``checkpoints/step_N``
  (``torch.distributed.checkpoint``, every ``--save-every`` steps, on Ctrl-C and at the end), from
  which ``--resume`` continues exactly; and at the end the fine-tuned model in transformers' format
  (config.json, safetensors sharded above 5 GB, tokenizer and generation files copied).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time

import torch
import torch.distributed as dist

from . import ops
from .config import Config, rope_frequencies
from .data import pack_examples, read_jsonl
from .model import IGNORE_INDEX, QWEN

_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "generation_config.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 2**30
# bf16 dense tensor-core peaks (FLOP/s) for the MFU column, by device name
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def run(args: argparse.Namespace) -> int:
    """The whole run, on every rank. Returns the exit code (130 after Ctrl-C)."""
    try:
        with _same_on_every_rank():
            _check_paths(args)
        rank, world, device = _init_distributed(args.device)
        try:
            return Trainer(args, rank, world, device).train()
        finally:
            dist.destroy_process_group()
    except _ReportedByLocalRank0:
        return 1  # its error is printed by local rank 0


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
    except errors or (OSError, ValueError, KeyError):
        if int(os.environ.get("LOCAL_RANK", "0")) != 0:
            raise _ReportedByLocalRank0() from None
        raise


def _check_paths(args) -> None:
    """What would fail late, checked before anything is loaded."""
    if not os.path.isdir(args.model):
        raise FileNotFoundError(f"--model {args.model!r}: no such checkpoint directory")
    if not os.path.isfile(os.path.join(args.model, "config.json")):
        raise FileNotFoundError(f"--model {args.model!r}: no config.json in it")
    if os.path.isdir(args.data):
        raise FileNotFoundError(f"--data {args.data!r} is a directory, not a JSONL file")
    if not os.path.isfile(args.data):
        raise FileNotFoundError(f"--data {args.data!r}: no such file")
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
_RUN_ARGUMENTS = ("tokens_per_step", "micro_batch_tokens", "lr", "warmup", "max_grad_norm", "weight_decay", "seed",
                  "dtype")
_RUN_OUTPUTS = (_RUN_FILE, "metrics.jsonl", "checkpoints", "loss.png")


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
                "data": os.path.abspath(args.data), "data sha256": digest(args.data)}
    identity.update({f"--{name.replace('_', '-')}": getattr(args, name) for name in _RUN_ARGUMENTS})
    # the values the defaults stand for, so spelling a default out does not make another run
    identity["--micro-batch-tokens"] = args.micro_batch_tokens or args.tokens_per_step // _world_size()
    identity["--dtype"] = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return identity


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


class Trainer:
    def __init__(self, args, rank: int, world: int, device: torch.device):
        from .tokenizer import Tokenizer

        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda"
                                                                     else torch.float32)
        with _same_on_every_rank():
            self.config = Config.from_pretrained(args.model)
            micro = args.micro_batch_tokens or args.tokens_per_step // world
            if args.tokens_per_step % micro or (args.tokens_per_step // micro) % world:
                raise ValueError(f"--tokens-per-step {args.tokens_per_step} must be a whole number of micro-batches "
                                 f"(--micro-batch-tokens {micro}) for each of the {world} ranks")
            self.micro_tokens, self.micro_per_rank = micro, args.tokens_per_step // micro // world
            self.tokenizer = Tokenizer.from_pretrained(args.model)
            # Each example is cut to the model's context, which the micro-batch packing several examples
            # may exceed (65,536 tokens against every published Qwen3's 40,960), and to the micro-batch.
            self.max_example_tokens = min(micro, self.config.max_position_embeddings)
            self.examples = read_jsonl(args.data, self.tokenizer, max_len=self.max_example_tokens)
        self.model = self._build_model()
        self.n_params = sum(p.numel() for p in self.model.parameters())  # for MFU
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                                           weight_decay=args.weight_decay, foreach=True)
        self.checkpoints = os.path.join(args.out, "checkpoints")
        self.metrics_file = os.path.join(args.out, "metrics.jsonl")
        self.step = 0
        self._stream, self._next_index = self._packed_stream(), 0

    # --- model -------------------------------------------------------------------------------------

    def _build_model(self) -> QWEN:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        fused = self.args.fused if self.args.fused is not None else self.device.type == "cuda"
        with torch.device("meta"):
            model = QWEN(self.config, fused=fused)
        if self.args.activation_checkpointing:
            from torch.utils.checkpoint import checkpoint
            for block in model.blocks:  # FSDP's hooks stay on the block's __call__; its forward is recomputed
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)  # embeddings, final norm and the (tied) head: one group
        model.to_empty(device=self.device)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full = QWEN.from_pretrained(self.args.model, dtype=torch.float32).state_dict() if self.rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
        model.inv_freq = rope_frequencies(self.config)[0].to(self.device)
        return model.train()

    # --- data ----------------------------------------------------------------------------------------

    def micro_batches(self, step: int) -> list:
        """This rank's micro-batches of ``step`` (0-based): the step's micro-batches, dealt round-robin
        over the ranks. Steps must be asked for in order (a resumed run skips ahead)."""
        per_step = self.micro_per_rank * self.world
        first = step * per_step
        mine = []
        while self._next_index < first + per_step:
            index, batch = self._next_index, next(self._stream)
            self._next_index += 1
            if index >= first and (index - first) % self.world == self.rank:
                mine.append(batch)
        return mine

    def _packed_stream(self):
        """Micro-batches forever: each epoch the examples in a fresh order drawn from ``--seed``, packed
        in that order."""
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.examples.tokens), generator=g).tolist()
            yield from pack_examples((self.examples.tokens[i] for i in order), self.micro_tokens,
                                     labels=(self.examples.labels[i] for i in order))
            epoch += 1

    # --- training ------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Linear warmup over ``--warmup`` steps, then cosine decay to 0 at ``--steps`` (1-based steps)."""
        warmup, total = self.args.warmup, self.args.steps
        if step <= warmup:
            return self.args.lr * step / max(warmup, 1)
        progress = (step - warmup - 1) / max(total - warmup, 1)
        return self.args.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def train_step(self, step: int) -> dict:
        """One optimizer step (``step`` is 1-based); returns its metrics."""
        start = time.perf_counter()
        batches = [b.to(self.device) for b in self.micro_batches(step - 1)]
        counted = torch.zeros((), dtype=torch.float32, device=self.device)
        for b in batches:  # targets are labels shifted by one, as the model's loss shifts them
            counted += (b.labels[:, 1:] != IGNORE_INDEX).sum()
        dist.all_reduce(counted)
        total = torch.zeros((), dtype=torch.float32, device=self.device)
        for i, b in enumerate(batches):
            self.model.set_requires_gradient_sync(i == len(batches) - 1)
            loss = self.model(b.input_ids, labels=b.labels, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                              num_items_in_batch=counted.clamp(min=1))
            # FSDP averages gradients over the ranks; the loss is already divided by the whole step's
            # count, so scale the average back to the sum (gloo has no pre-multiplied sum to ask for)
            (loss * self.world).backward()
            total += loss.detach()
        # --max-grad-norm 0 means no clipping (as in transformers); the norm is still measured
        max_norm = self.args.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        dist.all_reduce(total)
        if not (math.isfinite(total.item()) and math.isfinite(grad_norm.item())):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteStep(step, total.item(), grad_norm.item())
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step = step  # at once: a Ctrl-C from here on saves this step's weights under its number
        tokens = torch.tensor([sum(b.input_ids.numel() for b in batches)], device=self.device)
        dist.all_reduce(tokens)
        seconds = time.perf_counter() - start
        metrics = {"step": step, "loss": total.item(), "lr": lr, "grad_norm": grad_norm.item(),
                   "tokens": int(tokens.item()), "tokens_per_s": tokens.item() / seconds}
        if self.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            peak = next((f for name, f in _PEAK_FLOPS.items() if name in torch.cuda.get_device_name(self.device)),
                        None)
            if peak:
                metrics["mfu"] = 6 * self.n_params * metrics["tokens_per_s"] / (peak * self.world)
        return metrics

    def train(self) -> int:
        args = self.args
        if args.resume:
            self.load_checkpoint()
        else:
            if self.rank == 0:  # a new run (over an old one only with --overwrite, see _check_run)
                for name in _RUN_OUTPUTS:
                    path = os.path.join(args.out, name)
                    if os.path.isdir(path):
                        shutil.rmtree(path)
                    elif os.path.exists(path):
                        os.remove(path)
                with open(os.path.join(args.out, _RUN_FILE), "w") as f:
                    json.dump(run_identity(args), f, indent=2)
            dist.barrier()
        if self.rank == 0 and self.examples.truncated:
            limit = (f"the model's {self.max_example_tokens}-token context"
                     if self.max_example_tokens == self.config.max_position_embeddings
                     else f"a {self.max_example_tokens}-token micro-batch")
            print(f"note: {self.examples.truncated} of {len(self.examples.tokens)} examples were longer than {limit} "
                  "and were cut to it", file=sys.stderr)
        started, first = time.perf_counter(), self.step + 1
        try:
            ops.sync_tuning()  # every rank runs rank 0's cached kernel choices ...
            for step in range(self.step + 1, args.steps + 1):
                metrics = self.train_step(step)
                if step == first:
                    ops.sync_tuning()  # ... and those rank 0 tuned in the first step
                if self.rank == 0:
                    with open(self.metrics_file, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    _progress(metrics, args.steps, (time.perf_counter() - started) / (step - first + 1))
                if args.save_every and step % args.save_every == 0 and step < args.steps:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.rank == 0:
                print(f"\ninterrupted: saving a checkpoint at step {self.step} (resume with --resume)",
                      file=sys.stderr)
            self.save_checkpoint()
            return 130
        except NonFiniteStep as e:
            if self.rank == 0 and sys.stderr.isatty():
                print(file=sys.stderr)  # the error goes below the redrawn progress line, not onto it
            # The weights are still those of the last good step: keep them as a checkpoint, write no model.
            if self.step and not os.path.isdir(self._checkpoint_dir(self.step)):
                self.save_checkpoint()
            kept = f"the last good state is {self._checkpoint_dir(self.step)}" if self.step else "nothing was saved"
            with _same_on_every_rank(RuntimeError):  # every rank stops at the step whose sums are not finite
                raise RuntimeError(f"{e}; stopped before updating the weights, {kept}") from None
        if self.rank == 0 and sys.stderr.isatty():
            print(file=sys.stderr)  # ends the redrawn progress line
        self.save_checkpoint()
        self.save_pretrained(args.out)
        if self.rank == 0:
            plot_loss(self.metrics_file, os.path.join(args.out, "loss.png"))
            print(f"saved the fine-tuned model and metrics in {args.out}", file=sys.stderr)
        # Every rank leaves together: a gloo rank whose peer tore its process group down first was once
        # seen to abort at exit (torch 2.11, 'terminate called without an active exception').
        dist.barrier()
        return 0

    # --- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
        return {"model": get_model_state_dict(self.model), "optimizer": get_optimizer_state_dict(self.model,
                                                                                                 self.optimizer),
                "step": self.step}

    def _checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step_{step:07d}")

    def save_checkpoint(self) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save(self._state(), checkpoint_id=self._checkpoint_dir(self.step))
        dist.barrier()

    def load_checkpoint(self) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        found = sorted(d for d in os.listdir(self.checkpoints) if d.startswith("step_")) \
            if os.path.isdir(self.checkpoints) else []
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint in {self.checkpoints!r}")
        state = self._state()  # torch fills in AdamW's moments first (a zero step) so they can be loaded into
        try:
            dcp.load(state, checkpoint_id=os.path.join(self.checkpoints, found[-1]))
        except Exception as e:  # dcp wraps each rank's failure in a long report: name the first cause
            first = str(e).strip().splitlines()
            cause = next((line.strip() for line in first if "Error" in line or "size" in line), first[0] if first
                         else type(e).__name__)
            with _same_on_every_rank(RuntimeError):  # dcp.load fails on every rank together
                raise RuntimeError(f"--resume: {os.path.join(self.checkpoints, found[-1])!r} does not fit this "
                                   f"model ({cause[:300]})") from None
        set_model_state_dict(self.model, state["model"])
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        if self.rank == 0 and os.path.exists(self.metrics_file):
            with open(self.metrics_file) as f:
                kept = [line for line in f if json.loads(line)["step"] <= self.step]
            with open(self.metrics_file, "w") as f:
                f.writelines(kept)
        if self.rank == 0:
            print(f"resumed from {found[-1]}", file=sys.stderr)

    def save_pretrained(self, out: str) -> None:
        """The model in transformers' format: config.json, safetensors (sharded above 5 GB), tokenizer files."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            with open(os.path.join(self.args.model, "config.json")) as f:
                given = json.load(f)
            save_hf_checkpoint(state, self.config, out, dtype=self.config.torch_dtype or torch.float32, keep=given)
            for name in _COPIED_FILES:
                if os.path.isfile(os.path.join(self.args.model, name)):
                    shutil.copy2(os.path.join(self.args.model, name), os.path.join(out, name))
        dist.barrier()


def save_hf_checkpoint(state: dict[str, torch.Tensor], config: Config, out: str, dtype: torch.dtype,
                       keep: dict | None = None) -> None:
    """Our state dict written as a transformers Qwen3 checkpoint in ``dtype``. Its config.json spells
    the model both as the published checkpoints do (which transformers 4 reads) and as transformers 5
    writes it; the keys of ``keep`` (the input checkpoint's config.json) that the model does not define,
    such as its token ids, are kept."""
    from safetensors.torch import save_file

    from .loading import local_to_hf
    tensors = {local_to_hf(name): t.detach().to("cpu", dtype).contiguous() for name, t in state.items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    shards, size = [{}], 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    with open(os.path.join(out, "config.json"), "w") as f:
        name = str(dtype).removeprefix("torch.")
        json.dump({**(keep or {}), **config.to_published_hf_dict(), "dtype": name, "torch_dtype": name}, f,
                  indent=2)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


class NonFiniteStep(Exception):
    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"step {step}: the loss is {loss:.6g} and the gradient norm {grad_norm:.6g}")


def _progress(metrics: dict, steps: int, seconds_per_step: float) -> None:
    """One line per step: redrawn in place on a terminal, a line of its own in a redirected log."""
    eta = int(seconds_per_step * (steps - metrics["step"]))
    line = (f"step {metrics['step']}/{steps}  loss {metrics['loss']:.4f}  {metrics['tokens_per_s']:,.0f} tok/s  "
            f"ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
    if sys.stderr.isatty():
        print(f"\r{line}", end="", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def plot_loss(metrics_file: str, png: str, width: int = 640, height: int = 360) -> None:
    """The loss curve as a PNG (no plotting library needed): the loss per step, axes at the minimum."""
    with open(metrics_file) as f:
        losses = [loss for loss in (json.loads(line)["loss"] for line in f) if math.isfinite(loss)]
    if not losses:
        return
    with contextlib.suppress(ImportError):
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(width / 100, height / 100), dpi=100)
        ax.plot(range(1, len(losses) + 1), losses)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        fig.savefig(png)
        plt.close(fig)
        return
    _write_line_png(losses, png, width, height)


def _write_line_png(values: list[float], png: str, width: int, height: int) -> None:
    import struct
    import zlib
    margin = 20
    pixels = [[255] * width for _ in range(height)]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    for x in range(margin, width - margin):
        pixels[height - margin][x] = 0
    for y in range(margin, height - margin + 1):
        pixels[y][margin] = 0

    def point(i, v):
        x = margin + (i * (width - 2 * margin - 1)) // max(len(values) - 1, 1)
        y = height - margin - 1 - int((v - lo) / span * (height - 2 * margin - 2))
        return x, y

    for (x0, y0), (x1, y1) in zip(map(point, range(len(values)), values),
                                  list(map(point, range(len(values)), values))[1:] or [point(0, values[0])]):
        steps = max(abs(x1 - x0), abs(y1 - y0), 1)
        for t in range(steps + 1):
            pixels[y0 + (y1 - y0) * t // steps][x0 + (x1 - x0) * t // steps] = 40
    raw = b"".join(b"\x00" + bytes(row) for row in pixels)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(png, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
