"""``qwen3-kernels train`` on the CPU (gloo, a tiny random checkpoint, a few steps): two ranks under
torchrun against one process, an interrupted-and-resumed run against an uninterrupted one, the output
against transformers, the loss on memorisable data, and the errors a user can make."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import make_hf_model, write_tokenizer

from qwen3_kernels import QWEN, train
from qwen3_kernels.__main__ import main
from qwen3_kernels.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

EXAMPLES = [{"text": "The quick brown fox jumps over the lazy dog."},
            {"messages": [{"role": "user", "content": "Hello world!"},
                          {"role": "assistant", "content": "How are you today?"}]},
            {"text": "héllo wörld, ça va? naïve café"},
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "你好"},
                          {"role": "assistant", "content": "今天天气很好。"}]},
            {"text": "emoji: 🙂🚀✨ and math: ∑ x² ≤ ∞"}] * 3
# 4 micro-batches of 32 tokens per step: 4 accumulated in one process, 2 on each of two ranks
STEPS = ["--tokens-per-step", "128", "--micro-batch-tokens", "32", "--lr", "1e-2", "--warmup", "1", "--seed", "3",
         "--device", "cpu", "--dtype", "float32"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("train") / "qwen3-tiny"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=128).save_pretrained(path)
    write_tokenizer(path)
    return path


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in EXAMPLES))
    return path


def _train(checkpoint, data, out, *extra):
    return main(["train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), *STEPS, *extra])


def _torchrun_2_ranks(checkpoint, data, out, *extra):
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", port, "-m", "qwen3_kernels", "train", "--model",
                           str(checkpoint), "--data", str(data), "--out", str(out), *STEPS, *extra],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)


def _in_published_spelling(path) -> dict:
    """Rewrites the checkpoint's config.json (transformers 5's spelling) as the released Qwen3 files
    spell it (rope_theta, rope_scaling, torch_dtype bfloat16, the token ids); returns it."""
    config = json.loads((path / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    del config["dtype"]
    config.update(rope_theta=theta, rope_scaling=None, torch_dtype="bfloat16", bos_token_id=151643,
                  eos_token_id=151645, transformers_version="4.51.0")
    (path / "config.json").write_text(json.dumps(config))
    return config


def _metrics(out):
    with open(out / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def _weights(out):
    from safetensors.torch import load_file
    return load_file(out / "model.safetensors")


def test_one_process_writes_metrics_checkpoints_and_a_transformers_model(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "3", "--save-every", "2") == 0
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert set(metrics[0]) >= {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"}
    assert metrics[0]["lr"] == pytest.approx(1e-2) and metrics[-1]["lr"] < metrics[1]["lr"]
    assert all(m["tokens"] <= 128 and m["loss"] > 0 for m in metrics)
    assert sorted(os.listdir(out / "checkpoints")) == ["step_0000002", "step_0000003"]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    # the published spelling, which transformers 4 reads (without it: rope_theta 10000), beside 5's
    written, given = (json.loads((path / "config.json").read_text()) for path in (out, checkpoint))
    theta = given.get("rope_theta") or given["rope_parameters"]["rope_theta"]  # transformers 5 writes the latter
    assert written["rope_theta"] == theta and written["rope_scaling"] is None
    assert written["torch_dtype"] == written["dtype"] == "float32"
    # transformers and QWEN.from_pretrained read the output and agree logit for logit
    ours = QWEN.from_pretrained(out)
    theirs = transformers.Qwen3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    ids = torch.randint(0, ours.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, rtol=1e-5, atol=1e-5)
    # and the weights did move
    start = QWEN.from_pretrained(checkpoint)
    assert not torch.equal(start.blocks[0].attn.q_proj.weight, ours.blocks[0].attn.q_proj.weight)


def test_two_ranks_match_one_process(checkpoint, data, tmp_path):
    """The same global batch split over two gloo ranks (FSDP2 shards, 2 micro-batches each) gives the
    losses and final weights of one process accumulating all 4."""
    one, two = tmp_path / "one", tmp_path / "two"
    assert _train(checkpoint, data, one, "--steps", "3") == 0
    result = _torchrun_2_ranks(checkpoint, data, two, "--steps", "3")
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert (a["step"], a["tokens"]) == (b["step"], b["tokens"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    mine, theirs = _weights(one), _weights(two)
    assert set(mine) == set(theirs)
    for name in mine:
        # summation order differs (2 ranks x 2 micro-batches); AdamW's first steps divide by tiny
        # second moments, so 1e-7 gradient noise shows as ~1e-6 in a weight: 1e-3 of one lr step
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-5, atol=1e-5, msg=name)


def test_interrupted_run_resumes_exactly(checkpoint, data, tmp_path, monkeypatch):
    """Ctrl-C during step 3 saves step 2; --resume then gives the uninterrupted run's losses and weights."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert _train(checkpoint, data, whole, "--steps", "4") == 0
    original = train.Trainer.train_step

    def ctrl_c_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(train.Trainer, "train_step", ctrl_c_at_step_3)
    assert _train(checkpoint, data, resumed, "--steps", "4") == 130
    assert os.listdir(resumed / "checkpoints") == ["step_0000002"]
    monkeypatch.setattr(train.Trainer, "train_step", original)
    assert _train(checkpoint, data, resumed, "--steps", "4", "--resume") == 0
    assert [m["loss"] for m in _metrics(resumed)] == pytest.approx([m["loss"] for m in _metrics(whole)], rel=1e-6)
    for name, weight in _weights(whole).items():
        torch.testing.assert_close(_weights(resumed)[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_changes_nothing_but_memory(checkpoint, data, tmp_path, monkeypatch):
    """Each block's forward runs again in the backward; losses and weights stay the same."""
    from qwen3_kernels.model import Block
    calls, forward = [0], Block.forward
    monkeypatch.setattr(Block, "forward", lambda self, *a, **k: calls.__setitem__(0, calls[0] + 1) or forward(self, *a,
                                                                                                          **k))
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    assert _train(checkpoint, data, plain, "--steps", "2") == 0
    plain_calls = calls[0]
    assert _train(checkpoint, data, recomputed, "--steps", "2", "--activation-checkpointing") == 0
    assert calls[0] - plain_calls == 2 * plain_calls
    assert [m["loss"] for m in _metrics(recomputed)] == pytest.approx([m["loss"] for m in _metrics(plain)], rel=1e-6)
    for name, weight in _weights(plain).items():
        torch.testing.assert_close(_weights(recomputed)[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_compute_over_fp32_weights(checkpoint, data, tmp_path):
    """--dtype bfloat16: FSDP2 casts the fp32 weights for compute and reduces gradients in fp32; the
    losses follow the fp32 run's to bf16 precision and the saved model stays in the checkpoint's fp32."""
    exact, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert _train(checkpoint, data, exact, "--steps", "2") == 0
    assert _train(checkpoint, data, bf16, "--steps", "2", "--dtype", "bfloat16") == 0
    assert [m["loss"] for m in _metrics(bf16)] == pytest.approx([m["loss"] for m in _metrics(exact)], rel=2e-2)
    assert all(w.dtype == torch.float32 for w in _weights(bf16).values())


def test_loss_falls_on_memorisable_data(checkpoint, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog."}) + "\n")
    out = tmp_path / "out"
    assert main(["train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", "25",
                 "--tokens-per-step", "32", "--lr", "2e-2", "--device", "cpu"]) == 0
    losses = [m["loss"] for m in _metrics(out)]
    assert losses[-1] < 0.1 * losses[0], losses


@pytest.mark.parametrize("case, message", [
    ("bad line", r"data.jsonl:2: not valid JSON"),
    ("no model", r"--model '.*nowhere': no such checkpoint directory"),
    ("unwritable out", r"--out '.*': cannot write there"),
    ("uneven split", r"--tokens-per-step 100 must be a whole number of micro-batches \(--micro-batch-tokens 32\)"),
    ("not utf-8", r"data.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"),
    ("directory", r"--data '.*' is a directory that datasets' save_to_disk did not write"),
    ("content type", r"data.jsonl:1: message 0's content must be a string or a list of text parts"),
    ("resume another model", r"--resume: the run in '.*' was trained otherwise: model '.*' -> '.*'"),
    ("resume nothing", r"--resume: '.*out' holds no run to continue"),
])
def test_errors_are_one_line(checkpoint, data, tmp_path, capsys, case, message):
    model, out, extra = str(checkpoint), tmp_path / "out", []
    if case == "bad line":
        data.write_text(json.dumps(EXAMPLES[0]) + "\n" + '{"text": "unclosed\n')
    elif case == "no model":
        model = str(tmp_path / "nowhere")
    elif case == "unwritable out":
        (tmp_path / "a-file").write_text("")
        out = tmp_path / "a-file" / "out"
    elif case == "not utf-8":
        data.write_bytes(json.dumps(EXAMPLES[0]).encode() + b'\n{"text": "caf\xe9"}\n')
    elif case == "directory":
        data = tmp_path
    elif case == "content type":
        data.write_text(json.dumps({"messages": [{"role": "user", "content": 7},
                                                 {"role": "assistant", "content": "x"}]}) + "\n")
    elif case == "resume another model":
        assert _train(checkpoint, data, out, "--steps", "1") == 0
        model = str(tmp_path / "another")
        shutil.copytree(checkpoint, model)
        edit = json.loads((checkpoint / "config.json").read_text())
        (tmp_path / "another" / "config.json").write_text(json.dumps({**edit, "num_hidden_layers": 1}))
        capsys.readouterr()
        extra = [*STEPS, "--resume"]
    elif case == "resume nothing":
        extra = ["--resume"]
    else:
        extra = ["--tokens-per-step", "100", "--micro-batch-tokens", "32"]
    assert main(["train", "--model", model, "--data", str(data), "--out", str(out), "--device", "cpu", *extra]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert __import__("re").search(message, err[0]), err[0]


def test_the_readme_command_on_a_published_qwen3_config(tmp_path):
    """max_position_embeddings 40960 (every published Qwen3) with the default 65,536-token step in one
    process: the packed row is longer than the context, each example in it is not."""
    path = tmp_path / "published"
    tok = write_tokenizer(path)
    make_hf_model(vocab_size=tok.get_vocab_size(), max_position_embeddings=40960).save_pretrained(path)
    write_tokenizer(path)
    _in_published_spelling(path)
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": f"{i} " + "The quick brown fox jumps over the lazy dog. " * 60}) + "\n"
                            for i in range(72)))
    assert main(["train", "--model", str(path), "--data", str(data), "--out", str(tmp_path / "run1"), "--steps", "1",
                 "--lr", "1e-5", "--warmup", "20", "--device", "cpu"]) == 0
    assert _metrics(tmp_path / "run1")[0]["tokens"] > 40960


def test_a_non_finite_loss_stops_at_that_step(checkpoint, data, tmp_path, monkeypatch, capsys):
    """A NaN at step 3 ends the run there with one line naming the step; the weights of step 2 are the
    last checkpoint, no NaN model is written and the metrics stop at step 2."""
    calls, forward = [0], QWEN.forward

    def nan_from_step_3(self, *args, **kwargs):
        calls[0] += 1
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if calls[0] > 8 else loss  # 4 micro-batches a step

    monkeypatch.setattr(QWEN, "forward", nan_from_step_3)
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "5") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: step 3: the loss is nan") and "step_0000002" in err[-1], err
    assert [m["step"] for m in _metrics(out)] == [1, 2]
    assert os.listdir(out / "checkpoints") == ["step_0000002"]
    assert not (out / "model.safetensors").exists()


def test_max_grad_norm_0_means_no_clipping(checkpoint, data, tmp_path, capsys):
    unclipped, huge = tmp_path / "zero", tmp_path / "huge"
    assert _train(checkpoint, data, unclipped, "--steps", "2", "--max-grad-norm", "0") == 0
    assert _train(checkpoint, data, huge, "--steps", "2", "--max-grad-norm", "1e30") == 0
    assert [m["loss"] for m in _metrics(unclipped)] == [m["loss"] for m in _metrics(huge)]
    assert _metrics(unclipped)[1]["loss"] != _metrics(unclipped)[0]["loss"]  # it trained
    for name, weight in _weights(huge).items():
        torch.testing.assert_close(_weights(unclipped)[name], weight, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("flag, value, message", [
    ("--max-grad-norm", "-1", "must be a finite number >= 0, got -1.0"),
    ("--warmup", "-5", "must be an integer >= 0, got -5"),
    ("--lr", "-1e-3", "must be a finite number > 0, got -0.001"),
    ("--lr", "0", "must be a finite number > 0, got 0.0"),
])
def test_bad_training_arguments(checkpoint, data, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        _train(checkpoint, data, tmp_path / "out", flag, value)
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


def test_an_out_directory_holds_one_run(checkpoint, data, tmp_path, capsys):
    """A new run does not start over another run's outputs unless --overwrite; --resume continues only
    the run whose model, data and arguments it was given."""
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "2", "--save-every", "1") == 0
    assert _train(checkpoint, data, out, "--steps", "2") == 1
    assert "already holds a run (run.json, metrics.jsonl, checkpoints, loss.png): --resume" in capsys.readouterr().err
    assert _train(checkpoint, data, out, "--steps", "3", "--resume", "--lr", "2e-2") == 1
    assert "was trained otherwise: --lr 0.01 -> 0.02" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("fox", "cat"))
    assert main(["train", "--model", str(checkpoint), "--data", str(other), "--out", str(out), *STEPS, "--steps", "3",
                 "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data '" in err and "data sha256" in err
    assert _train(checkpoint, data, out, "--steps", "1", "--overwrite") == 0
    assert [m["step"] for m in _metrics(out)] == [1] and os.listdir(out / "checkpoints") == ["step_0000001"]


def test_the_progress_line_is_a_line_per_step_in_a_log(checkpoint, data, tmp_path, capsys):
    assert _train(checkpoint, data, tmp_path / "out", "--steps", "2") == 0
    err = capsys.readouterr().err
    assert "\r" not in err and [line.split("  ")[0] for line in err.splitlines() if line.startswith("step ")] == [
        "step 1/2", "step 2/2"]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # as one line, wherever argparse wraps it
    for default in ("100 or what --epochs amounts to", "(default: 65536)", "(default: 1e-05)", "(default: 0)", "(default: 1.0)",
                    "(default: one at the end and on Ctrl-C only)"):
        assert default in out, default


def test_an_example_longer_than_the_context_is_cut_to_it(checkpoint, tmp_path, capsys):
    """A 512-token micro-batch packs examples for a 128-token model: an example longer than the
    context is cut to the context (the micro-batch's length would exceed it), the shorter one is kept."""
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": "The quick brown fox jumps over the lazy dog. " * 40}) + "\n"
                    + json.dumps(EXAMPLES[0]) + "\n")
    short = len(Tokenizer.from_pretrained(checkpoint).encode(EXAMPLES[0]["text"])) + 1  # + <|endoftext|>
    out = tmp_path / "out"
    assert main(["train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", "1",
                 "--tokens-per-step", "512", "--device", "cpu"]) == 0
    assert "note: 1 of 2 examples were longer than the model's 128-token context and were cut to it" in \
        capsys.readouterr().err
    assert _metrics(out)[0]["tokens"] == 128 + short


def test_resuming_with_a_default_spelled_out_is_the_same_run(checkpoint, data, tmp_path):
    out, common = tmp_path / "out", ["--tokens-per-step", "128", "--lr", "1e-2", "--device", "cpu"]
    assert main(["train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", "1",
                 *common]) == 0
    assert main(["train", "--model", str(checkpoint), "--data", str(data), "--out", str(out), "--steps", "2",
                 *common, "--dtype", "float32", "--micro-batch-tokens", "128", "--resume"]) == 0
    assert [m["step"] for m in _metrics(out)] == [1, 2]


def test_a_fault_every_rank_finds_is_printed_by_local_rank_0_only(checkpoint, data, tmp_path, capsys, monkeypatch):
    """Under torchrun every rank checks the same --model, --data and --out: the other ranks exit 1
    quietly (local rank 0 of each machine prints the one line)."""
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "1") == 0
    another = tmp_path / "another"
    shutil.copytree(checkpoint, another)
    capsys.readouterr()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _train(another, data, out, "--steps", "2", "--resume") == 1
    assert _train(checkpoint, tmp_path, out, "--steps", "2") == 1  # a directory as --data
    assert capsys.readouterr().err == ""
    forward = QWEN.forward  # and a non-finite loss, which the ranks find together (all-reduced)
    monkeypatch.setattr(QWEN, "forward", lambda self, *a, **k: forward(self, *a, **k) * float("nan"))
    assert _train(checkpoint, data, tmp_path / "nan", "--steps", "2") == 1
    assert "error" not in capsys.readouterr().err


def test_bad_data_under_torchrun_is_one_error_line(checkpoint, tmp_path):
    """Each rank reads --data after the process group starts; only local rank 0 says what is wrong."""
    data = tmp_path / "data.jsonl"
    data.write_bytes(json.dumps(EXAMPLES[0]).encode() + b'\n{"text": "caf\xe9"}\n')
    result = _torchrun_2_ranks(checkpoint, data, tmp_path / "out")
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {data}:2: not UTF-8 (byte 0xe9 at column 14)"], result.stderr[-3000:]


def test_config_json_keeps_the_published_spelling_of_the_input(checkpoint, data, tmp_path):
    """A checkpoint in the released files' spelling (rope_theta, rope_scaling, torch_dtype, token ids)
    comes out with every one of its keys and values, so transformers 4 reads the same model; the
    weights are written in its torch_dtype."""
    published = tmp_path / "published"
    shutil.copytree(checkpoint, published)
    given = _in_published_spelling(published)
    out = tmp_path / "out"
    assert _train(published, data, out, "--steps", "1") == 0
    written = json.loads((out / "config.json").read_text())
    assert {key: written.get(key) for key in given} == given
    assert written["dtype"] == "bfloat16" and written["rope_parameters"] == {"rope_type": "default",
                                                                             "rope_theta": given["rope_theta"]}
    assert {w.dtype for w in _weights(out).values()} == {torch.bfloat16}
