"""`dvt demo`, the main job: the shipped Fashion-MNIST DVT end to end in both frameworks.

With the shipped weights (weights/manifest.json, sha256-checked) it reports per-exit
accuracy, the budget table against the static baseline, PyTorch/MindSpore agreement and
the measured early-exit speedup, and writes the plot. Without them it falls back to the
random-weight CPU demo (`random_weight_demo`).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dvt_shared.io_utils import sha256_file

from . import CommandError, backends

if TYPE_CHECKING:  # imported where it runs, as every command's modules are
    from .evaluate import Evaluated

WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
# The first 2048 test images are timed and run at reduced precision (MindSpore's fp16 runs slowly on a
# CPU; benchmarks/precision_agreement.py runs all 10,000); accuracy and the fp32 agreement use all.
SPEEDUP_IMAGES = 2048
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


# Each timing is the best of 3 runs: the first may compile (MindSpore graphs per batch shape), and a run
# of 2048 images is short enough for one burst of another process to show in it.
TIMED_RUNS = 3
# The engines the demo times: (backend, precision, label), every backend of the table that runs models, at
# fp32 and bf16 where it computes bf16. fp16 is left out: on this CPU it is emulated (MindSpore's stands for
# Ascend's Cube unit, PyTorch's for CUDA autocast) and times nothing a deployment runs; its decisions are checked.
SPEEDUP_RUNS = tuple(
    (name, precision, f"{backends.BACKENDS[name].label} {precision}")
    for name in backends.model_backends() for precision in ("fp32", "bf16")
    if precision in backends.BACKENDS[name].precisions
)


def speedup(dvt: Evaluated, images: np.ndarray, thresholds) -> list[dict]:
    """Wall time of every exit on every image vs the early-exit engine at `thresholds`, for each run of
    SPEEDUP_RUNS, both through the same engine: the one the evaluation's agreement checks ran
    (`Evaluated.engine`), so through stages it has already compiled."""
    batch = 256
    rows = []
    for name, precision, label in SPEEDUP_RUNS:
        facade = backends.load(name)
        chunks = [facade.tensor(images[s:s + batch]) for s in range(0, len(images), batch)]
        rows.append(_timed(label, dvt.engine(name, precision), chunks, thresholds))
    return rows


def _timed(label, engine, chunks, thresholds) -> dict:
    """Every exit on every image, then real early exit at `thresholds`, through the same engine: each
    the best of TIMED_RUNS runs (see there)."""
    from dvt_shared.exit_policy import last_exit_only
    from dvt_shared.flops import cumulative_flops

    def best_of_runs():
        times = []
        for _ in range(TIMED_RUNS):
            start = time.perf_counter()
            predictions = [engine.predict(x) for x in chunks]
            times.append(time.perf_counter() - start)
        return min(times), predictions

    config = engine.config
    engine.set_thresholds(last_exit_only(config.num_exits))
    full_s, _ = best_of_runs()
    engine.set_thresholds(thresholds)
    engine_s, predictions = best_of_runs()
    spent = sum(int(p.macs.sum()) for p in predictions)
    count = sum(len(p.macs) for p in predictions)
    theoretical = cumulative_flops(config)[-1] * count / spent
    return {"backend": label, "every_exit_s": full_s, "engine_s": engine_s, "theoretical": theoretical,
            "practical": full_s / engine_s, "exit_index": np.concatenate([p.exit_index for p in predictions])}


def run_demo(args: argparse.Namespace) -> None:
    if not MANIFEST.is_file():
        print(f"no shipped weights ({MANIFEST} missing): running the random-weight CPU demo")
        random_weight_demo()
        return
    from .evaluate import evaluate, fashion_mnist, markdown

    start = time.perf_counter()
    dvt_path, entry = shipped_weights("dvt")
    static_path, _ = shipped_weights("static")
    out = Path(args.out)
    data = fashion_mnist(args.data_dir)
    report, dvt = evaluate(
        str(dvt_path), str(static_path), data, out, agreement=True,
        precisions=(("mindspore", "fp16"), ("torch", "bf16")), precision_images=SPEEDUP_IMAGES,
    )
    print(markdown(report))
    thresholds = entry["thresholds"]
    rows = speedup(dvt, dvt.inputs["test_images"][:SPEEDUP_IMAGES], thresholds)
    print(f"Real early exit on the first {SPEEDUP_IMAGES} test images (thresholds {thresholds}, batch 256):")
    print(f"{'backend':<16} {'every exit s':>12} {'engine s':>9} {'theoretical':>11} {'practical':>9}"
          f" {'efficiency':>10} {'same exit as PyTorch fp32':>26}")
    for r in rows:
        same = int((r["exit_index"] == rows[0]["exit_index"]).sum())
        print(f"{r['backend']:<16} {r['every_exit_s']:>12.2f} {r['engine_s']:>9.2f} {r['theoretical']:>11.2f} "
              f"{r['practical']:>9.2f} {r['practical'] / r['theoretical']:>10.2f} {same:>20} / {len(r['exit_index'])}")
    print(f"report: {out}/evaluation.md, {out}/accuracy_vs_gflops.png; demo took {time.perf_counter() - start:.0f} s")


# The release's two reference cascades (config, weights, images and the release's per-exit logits) ship
# as package data, so that an installed `dvt demo` checks them too.
RELEASE_CASCADES_DIR = Path(__file__).resolve().parent / "data" / "release"
RELEASE_CASCADES = ("t2t_mini", "deit_mini")
RANDOM_DEMO_MODEL = "dvt_t2t_vit_12"


def release_cascade_file(cascade: str, part: str) -> Path:
    """The shipped file `part` ("config.json", "weights.npz" or "io.npz") of the release cascade `cascade`."""
    path = RELEASE_CASCADES_DIR / f"{cascade}_{part}"
    if not path.is_file():
        raise CommandError(f"{path} is missing: this installation of dvt_cli is incomplete")
    return path


def release_cascade_deltas(facade) -> dict[str, list[float]]:
    """Per release reference cascade, max |logit - release logit| at each exit, run through `facade`."""
    from dvt_shared import config_from_release_json

    deltas = {}
    for name in RELEASE_CASCADES:
        config = config_from_release_json(json.loads(release_cascade_file(name, "config.json").read_text()), name)
        with np.load(release_cascade_file(name, "weights.npz")) as weights:
            model = facade.inference_model(config, dict(weights))
        with np.load(release_cascade_file(name, "io.npz")) as io:
            outputs = facade.all_exit_logits(model, io["images"])
            deltas[name] = [float(np.abs(o - io[f"exit{k}"]).max()) for k, o in enumerate(outputs)]
    return deltas


def random_weight_demo(backend: str = "torch") -> None:
    """The CPU demo without trained weights: dvt_t2t_vit_12 with random weights, its per-exit GFLOPs,
    a timed forward pass, and the release fixtures' logits."""
    from dvt_shared.flops import exit_gflops, stage_flops
    from dvt_shared.models import get_model_config

    facade = backends.load(backend)
    config = get_model_config(RANDOM_DEMO_MODEL)
    model = facade.create_model(RANDOM_DEMO_MODEL)
    print(f"{config.name}: {config.description}")
    print(f"parameters: {facade.count_parameters(model) / 1e6:.2f} M "
          f"(random weights: no trained ImageNet checkpoint ships)")
    print(f"{'exit':>4} {'tokens':>7} {'stage GFLOPs':>13} {'cumulative GFLOPs':>18}")
    for k, (grid, stage, total) in enumerate(zip(config.grids, stage_flops(config), exit_gflops(config))):
        print(f"{k:>4} {f'{grid}x{grid}':>7} {stage / 1e9:>13.3f} {total:>18.3f}")
    images = np.random.default_rng(0).standard_normal((2, config.in_chans, config.img_size, config.img_size),
                                                      np.float32)
    model = facade.inference_model(config, facade.to_canonical(model))
    start = time.perf_counter()
    outputs = facade.all_exit_logits(model, images)
    elapsed = time.perf_counter() - start
    print(f"forward pass, batch 2, {backend}, CPU: {elapsed * 1000:.0f} ms; "
          f"logits per exit: {[o.shape for o in outputs]}")
    for name, deltas in release_cascade_deltas(facade).items():
        print(f"release fixture {name}: max |logit - release logit| per exit = "
              + ", ".join(f"{d:.1e}" for d in deltas))


def add_demo(subparsers, common: argparse.ArgumentParser) -> None:
    parser = subparsers.add_parser("demo", parents=[common], help="the main job: the shipped model end to end")
    parser.add_argument("--data-dir", help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--out", default="out", help="report folder (default out/)")
    parser.set_defaults(handler=run_demo)
