"""Batches without padding: examples packed back to back into one row, each attending only to itself
(``QWEN.forward(..., position_ids=...)`` or ``cu_seqlens=...``), in the layout transformers'
``DataCollatorWithFlattening`` produces."""

from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple, Sequence

import torch

from ..model import IGNORE_INDEX


class PackedBatch(NamedTuple):
    """One padding-free batch of n examples, ``total`` tokens."""
    input_ids: torch.Tensor     # (1, total) int64
    position_ids: torch.Tensor  # (1, total) int64, restarting at 0 for each example
    labels: torch.Tensor        # (1, total) int64; -100 at each example's first token, so no loss crosses
    #                             from one example into the next, and wherever the example's labels say
    cu_seqlens: torch.Tensor    # (n + 1,) int32, prefix sums of the example lengths
    max_seqlen: int             # the longest example

    def to(self, device) -> "PackedBatch":
        return PackedBatch(self.input_ids.to(device), self.position_ids.to(device), self.labels.to(device),
                           self.cu_seqlens.to(device), self.max_seqlen)


def pack_examples(examples: Iterable[Sequence[int]], max_tokens: int,
                  labels: Iterable[Sequence[int]] | None = None) -> Iterator[PackedBatch]:
    """Packs token lists, in order, into batches of at most ``max_tokens`` tokens: an example that does
    not fit in the current batch starts the next one. ``labels`` (one list per example, same lengths;
    -100 where a token is not trained on, e.g. a prompt) default to the tokens themselves. An empty
    example is skipped; one longer than ``max_tokens`` is an error (truncate it first)."""
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    label_lists = iter(labels) if labels is not None else None
    batch: list[tuple[list[int], list[int]]] = []
    used = 0
    for i, example in enumerate(examples):
        tokens = [int(t) for t in example]
        if label_lists is None:
            example_labels = tokens
        else:
            try:
                example_labels = [int(t) for t in next(label_lists)]
            except StopIteration:
                raise ValueError(f"labels ran out at example {i}: give one label list per example") from None
            if len(example_labels) != len(tokens):
                raise ValueError(f"example {i}: {len(tokens)} tokens but {len(example_labels)} labels")
        if not tokens:
            continue
        if len(tokens) > max_tokens:
            raise ValueError(f"example {i} has {len(tokens)} tokens, more than max_tokens={max_tokens}; "
                             "truncate it first")
        if used + len(tokens) > max_tokens:
            yield _batch(batch)
            batch, used = [], 0
        batch.append((tokens, example_labels))
        used += len(tokens)
    if batch:
        yield _batch(batch)


def _batch(examples: list[tuple[list[int], list[int]]]) -> PackedBatch:
    lengths = [len(tokens) for tokens, _ in examples]
    input_ids = torch.tensor([t for tokens, _ in examples for t in tokens])
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.tensor([label for _, example_labels in examples for label in [IGNORE_INDEX] + example_labels[1:]])
    cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedBatch(input_ids[None], position_ids[None], labels[None], cu_seqlens, max(lengths))
