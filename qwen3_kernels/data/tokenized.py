"""Fine-tuning data tokenised once, in worker processes, into flat arrays on disk that training reads
through memory maps, so a corpus larger than memory trains and a resumed run does not tokenise again.

Cache layout (``read_examples(..., cache_dir=C)``): ``C/<key>/`` holds

- ``tokens.bin``  int32, every example's token ids back to back;
- ``labels.bin``  int32, the same length, -100 where a token is not trained on;
- ``offsets.bin`` int64, ``examples + 1`` entries: example i is ``[offsets[i], offsets[i + 1])``;
- ``meta.json``   counts (examples, tokens, trained tokens, truncated), ``max_len``, the source, the key.

``<key>`` is the sha256 of the data's content (a directory: its files' paths and contents), the
tokenizer (its ``tokenizer.json`` as loaded, and its special tokens), the chat template's code,
``max_len`` and ``FORMAT_VERSION``; change any and the cache is rebuilt under a new key. A cache is
built in ``C/.tmp-*`` and renamed into place once complete (``meta.json`` is written last), so one
killed half way is never read; a ``<key>`` directory that fails its checks is rebuilt. Processes
sharing ``C`` (the ranks of a run) take a lock file ``C/<key>.lock``: one builds, the others then read."""

from __future__ import annotations

import collections
import hashlib
import inspect
import json
import os
import pickle
import shutil
import tempfile
import uuid
import weakref
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import numpy as np

from ..model import IGNORE_INDEX
from .records import BLANK, end_of_text_ids, parse_json_line, tokenize_record
from .sources import check_data_path, fingerprint, iter_records

FORMAT_VERSION = 1
_CHUNK = 256               # records per task sent to a worker
_IN_PROCESS_BELOW = 4 << 20  # bytes of data under which workers=None tokenises in this process
_FILES = {"tokens": ("tokens.bin", np.int32), "labels": ("labels.bin", np.int32), "offsets": ("offsets.bin", np.int64)}


class Examples(NamedTuple):
    """Tokenised fine-tuning examples held in memory: ``tokens[i]`` and ``labels[i]`` (-100 where not
    trained on); ``lengths``, ``num_tokens`` and ``num_trained_tokens`` as ``TokenizedExamples`` has them."""
    tokens: list[list[int]]
    labels: list[list[int]]
    truncated: int  # how many examples were cut to ``max_len`` tokens

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(t) for t in self.tokens], dtype=np.int64)

    @property
    def num_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def num_trained_tokens(self) -> int:
        return sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in self.labels)


class ExampleColumn:
    """``tokens`` or ``labels`` of memory-mapped examples: ``column[i]`` is example i as a list of ints."""

    def __init__(self, flat: np.ndarray, offsets: np.ndarray):
        self._flat, self._offsets = flat, offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, i: int) -> list[int]:
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"example {i} out of range ({n} examples)")
        i %= n
        return self._flat[int(self._offsets[i]):int(self._offsets[i + 1])].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        return (self[i] for i in range(len(self)))


class TokenizedExamples:
    """Examples read from a tokenised directory (see the module's docstring) through memory maps:
    ``tokens[i]``, ``labels[i]`` (lists of ints), ``len(...)``, ``truncated`` (examples cut to
    ``max_len``), ``num_tokens``, ``num_trained_tokens`` (labels other than -100 after each example's
    first token, which packing never trains on: what the loss averages over in an epoch), ``lengths``
    (an int64 array of the examples' token counts), ``directory``."""

    def __init__(self, directory: str, meta: dict, remove_when_done: str | None = None):
        self.directory = directory
        self.meta = meta
        arrays = {name: _open_array(os.path.join(directory, file), dtype, meta["counts"][name])
                  for name, (file, dtype) in _FILES.items()}
        self.tokens = ExampleColumn(arrays["tokens"], arrays["offsets"])
        self.labels = ExampleColumn(arrays["labels"], arrays["offsets"])
        self._offsets = arrays["offsets"]
        self.truncated = int(meta["truncated"])
        self.num_tokens = int(meta["tokens"])
        self.num_trained_tokens = int(meta["trained_tokens"])
        if remove_when_done:  # a temporary directory: gone with this object (or at exit)
            weakref.finalize(self, shutil.rmtree, remove_when_done, True)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        """Each example's token count (int64, in memory: 8 bytes an example)."""
        return np.diff(self._offsets)

    def __repr__(self) -> str:
        return (f"TokenizedExamples({len(self)} examples, {self.num_tokens} tokens, {self.truncated} truncated, "
                f"in {self.directory!r})")


def _open_array(file: str, dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(file, dtype=dtype, mode="r", shape=(count,))


def read_examples(path, tokenizer, max_len: int, *, cache_dir=None, workers: int | None = None,
                  progress=None) -> TokenizedExamples:
    """The examples of ``path`` (any format ``check_data_path`` accepts; records as in ``records``),
    each cut to ``max_len`` tokens (``truncated`` counts them), tokenised by ``workers`` processes
    (None: in this process for data under 4 MiB, else min(8, CPUs); the same result whatever the
    number) into ``cache_dir/<key>/`` (see the module's docstring), or, when ``cache_dir`` is None, into a
    temporary directory removed with the returned object. A cache already complete for the same key is
    read without tokenising. ``progress``, if given, is called with the number of examples tokenised so
    far as tokenising goes (never on a cache hit). Any bad record is a ValueError naming where it is.
    With ``workers`` > 1 the calling program's main module must be importable without side effects
    (``if __name__ == "__main__":``), as multiprocessing's spawn requires."""
    path = os.fspath(path)
    fmt = check_data_path(path, flag="data")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 1:
        raise ValueError(f"max_len must be a positive integer, got {max_len!r}")
    workers = _workers(workers, path)
    if cache_dir is None:
        scratch = tempfile.mkdtemp(prefix="qwen3_kernels-tokens-")
        try:
            directory = os.path.join(scratch, "examples")
            meta = _build(path, fmt, tokenizer, max_len, workers, directory, key=None, progress=progress)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return TokenizedExamples(directory, meta, remove_when_done=scratch)
    cache_dir = os.fspath(cache_dir)
    key = cache_key(path, tokenizer, max_len, fmt)
    final = os.path.join(cache_dir, key)
    found = _open_cache(final, key)
    if found is not None:
        return found
    os.makedirs(cache_dir, exist_ok=True)
    with _locked(os.path.join(cache_dir, key + ".lock")):
        found = _open_cache(final, key)  # another process may have built it while this one waited
        if found is not None:
            return found
        for name in os.listdir(cache_dir):  # others' leftovers: whoever wrote them was killed (we hold the lock)
            if name.startswith(f".tmp-{key}-"):
                shutil.rmtree(os.path.join(cache_dir, name), ignore_errors=True)
        building = os.path.join(cache_dir, f".tmp-{key}-{uuid.uuid4().hex[:12]}")
        try:
            meta = _build(path, fmt, tokenizer, max_len, workers, building, key=key, progress=progress)
            if os.path.lexists(final):  # there, but failed its checks
                broken = os.path.join(cache_dir, f".tmp-{key}-broken-{uuid.uuid4().hex[:12]}")
                os.rename(final, broken)
                shutil.rmtree(broken, ignore_errors=True)
            os.rename(building, final)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        _fsync_dir(cache_dir)
    return TokenizedExamples(final, meta)


def read_jsonl(path, tokenizer, max_len: int) -> Examples:
    """One example per line of a JSONL file (records as in ``records``), in memory, in this process;
    examples longer than ``max_len`` tokens are cut to it (and counted). For training data of any
    size or format, ``read_examples``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"training data {path!r}: no such file")
    ids, labels, lengths, truncated = _tokenize_chunk(list(iter_records(path, "jsonl")), tokenizer, max_len)
    if not len(lengths):
        raise ValueError(f"training data {path!r} holds no examples")
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    tokens = ids.tolist()
    trained = labels.tolist()
    return Examples([tokens[a:b] for a, b in zip(bounds, bounds[1:])],
                    [trained[a:b] for a, b in zip(bounds, bounds[1:])], truncated)


def cache_key(path, tokenizer, max_len: int, fmt: str | None = None) -> str:
    """The name of ``path``'s tokenised directory under a cache directory (see the module's docstring)."""
    path = os.fspath(path)
    fmt = fmt or check_data_path(path, flag="data")
    h = hashlib.sha256()
    h.update(json.dumps({"format version": FORMAT_VERSION, "max_len": max_len, "data format": fmt}).encode())
    h.update(fingerprint(path).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the tokens: the tokenizer's vocabulary and rules (its ``tokenizer.json``
    as loaded), its special tokens, the end-of-text id, and the chat template's code."""
    from .. import tokenizer as tokenizer_module

    h = hashlib.sha256()
    inner = getattr(tokenizer, "_tok", None)
    if inner is not None and hasattr(inner, "to_str"):
        h.update(inner.to_str().encode())
    else:
        try:
            h.update(pickle.dumps(tokenizer))
        except Exception as e:
            raise ValueError(f"cannot fingerprint the tokenizer for the token cache ({e}); "
                             "pass cache_dir=None") from None
    h.update(json.dumps([getattr(tokenizer, "eos_token", None), getattr(tokenizer, "pad_token", None),
                         end_of_text_ids(tokenizer)]).encode())
    for function in (tokenizer_module.chat_segments, tokenizer_module.Tokenizer.encode_chat):
        try:
            h.update(inspect.getsource(function).encode())
        except (OSError, TypeError):  # installed without sources
            h.update(function.__code__.co_code + repr(function.__code__.co_consts).encode())
    return h.hexdigest()


def _workers(workers, path: str) -> int:
    if workers is None:
        if _size(path) < _IN_PROCESS_BELOW:
            return 1
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, min(8, cpus))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")
    return workers


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)
    return os.path.getsize(path)


def _open_cache(directory: str, key: str) -> TokenizedExamples | None:
    """The cache at ``directory`` if it is complete and consistent, else None (it is then rebuilt)."""
    try:
        with open(os.path.join(directory, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("format version") != FORMAT_VERSION or meta.get("key") != key:
            return None
        counts = meta["counts"]
        for name, (file, dtype) in _FILES.items():
            if os.path.getsize(os.path.join(directory, file)) != int(counts[name]) * np.dtype(dtype).itemsize:
                return None
        if counts["tokens"] != counts["labels"] or counts["offsets"] != meta["examples"] + 1:
            return None
        examples = TokenizedExamples(directory, meta)
        offsets = examples.tokens._offsets
        if offsets[0] != 0 or offsets[-1] != counts["tokens"]:
            return None
        return examples
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build(path: str, fmt: str, tokenizer, max_len: int, workers: int, directory: str, key, progress=None) -> dict:
    os.makedirs(directory)
    files = {name: open(os.path.join(directory, file), "wb") for name, (file, _) in _FILES.items()}
    counts = dict.fromkeys(_FILES, 0)
    totals = {"examples": 0, "trained_tokens": 0, "truncated": 0}
    try:
        files["offsets"].write(np.zeros(1, np.int64).tobytes())
        counts["offsets"] = 1

        def write(result):
            ids, labels, lengths, truncated = result
            files["tokens"].write(ids.tobytes())
            files["labels"].write(labels.tobytes())
            files["offsets"].write((counts["tokens"] + np.cumsum(lengths, dtype=np.int64)).tobytes())
            counts["tokens"] += len(ids)
            counts["labels"] += len(labels)
            counts["offsets"] += len(lengths)
            totals["examples"] += len(lengths)
            firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            totals["trained_tokens"] += int(np.count_nonzero(labels != IGNORE_INDEX)
                                            - np.count_nonzero(labels[firsts] != IGNORE_INDEX))
            totals["truncated"] += truncated
            if progress is not None:
                progress(totals["examples"])

        for result in _tokenized(_chunks(iter_records(path, fmt)), tokenizer, max_len, workers):
            write(result)
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    if not totals["examples"]:
        raise ValueError(f"data {path!r} holds no examples")
    meta = {"format version": FORMAT_VERSION, "key": key, "source": os.path.abspath(path), "format": fmt,
            "max_len": max_len, "tokens": counts["tokens"], "counts": counts, **totals}
    with open(os.path.join(directory, "meta.json"), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    return meta


def _chunks(records) -> Iterator[list]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenized(chunks, tokenizer, max_len: int, workers: int):
    """Each chunk's ``_tokenize_chunk`` result, in order; with several workers, at most 2 chunks per
    worker are in flight, so reading runs ahead of tokenising by a bounded amount."""
    if workers == 1:
        for chunk in chunks:
            yield _tokenize_chunk(chunk, tokenizer, max_len)
        return
    import multiprocessing

    try:
        pickle.dumps(tokenizer)
    except Exception as e:
        raise ValueError(f"the tokenizer cannot be sent to worker processes ({e}); use workers=1") from None
    context = multiprocessing.get_context("spawn")  # fork is unsafe in a process that holds CUDA or threads
    with context.Pool(workers, initializer=_start_worker, initargs=(tokenizer, max_len)) as pool:
        pending = collections.deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_tokenize_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_worker_state: dict = {}


def _start_worker(tokenizer, max_len: int) -> None:
    _worker_state.update(tokenizer=tokenizer, max_len=max_len)


def _tokenize_in_worker(chunk):
    return _tokenize_chunk(chunk, _worker_state["tokenizer"], _worker_state["max_len"])


def _tokenize_chunk(chunk, tokenizer, max_len: int):
    """``(ids, labels, lengths, truncated)`` of a list of ``(where, kind, payload)`` records: flat int32
    ids and labels, int64 lengths, how many were cut to ``max_len``. Blank JSONL lines are skipped."""
    end_of_text = end_of_text_ids(tokenizer)
    ids, labels, lengths, truncated = [], [], [], 0
    for where, kind, payload in chunk:
        record = parse_json_line(payload, where) if kind == "line" else payload
        if record is BLANK:
            continue
        example_ids, example_labels = tokenize_record(record, where, tokenizer, end_of_text)
        if len(example_ids) > max_len:
            example_ids, example_labels, truncated = example_ids[:max_len], example_labels[:max_len], truncated + 1
        ids.extend(example_ids)
        labels.extend(example_labels)
        lengths.append(len(example_ids))
    return (np.asarray(ids, np.int32), np.asarray(labels, np.int32), np.asarray(lengths, np.int64), truncated)


@contextmanager
def _locked(file: str):
    try:
        import fcntl
    except ImportError:  # no advisory locks here: concurrent builders race, and the rename keeps it correct
        yield
        return
    with open(file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
