"""Autotuning choices that outlive the process, and that every rank of a job shares.

A choice (which candidate serves an op at a shape bucket) is kept in memory and in a JSON file,
``$QWEN3_KERNELS_CACHE_DIR/tuning.json`` (default ``~/.cache/qwen3_kernels/``), under a key naming
the GPU, its compute capability, the torch and Triton versions, a hash of the kernels' source, the
op and the bucket. A new process tunes nothing it finds there. A key written under another card,
torch, Triton or other kernels is stale: it is never asked for, so it is never used.

- Writes take a lock, merge with what another process wrote meanwhile, write a temporary file and
  rename it over the old one: eight ranks (or two jobs) tuning at once never leave half a file and
  never drop each other's entries.
- A file that does not parse, or is not ours, is a warning and a retune, never a crash; the next
  write replaces it.
- Under ``torch.distributed`` with several ranks only rank 0 tunes (and reads and writes the file).
  The other ranks run each op's default until ``sync()`` hands them rank 0's choices: it is a
  collective (``broadcast_object_list``), so every rank calls it at the same point, e.g. once after
  ``init_process_group`` (choices already in rank 0's file) and once after the first step (choices
  rank 0 tuned during it). Tuning itself never communicates: ranks of a packed-batch job see
  different shapes, and a collective inside an op that only some ranks reach would hang the job.
- ``$QWEN3_KERNELS_TUNING_LOG`` names a JSON-lines file that receives every tuning this process
  runs: the op, the bucket, the winner and every candidate's time, or why it was dropped.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Callable

import torch

log = logging.getLogger("qwen3_kernels")

CACHE_DIR_ENV = "QWEN3_KERNELS_CACHE_DIR"
LOG_ENV = "QWEN3_KERNELS_TUNING_LOG"
FILE_NAME = "tuning.json"
FORMAT = "qwen3_kernels tuning"
VERSION = 1

# key -> {"choice": name, "ms": {candidate: ms}, "dropped": {candidate: why}}
_entries: dict[str, dict] = {}      # what this process knows: the file's entries and its own tunings
_file_read: str | None = None       # the cache file whose entries are in _entries
_from_rank0: dict[str, dict] = {}   # a follower rank's choices: only what rank 0 sent
_used: dict[str, dict] = {}         # key -> {"op", "bucket", "tuned_here"}: what this process served
_warned: set = set()


def cache_dir() -> str:
    return os.environ.get(CACHE_DIR_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "qwen3_kernels")


def cache_file() -> str:
    return os.path.join(cache_dir(), FILE_NAME)


@functools.lru_cache(maxsize=None)
def source_hash() -> str:
    """The Triton kernels' source (every module of this package folder): other kernels, other choices."""
    folder = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:16]


def device_context(device: torch.device) -> str:
    """What a choice depends on besides the op and the shape: the GPU model and its compute
    capability (not its index: every rank's cuda:N is the same card), torch, Triton and the
    kernels' source."""
    import triton
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        where = f"{torch.cuda.get_device_name(index)}|sm_{major}{minor}"
    else:
        where = device.type
    return f"{where}|torch {torch.__version__}|triton {triton.__version__}|kernels {source_hash()}"


def key(device: torch.device, op: str, bucket: dict) -> str:
    return f"{device_context(device)}|{op}|{json.dumps(bucket, sort_keys=True)}"


def _warn_once(message: str, *args) -> None:
    text = message % args
    if text not in _warned:
        _warned.add(text)
        log.warning(text)


def _valid_entry(entry: Any) -> bool:
    return (isinstance(entry, dict) and isinstance(entry.get("choice"), str)
            and isinstance(entry.get("ms", {}), dict))


def _read(path: str, quiet: bool = False) -> dict:
    """The file's entries; {} (with a warning unless ``quiet``) if it is missing, corrupt or foreign."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        if not quiet:
            _warn_once("tuning cache %s is unreadable (%s): tuning again", path, e)
        return {}
    if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict)):
        if not quiet:
            _warn_once("tuning cache %s is not a %r file: tuning again (the next write replaces it)", path, FORMAT)
        return {}
    if data.get("version") != VERSION:
        if not quiet:
            _warn_once("tuning cache %s is version %r, this is version %d: tuning again", path, data.get("version"),
                       VERSION)
        return {}
    entries = {k: v for k, v in data["entries"].items() if isinstance(k, str) and _valid_entry(v)}
    if len(entries) != len(data["entries"]) and not quiet:
        _warn_once("tuning cache %s: %d malformed entries ignored", path, len(data["entries"]) - len(entries))
    return entries


@contextlib.contextmanager
def _locked(path: str):
    """An exclusive lock on ``path + '.lock'`` (POSIX); elsewhere the rename alone keeps the file whole."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write(path: str, entries: dict) -> None:
    """Merges ``entries`` into the file under the lock: read, update, write a temporary file, rename."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _locked(path):
            merged = {**_read(path, quiet=True), **entries}
            fd, tmp = tempfile.mkstemp(prefix=".tuning-", suffix=".json", dir=os.path.dirname(path))
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    json.dump({"format": FORMAT, "version": VERSION, "entries": merged}, f, indent=1, sort_keys=True)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as e:
        _warn_once("tuning cache %s cannot be written (%s): the choices last for this process only", path, e)


def _load(force: bool = False) -> None:
    global _file_read
    path = cache_file()
    if force or _file_read != path:  # first use, the cache directory changed, or a miss (another writer?)
        _entries.update(_read(path))
        _file_read = path


def _follower() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and dist.get_rank() != 0


def lookup(device: torch.device, op: str, bucket: dict) -> str | None:
    """The remembered choice for (device, op, bucket), or None; never tunes."""
    entry_key = key(device, op, bucket)
    if _follower():
        entry = _from_rank0.get(entry_key)
    else:
        _load()
        entry = _entries.get(entry_key)
    if entry is None:
        return None
    _used.setdefault(entry_key, {"op": op, "bucket": bucket, "tuned_here": False})
    return entry["choice"]


def remembered(device: torch.device, op: str) -> list[tuple[dict, str]]:
    """Every (bucket, choice) remembered for ``op`` on ``device`` (this stack, these kernels)."""
    prefix = f"{device_context(device)}|{op}|"
    if _follower():
        entries = _from_rank0
    else:
        _load()
        entries = _entries
    found = []
    for entry_key, entry in list(entries.items()):
        if entry_key.startswith(prefix):
            try:
                bucket = json.loads(entry_key[len(prefix):])
            except ValueError:
                continue
            if isinstance(bucket, dict):
                found.append((bucket, entry["choice"]))
    return found


def tuned(device: torch.device, op: str, bucket: dict, tune: Callable[[], tuple[str, dict, dict]],
          valid: Callable[[str], bool] = lambda choice: True) -> str | None:
    """The choice for (device, op, bucket): remembered, read from the cache file, or tuned now by
    ``tune()`` -> (winner, {candidate: ms}, {candidate: why dropped}), then kept and written. A
    remembered choice that ``valid`` rejects (not among today's candidates) is tuned again. None on
    a rank other than 0 of a distributed job that has no choice from rank 0 yet: run the default."""
    entry_key = key(device, op, bucket)
    if _follower():
        entry = _from_rank0.get(entry_key)
        if entry is not None and valid(entry["choice"]):
            _used.setdefault(entry_key, {"op": op, "bucket": bucket, "tuned_here": False})
            return entry["choice"]
        return None
    _load()
    entry = _entries.get(entry_key)
    if entry is None:
        _load(force=True)  # another process may have tuned it meanwhile
        entry = _entries.get(entry_key)
    if entry is not None and valid(entry["choice"]):
        _used.setdefault(entry_key, {"op": op, "bucket": bucket, "tuned_here": False})
        return entry["choice"]
    if entry is not None:
        _warn_once("tuning cache %s: %s %s holds %r, which is no candidate here: tuning again", cache_file(), op,
                   json.dumps(bucket, sort_keys=True), entry["choice"])
    choice, timings, dropped = tune()
    entry = {"choice": choice, "ms": {k: float(v) for k, v in timings.items()}, "dropped": dict(dropped),
             "tuned": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    _entries[entry_key] = entry
    _used[entry_key] = {"op": op, "bucket": bucket, "tuned_here": True}
    _write(cache_file(), {entry_key: entry})
    _log_timings(device, op, bucket, entry)
    return choice


def _log_timings(device: torch.device, op: str, bucket: dict, entry: dict) -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    line = json.dumps({"device": device_context(device), "op": op, "bucket": bucket, **entry}, sort_keys=True)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        _warn_once("%s=%s cannot be written (%s)", LOG_ENV, path, e)


def sync() -> None:
    """Every rank takes rank 0's choices: those in its cache file and those it tuned. A collective:
    all ranks must call it at the same point. Outside a distributed job (or with one rank) it does
    nothing."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if dist.get_rank() == 0:
        _load()
    table = [dict(_entries) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(table, src=0)
    if dist.get_rank() != 0:
        _from_rank0.clear()
        _from_rank0.update(table[0])


def report() -> list[dict]:
    """What this process served from tuning, one row per (op, bucket): the winner, every timed
    candidate's ms (best first), the dropped candidates and why, and whether it was tuned here or
    read from the cache (or from rank 0)."""
    rows = []
    for entry_key, use in _used.items():
        entry = _from_rank0.get(entry_key) if _follower() else _entries.get(entry_key)
        if entry is None:
            continue
        ms = dict(sorted(entry.get("ms", {}).items(), key=lambda item: item[1]))
        rows.append({"op": use["op"], "bucket": use["bucket"], "choice": entry["choice"], "ms": ms,
                     "dropped": dict(entry.get("dropped", {})), "tuned_here": use["tuned_here"]})
    return rows


def describe(row: dict) -> str:
    """One line: which candidate won a bucket and by how much over the runner-up (and over SDPA's
    best where SDPA raced)."""
    bucket = " ".join(f"{k}={v}" for k, v in row["bucket"].items())
    ms = row["ms"]
    winner = row["choice"]
    text = f"{row['op']} [{bucket}]: {winner}"
    if winner in ms:
        text += f" {ms[winner]:.3f} ms"
        others = [(name, t) for name, t in ms.items() if name != winner]
        if others:  # the runner-up: the winner is the fastest of the timed (agreeing) candidates
            runner_up, t = min(others, key=lambda item: item[1])
            text += f", {t / ms[winner]:.2f}x faster than {runner_up} ({t:.3f} ms)"
            # in SDPA's race, also the other side's best: the Triton kernels, or SDPA's fastest backend
            sdpa = sorted((t, name) for name, t in others if name.startswith("sdpa-"))
            if winner.startswith("sdpa-") and "triton" in ms and runner_up != "triton":
                text += f", {ms['triton'] / ms[winner]:.2f}x faster than triton ({ms['triton']:.3f} ms)"
            elif not winner.startswith("sdpa-") and sdpa and not runner_up.startswith("sdpa-"):
                text += f", {sdpa[0][0] / ms[winner]:.2f}x faster than {sdpa[0][1]} ({sdpa[0][0]:.3f} ms)"
    if row["dropped"]:
        text += f"; dropped: {', '.join(sorted(row['dropped']))}"
    return text


def forget() -> None:
    """Drops what this process holds (the file stays): the next lookup reads the file again."""
    global _file_read
    _entries.clear()
    _from_rank0.clear()
    _used.clear()
    _warned.clear()
    _file_read = None
