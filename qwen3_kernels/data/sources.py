"""Where fine-tuning records come from: ``.jsonl``, ``.json`` (an array of records, or JSONL content),
``.parquet``, ``.arrow`` (Arrow IPC, stream or file) and directories written by ``datasets``'
``save_to_disk`` (a ``DatasetDict`` gives its "train" split). Everything but JSON is read through the
``datasets`` library (the optional ``train`` extra), streamed or memory-mapped, never loaded whole.

Records come out as ``(where, kind, payload)``: ``where`` names the record in errors (``file:line`` for
JSON lines, ``file: record N (line L)`` in a JSON array, ``file: row N`` in a table, N counted from 0 as
``dataset[N]``); ``kind`` is ``"line"`` (payload: the raw bytes of a JSONL line, parsed by whoever
tokenises it) or ``"record"`` (payload: the record itself)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator

SUPPORTED = (".jsonl", ".json", ".parquet", ".arrow")
_FORMAT_OF = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
_SUPPORTED_TEXT = ".jsonl, .json, .parquet, .arrow, or a directory written by datasets' save_to_disk"


def check_data_path(path, flag: str = "--data") -> str:
    """The format of ``path`` (``"jsonl"``, ``"json"``, ``"parquet"``, ``"arrow"`` or ``"datasets"``),
    found from its name and, for a directory, the files ``save_to_disk`` writes; nothing is loaded.
    FileNotFoundError or ValueError, one line naming ``flag``, where it is none of these."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path!r}: no such file or directory")
    if os.path.isdir(path):
        dict_file = os.path.join(path, "dataset_dict.json")
        if os.path.isfile(dict_file):
            _train_split(path, _splits(dict_file), flag)
            return "datasets"
        if os.path.isfile(os.path.join(path, "state.json")) and os.path.isfile(os.path.join(path, "dataset_info.json")):
            return "datasets"
        raise ValueError(f"{flag} {path!r} is a directory that datasets' save_to_disk did not write (no state.json or "
                         f"dataset_dict.json in it); supported: {_SUPPORTED_TEXT}")
    if not os.path.isfile(path):
        raise ValueError(f"{flag} {path!r} is neither a file nor a directory")
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FORMAT_OF:
        raise ValueError(f"{flag} {path!r}: unsupported extension {ext or '(none)'!r}; supported: {_SUPPORTED_TEXT}")
    return _FORMAT_OF[ext]


def _splits(dict_file: str) -> list[str]:
    try:
        with open(dict_file, encoding="utf-8") as f:
            splits = json.load(f).get("splits")
    except (ValueError, AttributeError):
        splits = None
    if not isinstance(splits, list):
        raise ValueError(f"{dict_file}: not a datasets dataset_dict.json (no \"splits\" list)")
    return splits


def _train_split(path: str, splits: list, flag: str) -> str:
    if "train" not in splits:
        raise ValueError(f"{flag} {path!r} is a DatasetDict without a \"train\" split (it has: "
                         f"{', '.join(map(str, splits)) or 'none'}); save the split to use with "
                         "dataset_dict[name].save_to_disk(...)")
    return "train"


def datasets_module(what: str):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {what} needs the datasets library: "
                          "install qwen3_kernels[train] (datasets)") from None
    return datasets


def iter_records(path, fmt: str) -> Iterator[tuple[str, str, object]]:
    path = os.fspath(path)
    if fmt == "jsonl":
        yield from _jsonl(path)
    elif fmt == "json":
        yield from _json(path)
    elif fmt in ("parquet", "arrow"):
        datasets = datasets_module(f"{path!r} (.{fmt})")
        try:
            table = datasets.load_dataset(fmt, data_files=[os.path.abspath(path)], split="train", streaming=True)
            rows = iter(table)
        except Exception as e:  # the library's own error, on one line, naming the file
            raise ValueError(f"{path}: datasets cannot read it as {fmt} ({_one_line(e)})") from None
        yield from _rows(path, rows)
    elif fmt == "datasets":
        datasets = datasets_module(f"the directory {path!r}")
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as e:
            raise ValueError(f"{path}: datasets' load_from_disk cannot read it ({_one_line(e)})") from None
        if isinstance(loaded, datasets.DatasetDict):
            _train_split(path, list(loaded), "data")
            loaded, path = loaded["train"], f"{path} (split 'train')"
        yield from _rows(path, iter(loaded))
    else:
        raise ValueError(f"unknown data format {fmt!r}")


def _rows(name: str, rows) -> Iterator[tuple[str, str, object]]:
    """A table's rows as records; a null column is absent (a table has every column in every row)."""
    for i, row in enumerate(rows):
        yield f"{name}: row {i}", "record", {k: v for k, v in row.items() if v is not None}


def _jsonl(path: str) -> Iterator[tuple[str, str, object]]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield f"{path}:{number}", "line", raw


def _json(path: str) -> Iterator[tuple[str, str, object]]:
    """A JSON array, one element at a time (the file's text is held, its records are not all parsed at
    once), or JSONL content in a ``.json`` file."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"["):
        yield from _jsonl(path)
        return
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x})") from None
    del raw
    yield from _json_array(path, text)


def _json_array(path: str, text: str) -> Iterator[tuple[str, str, object]]:
    decoder = json.JSONDecoder()
    n = len(text)
    pos = text.index("[") + 1
    line = 1 + text.count("\n", 0, pos)
    counted = pos  # text[:counted] has been counted into ``line``

    def at(p):  # the line number of position p
        nonlocal line, counted
        line += text.count("\n", counted, p)
        counted = p
        return line

    def skip(p):
        while p < n and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(pos)
    if pos < n and text[pos] == "]":
        _expect_end(path, text, pos + 1, at)
        return
    index = 0
    while True:
        if pos >= n:
            raise ValueError(f"{path}:{at(n)}: not valid JSON (the array is not closed)")
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{at(e.pos)}: not valid JSON ({e.msg}, in record {index})") from None
        yield f"{path}: record {index} (line {at(pos)})", "record", record
        index += 1
        pos = skip(end)
        if pos < n and text[pos] == ",":
            pos = skip(pos + 1)
            continue
        if pos < n and text[pos] == "]":
            _expect_end(path, text, pos + 1, at)
            return
        raise ValueError(f"{path}:{at(min(pos, n))}: not valid JSON (expected ',' or ']' after record {index - 1})")


def _expect_end(path, text, pos, at):
    rest = text[pos:]
    if rest.strip():
        raise ValueError(f"{path}:{at(pos + len(rest) - len(rest.lstrip()))}: not valid JSON (text after the array)")


def fingerprint(path) -> str:
    """sha256 of a data file's content, or of a directory's files (their relative paths and contents)."""
    path = os.fspath(path)
    h = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(root, name), path)
                       for root, _, names in os.walk(path) for name in names)
        for rel in files:
            h.update(f"{len(rel)}:{rel}".encode())
            h.update(_file_digest(os.path.join(path, rel)).encode())
    else:
        h.update(_file_digest(path).encode())
    return h.hexdigest()


_digests: dict = {}  # (path, size, mtime, inode) -> sha256, for this process's life


def _file_digest(file: str) -> str:
    st = os.stat(file)
    stamp = (os.path.abspath(file), st.st_size, st.st_mtime_ns, st.st_ino)
    if stamp in _digests:
        return _digests[stamp]
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    _digests[stamp] = h.hexdigest()
    return _digests[stamp]


def _one_line(e: Exception) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:300] + "..."
