"""Writer processes for tests/test_crash_safety.py to kill at random moments.

    python tests/crash_writers.py REFERENCE_DIR

A fork server, so that the imports (seconds) are paid once and not per kill. It first
writes every version of every kind of file once into REFERENCE_DIR (KIND.VERSION), prints
"ready", then serves stdin line by line, one reply line each:

    start KIND PATH   forks a child that rewrites PATH with the project's own writer for
                      KIND, cycling through the versions, until it is killed; replies its pid
    reap PID          waits until that child is gone; replies its wait status
"""
from __future__ import annotations

import os
import sys

import numpy as np
import torch

from dvt_shared.models import get_model_config
from dvt_shared.weight_format import WeightMetadata, save_canonical
from dvt_torch.checkpoint import write_release_checkpoint
from dvt_torch.train_state import CHECKPOINT_FORMAT, save_checkpoint

VERSIONS = 3
# 4 MiB of float32 per file: a write takes long enough for kills to land inside it.
ROWS, COLUMNS = 1024, 1024

TENSORS = [
    {
        "normal_token.blocks.0.mlp.fc1.weight": rng.standard_normal((ROWS, COLUMNS), dtype=np.float32),
        "normal_token.blocks.0.mlp.fc1.bias": rng.standard_normal(ROWS, dtype=np.float32),
    }
    for rng in (np.random.default_rng(version) for version in range(VERSIONS))
]
METADATA = WeightMetadata(config=get_model_config("dvt_t2t_vit_fmnist"), provenance="crash-safety test")


def write_canonical(path: str, version: int) -> None:
    save_canonical(path, TENSORS[version], METADATA)


def write_training_checkpoint(path: str, version: int) -> None:
    model = {key: torch.from_numpy(value) for key, value in TENSORS[version].items()}
    save_checkpoint(path, {
        "format": CHECKPOINT_FORMAT, "epoch": version, "step": 10 * version, "model": model,
        "optimizer": {"state": {0: {"exp_avg": model["normal_token.blocks.0.mlp.fc1.bias"] * 0.5}}},
    })


def write_release(path: str, version: int) -> None:
    write_release_checkpoint(path, TENSORS[version], flops=[0.1, 0.2, 0.3 + version])


WRITERS = {"canonical": write_canonical, "checkpoint": write_training_checkpoint, "release": write_release}


def rewrite_forever(kind: str, path: str) -> None:
    write = WRITERS[kind]
    version = 0
    while True:
        version = (version + 1) % VERSIONS
        write(path, version)


def serve(reference_dir: str) -> None:
    os.makedirs(reference_dir, exist_ok=True)
    for kind, write in WRITERS.items():
        for version in range(VERSIONS):
            write(os.path.join(reference_dir, f"{kind}.{version}"), version)
    print("ready", flush=True)
    for line in sys.stdin:
        command, *operands = line.split()
        if command == "start":
            kind, path = operands
            pid = os.fork()
            if pid == 0:
                # The child only ever writes; whatever happens it must not go on serving stdin.
                try:
                    rewrite_forever(kind, path)
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif command == "reap":
            _, status = os.waitpid(int(operands[0]), 0)
            print(status, flush=True)
        else:
            raise ValueError(f"unknown command {line!r}")


if __name__ == "__main__":
    serve(sys.argv[1])
