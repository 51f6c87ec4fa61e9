"""Put two finished training runs into weights/ with a manifest: DVT and its static baseline,
or (--vt) the VT-ResNet and its plain ResNet.

    python -m dvt_cli.ship runs/dvt_fmnist runs/dvt_fmnist_static
    python -m dvt_cli.ship --vt runs/vt_resnet_fmnist runs/resnet_fmnist

The DVT's thresholds are calibrated on held-out training images for an average budget of
half the static baseline's cost, stored in its metadata, and everything a user compares
(sha256, config, recipe, epochs, wall time, test metrics; GFLOPs and parameters) goes into
weights/manifest.json under the roles "dvt" and "static", or "vt" and "resnet". Each run's
per-epoch log and curve plot are copied beside its weights. Shipping one pair keeps the other
pair's entries.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dvt_shared import calibration
from dvt_shared.flops import exit_gflops
from dvt_shared.io_utils import atomic_write_bytes, sha256_file
from dvt_shared.weight_format import load_canonical, save_canonical

from .demo import MANIFEST, WEIGHTS_DIR
from .evaluate import baseline_point, fashion_mnist, score


def run_summary(run: Path) -> dict:
    """Epochs and times from a run's log; test accuracy is measured again on the shipped file.
    Wall time counts everything between the first and last epoch (pauses and other processes
    included); the median epoch is not moved by a few paused or slowed epochs, the better
    figure to plan with."""
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    last = log[-1]
    return {
        "epochs": last["epoch"], "wall_time_s": last["elapsed_s"],
        "median_epoch_s": float(np.median([entry["epoch_time_s"] for entry in log])),
    }


def ship_training_log(run: Path, name: str) -> dict:
    """Copy a run's per-epoch log and its curve plot into weights/ as NAME.log.jsonl and NAME.png,
    so the shipped file's training history travels with it."""
    files = {}
    for key, source, target_name in (("training_log", "log.jsonl", f"{name}.log.jsonl"),
                                     ("training_curve", "log.png", f"{name}.png")):
        source_path = run / source
        if not source_path.is_file():
            raise FileNotFoundError(f"{run} has no {source}: is it a `dvt train` output folder?")
        atomic_write_bytes(WEIGHTS_DIR / target_name, source_path.read_bytes())
        files[key] = target_name
    return files


def ship(dvt_run: Path, static_run: Path) -> dict:
    data = fashion_mnist(None)
    static = score(str(static_run / "final.safetensors"), data, calibrate=False)
    static_gflops = exit_gflops(static.config)[-1]
    dvt = score(str(dvt_run / "final.safetensors"), data)
    labels = dvt.inputs["test_labels"]
    gflops = np.asarray(exit_gflops(dvt.config))
    budget = float(np.clip(0.5 * static_gflops, gflops[0], gflops[-1]))
    thresholds = calibration.thresholds_for_budget(dvt.calib_probs, gflops, budget)
    result = calibration.dynamic_evaluate(dvt.test_probs, labels, gflops, thresholds)

    manifest = {}
    for role, run, evaluated in (("dvt", dvt_run, dvt), ("static", static_run, static)):
        tensors, metadata = load_canonical(run / "final.safetensors")
        if role == "dvt":
            metadata.thresholds = [float(t) for t in thresholds]
        target = WEIGHTS_DIR / f"{metadata.config.name}.safetensors"
        save_canonical(target, tensors, metadata)
        per_exit = ((evaluated.test_probs.argmax(-1) == labels[None]).mean(axis=1) * 100).round(2).tolist()
        manifest[role] = {
            "file": target.name, "sha256": sha256_file(target), "config": metadata.config.to_dict(),
            "recipe": json.loads(metadata.provenance) if metadata.provenance.startswith("{") else metadata.provenance,
            **run_summary(run), **ship_training_log(run, metadata.config.name),
            "test_accuracy_per_exit": per_exit, "exit_gflops": list(exit_gflops(metadata.config)),
        }
    manifest["dvt"].update({
        "thresholds": [float(t) for t in thresholds], "threshold_budget_gflops": budget,
        "test_accuracy_adaptive": result.accuracy, "test_gflops_adaptive": result.expected_flops,
        "test_exit_shares": (result.exit_counts / len(labels)).tolist(),
        "calibration": "10,000 held-out training images (seeded sample), budget = half the static baseline's GFLOPs",
    })
    return write_manifest(manifest)


def write_manifest(entries: dict) -> dict:
    """weights/manifest.json with `entries` added or replaced by role, the other roles kept."""
    manifest = json.loads(MANIFEST.read_text()) if MANIFEST.is_file() else {}
    manifest.update(entries)
    atomic_write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def ship_classifiers(vt_run: Path, resnet_run: Path) -> dict:
    """Ship a VT-ResNet run and its plain-ResNet run with test accuracy, GFLOPs and parameters."""
    data = fashion_mnist(None)
    entries = {}
    for role, run in (("vt", vt_run), ("resnet", resnet_run)):
        tensors, metadata = load_canonical(run / "final.safetensors")
        target = WEIGHTS_DIR / f"{metadata.config.name}.safetensors"
        save_canonical(target, tensors, metadata)
        evaluated = score(str(target), data, calibrate=False)
        point = baseline_point(evaluated, evaluated.inputs["test_labels"])
        entries[role] = {
            "file": target.name, "sha256": sha256_file(target), "config": metadata.config.to_dict(),
            "recipe": json.loads(metadata.provenance), **run_summary(run),
            **ship_training_log(run, metadata.config.name),
            "test_accuracy": round(point["accuracy"], 2), "gflops": point["gflops"], "params": point["params"],
        }
    return write_manifest(entries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vt", action="store_true", help="the runs are a VT-ResNet and its plain ResNet")
    parser.add_argument("model_run", type=Path, help="the DVT's run (with --vt: the VT-ResNet's)")
    parser.add_argument("baseline_run", type=Path, help="the static baseline's run (with --vt: the ResNet's)")
    args = parser.parse_args()
    if args.vt:
        manifest = ship_classifiers(args.model_run, args.baseline_run)
    else:
        manifest = ship(args.model_run, args.baseline_run)
    print(json.dumps({role: {k: v for k, v in entry.items() if k not in ("config", "recipe")}
                      for role, entry in manifest.items()}, indent=1))


if __name__ == "__main__":
    main()
