"""Training data: fine-tuning records in the formats people have (JSONL/JSON, parquet, Arrow, a
``datasets`` directory; ``messages``, ``text`` or ``prompt``/``completion`` records), tokenised once
in worker processes into a memory-mapped cache, and batches without padding: examples packed back to
back into one row, each attending only to itself (``QWEN.forward(..., position_ids=...)`` or
``cu_seqlens=...``), in the layout transformers' ``DataCollatorWithFlattening`` produces.

- ``check_data_path(path, flag)``: the format of a path, or a one-line error, loading nothing;
- ``read_examples(path, tokenizer, max_len, cache_dir=..., workers=...)``: the examples, streamed
  through a token cache (``tokenized``'s docstring has its layout and key);
- ``read_jsonl(path, tokenizer, max_len)``: a JSONL file's examples in memory (``Examples``);
- ``data_fingerprint(path)``: sha256 of a data file or directory's content;
- ``pack_examples(...)``: padding-free ``PackedBatch``es."""

from .packing import PackedBatch, pack_examples
from .records import tokenize_record
from .sources import SUPPORTED, check_data_path
from .sources import fingerprint as data_fingerprint
from .tokenized import (FORMAT_VERSION, Examples, ExampleColumn, TokenizedExamples, cache_key, read_examples,
                        read_jsonl, tokenizer_fingerprint)

__all__ = ["Examples", "ExampleColumn", "FORMAT_VERSION", "PackedBatch", "SUPPORTED", "TokenizedExamples", "cache_key",
           "check_data_path", "data_fingerprint", "pack_examples", "read_examples", "read_jsonl", "tokenize_record",
           "tokenizer_fingerprint"]
