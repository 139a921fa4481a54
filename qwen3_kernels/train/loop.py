"""The training loop: the FSDP2 model, the packed micro-batches dealt to the ranks, the optimizer
step, checkpoints and the exported model."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist

from .. import ops
from ..config import Config, rope_frequencies
from ..data import pack_examples, read_examples
from ..model import IGNORE_INDEX, QWEN, expert_load
from . import lora
from .export import save_hf_checkpoint
from .launch import _EXPORTED_MODEL, _RUN_FILE, _RUN_OUTPUTS, _same_on_every_rank, run_identity
from .report import Progress, Reporters, parse_report_to, plot_loss

_COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                 "added_tokens.json", "generation_config.json", "chat_template.jinja")
# bf16 dense tensor-core peaks (FLOP/s) for the MFU column, by device name
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


class Trainer:
    def __init__(self, args, rank: int, world: int, device: torch.device):
        from ..tokenizer import Tokenizer

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
            # tokenised once into --out/tokenized (keyed by the data's and tokenizer's content, so a
            # resumed run reads it back) and read from there through memory maps: a corpus larger
            # than memory trains; the ranks share one tokenisation (a file lock)
            cache = os.path.join(args.out, "tokenized")
            self.examples = read_examples(args.data, self.tokenizer, self.max_example_tokens, cache_dir=cache)
            self.eval_examples = read_examples(args.eval_data, self.tokenizer, self.max_example_tokens,
                                               cache_dir=cache) if args.eval_data else None
        self.moe = any(self.config.is_moe_layer(i) for i in range(self.config.num_layers))
        with _same_on_every_rank():
            if args.router_aux_loss_coef is not None and not self.moe:
                raise ValueError(f"--router-aux-loss-coef: {args.model!r} is a dense Qwen3 (no Mixture-of-Experts "
                                 "layer), so there is no load-balancing loss to weigh")
        # the load-balancing loss is on in training (the released configs leave output_router_logits off)
        self.aux_coef = (args.router_aux_loss_coef if args.router_aux_loss_coef is not None
                         else self.config.router_aux_loss_coef) if self.moe else 0.0
        self.lora = None  # PEFT's LoraConfig of a LoRA run (--lora-rank); None: full fine-tuning
        if args.lora_rank:
            with _same_on_every_rank():
                self.lora = lora.lora_config(args, lora.parse_targets(args.lora_targets, self.config),
                                             base_model=os.path.abspath(args.model))
        self.steps = args.steps or (steps_for_epochs(self.examples, self.micro_tokens, args.seed, args.epochs,
                                                     self.micro_per_rank * world) if args.epochs else 100)
        self.model = self._build_model()
        self.n_params = sum(p.numel() for p in self.model.parameters())  # for MFU
        # all parameters, or a LoRA run's adapters: the frozen base gets no gradient and no optimizer state
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.n_trainable = sum(p.numel() for p in self.trainable)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=args.lr, betas=(0.9, 0.95),
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
        if self.lora is not None:  # PEFT's LoRA layers around the targeted projections, the rest frozen
            lora.add_adapters(model, self.lora)
        if self.args.activation_checkpointing:
            from torch.utils.checkpoint import checkpoint
            for block in model.blocks:  # FSDP's hooks stay on the block's __call__; its forward is recomputed
                block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
        policy = MixedPrecisionPolicy(param_dtype=self.dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        # embeddings, final norm and the (tied) head: one group. In a LoRA run the frozen base is sharded
        # as in full fine-tuning, the adapters beside it in their block's group: FSDP2 reduce-scatters
        # only the gradients there are, the adapters'.
        fully_shard(model, mp_policy=policy)
        model.to_empty(device=self.device)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full = {}
        if self.rank == 0:
            full_model = QWEN.from_pretrained(self.args.model, dtype=torch.float32)
            if self.lora is not None:  # the adapters' initial weights drawn from --seed, sent to every rank
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.args.seed)
                    lora.add_adapters(full_model, self.lora)
            full = full_model.state_dict()
            del full_model
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
            order = epoch_order(len(self.examples.tokens), self.args.seed, epoch)
            yield from pack_examples((self.examples.tokens[i] for i in order), self.micro_tokens,
                                     labels=(self.examples.labels[i] for i in order))
            epoch += 1

    # --- training ------------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """Linear warmup over ``--warmup`` steps, then ``--lr-scheduler``: cosine decay to 0 at the last
        step, linear decay to 0, or constant (1-based steps)."""
        warmup, total = self.args.warmup, self.steps
        if step <= warmup:
            return self.args.lr * step / max(warmup, 1)
        progress = (step - warmup - 1) / max(total - warmup, 1)
        if self.args.lr_scheduler == "constant":
            return self.args.lr
        if self.args.lr_scheduler == "linear":
            return self.args.lr * (1.0 - progress)
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
        aux_total = torch.zeros((), dtype=torch.float32, device=self.device)
        expert_tokens = None
        micro_batches = self.micro_per_rank * self.world
        for i, b in enumerate(batches):
            self.model.set_requires_gradient_sync(i == len(batches) - 1)
            if self.lora is not None and self.lora.lora_dropout:
                # the adapters' dropout masks drawn from the micro-batch's index in the run: the same
                # on one process or several, and after a resume
                torch.manual_seed(lora.dropout_seed(self.args.seed, (step - 1) * micro_batches + i * self.world
                                                    + self.rank))
            loss = self.model(b.input_ids, labels=b.labels, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                              num_items_in_batch=counted.clamp(min=1), output_router_logits=False,
                              return_aux=self.moe)
            objective = loss
            if self.moe:
                # MoE: each micro-batch's load-balancing loss, weighed by the coefficient and averaged
                # over the step's micro-batches (those of every rank), so the step's objective does not
                # depend on how its micro-batches are dealt to the ranks
                loss, stats = loss
                objective = loss + self.aux_coef * stats.aux_loss / micro_batches
                aux_total += stats.aux_loss.detach()
                expert_tokens = stats.tokens_per_expert if expert_tokens is None \
                    else expert_tokens + stats.tokens_per_expert
            # FSDP averages gradients over the ranks; the loss is already divided by the whole step's
            # count, so scale the average back to the sum (gloo has no pre-multiplied sum to ask for)
            (objective * self.world).backward()
            total += loss.detach()
        # --max-grad-norm 0 means no clipping (as in transformers); the norm is still measured
        max_norm = self.args.max_grad_norm or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
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
        if self.moe:  # the step's mean load-balancing loss, and how unevenly its tokens were routed
            dist.all_reduce(aux_total)
            dist.all_reduce(expert_tokens)
            largest, smallest = expert_load(expert_tokens)
            metrics.update(aux_loss=aux_total.item() / micro_batches, expert_load_max=largest.item(),
                           expert_load_min=smallest.item())
        if self.device.type == "cuda":
            metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            peak = next((f for name, f in _PEAK_FLOPS.items() if name in torch.cuda.get_device_name(self.device)),
                        None)
            if peak:  # per token 2N FLOPs forward, 2N for the activations' gradients, 2N per trained weight
                flops = 4 * self.n_params + 2 * self.n_trainable
                metrics["mfu"] = flops * metrics["tokens_per_s"] / (peak * self.world)
        return metrics

    def train(self) -> int:
        args = self.args
        if args.resume:
            self.load_checkpoint()
        else:
            if self.rank == 0:  # a new run (over an old one only with --overwrite, see _check_run)
                # the model an earlier run exported goes with it, so a LoRA run does not leave another
                # run's full model beside its adapter
                previous = os.path.exists(os.path.join(args.out, _RUN_FILE))
                exported = [name for name in os.listdir(args.out) if previous and _EXPORTED_MODEL.fullmatch(name)]
                for name in (*_RUN_OUTPUTS, *exported):
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
        if self.rank == 0:
            print(self.summary(), file=sys.stderr)
        reporters = Reporters(parse_report_to(args.report_to), args.out, run_identity(args)) if self.rank == 0 \
            else None
        started, first = time.perf_counter(), self.step + 1
        progress = Progress(self.steps, first) if self.rank == 0 else None
        try:
            ops.sync_tuning()  # every rank runs rank 0's cached kernel choices ...
            for step in range(self.step + 1, self.steps + 1):
                metrics = self.train_step(step)
                if step == first:
                    ops.sync_tuning()  # ... and those rank 0 tuned in the first step
                saving = bool(args.save_every and step % args.save_every == 0 and step < self.steps)
                if self.eval_examples is not None and (step == self.steps or (
                        step % args.eval_every == 0 if args.eval_every else saving)):
                    metrics["eval_loss"], metrics["eval_tokens"] = self.evaluate()
                if self.rank == 0:
                    with open(self.metrics_file, "a") as f:
                        f.write(json.dumps(metrics) + "\n")
                    reporters.log(metrics)
                    progress.update(metrics, (time.perf_counter() - started) / (step - first + 1))
                if saving:
                    self.save_checkpoint()
        except KeyboardInterrupt:
            if self.rank == 0:
                progress.close()
                print(f"\ninterrupted: saving a checkpoint at step {self.step} (resume with --resume)",
                      file=sys.stderr)
            self.save_checkpoint()
            return 130
        except NonFiniteStep as e:
            if self.rank == 0:
                progress.close()  # the error goes below the progress bar, not onto it
            # The weights are still those of the last good step: keep them as a checkpoint, write no model.
            if self.step and not os.path.isdir(self._checkpoint_dir(self.step)):
                self.save_checkpoint()
            kept = f"the last good state is {self._checkpoint_dir(self.step)}" if self.step else "nothing was saved"
            with _same_on_every_rank(RuntimeError):  # every rank stops at the step whose sums are not finite
                raise RuntimeError(f"{e}; stopped before updating the weights, {kept}") from None
        finally:
            if reporters is not None:
                reporters.close()
        if self.rank == 0:
            progress.close()
        self.save_checkpoint()
        self.save_pretrained(args.out)
        if self.rank == 0:
            plot_loss(self.metrics_file, os.path.join(args.out, "loss.png"))
            print(f"saved the fine-tuned model and metrics in {args.out}", file=sys.stderr)
        # Every rank leaves together: a gloo rank whose peer tore its process group down first was once
        # seen to abort at exit (torch 2.11, 'terminate called without an active exception').
        dist.barrier()
        return 0

    def summary(self) -> str:
        """One line at the start: the data, what the steps amount to, the parameters trained."""
        first_epoch = count_micro_batches(self.examples, self.micro_tokens, self.args.seed, 0)
        epochs = self.steps * self.micro_per_rank * self.world / max(first_epoch, 1)
        tokens, trained = self.examples.num_tokens, self.examples.num_trained_tokens
        line = (f"training: {len(self.examples.tokens):,} examples, {tokens:,} tokens ({trained:,} trained on); "
                f"{self.steps:,} steps of {self.args.tokens_per_step:,} tokens = {epochs:.2f} epochs; "
                f"{self.n_trainable:,} of {self.n_params:,} parameters trained")
        if self.eval_examples is not None:
            line += f"; eval: {len(self.eval_examples.tokens):,} examples"
        return line

    # --- evaluation ----------------------------------------------------------------------------------

    def evaluate(self) -> tuple[float, int]:
        """The eval set's loss: the sum over its trained tokens divided by their count (a token-weighted
        mean over the whole set, whatever the number of ranks), and that count. The eval examples,
        in file order, are packed into micro-batches dealt round-robin over the ranks; a rank with
        fewer batches runs a forward with nothing counted, since FSDP gathers parameters with every
        forward on every rank."""
        batches = list(pack_examples(self.eval_examples.tokens, self.micro_tokens, labels=self.eval_examples.labels))
        rounds = -(-len(batches) // self.world)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        counted = torch.zeros((), dtype=torch.float64, device=self.device)
        self.model.eval()  # no adapter dropout
        with torch.no_grad():
            for i in range(rounds):
                index = i * self.world + self.rank
                b = batches[index if index < len(batches) else 0].to(self.device)
                labels = b.labels if index < len(batches) else torch.full_like(b.labels, IGNORE_INDEX)
                loss_sum = self.model(b.input_ids, labels=labels, cu_seqlens=b.cu_seqlens, max_seqlen=b.max_seqlen,
                                      num_items_in_batch=1, output_router_logits=False)  # the sum of the LM loss
                total += loss_sum.double()
                counted += (labels[:, 1:] != IGNORE_INDEX).sum()
        self.model.train()
        dist.all_reduce(total)
        dist.all_reduce(counted)
        return (total / counted.clamp(min=1)).item(), int(counted.item())

    # --- checkpoints ---------------------------------------------------------------------------------

    def _state(self) -> dict:
        """What a checkpoint holds: the trained parameters (all, or a LoRA run's adapters: the frozen
        base is read from --model again), their AdamW state and the step."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        model = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))
        if self.lora is not None:  # torch keeps a tied head's second name (lm_head.weight), frozen or not
            trained = {name for name, p in self.model.named_parameters() if p.requires_grad}
            model = {name: value for name, value in model.items() if name in trained}
        return {"model": model, "optimizer": get_optimizer_state_dict(self.model, self.optimizer), "step": self.step}

    def _checkpoint_dir(self, step: int) -> str:
        return os.path.join(self.checkpoints, f"step_{step:07d}")

    def save_checkpoint(self) -> None:
        """A resumable checkpoint of this step; with ``--save-total-limit K``, the older ones beyond the
        newest K are removed once this one is complete on every rank."""
        import torch.distributed.checkpoint as dcp
        dcp.save(self._state(), checkpoint_id=self._checkpoint_dir(self.step))
        dist.barrier()
        if self.rank == 0 and self.args.save_total_limit:
            for old in sorted(d for d in os.listdir(self.checkpoints) if d.startswith("step_"))[
                    :-self.args.save_total_limit]:
                shutil.rmtree(os.path.join(self.checkpoints, old))
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
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        # a LoRA checkpoint holds the adapters alone (dcp.load has checked that each is there)
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=self.lora is None))
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
        """The model in transformers' format: config.json, safetensors (sharded above 5 GB), tokenizer files.
        A LoRA run writes the adapter in PEFT's format instead (adapter_config.json,
        adapter_model.safetensors), and with --merge also the base with the adapter merged, as a full
        checkpoint in ``out/merged``."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        if self.lora is not None:  # the adapters gathered whole (every rank, in the same order), nothing else
            adapters = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                        for name, p in self.model.named_parameters() if p.requires_grad}
            if self.rank == 0:
                lora.save_adapter(adapters, self.lora, out)
                self._copy_tokenizer_files(out)
        if self.lora is None or self.args.merge:
            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if self.rank == 0:
                if self.lora is not None:
                    state = lora.merged_state(state, lora.resolved_alpha(self.args) / self.args.lora_rank)
                    out = os.path.join(out, lora.MERGED_DIR)
                    os.makedirs(out, exist_ok=True)
                with open(os.path.join(self.args.model, "config.json")) as f:
                    given = json.load(f)
                save_hf_checkpoint(state, self.config, out, dtype=self.config.torch_dtype or torch.float32, keep=given)
                self._copy_tokenizer_files(out)
            del state
        dist.barrier()

    def _copy_tokenizer_files(self, out: str) -> None:
        for name in _COPIED_FILES:
            if os.path.isfile(os.path.join(self.args.model, name)):
                shutil.copy2(os.path.join(self.args.model, name), os.path.join(out, name))


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The order of the ``n`` examples in ``epoch``, drawn from the run's seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def count_micro_batches(examples, micro_tokens: int, seed: int, epoch: int) -> int:
    """How many micro-batches ``pack_examples`` makes of ``epoch`` (from the lengths alone)."""
    count, used, lengths = 0, 0, examples.lengths
    for i in epoch_order(len(lengths), seed, epoch):
        n = int(lengths[i])
        if not n:
            continue
        if not count or used + n > micro_tokens:
            count, used = count + 1, 0
        used += n
    return count


def steps_for_epochs(examples, micro_tokens: int, seed: int, epochs: float, per_step: int) -> int:
    """``--epochs``: the optimizer steps (``per_step`` micro-batches each) that cover ``epochs``
    passes over the data, the last step completed (a fraction of an epoch counts its micro-batches)."""
    whole, fraction = int(epochs), epochs - int(epochs)
    batches = sum(count_micro_batches(examples, micro_tokens, seed, e) for e in range(whole))
    if fraction:
        batches += math.ceil(fraction * count_micro_batches(examples, micro_tokens, seed, whole))
    return max(1, -(-batches // per_step))


class NonFiniteStep(Exception):
    def __init__(self, step: int, loss: float, grad_norm: float):
        super().__init__(f"step {step}: the loss is {loss:.6g} and the gradient norm {grad_norm:.6g}")
