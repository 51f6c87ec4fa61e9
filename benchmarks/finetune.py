"""Fine-tuning against training from scratch, at equal epochs, on an image folder made from Fashion-MNIST.

Writes a class subset of Fashion-MNIST as grey PNGs (train/ from its training images, val/ from its
test images), then trains the Fashion-MNIST DVT on it twice with the same recipe: from the shipped
weights (`--init-weights`, heads re-sized to the subset's classes) and from random weights. Prints
per-exit validation accuracy per epoch and plots both curves. The shipped model has seen these
training images under their 10-class labels, so this shows the machinery and the head-start a
trained backbone gives, not transfer to a new domain.

    .venv/bin/python benchmarks/finetune.py [--classes 0 1 2 3 4] [--per-class 200] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from common import print_table

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "weights" / "dvt_t2t_vit_fmnist.safetensors"


def write_folder(root: Path, classes: list[int], per_class: int, data_dir: str | None) -> None:
    from PIL import Image

    from dvt_shared.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

    data = load_fashion_mnist(data_dir)
    rng = np.random.default_rng(0)
    for split, images, labels, count in (("train", data["train_images"], data["train_labels"], per_class),
                                         ("val", data["test_images"], data["test_labels"], per_class // 2)):
        for label in classes:
            folder = root / split / FASHION_MNIST_CLASSES[label].replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            for i in rng.permutation(np.flatnonzero(labels == label))[:count]:
                Image.fromarray(images[i], mode="L").save(folder / f"{i}.png")


def run(out: Path, folder: Path, epochs: int, init: Path | None) -> list[dict]:
    from dvt_shared.train_options import add_train_arguments
    from dvt_torch.train import train

    argv = ["--data", str(folder), "--epochs", str(epochs), "--batch-size", "64", "--lr", "5e-4", "--warmup-epochs",
            "0.5", "--workers", "0", "--threads", "1", "--no-progress", "--out", str(out)]
    if init is not None:
        argv += ["--init-weights", str(init)]
    # a rerun replaces this script's own earlier run
    shutil.rmtree(out, ignore_errors=True)
    train(add_train_arguments(argparse.ArgumentParser()).parse_args(argv))
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def plot(logs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dvt_shared.io_utils import atomic_write_png

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=120)
    for label, log in logs.items():
        ax.plot([r["epoch"] for r in log], [r["test_acc"][-1] for r in log], "o-", label=f"{label}, last exit")
        ax.plot([r["epoch"] for r in log], [r["test_acc"][0] for r in log], "s--", label=f"{label}, first exit")
    ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title="fine-tuned vs from scratch, equal epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_png(path, fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="Fashion-MNIST labels kept")
    parser.add_argument("--per-class", type=int, default=200,
                        help="training images per class (half as many to validate)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--out", default="out/finetune")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    out = Path(args.out)
    folder = out / "data"
    if not folder.exists():
        write_folder(folder, args.classes, args.per_class, args.data_dir)
    logs = {"fine-tuned": run(out / "finetuned", folder, args.epochs, SHIPPED),
            "from scratch": run(out / "scratch", folder, args.epochs, None)}
    rows = [[label, r["epoch"], " / ".join(f"{a:.1f}" for a in r["test_acc"]), f"{r['loss']:.3f}"]
            for label, log in logs.items() for r in log]
    print(f"{len(args.classes)} classes, {args.per_class} training images each, {args.epochs} epochs, same recipe")
    print_table(["start", "epoch", "val acc per exit (%)", "train loss"], rows)
    plot(logs, out / "finetune.png")
    print(f"plot: {out / 'finetune.png'}")


if __name__ == "__main__":
    main()
