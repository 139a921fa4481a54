"""Autotuning on the CPU, with fake clocks: the cache that outlives the process (round trip through a
new process, two writers at once, a corrupt or foreign file, a version change, rank 0's choices on
two gloo ranks), the backward tuner (fastest agreeing candidate; disagreeing, raising or
spilling-only-on-this-card candidates dropped with a warning; deterministic mode without atomics)
and SDPA in the race (only where its semantics match; when it wins, its output serves, also in a
torch.compile trace). The kernels run in Triton's interpreter, sm_90's candidates under
``simulated_gpu(90, ...)``."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from qwen3_kernels_testing.kernels import needs_triton, rand

pytestmark = needs_triton


def _modules():
    from qwen3_kernels.ops.triton import _common, attention, tuning
    return attention, tuning, _common


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """An empty tuning cache for this test; the module forgets what earlier tests tuned."""
    _, tuning, _ = _modules()
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.LOG_ENV, raising=False)
    tuning.forget()
    yield tmp_path / "cache" / tuning.FILE_NAME
    tuning.forget()


@pytest.fixture
def tuner(cache, monkeypatch):
    """Tuning forced on for the CPU tensors the interpreter runs (on a GPU it is on by default)."""
    attn, _, _ = _modules()
    monkeypatch.setattr(attn, "_tuning_mode", lambda device: "tune")
    return cache


class BackwardClock:
    """A fake ``_measure`` for the backward tuner: each candidate's time from ``times`` (by name,
    ``default`` for the rest); records which candidates ran and which were timed."""

    def __init__(self, monkeypatch, times: dict, default: float = 10.0):
        attn, _, _ = _modules()
        self.times, self.default, self.launched, self.measured = times, default, [], []
        run_backward = attn._run_backward

        def spy(cand, *args, **kwargs):
            self.launched.append(cand["name"])
            return run_backward(cand, *args, **kwargs)

        monkeypatch.setattr(attn, "_run_backward", spy)
        monkeypatch.setattr(attn, "_measure", self.measure)

    def measure(self, run):
        run()
        self.measured.append(self.launched[-1])
        return self.times.get(self.launched[-1], self.default)


def _backward_inputs(D=32, T=40, H=4, Hkv=2, dtype=torch.float16, arch=90):
    """q, k, v, dout and the forward's (out, lse) as sm_{arch}'s default forward tile computes them."""
    attn, _, common = _modules()
    q, k, v = (rand(1, T, h, D, dtype=dtype, seed=s) for s, h in enumerate((H, Hkv, Hkv)))
    do = rand(1, T, H, D, dtype=dtype, seed=3)
    with common.simulated_gpu(arch, 4):
        out, lse = attn.attention_forward(q, k, v, True, D ** -0.5, config=attn.fwd_candidates(arch, D, dtype)[0])
    return do, q, k, v, out, lse


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------

def test_autotune_0_and_graph_capture_pin_or_replay_choices(monkeypatch):
    attn, _, _ = _modules()
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setenv("QWEN3_KERNELS_AUTOTUNE", "0")
    assert attn._tuning_mode(cuda) == "off"  # the default config, nothing timed, nothing looked up
    monkeypatch.setenv("QWEN3_KERNELS_AUTOTUNE", "1")
    assert attn._tuning_mode(cuda) == "tune"
    assert attn._tuning_mode(torch.device("cpu")) == "off"  # the interpreter: nothing to time
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert attn._tuning_mode(cuda) == "lookup"  # a CUDA graph replays what was tuned before capture


def test_tuned_once_then_remembered_and_written(cache):
    _, tuning, _ = _modules()
    calls = []

    def tune():
        calls.append(1)
        return "b", {"a": 2.0, "b": 1.0}, {"c": "failed: out of resources"}

    cpu = torch.device("cpu")
    assert tuning.tuned(cpu, "op", {"T": 4096}, tune) == "b"
    assert tuning.tuned(cpu, "op", {"T": 4096}, tune) == "b"
    assert calls == [1]
    data = json.loads(cache.read_text())
    assert data["format"] == tuning.FORMAT and data["version"] == tuning.VERSION
    (key, entry), = data["entries"].items()
    assert key == tuning.key(cpu, "op", {"T": 4096})
    assert "torch " + torch.__version__ in key and "kernels " + tuning.source_hash() in key
    assert entry["choice"] == "b" and entry["ms"] == {"a": 2.0, "b": 1.0} and "c" in entry["dropped"]
    row, = tuning.report()
    assert row["choice"] == "b" and row["tuned_here"] and list(row["ms"]) == ["b", "a"]
    assert tuning.describe(row) == "op [T=4096]: b 1.000 ms, 2.00x faster than a (2.000 ms); dropped: c"


def test_timings_log_names_every_candidate(cache, monkeypatch, tmp_path):
    _, tuning, _ = _modules()
    log = tmp_path / "timings.jsonl"
    monkeypatch.setenv(tuning.LOG_ENV, str(log))
    tuning.tuned(torch.device("cpu"), "op", {"T": 1}, lambda: ("a", {"a": 1.0, "b": 3.0}, {"c": "disagrees"}))
    line, = log.read_text().splitlines()
    record = json.loads(line)
    assert record["op"] == "op" and record["choice"] == "a" and record["ms"] == {"a": 1.0, "b": 3.0}
    assert record["dropped"] == {"c": "disagrees"} and record["bucket"] == {"T": 1}


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env(**extra) -> dict:
    """The environment of a child process: this one's, the interpreter on, this checkout importable."""
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path, **extra}


def _run(script: str, *args, env=None, timeout=240):
    env = _env(**(env or {}))
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# Tunes sm_90's backward at one shape in the interpreter with a fake clock ({name: ms}; {} means
# "measuring is an error") and prints the winner and what was timed.
BACKWARD_TUNING = textwrap.dedent('''
    import json, sys
    import torch
    from qwen3_kernels.ops.triton import _common, attention as attn
    times = json.loads(sys.argv[1])
    launched, measured = [], []
    run_backward = attn._run_backward
    def spy(cand, *args, **kwargs):
        launched.append(cand["name"])
        return run_backward(cand, *args, **kwargs)
    def measure(run):
        assert times, "tuned again"
        run()
        measured.append(launched[-1])
        return times.get(launched[-1], 10.0)
    attn._run_backward, attn._measure, attn._tuning_mode = spy, measure, lambda device: "tune"
    g = torch.Generator().manual_seed(0)
    q, k, v, do = (torch.randn(1, 40, h, 32, generator=g).half() for h in (4, 2, 2, 4))
    with _common.simulated_gpu(90, 4):
        out, lse = attn.attention_forward(q, k, v, True, 0.2, config=attn.fwd_candidates(90, 32, q.dtype)[0])
        chosen = attn.tuned_bwd_candidate(do, q, k, v, out, lse, True, 0.2)
    print(json.dumps({"chosen": chosen["name"], "measured": measured}))
''')


def test_round_trip_through_a_new_process(tmp_path):
    attn, tuning, _ = _modules()
    names = [c["name"] for c in attn.bwd_candidates(90, 32, torch.float16, deterministic=False)]
    env = {tuning.CACHE_DIR_ENV: str(tmp_path)}
    first = json.loads(_run(BACKWARD_TUNING, json.dumps({names[2]: 1.0}), env=env))
    assert first["chosen"] == names[2] and set(first["measured"]) == set(names)
    assert (tmp_path / tuning.FILE_NAME).exists()
    second = json.loads(_run(BACKWARD_TUNING, "{}", env=env))  # a new process: read back, nothing timed
    assert second == {"chosen": names[2], "measured": []}


def test_two_writers_at_once_keep_every_entry(tmp_path):
    """Two processes merging 100 entries each into one file, interleaved: the file stays valid JSON
    and holds all 200 (a read-merge-rename without the lock loses the other writer's entries)."""
    _, tuning, _ = _modules()
    go = tmp_path / "go"
    script = textwrap.dedent('''
        import os, sys, time
        from qwen3_kernels.ops.triton import tuning
        while not os.path.exists(sys.argv[2]):
            time.sleep(0.001)
        for i in range(100):
            tuning._write(tuning.cache_file(), {f"{sys.argv[1]}-{i}": {"choice": sys.argv[1], "ms": {}}})
    ''')
    env = _env(**{tuning.CACHE_DIR_ENV: str(tmp_path)})
    writers = [subprocess.Popen([sys.executable, "-c", script, name, str(go)], env=env, stderr=subprocess.PIPE,
                                text=True) for name in ("a", "b")]
    go.touch()
    for w in writers:
        assert w.wait(timeout=120) == 0, w.stderr.read()
    entries = json.loads((tmp_path / tuning.FILE_NAME).read_text())["entries"]
    assert set(entries) == {f"{name}-{i}" for name in "ab" for i in range(100)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tuning-")]  # no temporary file left


@pytest.mark.parametrize("content, warning", [
    ("{\"format\": \"qwen3_kernels tuning\", \"entr", "is unreadable"),
    (json.dumps({"format": "someone else's", "entries": {}}), "is not a 'qwen3_kernels tuning' file"),
    (json.dumps({"format": "qwen3_kernels tuning", "version": 99, "entries": {}}), "is version 99"),
    (json.dumps([1, 2]), "is not a 'qwen3_kernels tuning' file"),
])
def test_a_corrupt_or_foreign_file_is_a_warning_and_a_retune(cache, caplog, content, warning):
    _, tuning, _ = _modules()
    cache.parent.mkdir(parents=True)
    cache.write_text(content)
    calls = []

    def tune():
        calls.append(1)
        return "a", {"a": 1.0}, {}

    assert tuning.tuned(torch.device("cpu"), "op", {"T": 1}, tune) == "a"
    assert calls == [1]
    assert any(warning in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    data = json.loads(cache.read_text())  # replaced by a valid file holding the new choice
    assert data["format"] == tuning.FORMAT and [e["choice"] for e in data["entries"].values()] == ["a"]


def test_a_malformed_entry_or_a_choice_that_is_no_candidate_is_tuned_again(cache, caplog):
    _, tuning, _ = _modules()
    cpu = torch.device("cpu")
    tuning._write(str(cache), {tuning.key(cpu, "op", {"T": 1}): {"choice": "gone", "ms": {}},
                               tuning.key(cpu, "op", {"T": 2}): {"choice": 3}})
    assert tuning.tuned(cpu, "op", {"T": 1}, lambda: ("a", {}, {}), valid=lambda c: c in ("a", "b")) == "a"
    assert tuning.tuned(cpu, "op", {"T": 2}, lambda: ("b", {}, {})) == "b"
    messages = [r.getMessage() for r in caplog.records]
    assert any("holds 'gone', which is no candidate here" in m for m in messages)
    assert any("1 malformed entries ignored" in m for m in messages)


@pytest.mark.parametrize("change", ["triton", "torch", "kernels", "gpu"])
def test_a_stale_key_is_ignored(cache, monkeypatch, change):
    """A choice made under another Triton, torch, kernel source or GPU is never used (it stays in the
    file for the stack that made it)."""
    _, tuning, _ = _modules()
    cpu = torch.device("cpu")
    assert tuning.tuned(cpu, "op", {"T": 1}, lambda: ("old", {}, {})) == "old"
    import triton
    context = tuning.device_context(cpu)
    stale = {"triton": context.replace(f"triton {triton.__version__}", "triton 99.0"),
             "torch": context.replace(f"torch {torch.__version__}", "torch 99.0"),
             "kernels": context.replace(f"kernels {tuning.source_hash()}", "kernels 0123456789abcdef"),
             "gpu": context.replace("cpu|", "NVIDIA H100 80GB HBM3|sm_90|")}[change]
    assert stale != context
    tuning.forget()
    monkeypatch.setattr(tuning, "device_context", lambda device: stale)
    assert tuning.tuned(cpu, "op", {"T": 1}, lambda: ("new", {}, {})) == "new"
    assert sorted(e["choice"] for e in json.loads(cache.read_text())["entries"].values()) == ["new", "old"]


def test_source_hash_follows_the_kernels(monkeypatch, tmp_path):
    _, tuning, _ = _modules()
    assert len(tuning.source_hash()) == 16
    monkeypatch.setattr(tuning, "__file__", str(tmp_path / "tuning.py"))
    (tmp_path / "attention.py").write_text("x = 1\n")
    tuning.source_hash.cache_clear()
    try:
        one = tuning.source_hash()
        (tmp_path / "attention.py").write_text("x = 2\n")
        tuning.source_hash.cache_clear()
        assert tuning.source_hash() != one
    finally:
        tuning.source_hash.cache_clear()


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_rank_0_tunes_and_every_rank_takes_its_choice(tmp_path):
    """Two gloo ranks whose fake clocks disagree: rank 1 first tunes alone (before the process group,
    into its own cache: its clock's winner), then, in the job, runs the default until ``sync()``
    and rank 0's choice after it, never timing anything or reading its own file."""
    attn, _, _ = _modules()
    names = [c["name"] for c in attn.bwd_candidates(90, 32, torch.float16, deterministic=False)]
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent('''
        import json, os, sys
        import torch
        import torch.distributed as dist
        rank = int(os.environ["RANK"])
        os.environ["QWEN3_KERNELS_CACHE_DIR"] = os.path.join(sys.argv[1], f"rank{rank}")
        from qwen3_kernels.ops.triton import _common, attention as attn, tuning
        names = json.loads(sys.argv[2])
        times = {names[2]: 1.0} if rank == 0 else {names[3]: 1.0}  # the clocks disagree
        launched, measured = [], []
        run_backward = attn._run_backward
        def spy(cand, *args, **kwargs):
            launched.append(cand["name"])
            return run_backward(cand, *args, **kwargs)
        def measure(run):
            run()
            measured.append(launched[-1])
            return times.get(launched[-1], 10.0)
        attn._run_backward, attn._measure, attn._tuning_mode = spy, measure, lambda device: "tune"
        g = torch.Generator().manual_seed(0)
        q, k, v, do = (torch.randn(1, 40, h, 32, generator=g).half() for h in (4, 2, 2, 4))
        def choice():
            with _common.simulated_gpu(90, 4):
                out, lse = attn.attention_forward(q, k, v, True, 0.2, config=attn.fwd_candidates(90, 32, q.dtype)[0])
                return attn.tuned_bwd_candidate(do, q, k, v, out, lse, True, 0.2)["name"]
        alone = choice() if rank == 1 else None
        tuning.forget()
        del measured[:]
        dist.init_process_group("gloo")
        before = choice()
        tuning.sync()
        after = choice()
        dist.barrier()
        with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
            json.dump(dict(alone=alone, before=before, after=after, measured=measured), f)
        dist.destroy_process_group()
    '''))
    env = _env(OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", _free_port(), str(script), str(tmp_path), json.dumps(names)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    zero, one = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert zero["before"] == zero["after"] == names[2] and set(zero["measured"]) == set(names)
    assert one["alone"] == names[3]  # its own clock, its own file
    assert one["before"] == names[0] and one["after"] == names[2] and one["measured"] == []


# ---------------------------------------------------------------------------------------------
# The backward tuner
# ---------------------------------------------------------------------------------------------

def test_backward_tuner_picks_the_fastest_agreeing_candidate_and_serves_it(tuner, monkeypatch):
    attn, _, common = _modules()
    names = [c["name"] for c in attn.bwd_candidates(90, 32, torch.float16)]
    clock = BackwardClock(monkeypatch, {names[0]: 3.0, names[1]: 2.0, names[2]: 1.0})
    do, q, k, v, out, lse = _backward_inputs()
    with common.simulated_gpu(90, 4):
        grads = attn.attention_backward(do, q, k, v, out, lse, True, 32 ** -0.5)
        assert clock.launched[-1] == names[2] and set(clock.measured) == set(names)
        timed = len(clock.measured)
        again = attn.attention_backward(do, q, k, v, out, lse, True, 32 ** -0.5)
    assert len(clock.measured) == timed and clock.launched[-1] == names[2]  # remembered, not timed again
    assert all(torch.equal(a, b) for a, b in zip(grads, again))


def test_disagreeing_raising_or_card_only_spilling_candidates_are_dropped(tuner, monkeypatch, caplog):
    """sm_90 at head dim 128: the fastest candidates compute a wrong dq, fail to launch, or spill
    registers here though the gate compiled them spill-free: each is dropped with a warning naming
    it. A candidate the gate knows to spill (``may_spill``) is timed all the same, and wins."""
    attn, _, common = _modules()
    cands = attn.bwd_candidates(90, 128, torch.float16, deterministic=True)
    wrong, broken, spilling = (c["name"] for c in cands[1:4])
    may_spill = next(c["name"] for c in cands if c["may_spill"])
    run_backward = attn._run_backward

    class Spilled:
        n_spills = 64

    def faulty(cand, *args, **kwargs):
        (dq, dk, dv), compiled = run_backward(cand, *args, **kwargs)
        if cand["name"] == wrong:
            dq = dq * 1.01
        if cand["name"] == broken:
            raise RuntimeError("out of resources: shared memory, Required: 262144")
        if cand["name"] in (spilling, may_spill):
            compiled = compiled + [Spilled()]
        return (dq, dk, dv), compiled

    monkeypatch.setattr(attn, "_run_backward", faulty)
    clock = BackwardClock(monkeypatch, {wrong: 0.1, broken: 0.1, spilling: 0.1, may_spill: 1.0}, default=5.0)
    do, q, k, v, out, lse = _backward_inputs(D=128, H=4, Hkv=2)
    with common.simulated_gpu(90, 4):
        chosen = attn.tuned_bwd_candidate(do, q, k, v, out, lse, True, 128 ** -0.5)
    assert chosen["name"] == may_spill
    assert not {wrong, broken, spilling} & set(clock.measured)
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"dropped {wrong}, its output disagrees" in m and "dq: max |difference|" in m for m in messages)
    assert any(f"dropped {broken}, it failed on this GPU: out of resources" in m for m in messages)
    assert any(f"dropped {spilling}, it failed on this GPU: it spills 64 bytes" in m for m in messages)
    _, tuning, _ = _modules()
    row, = tuning.report()
    assert set(row["dropped"]) == {wrong, broken, spilling} and row["choice"] == may_spill


@pytest.mark.parametrize("deterministic", [True, False])
def test_deterministic_mode_excludes_the_atomic_designs(tuner, monkeypatch, deterministic):
    attn, _, common = _modules()
    every = attn.bwd_candidates(90, 32, torch.float16, deterministic=False)
    atomic = [c["name"] for c in every if c["design"].endswith("-atomic")]
    assert atomic and all(not c["design"].endswith("-atomic") for c in attn.bwd_candidates(90, 32, torch.float16,
                                                                                            deterministic=True))
    clock = BackwardClock(monkeypatch, {name: 0.5 for name in atomic}, default=5.0)
    do, q, k, v, out, lse = _backward_inputs()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with common.simulated_gpu(90, 4):
            chosen = attn.tuned_bwd_candidate(do, q, k, v, out, lse, True, 32 ** -0.5)
    finally:
        torch.use_deterministic_algorithms(previous)
    if deterministic:
        assert not set(atomic) & set(clock.launched) and chosen["name"] == every[0]["name"]
    else:
        assert set(atomic) <= set(clock.measured) and chosen["name"] in atomic


# ---------------------------------------------------------------------------------------------
# SDPA in the race
# ---------------------------------------------------------------------------------------------

class RaceClock:
    """A fake ``_measure`` for the SDPA race: times by implementation ("triton", "sdpa-flash", ...)."""

    def __init__(self, monkeypatch, times: dict):
        attn, _, _ = _modules()
        self.times, self.launched, self.measured = times, [], []
        sdpa, flash = attn.sdpa_attention, attn._flash_attention_op

        def sdpa_spy(q, k, v, causal, scale, backend):
            self.launched.append(backend)
            return sdpa(q, k, v, causal, scale, backend)

        def flash_spy(*args):
            self.launched.append("triton")
            return flash(*args)

        monkeypatch.setattr(attn, "sdpa_attention", sdpa_spy)
        monkeypatch.setattr(attn, "_flash_attention_op", flash_spy)
        monkeypatch.setattr(attn, "_measure", self.measure)

    def measure(self, run):
        run()
        self.measured.append(self.launched[-1])
        return self.times[self.launched[-1]]


def test_sdpa_races_only_where_it_computes_the_same_thing():
    attn, _, _ = _modules()
    q, k = torch.zeros(2, 7, 4, 16), torch.zeros(2, 7, 2, 16)
    assert attn.sdpa_computes(q, k, True, None, None)
    assert attn.sdpa_computes(q, torch.zeros(2, 9, 2, 16), False, None, None)  # no mask: any Tk
    assert not attn.sdpa_computes(q, torch.zeros(2, 9, 2, 16), True, None, None)  # SDPA's mask is top-left
    assert not attn.sdpa_computes(q, k, True, torch.tensor([7, 3]), None)  # per-sequence cache lengths
    assert not attn.sdpa_computes(q[:1], k[:1], True, None, torch.tensor([0, 3, 7], dtype=torch.int32))
    assert not attn.sdpa_computes(q[:, :0], k[:, :0], False, None, None)


@pytest.mark.parametrize("case", ["kv_lens", "packed", "chunked", "decode"])
def test_sdpa_stays_out_where_semantics_differ(tuner, monkeypatch, case):
    """With SDPA timed fastest, calls it cannot compute exactly still run (and equal) the Triton
    kernels, and nothing races."""
    attn, _, _ = _modules()
    clock = RaceClock(monkeypatch, {"triton": 5.0, "sdpa-flash": 0.1})
    B, Tq, Tk = (1, 12, 12) if case == "packed" else (2, 5 if case == "chunked" else 1 if case == "decode" else 12, 12)
    q, k, v = rand(B, Tq, 4, 16), rand(B, Tk, 2, 16, seed=1), rand(B, Tk, 2, 16, seed=2)
    kwargs = {"kv_lens": torch.tensor([12, 7], dtype=torch.int32)} if case == "kv_lens" else \
        {"cu_seqlens": torch.tensor([0, 5, 12], dtype=torch.int32), "max_seqlen": 7} if case == "packed" else {}
    out = attn.attention(q, k, v, **kwargs)
    assert clock.measured == [] and "sdpa-flash" not in clock.launched
    if case == "decode":
        expected = attn._decode_attention_op(q, k, v, None, True, 0.25)
    else:
        expected = attn.attention_forward(q, k, v, True, 0.25, kwargs.get("kv_lens"),
                                          cu_seqlens=kwargs.get("cu_seqlens"), max_seqlen=kwargs.get("max_seqlen"))[0]
    assert torch.equal(out, expected)


@pytest.mark.parametrize("causal", [True, False])
def test_when_sdpa_wins_its_output_serves(tuner, monkeypatch, causal):
    """SDPA's flash backend (it runs on the CPU) timed fastest on the forward: the forward alone is
    SDPA's, bit for bit; forward + backward is ranked apart and the Triton kernels win it, so with
    gradients the Triton kernels serve."""
    attn, tuning, _ = _modules()
    clock = RaceClock(monkeypatch, {"triton": 2.0, "sdpa-flash": 1.0})
    q, k, v = rand(2, 12, 4, 16), rand(2, 12 if causal else 9, 2, 16, seed=1), rand(2, 12 if causal else 9, 2, 16,
                                                                                   seed=2)
    out = attn.attention(q, k, v, causal=causal)
    assert set(clock.measured) == {"triton", "sdpa-flash"}
    assert torch.equal(out, attn.sdpa_attention(q, k, v, causal, 0.25, "sdpa-flash"))
    assert not torch.equal(out, attn.attention_forward(q, k, v, causal, 0.25)[0])  # another algorithm
    clock.times.update({"triton": 1.0, "sdpa-flash": 2.0})  # forward + backward: the Triton kernels win
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    trained = attn.attention(*leaves, causal=causal)
    assert torch.equal(trained, attn.attention_forward(q, k, v, causal, 0.25)[0])
    rows = {row["op"]: row for row in tuning.report()}
    assert rows["attention forward"]["choice"] == "sdpa-flash"
    assert rows["attention forward+backward"]["choice"] == "triton"
    assert "sdpa-efficient" in rows["attention forward"]["dropped"]  # no such kernel on the CPU


def test_sdpa_that_disagrees_never_serves(tuner, monkeypatch, caplog):
    attn, _, _ = _modules()
    clock = RaceClock(monkeypatch, {"triton": 2.0, "sdpa-flash": 1.0})
    sdpa = attn.sdpa_attention
    monkeypatch.setattr(attn, "sdpa_attention", lambda *args: sdpa(*args) * 1.001)
    q, k, v = rand(1, 12, 4, 16), rand(1, 12, 2, 16, seed=1), rand(1, 12, 2, 16, seed=2)
    assert torch.equal(attn.attention(q, k, v), attn.attention_forward(q, k, v, True, 0.25)[0])
    assert clock.measured == ["triton"]
    assert any("dropped sdpa-flash, its output disagrees with triton's (out: max |difference|" in r.getMessage()
               for r in caplog.records)


def test_a_compiled_graph_holds_the_winner_tuned_before_the_trace(tuner, monkeypatch):
    attn, _, _ = _modules()
    RaceClock(monkeypatch, {"triton": 2.0, "sdpa-flash": 1.0})
    q, k, v = rand(2, 12, 4, 16), rand(2, 12, 2, 16, seed=1), rand(2, 12, 2, 16, seed=2)
    sdpa_out = attn.sdpa_attention(q, k, v, True, 0.25, "sdpa-flash")
    attn.attention(q, k, v)  # tuned eagerly: SDPA wins
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attn.attention(q, k, v) * 1.0, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), sdpa_out, rtol=0, atol=0)
    # another shape, never tuned: the trace cannot time on fake tensors, the Triton op serves
    q2, k2, v2 = rand(2, 20, 4, 16), rand(2, 20, 2, 16, seed=1), rand(2, 20, 2, 16, seed=2)
    torch.testing.assert_close(compiled(q2, k2, v2), attn.attention_forward(q2, k2, v2, True, 0.25)[0],
                               rtol=0, atol=0)
    torch._dynamo.reset()


def test_ops_report_shows_each_tuned_bucket(tuner, monkeypatch, triton_everywhere):
    from qwen3_kernels import ops
    attn, _, _ = _modules()
    RaceClock(monkeypatch, {"triton": 3.0, "sdpa-flash": 1.5})
    q, k, v = rand(1, 12, 4, 16), rand(1, 12, 2, 16, seed=1), rand(1, 12, 2, 16, seed=2)
    ops.attention(q, k, v)
    reason = ops.report("cpu", torch.float32)["attention"].reason
    assert "attention forward [dtype=float32 D=16 B=1 T=16 H=4 Hkv=2 Tk=16 causal=True]: sdpa-flash 1.500 ms, " \
           "2.00x faster than triton (3.000 ms)" in reason
    row, = ops.tuning_report()
    assert row["choice"] == "sdpa-flash"
