"""`dvt demo`, the main job: the shipped Fashion-MNIST DVT end to end in both frameworks.

With the shipped weights (weights/manifest.json, sha256-checked) it reports per-exit
accuracy, the budget table against the static baseline, PyTorch/MindSpore agreement and
the measured early-exit speedup, and writes the plot. Without them it falls back to the
random-weight CPU demo of `dvt_torch.demo`.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dvt_shared.io_utils import sha256_file

from . import CommandError

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
SPEEDUP_IMAGES = 2048  # enough for stable timings; accuracy uses all 10,000
MANIFEST = WEIGHTS_DIR / "manifest.json"


def shipped_weights(role: str) -> tuple[Path, dict]:
    """Path and manifest entry of the shipped weights `role` ('dvt' or 'static'), sha256 checked."""
    manifest = json.loads(MANIFEST.read_text())
    if role not in manifest:
        raise CommandError(f"{MANIFEST} lists no {role!r} weights")
    entry = manifest[role]
    path = WEIGHTS_DIR / entry["file"]
    if not path.is_file():
        raise CommandError(f"{path} is listed in {MANIFEST} but missing")
    digest = sha256_file(path)
    if digest != entry["sha256"]:
        raise CommandError(f"{path}: sha256 {digest} does not match the manifest's {entry['sha256']}")
    return path, entry


def speedup(path: Path, images: np.ndarray, thresholds) -> list[dict]:
    """Wall time of every exit on every image vs the early-exit engine: PyTorch fp32 and bf16,
    MindSpore graph fp32 and fp16 (each through the same stages as its engine)."""
    import mindspore as ms
    import torch

    from dvt_mindspore.convert import from_canonical as ms_from_canonical
    from dvt_mindspore.dvt import DVT as MsDVT
    from dvt_mindspore.engine import AdaptiveDVT as MsAdaptiveDVT
    from dvt_torch.engine import AdaptiveDVT

    from . import read_weights
    from .inference import torch_model

    config, tensors, _, _ = read_weights(str(path))
    batch = 256
    rows = []
    model = torch_model(config, tensors)
    chunks = [torch.from_numpy(images[s:s + batch]) for s in range(0, len(images), batch)]
    for precision in ("fp32", "bf16"):
        rows.append(_timed(f"PyTorch {precision}", AdaptiveDVT(model, thresholds, precision=precision), chunks))
    ms.set_context(mode=ms.GRAPH_MODE)
    ms_model = ms_from_canonical(MsDVT(config), tensors)
    ms_chunks = [ms.Tensor(images[s:s + batch]) for s in range(0, len(images), batch)]
    for precision in ("fp32", "fp16"):
        engine = MsAdaptiveDVT(ms_model, thresholds, max_batch=batch, precision=precision)
        rows.append(_timed(f"MindSpore {precision}", engine, ms_chunks))
    return rows


def _timed(label, engine, chunks) -> dict:
    """Every exit on every image, then real early exit, through the same engine (the same compiled stages)."""
    from dvt_shared.exit_policy import check_thresholds
    from dvt_shared.flops import cumulative_flops

    def run_all():
        return [engine.predict(x) for x in chunks]

    config, thresholds = engine.config, engine.thresholds
    engine.thresholds = check_thresholds([1e8] * (config.num_exits - 1) + [-1e8], config.num_exits)
    run_all()  # warm-up (graph compilation)
    start = time.perf_counter()
    run_all()
    full_s = time.perf_counter() - start
    engine.thresholds = thresholds
    run_all()
    start = time.perf_counter()
    predictions = run_all()
    engine_s = time.perf_counter() - start
    spent = sum(int(p.macs.sum()) for p in predictions)
    count = sum(len(p.macs) for p in predictions)
    theoretical = cumulative_flops(config)[-1] * count / spent
    return {"backend": label, "every_exit_s": full_s, "engine_s": engine_s, "theoretical": theoretical,
            "practical": full_s / engine_s, "exit_index": np.concatenate([p.exit_index for p in predictions])}


def run_demo(args: argparse.Namespace) -> None:
    if not MANIFEST.is_file():
        from dvt_torch.demo import main as random_weight_demo

        print(f"no shipped weights ({MANIFEST} missing): running the random-weight CPU demo")
        random_weight_demo()
        return
    from .evaluate import evaluate, fashion_mnist, markdown

    start = time.perf_counter()
    dvt_path, entry = shipped_weights("dvt")
    static_path, _ = shipped_weights("static")
    out = Path(args.out)
    report = evaluate(str(dvt_path), str(static_path), args.data_dir, out, mindspore=True, precisions=("fp16", "bf16"))
    print(markdown(report))
    thresholds = entry["thresholds"]
    rows = speedup(dvt_path, fashion_mnist(args.data_dir)["test_images"][:SPEEDUP_IMAGES], thresholds)
    print(f"Real early exit on the first {SPEEDUP_IMAGES} test images (thresholds {thresholds}, batch 256):")
    print(f"{'backend':<16} {'every exit s':>12} {'engine s':>9} {'theoretical':>11} {'practical':>9} {'efficiency':>10}"
          f" {'same exit as PyTorch fp32':>26}")
    for r in rows:
        same = int((r["exit_index"] == rows[0]["exit_index"]).sum())
        print(f"{r['backend']:<16} {r['every_exit_s']:>12.2f} {r['engine_s']:>9.2f} {r['theoretical']:>11.2f} "
              f"{r['practical']:>9.2f} {r['practical'] / r['theoretical']:>10.2f} {same:>20} / {len(r['exit_index'])}")
    print(f"report: {out}/evaluation.md, {out}/accuracy_vs_gflops.png; demo took {time.perf_counter() - start:.0f} s")


def add_demo(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("demo", parents=[common], help="the main job: the shipped model end to end")
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--out", default="out", help="report folder (default out/)")
    parser.set_defaults(handler=run_demo)
