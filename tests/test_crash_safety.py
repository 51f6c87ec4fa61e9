"""Nothing is lost: a writer killed with SIGKILL at a random moment leaves the previous file whole.

The writers are the project's own (canonical weights, training checkpoint, release .pth),
run in processes forked by tests/crash_writers.py. Each trial lets one rewrite its file
over and over, kills it after a random delay, and checks that the file still loads and
holds exactly one of the complete versions: the sha256 of everything it loads to (tensors
bit for bit, metadata, records) equals that of a version written whole. The content is
hashed rather than the file because safetensors orders its metadata differently from one
write to the next.
"""
from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dvt_shared.weight_format import load_canonical
from dvt_torch.checkpoint import read_release_checkpoint
from dvt_torch.train_state import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TRIALS = 20
KINDS = ("canonical", "checkpoint", "release")
MAX_DELAY_S = 0.3


def _feed(digest, value: Any) -> None:
    """Feed `value` (nested containers of arrays, tensors and scalars) into `digest`, order-independently for dicts."""
    if isinstance(value, torch.Tensor):
        value = value.numpy()
    if isinstance(value, np.ndarray):
        digest.update(f"array {value.dtype} {value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif isinstance(value, dict):
        digest.update(b"dict")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"list {len(value)}".encode())
        for item in value:
            _feed(digest, item)
    else:
        digest.update(repr(value).encode())


def content_sha256(kind: str, path: Path) -> str:
    """Load `path` with the project's reader for `kind`; the sha256 of everything it holds."""
    if kind == "canonical":
        tensors, metadata = load_canonical(path)
        content = {"tensors": tensors, "metadata": metadata.to_strings()}
    elif kind == "checkpoint":
        content = load_checkpoint(str(path))
    else:
        release = read_release_checkpoint(path)
        content = {"state_dict": release.state_dict, "flops": release.flops}
    digest = hashlib.sha256()
    _feed(digest, content)
    return digest.hexdigest()


@pytest.fixture
def writers(tmp_path):
    server = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "crash_writers.py"), str(tmp_path / "reference")],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert server.stdout.readline().strip() == "ready", "the writer server did not start"
        yield server
    finally:
        server.stdin.close()
        server.wait(timeout=30)


def ask(server: subprocess.Popen, line: str) -> int:
    server.stdin.write(line + "\n")
    server.stdin.flush()
    return int(server.stdout.readline())


def test_sigkill_mid_write_leaves_a_complete_file(tmp_path, writers):
    references = {
        kind: {content_sha256(kind, tmp_path / "reference" / f"{kind}.{v}") for v in range(3)} for kind in KINDS
    }
    assert all(len(hashes) == 3 for hashes in references.values()), "each version must differ from the others"
    work = tmp_path / "work"
    work.mkdir()
    rng = random.Random(20)
    killed_mid_write = replaced = 0
    for trial in range(TRIALS):
        kind = KINDS[trial % len(KINDS)]
        target = work / f"{kind}.file"
        if not target.exists():
            target.write_bytes((tmp_path / "reference" / f"{kind}.0").read_bytes())
        before = content_sha256(kind, target)
        pid = ask(writers, f"start {kind} {target}")
        time.sleep(rng.uniform(0.0, MAX_DELAY_S))
        os.kill(pid, signal.SIGKILL)
        status = ask(writers, f"reap {pid}")
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"trial {trial}: writer {status=}"

        after = content_sha256(kind, target)  # raises if the file no longer loads
        assert after in references[kind], f"trial {trial}: the {kind} file holds no complete version"
        replaced += after != before
        leftovers = [p for p in work.iterdir() if p.name.startswith(f".{target.name}.")]
        killed_mid_write += bool(leftovers)
        for path in leftovers:
            path.unlink()
    print(f"{TRIALS} kills: {killed_mid_write} mid-write (temporary file left), {replaced} after a completed rewrite")
    # Without kills inside writes (and completed rewrites) the test would show nothing.
    assert killed_mid_write >= TRIALS // 4 and replaced >= 1
