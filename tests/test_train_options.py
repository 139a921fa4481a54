"""``qwen3-kernels train``'s options beyond the loop itself: the eval loss (one process and two ranks
against a direct computation), --epochs, the learning-rate schedules, --save-total-limit, the
metrics sent to TensorBoard and W&B, the start-up summary and the loss plot."""

import json
import math
import sys
import types
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_train import EXAMPLES, STEPS, _metrics, _torchrun_2_ranks, _train, checkpoint, data  # noqa: F401

from qwen3_kernels import QWEN, train
from qwen3_kernels.data import read_jsonl
from qwen3_kernels.model import IGNORE_INDEX
from qwen3_kernels.tokenizer import Tokenizer

# odd lengths, so the eval set packs into several micro-batches and one rank of two gets fewer
EVAL = [{"text": "A held-out sentence the model never trains on."},
        {"messages": [{"role": "user", "content": "What is two plus two?"},
                      {"role": "assistant", "content": "Four, of course."}]},
        {"text": "Another one: pack my box with five dozen liquor jugs."}]


@pytest.fixture
def eval_data(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in EVAL))
    return path


def _direct_eval_loss(model_dir, eval_file, max_len=32) -> tuple[float, int]:
    """The eval set's loss computed the plain way: each example alone, full logits, the sum of the
    trained tokens' cross-entropies (float64) over their count."""
    model = QWEN.from_pretrained(model_dir).eval()
    examples = read_jsonl(eval_file, Tokenizer.from_pretrained(model_dir), max_len=max_len)
    total, count = 0.0, 0
    with torch.no_grad():
        for tokens, labels in zip(examples.tokens, examples.labels):
            logits = model(torch.tensor([tokens]))[0].double()          # (T, V): position t predicts t + 1
            targets = torch.tensor(labels[1:])
            kept = targets != IGNORE_INDEX
            total += F.cross_entropy(logits[:-1][kept], targets[kept], reduction="sum").item()
            count += int(kept.sum())
    return total / count, count


def test_eval_loss_is_the_mean_over_the_eval_set(checkpoint, data, eval_data, tmp_path):
    """--eval-data with --save-every 1: an eval at the checkpoint of step 1 and at the end; the last
    equals the token-weighted mean computed directly on the saved model."""
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "2", "--save-every", "1", "--eval-data", str(eval_data)) == 0
    metrics = _metrics(out)
    assert all("eval_loss" in m for m in metrics)
    loss, count = _direct_eval_loss(out, eval_data)
    assert metrics[-1]["eval_tokens"] == count
    assert metrics[-1]["eval_loss"] == pytest.approx(loss, rel=1e-5)
    assert metrics[0]["eval_loss"] != metrics[1]["eval_loss"]  # measured on the weights of its step


def test_eval_loss_on_two_ranks_equals_one_process(checkpoint, data, eval_data, tmp_path):
    extra = ("--steps", "2", "--eval-every", "1", "--eval-data", str(eval_data))
    assert _train(checkpoint, data, tmp_path / "one", *extra) == 0
    result = _torchrun_2_ranks(checkpoint, data, tmp_path / "two", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["eval_tokens"] for m in two] == [m["eval_tokens"] for m in one]
    for a, b in zip(one, two):
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)


def test_epochs_2_runs_the_steps_that_cover_two_passes(checkpoint, data, tmp_path):
    """Every token of two epochs is trained on, and the last step is the one that completes them."""
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--epochs", "2") == 0
    tokens = sum(len(t) for t in read_jsonl(data, Tokenizer.from_pretrained(checkpoint), max_len=32).tokens)
    per_step = [m["tokens"] for m in _metrics(out)]
    assert sum(per_step) >= 2 * tokens > sum(per_step[:-1])


def test_steps_and_epochs_exclude_each_other(checkpoint, data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        _train(checkpoint, data, tmp_path / "out", "--steps", "3", "--epochs", "1")
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("scheduler, expected", [
    ("cosine", [0.5, 1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))]),
    ("linear", [0.5, 1.0, 1.0, 2 / 3, 1 / 3]),
    ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
])
def test_learning_rate_schedules(scheduler, expected):
    """Two warmup steps, then the schedule over the three steps left (1-based steps)."""
    trainer = SimpleNamespace(args=SimpleNamespace(lr=1.0, warmup=2, lr_scheduler=scheduler), steps=5)
    assert [train.Trainer.lr_at(trainer, step) for step in range(1, 6)] == pytest.approx(expected)


def test_save_total_limit_1_leaves_one_checkpoint(checkpoint, data, tmp_path):
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "3", "--save-every", "1", "--save-total-limit", "1") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_0000003"]


def test_tensorboard_event_files_hold_the_logged_scalars(checkpoint, data, eval_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "3", "--eval-data", str(eval_data), "--report-to",
                  "tensorboard") == 0
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    metrics = _metrics(out)
    for key, tag in (("loss", "train/loss"), ("lr", "train/lr"), ("grad_norm", "train/grad_norm")):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3]
        assert [e.value for e in logged] == pytest.approx([m[key] for m in metrics], rel=1e-6)
    assert [e.step for e in events.Scalars("eval/loss")] == [3]
    assert events.Scalars("eval/loss")[0].value == pytest.approx(metrics[-1]["eval_loss"], rel=1e-6)


def test_wandb_gets_each_steps_metrics(checkpoint, data, tmp_path, monkeypatch):
    """Through wandb's own calls (init, log with the step, finish), here recorded by a stand-in."""
    calls = []
    run = SimpleNamespace(log=lambda values, step: calls.append(("log", step, values)),
                          finish=lambda: calls.append(("finish",)))
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or run
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "2", "--report-to", "wandb") == 0
    assert calls[0][0] == "init" and calls[0][1]["dir"] == str(out) and calls[0][1]["config"]["--lr"] == 1e-2
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged] == [1, 2]
    assert [c[2]["train/loss"] for c in logged] == pytest.approx([m["loss"] for m in _metrics(out)])
    assert calls[-1] == ("finish",)


@pytest.mark.parametrize("value, message", [
    ("tensorbored", "--report-to 'tensorbored': choose from none, tensorboard, wandb"),
    ("none,wandb", "'none' cannot be combined"),
])
def test_bad_report_to(checkpoint, data, tmp_path, capsys, value, message):
    assert _train(checkpoint, data, tmp_path / "out", "--report-to", value) == 1
    assert message in capsys.readouterr().err


def test_a_reporter_whose_package_is_missing_is_one_error_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert _train(checkpoint, data, tmp_path / "out", "--report-to", "wandb") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --report-to wandb needs the wandb package (pip install 'qwen3_kernels[train]')"]


def test_the_summary_says_what_the_run_amounts_to(checkpoint, data, tmp_path, capsys):
    assert _train(checkpoint, data, tmp_path / "out", "--steps", "2") == 0
    summary = next(line for line in capsys.readouterr().err.splitlines() if line.startswith("training:"))
    n_params = sum(p.numel() for p in QWEN.from_pretrained(checkpoint).parameters())
    assert f"{len(EXAMPLES):,} examples" in summary and "2 steps of 128 tokens" in summary
    assert f"{n_params:,} of {n_params:,} parameters trained" in summary


def test_the_loss_plot_draws_training_and_eval_loss(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": i, "loss": v} for i, v in enumerate([3.0, 2.5, float("nan"), float("inf"), 2.0], start=1)]
    rows[1]["eval_loss"], rows[-1]["eval_loss"] = 2.8, 2.4
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train.plot_loss(str(metrics), str(tmp_path / "loss.png"))
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not train.plot_loss(str(metrics), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists() and "loss.png needs matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize("form", ["parquet", "arrow", "datasets directory"])
def test_a_table_trains_as_the_jsonl_it_came_from(checkpoint, data, tmp_path, form):
    """The same records as parquet, an Arrow file or a `datasets.save_to_disk` directory: the same
    losses step for step as the JSONL (the same tokens, in the same order)."""
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_list([{"messages": e.get("messages"), "text": e.get("text")} for e in EXAMPLES])
    path = tmp_path / {"parquet": "data.parquet", "arrow": "data.arrow", "datasets directory": "saved"}[form]
    if form == "parquet":
        table.to_parquet(str(path))
    elif form == "arrow":
        import pyarrow as pa
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.data.schema) as writer:
            writer.write_table(table.data.table)
    else:
        table.save_to_disk(str(path))
    assert _train(checkpoint, data, tmp_path / "jsonl", "--steps", "2") == 0
    assert _train(checkpoint, path, tmp_path / "table", "--steps", "2") == 0
    assert [m["loss"] for m in _metrics(tmp_path / "table")] == [m["loss"] for m in _metrics(tmp_path / "jsonl")]
    assert (tmp_path / "table" / "tokenized").is_dir()  # tokenised once, read back by a resumed run
