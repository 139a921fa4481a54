"""Text generation over a static KV cache: greedy or sampled (temperature, top-k, top-p), batched
prompts of different lengths, streaming, and a CUDA-graph decode step on GPUs."""

from __future__ import annotations

import logging
import math
import operator
from typing import Callable, Iterator, Sequence

import torch

log = logging.getLogger(__name__)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, vocab): argmax at temperature 0, else temperature, then
    top-k, then top-p (nucleus) filtering, in transformers' order, and a draw from what is left."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)                      # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p                                         # the improbable tail
        drop[:, -1] = False                                                    # always keep the best
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _prompt_lengths(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[int]:
    T = input_ids.shape[1]
    if attention_mask is None:
        return [T] * input_ids.shape[0]
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                         f"{tuple(input_ids.shape)}")
    mask = attention_mask.to("cpu", torch.bool)
    lengths = mask.sum(-1).tolist()
    for row, n in enumerate(lengths):
        if n == 0:
            raise ValueError(f"attention_mask row {row} is all zeros: an empty prompt")
        if not bool(mask[row, T - n:].all()):
            raise ValueError(f"attention_mask row {row} is not left-padded (zeros first, then ones)")
    return lengths


class _GraphedDecodeStep:
    """One decode step ``tokens (B, 1) -> logits (B, 1, vocab)`` captured in a CUDA graph. Every
    tensor it touches is static: the token buffer, the cache and its lengths (which the captured
    step advances in place)."""

    def __init__(self, model, cache):
        self.tokens = torch.zeros(cache.lens.shape[0], 1, dtype=torch.long, device=cache.lens.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compile kernels, settle allocations
            for _ in range(2):
                model._forward(self.tokens, cache, last_only=True)
                cache.lens -= 1  # the warm-up's scratch writes sit at `lens` and are overwritten later
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = model._forward(self.tokens, cache, last_only=True)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


@torch.inference_mode()
def generate_stream(model, input_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None,
                    eos_token_id: int | Sequence[int] | None = None, attention_mask: torch.Tensor | None = None,
                    generator: torch.Generator | None = None, cuda_graph: bool | None = None,
                    vocab_size: int | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence (B,) per step; a sequence that has produced an EOS
    yields the pad id (the first EOS id) from then on. Stops when all have finished or after
    ``max_new_tokens`` steps. Prompts are left-padded rows of ``input_ids`` with ``attention_mask``.
    ``vocab_size`` samples only ids below it: published Qwen3 embeddings have rows (151,936) beyond
    the tokenizer's 151,669 tokens, ids no tokenizer can decode. Every argument is checked when this
    is called, before the first step is asked for."""
    config = model.config
    max_new_tokens = _positive_integer(max_new_tokens, "max_new_tokens")
    top_k = None if top_k is None else _positive_integer(top_k, "top_k")
    temperature = float(temperature)
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if vocab_size is not None:
        vocab_size = _positive_integer(vocab_size, "vocab_size")
    model._check_input(input_ids)
    lengths = _prompt_lengths(input_ids, attention_mask)
    longest = max(lengths)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's max context (max_position_embeddings={config.max_position_embeddings})")
    eos = _token_ids(eos_token_id)
    pad = eos[0] if eos else 0
    return _steps(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos, pad, lengths, longest,
                  generator, cuda_graph, vocab_size)


def _positive_integer(value, name: str) -> int:
    """Python, NumPy and 0-d torch integers alike; bools and floats are refused."""
    try:
        if isinstance(value, bool):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be a positive integer, got {value!r} ({type(value).__name__})") from None
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {number}")
    return number


def _token_ids(eos_token_id) -> list[int]:
    """An id, a sequence of ids, or a tensor of them (0-d or 1-d) -> a list of Python ints."""
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, torch.Tensor):
        return [int(t) for t in eos_token_id.reshape(-1).tolist()]
    if isinstance(eos_token_id, (list, tuple, set)):
        return [operator.index(t) for t in eos_token_id]
    return [operator.index(eos_token_id)]


@torch.inference_mode()
def _steps(model, input_ids, max_new_tokens, temperature, top_k, top_p, eos, pad, lengths, longest, generator,
           cuda_graph, vocab_size) -> Iterator[torch.Tensor]:
    B, T = input_ids.shape
    device = input_ids.device

    cache = model.new_cache(B, longest + max_new_tokens)
    if len(set(lengths)) == 1:
        logits = model._forward(input_ids[:, T - longest:], cache, last_only=True)[:, -1]
    else:  # each prompt prefilled on its own rows of the cache, without its padding
        logits = torch.cat([model._forward(input_ids[b:b + 1, T - n:], cache.rows(b, b + 1), last_only=True)[:, -1]
                            for b, n in enumerate(lengths)])

    use_graph = device.type == "cuda" if cuda_graph is None else cuda_graph
    step = None
    if use_graph and max_new_tokens > 2:
        try:
            step = _GraphedDecodeStep(model, cache)
        except Exception as e:  # capture is an optimisation: fall back to eager steps, loudly
            log.warning("CUDA-graph capture of the decode step failed (%s); decoding eagerly", e)
    eos_ids = torch.tensor(eos, device=device, dtype=torch.long)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        tokens = sample_next_token(logits[:, :vocab_size].float(), temperature, top_k, top_p, generator)
        tokens = torch.where(finished, pad, tokens)
        yield tokens
        if eos:
            finished |= torch.isin(tokens, eos_ids)
            if bool(finished.all()):
                return
        if i + 1 < max_new_tokens:
            step_input = tokens[:, None]
            logits = (step(step_input) if step is not None else
                      model._forward(step_input, cache, last_only=True))[:, -1]


def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *,
             stream: Callable[[torch.Tensor], None] | None = None, **kwargs) -> torch.Tensor:
    """Prompt plus new tokens, (B, T + steps), like transformers' ``generate``; ``stream`` is called
    with each step's tokens (B,) as they come."""
    new_tokens = []
    for tokens in generate_stream(model, input_ids, max_new_tokens, **kwargs):
        if stream is not None:
            stream(tokens)
        new_tokens.append(tokens)
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)], dim=1)
