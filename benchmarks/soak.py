"""Soak run of the adaptive engine: the Fashion-MNIST test set, pass after pass, per backend.

Each backend (PyTorch eager, MindSpore graph mode, ONNX Runtime) runs in a process of its
own. It loads the shipped weights (sha256 checked against weights/manifest.json) with the
thresholds stored in them, classifies the test images with real early exit --passes times
in a row, and records after every pass its resident memory and throughput. A backend
holds when resident memory after every pass stays within 5% of that after the first (no
leak), the last pass's throughput is within 10% of the first's (no slowdown), and every
pass sends every image to the same exit with the same class. An unmeasured warm-up on the
first WARM_UP_BATCHES batches (graph compilation, first allocations) precedes the first pass.

Prints a table and writes a PNG of resident memory and throughput per pass. Not a test:
run it on a quiet machine.

    .venv/bin/python benchmarks/soak.py [--passes 20] [--limit 10000] [--backends torch mindspore onnx]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import print_table, run_worker

BACKENDS = ("torch", "mindspore", "onnx")
RSS_GROWTH_LIMIT = 0.05
WARM_UP_BATCHES = 4
THROUGHPUT_CHANGE_LIMIT = 0.10
DEFAULT_PLOT = Path(__file__).resolve().parents[1] / "out" / "soak.png"


def resident_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def shipped_model():
    """(config, tensors, thresholds) of the shipped DVT, its file checked against the manifest."""
    from dvt_cli.demo import shipped_weights
    from dvt_shared.weight_format import load_canonical

    path, _ = shipped_weights("dvt")
    tensors, metadata = load_canonical(path)
    if not metadata.thresholds:
        raise SystemExit(f"{path} holds no thresholds")
    return metadata.config, tensors, metadata.thresholds


def fashion_mnist_test_images(data_dir: str | None, limit: int) -> np.ndarray:
    from dvt_shared.datasets import load_fashion_mnist, normalise_fashion_mnist

    return normalise_fashion_mnist(load_fashion_mnist(data_dir)["test_images"][:limit])


def torch_engine(config, tensors, thresholds, batch: int, threads: int | None):
    import torch

    from dvt_torch.convert import from_canonical
    from dvt_torch.dvt import DVT
    from dvt_torch.engine import AdaptiveDVT

    if threads:
        torch.set_num_threads(threads)
    engine = AdaptiveDVT(from_canonical(DVT(config), tensors), thresholds, max_batch=batch)
    return engine, torch.from_numpy


def mindspore_engine(config, tensors, thresholds, batch: int, threads: int | None):
    import mindspore as ms

    from dvt_mindspore.convert import from_canonical
    from dvt_mindspore.dvt import DVT
    from dvt_mindspore.engine import AdaptiveDVT

    ms.set_context(mode=ms.GRAPH_MODE)
    if threads:
        ms.device_context.cpu.op_tuning.threads_num(threads)
    engine = AdaptiveDVT(from_canonical(DVT(config), tensors), thresholds, max_batch=batch)
    return engine, ms.Tensor


def onnx_engine(config, tensors, thresholds, batch: int, threads: int | None):
    import tempfile

    from dvt_onnx import OnnxAdaptiveDVT
    from dvt_torch.convert import from_canonical
    from dvt_torch.dvt import DVT
    from dvt_torch.export import export_onnx

    folder = tempfile.mkdtemp(prefix="dvt_soak_onnx_")
    export_onnx(from_canonical(DVT(config), tensors), folder)
    return OnnxAdaptiveDVT(folder, thresholds, max_batch=batch, threads=threads), lambda x: x


ENGINES = {"torch": torch_engine, "mindspore": mindspore_engine, "onnx": onnx_engine}


def soak(backend: str, passes: int, limit: int, batch: int, threads: int | None, data_dir: str | None) -> dict:
    """Resident memory and throughput after every pass of one backend over the test images."""
    config, tensors, thresholds = shipped_model()
    images = fashion_mnist_test_images(data_dir, limit)
    engine, to_input = ENGINES[backend](config, tensors, thresholds, batch, threads)
    x = to_input(images)
    engine.predict(to_input(images[:WARM_UP_BATCHES * batch]))
    rss, throughput, first, stable = [], [], None, True
    for index in range(passes):
        start = time.perf_counter()
        prediction = engine.predict(x)
        throughput.append(len(images) / (time.perf_counter() - start))
        rss.append(resident_mb())
        if first is None:
            first = prediction
        stable &= (np.array_equal(prediction.exit_index, first.exit_index)
                   and np.array_equal(prediction.classes, first.classes))
        print(f"{backend} pass {index + 1}/{passes}: {throughput[-1]:.0f} img/s, {rss[-1]:.0f} MB", file=sys.stderr)
    return {"backend": backend, "images": len(images), "rss_mb": rss, "images_per_s": throughput,
            "same_decisions": stable, "undecided": first.undecided,
            "exit_counts": np.bincount(first.exit_index[first.exit_index >= 0], minlength=config.num_exits).tolist()}


def verdict(result: dict) -> tuple[float, float, bool]:
    """(RSS growth after the first pass, throughput change last vs first, holds)."""
    rss, speed = result["rss_mb"], result["images_per_s"]
    growth = max(rss) / rss[0] - 1
    change = speed[-1] / speed[0] - 1
    holds = growth <= RSS_GROWTH_LIMIT and abs(change) <= THROUGHPUT_CHANGE_LIMIT and result["same_decisions"]
    return growth, change, holds


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from dvt_shared.io_utils import atomic_write_png

    fig, (memory, speed) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for result in results:
        passes = np.arange(1, len(result["rss_mb"]) + 1)
        memory.plot(passes, result["rss_mb"], "o-", label=result["backend"])
        speed.plot(passes, result["images_per_s"], "o-", label=result["backend"])
    memory.set(xlabel="pass", ylabel="resident memory after the pass (MB)", title="memory")
    speed.set(xlabel="pass", ylabel="images / s", title="throughput")
    for ax in (memory, speed):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_png(path, fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--limit", type=int, default=10000, help="test images per pass (default: all 10,000)")
    parser.add_argument("--batch", type=int, default=256, help="the engine's max_batch")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per backend (default: its own)")
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help=f"PNG to write (default {DEFAULT_PLOT})")
    parser.add_argument("--worker", choices=BACKENDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.passes < 2 or args.limit < 1 or args.batch < 1:
        parser.error("--passes must be >= 2, --limit and --batch >= 1")

    options = ["--passes", str(args.passes), "--limit", str(args.limit), "--batch", str(args.batch)]
    options += ["--threads", str(args.threads)] if args.threads else []
    options += ["--data-dir", args.data_dir] if args.data_dir else []
    if args.worker:
        print(json.dumps(soak(args.worker, args.passes, args.limit, args.batch, args.threads, args.data_dir)))
        return 0

    results, rows = [], []
    for backend in args.backends:
        print(f"soaking {backend}: {args.passes} passes ...", file=sys.stderr, flush=True)
        result = run_worker(os.path.abspath(__file__), backend, options)
        growth, change, holds = verdict(result)
        results.append(result)
        rss, speed = result["rss_mb"], result["images_per_s"]
        rows.append([backend, result["images"], "/".join(map(str, result["exit_counts"])), len(rss), speed[0],
                     speed[-1], f"{change:+.1%}", rss[0], max(rss),
                     rss[-1], f"{growth:+.1%}", "yes" if result["same_decisions"] else "NO",
                     "holds" if holds else "FAILS"])
    print_table(["backend", "images", "per exit", "passes", "img/s first", "img/s last", "change", "RSS MB first",
                 "RSS MB max", "RSS MB last", "RSS growth", "same exits",
                 f"verdict (<= {RSS_GROWTH_LIMIT:.0%} RSS, +-{THROUGHPUT_CHANGE_LIMIT:.0%} speed)"], rows)
    plot(results, args.plot)
    print(f"plot: {args.plot}")
    return 0 if all(row[-1] == "holds" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
