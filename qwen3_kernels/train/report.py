"""What a run tells: the progress (a tqdm bar on a terminal, a line per step in a log), the metrics
sent to TensorBoard and W&B (``--report-to``), and the loss plot."""

from __future__ import annotations

import json
import math
import os
import sys

REPORTERS = ("none", "tensorboard", "wandb")
_EXTRA = "pip install 'qwen3_kernels[train]'"


class Progress:
    """Rank 0's progress: a tqdm bar (step, loss, tokens/s, ETA) when stderr is a terminal, else one
    plain line per step, so a redirected log reads line by line."""

    def __init__(self, steps: int, first: int):
        self.steps, self.bar = steps, None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=steps, initial=first - 1, unit="step", file=sys.stderr, dynamic_ncols=True)

    def update(self, metrics: dict, seconds_per_step: float) -> None:
        if self.bar is not None:
            postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:,.0f}"}
            if "eval_loss" in metrics:
                postfix["eval"] = f"{metrics['eval_loss']:.4f}"
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
            return
        eta = int(seconds_per_step * (self.steps - metrics["step"]))
        line = (f"step {metrics['step']}/{self.steps}  loss {metrics['loss']:.4f}  "
                f"{metrics['tokens_per_s']:,.0f} tok/s  ETA {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")
        if "eval_loss" in metrics:
            line += f"  eval loss {metrics['eval_loss']:.4f}"
        print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def parse_report_to(text: str) -> tuple[str, ...]:
    """``--report-to``: comma-separated names out of ``REPORTERS``; ``none`` alone means none."""
    names = tuple(dict.fromkeys(name.strip().lower() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in REPORTERS]
    if unknown or not names:
        raise ValueError(f"--report-to {text!r}: choose from {', '.join(REPORTERS)} (comma-separated)")
    if "none" in names and len(names) > 1:
        raise ValueError(f"--report-to {text!r}: 'none' cannot be combined with another reporter")
    return tuple(name for name in names if name != "none")


def check_reporters(names: tuple[str, ...]) -> None:
    """Each reporter's package, checked before anything loads."""
    for name, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if name in names:
            try:
                __import__(module)
            except ImportError:
                raise ImportError(f"--report-to {name} needs the {module} package ({_EXTRA})") from None


class Reporters:
    """The metrics of each step sent to TensorBoard (event files in ``<out>/tensorboard``, through
    ``torch.utils.tensorboard``) and W&B (``wandb``; ``WANDB_MODE=offline`` works without a network,
    runs go to ``<out>/wandb``); rank 0 only. Keys as in metrics.jsonl, under ``train/`` (``eval/``
    for the eval loss)."""

    def __init__(self, names: tuple[str, ...], out: str, config: dict):
        self.writers = []
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(log_dir=os.path.join(out, "tensorboard"))
            self.writers.append(self._to_tensorboard)
        if "wandb" in names:
            import wandb
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "qwen3-kernels"), dir=out, config=config,
                                    name=os.environ.get("WANDB_NAME") or os.path.basename(os.path.abspath(out)))
            self.writers.append(self._to_wandb)

    @staticmethod
    def _scalars(metrics: dict) -> dict:
        return {(f"eval/{key.removeprefix('eval_')}" if key.startswith("eval_") else f"train/{key}"): value
                for key, value in metrics.items() if key != "step" and isinstance(value, (int, float))}

    def _to_tensorboard(self, metrics: dict) -> None:
        for key, value in self._scalars(metrics).items():
            self.tensorboard.add_scalar(key, value, metrics["step"])

    def _to_wandb(self, metrics: dict) -> None:
        self.wandb.log(self._scalars(metrics), step=metrics["step"])

    def log(self, metrics: dict) -> None:
        for write in self.writers:
            write(metrics)

    def close(self) -> None:
        if hasattr(self, "tensorboard"):
            self.tensorboard.close()
        if hasattr(self, "wandb"):
            self.wandb.finish()


def plot_loss(metrics_file: str, png: str, width: int = 640, height: int = 360) -> bool:
    """``loss.png``: the training loss per step and, where the run evaluated, the eval loss, with
    labelled axes (matplotlib, from the training extra). Non-finite losses are left out. Returns
    False, with a note, where matplotlib is not installed."""
    with open(metrics_file) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if math.isfinite(r.get("loss", math.nan))]
    evals = [(r["step"], r["eval_loss"]) for r in rows if math.isfinite(r.get("eval_loss", math.nan))]
    if not train and not evals:
        return False
    try:
        import matplotlib
    except ImportError:
        print(f"note: loss.png needs matplotlib ({_EXTRA}); the losses are in {metrics_file}", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="tight")
    ax = fig.add_subplot()
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (cross-entropy per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(png)
    return True
