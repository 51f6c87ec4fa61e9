"""The device check: what a GPU machine must show before anyone trains on it.

1. the CUDA parity targets (parity_tests, `-k cuda`: per-exit logits and exit decisions on the GPU
   against the CPU's float64-proven answers);
2. training steps of DVT-T2T-ViT-12 at 224x224 on synthetic images, as `dvt train` runs them
   (dvt_torch.train.TrainingRun: multi-exit loss, AdamW, GradScaler under fp16), in fp32, bf16 and
   fp16, each with and without channels_last and torch.compile: the loss of every step must be
   finite; images/s is timed over the steps after the first --warmup ones (compilation happens there).

    python benchmarks/gpu_check.py                  # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-dry-run    # this CPU: the Fashion-MNIST DVT, a few steps

The dry run keeps the script working where no GPU is: the same code on a small model; bf16 only where
the CPU computes it natively; torch.compile with the `eager` backend (dynamo's capture without code
generation; inductor's C++ compile of one configuration takes minutes on 2 cores: --compile-backend
inductor to try it). Exit status 1 when any loss is not finite or a parity test fails.
"""
from __future__ import annotations

import argparse
import itertools
import math
import os
import subprocess
import sys
import tempfile
import time

from common import print_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRECISIONS = ("fp32", "bf16", "fp16")
AMP = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}


def parity_targets(device: str) -> tuple[bool, str]:
    """Run the parity tests of `device`'s targets; (passed, pytest's summary line)."""
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "parity_tests", "-k", device],
        cwd=REPO, capture_output=True, text=True, check=False,
    )
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    # 0: passed; 5: nothing collected for this device
    return done.returncode in (0, 5), lines[-1] if lines else done.stderr.strip()[-300:]


def training_steps(model: str, precision: str, channels_last: bool, compiled: bool, options) -> dict:
    """`options.steps` training steps of `model` as `dvt train` runs them; every step's loss and images/s."""
    import torch

    from dvt_torch.train import Dist, TrainingRun, add_train_arguments

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as out:
        argv = [
            "--model", model, "--data", "synthetic", "--batch-size", str(options.batch_size),
            "--train-subset", str(options.batch_size * options.steps), "--test-subset", str(options.batch_size),
            "--epochs", "1", "--warmup-epochs", "0", "--lr", "5e-4", "--amp", AMP[precision], "--out", out,
            "--no-progress", "--compile-backend", options.compile_backend,
            *(["--channels-last"] if channels_last else []), *(["--compile"] if compiled else []),
        ]
        args = add_train_arguments(argparse.ArgumentParser()).parse_args(argv)
        run = TrainingRun(args, Dist(rank=0, world_size=1, local_rank=0, device=device))
        losses, started = [], None
        for step, (images, labels) in enumerate(run.data.train_batches(0, 0, run.augment_generator)):
            if step == options.warmup:
                synchronise(device)
                started = time.perf_counter()
            before = run.sums["loss"].clone()
            run.train_step(images, labels)
            losses.append(float(run.sums["loss"] - before) / len(labels))
        synchronise(device)
        timed = len(losses) - options.warmup
        images_per_s = timed * options.batch_size / (time.perf_counter() - started) if timed > 0 else float("nan")
    return {"losses": losses, "images_per_s": images_per_s}


def synchronise(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_has_bf16() -> bool:
    from dvt_torch.train import cpu_has_native_bf16

    return cpu_has_native_bf16()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true", help="run on this CPU: a small model, few steps")
    parser.add_argument("--model", default=None, help="default: dvt_t2t_vit_12 (dry run: dvt_t2t_vit_fmnist)")
    parser.add_argument("--steps", type=int, default=None, help="steps per configuration (default: 50; dry run: 4)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 10; dry run: 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 (dry run: 16)")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--compile-backend", default=None, help="default: inductor (dry run: eager)")
    parser.add_argument("--no-parity", dest="parity", action="store_false", help="skip the parity targets")
    options = parser.parse_args()

    import torch

    dry = options.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --cpu-dry-run", file=sys.stderr)
        return 2
    options.model = options.model or ("dvt_t2t_vit_fmnist" if dry else "dvt_t2t_vit_12")
    options.steps = options.steps or (4 if dry else 50)
    options.warmup = min(options.warmup if options.warmup is not None else (2 if dry else 10), options.steps - 1)
    options.batch_size = options.batch_size or (16 if dry else 64)
    options.compile_backend = options.compile_backend or ("eager" if dry else "inductor")
    device = "cpu" if dry else "cuda"
    if dry:
        torch.set_num_threads(1)
    print(f"device: {torch.cuda.get_device_name() if not dry else 'CPU (dry run)'}, torch {torch.__version__}")

    ok = True
    if options.parity:
        passed, summary = parity_targets(device)
        ok &= passed
        print(f"parity targets ({device}): {summary}")

    rows = []
    for precision, channels_last, compiled in itertools.product(options.precisions, (False, True), (False, True)):
        label = [precision, "yes" if channels_last else "no", options.compile_backend if compiled else "no"]
        if dry and precision == "bf16" and not cpu_has_bf16():
            rows.append(label + ["skipped: no native bf16 on this CPU", "", ""])
            continue
        result = training_steps(options.model, precision, channels_last, compiled, options)
        finite = all(math.isfinite(loss) for loss in result["losses"])
        ok &= finite
        losses = result["losses"]
        rows.append(label + ["yes" if finite else "NO", f"{losses[0]:.4f} -> {losses[-1]:.4f}",
                             f"{result['images_per_s']:.1f}"])
    print(f"\n{options.model}, batch {options.batch_size}, {options.steps} steps (images/s over the last "
          f"{options.steps - options.warmup}):")
    print_table(["precision", "channels_last", "compile", "finite losses", "loss first -> last", "images/s"], rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
