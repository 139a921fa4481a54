"""``qwen3-kernels tune`` (qwen3_kernels/tune.py): the shapes it tunes for a model, its table, the whole
run on the CPU's interpreter with sm_90's candidates and a fake clock, and the one line it prints
where there is no CUDA device."""

import argparse
import itertools

import pytest
import torch

from qwen3_kernels import Config, tune


def _parser():
    parser = argparse.ArgumentParser(prog="qwen3-kernels tune")
    tune.add_arguments(parser)
    return parser


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_0(capsys):
    assert tune.run(_parser().parse_args(["--preset", "0.6B"])) == 0
    out, err = capsys.readouterr()
    assert out.count("\n") == 1 and "no CUDA device here" in out and err == ""
    assert tune.main(["--preset", "8B", "--tokens", "4096"]) == 0


@pytest.mark.parametrize("argv", [[], ["--preset", "0.6B", "--model", "x"], ["--preset", "1B"],
                                  ["--preset", "0.6B", "--tokens", "0"]])
def test_bad_arguments_are_argument_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_the_plan_covers_prefill_decode_and_training():
    shapes = tune.plan(Config.preset("0.6B"), tokens=16384, max_len=16384)
    labels = [s.label for s in shapes]
    lengths = [128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    assert [s.q_len for s in shapes if s.kind == "prefill"] == lengths
    assert [(s.q_len, s.kv_len) for s in shapes if s.kind == "cache prefill"] == [(n, 2 * n) for n in lengths]
    assert [(s.batch, s.kv_len) for s in shapes if s.kind == "decode"] == [
        (b, n) for b in (1, 8, 64) for n in (1024, 32768)]
    assert "train B=1 T=16384 fwd+bwd" in labels
    assert [s.sequence for s in shapes if s.kind == "packed"] == [512, 1024, 2048, 4096, 8192, 16384]
    assert all(s.grad == (s.kind in ("train", "packed")) for s in shapes)


def test_the_plan_stays_inside_the_context():
    config = Config(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16,
                    intermediate_size=96, max_position_embeddings=3000)
    shapes = tune.plan(config, tokens=8192, max_len=16384)
    assert [s.q_len for s in shapes if s.kind == "prefill"] == [128, 256, 512, 1024, 2048, 3000]
    assert max(s.kv_len for s in shapes if s.kind != "packed") == 3000
    assert {s.kv_len for s in shapes if s.kind == "decode"} == {1024, 3000}
    # a packed micro-batch holds more tokens than the context, each sequence no more than it
    assert [(s.q_len, s.sequence) for s in shapes if s.kind == "packed"] == [(8192, 512), (8192, 1024),
                                                                            (8192, 2048), (8192, 3000)]


def test_the_table_names_winner_runner_up_and_sdpa():
    rows = [
        {"shape": "prefill B=1 T=4096", "op": "attention forward", "choice": "sdpa-cudnn",
         "ms": {"sdpa-cudnn": 0.5, "triton": 0.6, "sdpa-flash": 0.7}, "dropped": {}, "tuned_here": True},
        {"shape": "train B=1 T=16384 fwd+bwd", "op": "attention backward", "choice": "joint dkdv 16x64 w4 s1 dq",
         "ms": {"joint dkdv 16x64 w4 s1 dq": 1.25, "split": 1.5}, "dropped": {"x": "failed"}, "tuned_here": False},
        {"shape": "prefill B=1 T=128", "op": "attention forward", "choice": "triton", "ms": {"triton": 0.01},
         "dropped": {"sdpa-cudnn": "not offered here: No available kernel"}, "tuned_here": True},
    ]
    lines = tune.table(rows).splitlines()
    assert lines[0].split() == ["shape", "op", "winner", "ms", "runner-up", "SDPA", "ms"]
    assert lines[1].split() == ["prefill", "B=1", "T=4096", "forward", "sdpa-cudnn", "0.500", "triton", "(0.600)",
                                "0.500", "(sdpa-cudnn)"]
    assert "backward (cached)" in lines[2] and "split (1.500)" in lines[2] and lines[2].endswith("-")
    assert lines[3].endswith("none runs here")


@pytest.fixture
def interpreter_tuning(monkeypatch, tmp_path, triton_everywhere):
    """Every attention op through the interpreter as on sm_90, tuned with a clock that makes each
    race's first candidate (the default, or the Triton kernels) the winner, into an empty cache."""
    from qwen3_kernels.ops.triton import _common, attention, tuning
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(tmp_path))
    tuning.forget()
    monkeypatch.setattr(attention, "_tuning_mode", lambda device: "tune")
    ticks = itertools.count(1)
    monkeypatch.setattr(attention, "_measure", lambda run: (run(), float(next(ticks)))[1])
    with _common.simulated_gpu(90, 4):
        yield tmp_path / tuning.FILE_NAME
    tuning.forget()


def test_a_whole_tuning_run_on_the_interpreter(interpreter_tuning):
    config = Config(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                    intermediate_size=96, max_position_embeddings=64)
    shapes = tune.plan(config, tokens=48, max_len=32)
    rows = tune.tune_shapes(shapes, config, torch.float16, torch.device("cpu"))
    ops = {(r["shape"], r["op"]) for r in rows}
    assert ("prefill B=1 T=32", "attention forward") in ops  # SDPA raced the Triton kernels
    assert ("prefill B=1 T=32", "attention forward tiles") in ops
    assert ("cache prefill B=1 T=32 cache=64", "attention forward tiles") in ops
    assert ("train B=1 T=48 fwd+bwd", "attention forward+backward") in ops
    assert ("train B=1 T=48 fwd+bwd", "attention backward") in ops
    assert ("train packed 48 tokens, sequences of 48", "attention backward") in ops
    assert all(r["choice"] == "split-KV kernel" for r in rows if r["shape"].startswith("decode"))
    race = next(r for r in rows if r["op"] == "attention forward")
    assert race["choice"] == "triton" and "sdpa-flash" in race["ms"]  # SDPA's flash backend runs on the CPU
    text = tune.table(rows)
    assert "forward+backward" in text and "sdpa-flash" in text
    assert interpreter_tuning.exists()


def test_a_second_run_reads_every_choice_back(interpreter_tuning, monkeypatch):
    from qwen3_kernels.ops.triton import attention, tuning
    config = Config(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                    intermediate_size=96, max_position_embeddings=64)
    shapes = [s for s in tune.plan(config, tokens=48, max_len=32) if s.kind != "decode"]
    first = tune.tune_shapes(shapes, config, torch.float16, torch.device("cpu"))
    tuning.forget()  # as a new process would start

    def measure(run):
        raise AssertionError("tuned again")

    monkeypatch.setattr(attention, "_measure", measure)
    again = tune.tune_shapes(shapes, config, torch.float16, torch.device("cpu"))
    def settled(rows):
        return sorted((r["shape"], r["op"], r["choice"], sorted(r["ms"].items())) for r in rows)

    assert settled(again) == settled(first)
    assert not any(r["tuned_here"] for r in again) and "(cached)" in tune.table(again)


def test_run_checks_its_arguments_where_cuda_exists(monkeypatch, tmp_path, capsys):
    """As the CLI's subcommand parser leaves them (the parent parser's defaults where tune's were not
    applied): a missing config.json, a full-precision dtype and a CPU device are named errors."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("QWEN3_KERNELS_AUTOTUNE", "1")  # the test session pins the defaults (conftest)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        tune.run(argparse.Namespace(model=str(tmp_path), preset="0.6B", dtype=None, device="cuda"))
    with pytest.raises(ValueError, match="--dtype float32: tuning is for the half-precision dtypes"):
        tune.run(argparse.Namespace(model=None, preset="0.6B", dtype="float32", device="cuda"))
    with pytest.raises(ValueError, match="--device cpu: tuning ranks kernels on a CUDA device"):
        tune.run(argparse.Namespace(model=None, preset=None, dtype=None, device="cpu"))
    monkeypatch.setenv("QWEN3_KERNELS_AUTOTUNE", "0")
    assert tune.run(argparse.Namespace(model=None, preset="0.6B")) == 1
    assert capsys.readouterr().err == "error: QWEN3_KERNELS_AUTOTUNE=0 turns autotuning off; unset it to tune\n"


def test_tune_model_prints_the_table_and_stops_cleanly_when_interrupted(interpreter_tuning, monkeypatch, capsys):
    config = Config(vocab_size=97, hidden_size=64, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                    intermediate_size=96, max_position_embeddings=64)
    assert tune.tune_model(config, torch.float16, torch.device("cpu"), 48, 32, "tiny") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "tuning attention for tiny (heads 4/2, head dim 32) in float16 on cpu: 7 shapes"
    assert out[1].split()[:3] == ["shape", "op", "winner"] and out[-1].startswith("cache: ")
    from qwen3_kernels.ops.triton import tuning
    tuning.forget()
    calls = []

    def interrupted(shape, *args):
        calls.append(shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run_shape(shape, *args)

    run_shape = tune.run_shape
    monkeypatch.setattr(tune, "run_shape", interrupted)
    assert tune.tune_model(config, torch.float16, torch.device("cpu"), 48, 32, "tiny") == 130
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("interrupted: shown the tunings of 1 of 7 shapes; cache: ")
