"""``qwen3-kernels train --lora-rank R`` (CPU, gloo, a tiny checkpoint): the PEFT adapter it writes
loads in PEFT on transformers' Qwen3 with the logits of our model with the adapter merged (and of
--merge's checkpoint); only the adapters get gradients, the base stays as it was; two ranks equal
one process and an interrupted run resumes exactly (dropout on, its masks drawn per micro-batch);
Qwen3-MoE adapts its attention; bad LoRA options are one error line."""

import json
import os
import re

import pytest
import torch
from test_train import STEPS, _metrics, _torchrun_2_ranks, _train, checkpoint, data  # noqa: F401
from test_train_moe import moe_checkpoint  # noqa: F401
from test_train_options import _direct_eval_loss, eval_data  # noqa: F401

from qwen3_kernels import QWEN, train

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# lr 1e-2 over 3 steps: lora_B moves well away from 0, so the adapters change the logits
LORA = ["--lora-rank", "4", "--lora-alpha", "8"]


def _adapter(out) -> dict:
    from safetensors.torch import load_file
    return load_file(out / "adapter_model.safetensors")


def _merged_by_hand(base, adapter: dict, scale: float) -> QWEN:
    """Our model of ``base`` with each adapter added to its projection: W + scale * B @ A."""
    model = QWEN.from_pretrained(base)
    modules = dict(model.named_modules())
    for name, a in adapter.items():
        m = re.fullmatch(r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_A\.weight", name)
        if m:
            layer, part, proj = m.groups()
            b = adapter[name.replace("lora_A", "lora_B")]
            linear = modules[f"blocks.{layer}.{'attn' if part == 'self_attn' else 'ffn'}.{proj}"]
            with torch.no_grad():
                linear.weight += scale * (b @ a)
    return model.eval()


def _ids(vocab_size):
    return torch.randint(0, vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))


def test_the_adapter_loads_in_peft_with_the_logits_of_our_merged_model(checkpoint, data, tmp_path, capsys,
                                                                       monkeypatch):
    out = tmp_path / "out"
    with_grads = []
    original = train.Trainer.train_step

    def spy_on_gradients(self, step):  # which parameters hold a gradient when the optimizer steps
        step_once = self.optimizer.step

        def step_and_record(*a, **k):
            with_grads.append({n for n, p in self.model.named_parameters() if p.grad is not None})
            return step_once(*a, **k)
        self.optimizer.step = step_and_record
        try:
            return original(self, step)
        finally:
            del self.optimizer.step

    monkeypatch.setattr(train.Trainer, "train_step", spy_on_gradients)
    assert _train(checkpoint, data, out, "--steps", "3", *LORA, "--merge") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8, "CAUSAL_LM")
    assert sorted(config["target_modules"]) == sorted(SEVEN)
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert (out / "tokenizer.json").is_file() and (out / "merged" / "tokenizer.json").is_file()
    # only the adapters had gradients (the frozen head's included: the loss computed none for it)
    layers = QWEN.from_pretrained(checkpoint).config.num_layers
    adapters = {f"blocks.{i}.{'attn' if p in SEVEN[:4] else 'ffn'}.{p}.lora_{ab}.default.weight"
                for i in range(layers) for p in SEVEN for ab in "AB"}
    assert with_grads == [adapters] * 3
    # the summary counts the adapters as the trained parameters
    adapter = _adapter(out)
    assert len(adapter) == len(adapters)
    trained = sum(t.numel() for t in adapter.values())
    assert f"{trained:,} of " in capsys.readouterr().err
    assert all(t.abs().max() > 0 for name, t in adapter.items() if "lora_B" in name)  # B starts at 0: it moved

    ids = _ids(QWEN.from_pretrained(checkpoint).config.vocab_size)
    ours = _merged_by_hand(checkpoint, adapter, scale=8 / 4)
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    merged = QWEN.from_pretrained(out / "merged").eval()
    with torch.no_grad():
        expected = ours(ids)
        assert not torch.allclose(expected, QWEN.from_pretrained(checkpoint)(ids), atol=1e-3)  # the adapter counts
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(ids), expected, rtol=1e-5, atol=1e-5)


def test_the_frozen_base_is_unchanged(checkpoint, data, tmp_path, monkeypatch):
    """--merge's checkpoint holds the base's weights where no adapter is, bit for bit, and base + B A
    on the adapted projections. The q/k/v projections, one with an adapter, run one by one; gate and
    up, plain Linears, still as one packed GEMM."""
    from safetensors.torch import load_file

    from qwen3_kernels.ops import reference
    packed, packed_linear = [], reference.packed_linear
    monkeypatch.setattr(reference, "packed_linear", lambda x, w, *a: packed.append(len(w)) or packed_linear(x, w, *a))
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "2", *LORA, "--lora-targets", "q_proj,down_proj", "--merge") == 0
    before, after = load_file(checkpoint / "model.safetensors"), load_file(out / "merged" / "model.safetensors")
    adapter = _adapter(out)
    assert set(after) == set(before)
    adapted = 0
    for name, weight in before.items():
        lora_a = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if lora_a in adapter:
            adapted += 1
            delta = 2.0 * adapter[lora_a.replace("lora_A", "lora_B")] @ adapter[lora_a]
            torch.testing.assert_close(after[name], weight + delta, rtol=1e-6, atol=1e-6, msg=name)
        else:
            assert torch.equal(after[name], weight), name
    assert adapted == 2 * QWEN.from_pretrained(checkpoint).config.num_layers
    assert packed and set(packed) == {2}


def test_lora_on_two_ranks_matches_one_process(checkpoint, data, tmp_path):
    """FSDP2 shards the frozen base and the adapters over two gloo ranks: the losses and the adapters
    equal one process's, dropout included (each micro-batch draws its masks from its own seed)."""
    one, two = tmp_path / "one", tmp_path / "two"
    options = ("--steps", "3", *LORA, "--lora-dropout", "0.1")
    assert _train(checkpoint, data, one, *options) == 0
    result = _torchrun_2_ranks(checkpoint, data, two, *options)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(_metrics(one), _metrics(two), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    mine, theirs = _adapter(one), _adapter(two)
    assert set(mine) == set(theirs)
    for name in mine:
        torch.testing.assert_close(theirs[name], mine[name], rtol=1e-5, atol=1e-5, msg=name)
    # the dropout did something: without it the losses differ
    assert _train(checkpoint, data, tmp_path / "plain", "--steps", "3", *LORA) == 0
    assert _metrics(tmp_path / "plain")[-1]["loss"] != pytest.approx(_metrics(one)[-1]["loss"], rel=1e-6)


def test_an_interrupted_lora_run_resumes_exactly(checkpoint, data, tmp_path, monkeypatch):
    """Ctrl-C during step 3 saves step 2 (the adapters and their AdamW state, not the frozen base);
    --resume gives the uninterrupted run's losses and adapters."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    options = ("--steps", "4", *LORA, "--lora-dropout", "0.1")
    assert _train(checkpoint, data, whole, *options) == 0
    original = train.Trainer.train_step

    def ctrl_c_at_step_3(self, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, step)

    monkeypatch.setattr(train.Trainer, "train_step", ctrl_c_at_step_3)
    assert _train(checkpoint, data, resumed, *options) == 130
    assert os.listdir(resumed / "checkpoints") == ["step_0000002"]
    monkeypatch.setattr(train.Trainer, "train_step", original)
    assert _train(checkpoint, data, resumed, *options, "--resume") == 0
    assert [m["loss"] for m in _metrics(resumed)] == pytest.approx([m["loss"] for m in _metrics(whole)], rel=1e-6)
    for name, weight in _adapter(whole).items():
        torch.testing.assert_close(_adapter(resumed)[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_the_eval_loss_is_the_merged_models_without_dropout(checkpoint, data, eval_data, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "2", *LORA, "--lora-dropout", "0.5", "--eval-data", str(eval_data),
                  "--merge") == 0
    loss, count = _direct_eval_loss(out / "merged", eval_data)
    assert _metrics(out)[-1]["eval_tokens"] == count
    assert _metrics(out)[-1]["eval_loss"] == pytest.approx(loss, rel=1e-5)


def test_activation_checkpointing_recomputes_the_same_dropout(checkpoint, data, tmp_path):
    plain, recomputed = tmp_path / "plain", tmp_path / "recomputed"
    options = ("--steps", "2", *LORA, "--lora-dropout", "0.2")
    assert _train(checkpoint, data, plain, *options) == 0
    assert _train(checkpoint, data, recomputed, *options, "--activation-checkpointing") == 0
    assert [m["loss"] for m in _metrics(recomputed)] == pytest.approx([m["loss"] for m in _metrics(plain)], rel=1e-6)
    for name, weight in _adapter(plain).items():
        torch.testing.assert_close(_adapter(recomputed)[name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_a_lora_run_over_a_full_run_leaves_no_full_model(checkpoint, data, tmp_path):
    """--overwrite: the earlier run's exported model goes, so the adapter is all the model there is;
    the other way round, the adapter goes."""
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "1") == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert _train(checkpoint, data, out, "--steps", "1", *LORA, "--overwrite") == 0
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["inference_mode"] is True
    assert _train(checkpoint, data, out, "--steps", "1", "--overwrite") == 0
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    assert (out / "model.safetensors").is_file()


def test_the_checkpoint_holds_the_adapters_not_the_base(checkpoint, data, tmp_path):
    import torch.distributed.checkpoint as dcp
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "1", *LORA, "--lora-targets", "v_proj") == 0
    reader = dcp.FileSystemReader(str(out / "checkpoints" / "step_0000001"))
    models = {k.removeprefix("model.") for k in reader.read_metadata().state_dict_metadata if k.startswith("model.")}
    layers = QWEN.from_pretrained(checkpoint).config.num_layers
    assert models == {f"blocks.{i}.attn.v_proj.lora_{ab}.default.weight" for i in range(layers) for ab in "AB"}


def test_lora_on_qwen3_moe_adapts_the_attention(moe_checkpoint, data, tmp_path):  # noqa: F811
    """The experts are stacked parameters, so the default targets are the four attention projections;
    the adapter loads in PEFT on transformers' Qwen3MoeForCausalLM with our merged model's logits."""
    out = tmp_path / "out"
    assert _train(moe_checkpoint, data, out, "--steps", "2", *LORA, "--merge") == 0
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == sorted(SEVEN[:4])
    merged = QWEN.from_pretrained(out / "merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(moe_checkpoint, attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(base, out).eval()
    ids = _ids(merged.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, merged(ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options, message", [
    (["--lora-targets", "q_proj,qproj"], "--lora-targets: 'qproj' is not a projection of a Qwen3 block (choose from "
                                         "q_proj, k_proj"),
    (["--lora-targets", ","], "--lora-targets ',': no projection named"),
    (["--lora-alpha", "8"], "--lora-alpha: LoRA options, but --lora-rank is 0"),
    (["--merge", "--lora-dropout", "0.1"], "--lora-dropout, --merge: LoRA options, but --lora-rank is 0"),
])
def test_bad_lora_options_are_one_line(checkpoint, data, tmp_path, capsys, options, message):
    lora = ["--lora-rank", "4"] if "--lora-targets" in options else []
    assert _train(checkpoint, data, tmp_path / "out", "--steps", "1", *lora, *options) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err, err


def test_an_expert_target_on_qwen3_moe_is_named(moe_checkpoint, data, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    assert _train(moe_checkpoint, data, out, "--steps", "1", *LORA, "--lora-targets", "q_proj,up_proj") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --lora-targets: 'up_proj' is in the feed-forward layers, which in this Qwen3-MoE "
                          "model are stacked experts") and "\n" not in err, err


def test_resuming_with_other_lora_options_is_refused(checkpoint, data, tmp_path, capsys):
    out = tmp_path / "out"
    assert _train(checkpoint, data, out, "--steps", "1", *LORA) == 0
    # the default targets spelled out are the same run
    assert _train(checkpoint, data, out, "--steps", "1", *LORA, "--lora-targets", ",".join(SEVEN), "--resume") == 0
    capsys.readouterr()
    assert _train(checkpoint, data, out, "--steps", "2", "--lora-rank", "8", "--resume") == 1
    err = capsys.readouterr().err
    assert "--lora-rank 4 -> 8" in err and "--lora-alpha 8.0 -> 16.0" in err


def test_the_fused_loss_computes_no_gradient_for_the_frozen_head(checkpoint, data, tmp_path, monkeypatch,
                                                                 triton_everywhere):
    """Through the Triton kernels (the interpreter on the CPU): the linear cross-entropy's backward is
    asked for the hidden states' gradient only, never the frozen (tied) head's, and the packed q/k/v
    and gate/up GEMM gives way to the LoRA layers' own forwards."""
    from qwen3_kernels import ops
    from qwen3_kernels.ops.triton import cross_entropy
    asked, packed = [], []
    backward, packed_linear = cross_entropy.linear_cross_entropy_backward, ops.packed_linear

    def spy_backward(*args):
        asked.append(args[-2:])  # (need_hidden, need_weight)
        return backward(*args)

    monkeypatch.setattr(cross_entropy, "linear_cross_entropy_backward", spy_backward)
    monkeypatch.setattr(ops, "packed_linear", lambda x, w, *a: packed.append(len(w)) or packed_linear(x, w, *a))
    assert _train(checkpoint, data, tmp_path / "out", "--steps", "1", *LORA, "--fused") == 0
    assert asked and set(asked) == {(True, False)}
    assert not packed


def test_lora_without_peft_is_one_line(checkpoint, data, tmp_path, capsys, monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name, *a))
    assert _train(checkpoint, data, tmp_path / "out", "--steps", "1", *LORA) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: --lora-rank: LoRA runs through PEFT, which is not installed (pip install peft)", err


@pytest.mark.parametrize("flag, value, message", [
    ("--lora-rank", "-1", "must be an integer >= 0, got -1"),
    ("--lora-alpha", "0", "must be a finite number > 0, got 0.0"),
    ("--lora-dropout", "1", "must be in [0, 1), got 1.0"),
])
def test_bad_lora_values_are_refused_on_the_command_line(checkpoint, data, tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_info:
        _train(checkpoint, data, tmp_path / "out", flag, value)
    assert exit_info.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err
