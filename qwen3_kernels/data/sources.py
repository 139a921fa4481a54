"""Where fine-tuning records come from: ``.jsonl``, ``.json`` (an array of records, or JSONL content),
``.parquet``, ``.arrow`` (Arrow IPC, stream or file) and directories written by ``datasets``'
``save_to_disk`` (a ``DatasetDict`` gives its "train" split). Everything but JSON is read through the
``datasets`` library (the optional ``train`` extra), streamed or memory-mapped, never loaded whole.

Records come out as ``(where, kind, payload)``: ``where`` names the record in errors (``file:line`` for
JSON lines, ``file: record N (line L)`` in a JSON array, ``file: row N`` in a table, N counted from 0 as
``dataset[N]``); ``kind`` is ``"line"`` (payload: the raw bytes of a JSONL line, parsed by whoever
tokenises it) or ``"record"`` (payload: the record itself)."""

from __future__ import annotations

import codecs
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
    """A JSON array, read and parsed one element at a time, or JSONL content in a ``.json`` file."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    if head.startswith(b"["):
        yield from _JsonArray(path).records()
    else:
        yield from _jsonl(path)


_JSON = json.JSONDecoder()


class _JsonArray:
    """The elements of a JSON array file, parsed from a window of its text that is refilled as it is
    consumed, so only the record being parsed (and a block) is held."""

    block = 1 << 20  # bytes read at a time

    def __init__(self, path: str):
        self.path = path
        self.file = open(path, "rb")
        self.utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text, self.pos = "", 0  # the window, and where parsing stands in it
        self.counted, self.line = 0, 1  # text[counted] is on this line
        self.eof = False

    def more(self) -> bool:
        """Reads a block onto the window (dropping what was parsed); False at the end of the file."""
        if self.eof:
            return False
        raw = self.file.read(self.block)
        self.line_at(self.pos)
        self.text, self.pos, self.counted = self.text[self.pos:], 0, 0
        try:
            self.text += self.utf8.decode(raw, final=not raw)
        except UnicodeDecodeError as e:
            line = self.line + self.text.count("\n") + raw.count(b"\n", 0, max(e.start, 0))
            raise ValueError(f"{self.path}:{line}: not UTF-8 (byte 0x{e.object[e.start]:02x})") from None
        self.eof = not raw
        return True

    def line_at(self, pos: int) -> int:
        """The line of text[pos], for positions that never go back (each newline is counted once)."""
        self.line += self.text.count("\n", self.counted, pos)
        self.counted = pos
        return self.line

    def skip_space(self) -> str:
        """The next character that is not white space ("" at the end of the file), not consumed."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.text) or not self.more():
                return self.text[self.pos:self.pos + 1]

    def error(self, pos: int, what: str) -> ValueError:
        return ValueError(f"{self.path}:{self.line_at(pos)}: not valid JSON ({what})")

    def records(self) -> Iterator[tuple[str, str, object]]:
        try:
            self.skip_space()
            self.pos += 1  # the "[" _json saw
            if self.skip_space() == "]":
                self.pos += 1
                return self.expect_end()
            index = 0
            while True:
                if self.skip_space() == "":
                    raise self.error(self.pos, "the array is not closed")
                record, line = self.decode(index), self.line_at(self.pos)
                yield f"{self.path}: record {index} (line {line})", "record", record[0]
                self.pos = record[1]
                index += 1
                after = self.skip_space()
                if after == ",":
                    self.pos += 1
                elif after == "]":
                    self.pos += 1
                    return self.expect_end()
                else:
                    raise self.error(self.pos, f"expected ',' or ']' after record {index - 1}")
        finally:
            self.file.close()

    def decode(self, index: int):
        """(element, end) of the element at ``pos``; a parse that fails or ends at the window's end is
        tried again with more text, so an element cut by a block boundary is never taken for an error or
        for a shorter element (a number)."""
        while True:
            try:
                value, end = _JSON.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:
                    return value, end
            except json.JSONDecodeError as e:
                if self.eof:
                    raise self.error(e.pos, f"{e.msg}, in record {index}") from None
            self.more()

    def expect_end(self) -> None:
        if self.skip_space() != "":
            raise self.error(self.pos, "text after the array")


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
