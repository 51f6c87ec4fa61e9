"""What the benchmark scripts share: timing each backend in a process of its own."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

# MindSpore's C++ log lines are silenced (errors only) in every benchmark and its workers unless
# GLOG_v is set; `--verbose` (early_exit.py, precision_agreement.py) restores MindSpore's default.
os.environ.setdefault("GLOG_v", "3")
MINDSPORE_DEFAULT_GLOG_V = "2"


def run_worker(script: str, backend: str, args: list[str]) -> dict:
    """Run `script --worker BACKEND ARGS` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, script, "--worker", backend, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{backend} worker failed ({' '.join(args)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(header: list[str], rows: list[list]) -> None:
    cells = [[str(h) for h in header]] + [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if n == 0:
            print("  ".join("-" * w for w in widths))


def best_time(fn, repeats: int, clock=time.perf_counter, warmup: int = 1) -> float:
    """The shortest of `repeats` timed calls of `fn` on `clock`, after `warmup` untimed ones (compilation)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best
