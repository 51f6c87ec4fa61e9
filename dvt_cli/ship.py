"""Put two finished training runs (DVT and its static baseline) into weights/ with a manifest.

    python -m dvt_cli.ship runs/dvt_fmnist runs/dvt_fmnist_static

The DVT's thresholds are calibrated on held-out training images for an average budget of
half the static baseline's cost, stored in its metadata, and everything a user compares
(sha256, config, recipe, epochs, wall time, test metrics) goes into weights/manifest.json.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dvt_shared import exit_policy
from dvt_shared.flops import exit_gflops
from dvt_shared.io_utils import atomic_write_bytes, sha256_file
from dvt_shared.weight_format import load_canonical, save_canonical

from .demo import MANIFEST, WEIGHTS_DIR
from .evaluate import fashion_mnist, score


def run_summary(run: Path) -> dict:
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    last = log[-1]
    return {"epochs": last["epoch"], "wall_time_s": last["elapsed_s"], "test_acc_per_exit": last["test_acc"]}


def ship(dvt_run: Path, static_run: Path) -> dict:
    data = fashion_mnist(None)
    labels = data["test_labels"]
    static = score(str(static_run / "final.safetensors"), data, calibrate=False)
    static_gflops = exit_gflops(static.config)[-1]
    dvt = score(str(dvt_run / "final.safetensors"), data)
    gflops = np.asarray(exit_gflops(dvt.config))
    budget = float(np.clip(0.5 * static_gflops, gflops[0], gflops[-1]))
    thresholds = exit_policy.thresholds_for_budget(dvt.calib_probs, gflops, budget)
    result = exit_policy.dynamic_evaluate(dvt.test_probs, labels, gflops, thresholds)

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
            **run_summary(run), "test_accuracy_per_exit": per_exit, "exit_gflops": list(exit_gflops(metadata.config)),
        }
    manifest["dvt"].update({
        "thresholds": [float(t) for t in thresholds], "threshold_budget_gflops": budget,
        "test_accuracy_adaptive": result.accuracy, "test_gflops_adaptive": result.expected_flops,
        "test_exit_shares": (result.exit_counts / len(labels)).tolist(),
        "calibration": "10,000 held-out training images (seeded sample), budget = half the static baseline's GFLOPs",
    })
    atomic_write_bytes(MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dvt_run", type=Path)
    parser.add_argument("static_run", type=Path)
    args = parser.parse_args()
    manifest = ship(args.dvt_run, args.static_run)
    print(json.dumps({role: {k: v for k, v in entry.items() if k not in ("config", "recipe")}
                      for role, entry in manifest.items()}, indent=1))


if __name__ == "__main__":
    main()
