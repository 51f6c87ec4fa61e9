"""What a training run writes for people and for serving: OUT/log.jsonl (one line per epoch), its
curves in OUT/log.png, OUT/best.safetensors (the weights, raw or EMA, whose last exit scored best on
the evaluation set so far, as the release keeps its best checkpoint) and OUT/final.safetensors
(OUT/final_ema.safetensors too with --ema). Every file is written atomically, by rank 0.
"""
from __future__ import annotations

import json
import os

import torch

from dvt_shared.data_config import DataConfig
from dvt_shared.io_utils import atomic_write_png, atomic_writer
from dvt_shared.models import ModelConfig, model_gflops
from dvt_shared.weight_format import WeightMetadata, save_canonical

from .convert import to_canonical

LOG_NAME = "log.jsonl"
PLOT_NAME = "log.png"
BEST_NAME = "best.safetensors"
FINAL_NAME = "final.safetensors"
FINAL_EMA_NAME = "final_ema.safetensors"


def write_epoch_files(out: str, history: list[dict]) -> None:
    """OUT/log.jsonl (one line per epoch) and, once there is an epoch, its curves in OUT/log.png."""
    with atomic_writer(os.path.join(out, LOG_NAME), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in history)
    if history:
        plot_history(history, os.path.join(out, PLOT_NAME))


def history_figure(history: list[dict]):
    """A matplotlib figure (Agg) of each exit's test (and train) accuracy and the training loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    for k in range(len(history[0]["test_acc"])):
        line, = acc_ax.plot(epochs, [r["test_acc"][k] for r in history], "o-", label=f"exit {k} test")
        acc_ax.plot(epochs, [r["train_acc"][k] for r in history], ":", color=line.get_color(), label=f"exit {k} train")
    if "test_acc_ema" in history[0]:
        acc_ax.plot(epochs, [r["test_acc_ema"][-1] for r in history], "s--", color="black", label="last exit, EMA test")
    acc_ax.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy per exit")
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7)
    loss_ax.plot(epochs, [r["loss"] for r in history], "o-", color="tab:red", label="training loss")
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    loss_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_history(history: list[dict], path: str) -> None:
    """history_figure as a PNG, written atomically."""
    atomic_write_png(path, history_figure(history))


def save_weights(path: str, model: torch.nn.Module, config: ModelConfig, recipe: dict, metrics: dict,
                 data_config: DataConfig | None = None) -> None:
    """`model`'s weights in the canonical format, with its config, exit costs, recipe, `metrics` and the data
    config it was trained with (class names, input size, normalisation)."""
    metadata = WeightMetadata(
        config=config, exit_flops=list(model_gflops(config)), provenance=json.dumps(recipe, sort_keys=True),
        extra={k: json.dumps(v) for k, v in metrics.items()}, data_config=data_config,
    )
    save_canonical(path, to_canonical(model), metadata)


def epoch_candidates(record: dict) -> list[tuple[float, str]]:
    """(last-exit test accuracy, 'model' or 'ema') of an epoch's record: what best.safetensors chooses from."""
    candidates = [(record["test_acc"][-1], "model")]
    if "test_acc_ema" in record:
        candidates.append((record["test_acc_ema"][-1], "ema"))
    return candidates


def best_so_far(history: list[dict]) -> tuple[float, str, int] | None:
    """(accuracy, source, epoch) of the best last exit over `history`; the earliest wins a tie."""
    best = None
    for record in history:
        for accuracy, source in epoch_candidates(record):
            if best is None or accuracy > best[0]:
                best = (accuracy, source, record["epoch"])
    return best


def run_metrics(history: list[dict], step: int, completed: bool, elapsed: float) -> dict:
    """The run's summary, printed at the end and stored in its weight files."""
    last = history[-1] if history else {}
    metrics = {
        "completed": completed, "epochs": len(history), "steps": step, "train_time_s": round(elapsed, 2),
        "train_loss": last.get("loss"), "train_acc": last.get("train_acc"), "test_acc": last.get("test_acc"),
    }
    if history:
        metrics["best_test_acc"] = [max(r["test_acc"][k] for r in history) for k in range(len(last["test_acc"]))]
        accuracy, source, epoch = best_so_far(history)
        metrics["best"] = {"test_acc_last_exit": accuracy, "weights": source, "epoch": epoch}
    if "test_acc_ema" in last:
        metrics["test_acc_ema"] = last["test_acc_ema"]
    return metrics
