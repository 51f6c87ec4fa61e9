"""Start-up of the `dvt` command: wall time and the frameworks each command imports.

Every command runs in a fresh interpreter under `python -X importtime`; the table gives the
best wall time of --repeats runs, and whether torch, timm or MindSpore were imported at all.

    .venv/bin/python benchmarks/cli_startup.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from common import print_table

FRAMEWORKS = ("torch", "timm", "mindspore")


def imported_frameworks(stderr: str) -> list[str]:
    """Top-level frameworks named in `-X importtime` output."""
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in stderr.splitlines()
             if line.startswith("import time:")}
    return [name for name in FRAMEWORKS if name in names]


def timed(args: list[str], repeats: int) -> tuple[float, list[str]]:
    best, frameworks = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "dvt_cli", *args], capture_output=True,
                              text=True, env={**os.environ, "GLOG_v": "3"})
        elapsed = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"dvt {' '.join(args)} failed:\n{done.stderr[-2000:]}")
        best, frameworks = min(best, elapsed), imported_frameworks(done.stderr)
    return best, frameworks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import dvt_mindspore

    with tempfile.TemporaryDirectory() as folder:
        ckpt = os.path.join(folder, "model.ckpt")
        dvt_mindspore.save_weights(dvt_mindspore.create_model("dvt_t2t_vit_fmnist"), ckpt)
        canonical = os.path.join(folder, "model.safetensors")
        commands = {
            "dvt --help": ["--help"],
            "dvt convert x.ckpt y.safetensors": ["convert", ckpt, canonical, "--model", "dvt_t2t_vit_fmnist"],
            "dvt convert y.safetensors z.safetensors": ["convert", canonical, os.path.join(folder, "copy.safetensors")],
            "dvt train --help": ["train", "--help"],
        }
        rows = []
        for label, command in commands.items():
            seconds, frameworks = timed(command, args.repeats)
            rows.append([label, seconds, ", ".join(frameworks) or "none"])
    print_table(["command", f"best wall s of {args.repeats}", "frameworks imported"], rows)


if __name__ == "__main__":
    main()
