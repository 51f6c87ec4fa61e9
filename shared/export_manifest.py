"""The JSON manifest beside exported stage graphs (ONNX, MindIR): written last, checked on load.

The manifest names every stage's graph file with its sha256, so a graph that was changed,
truncated or swapped after export is refused before a runtime tries to parse it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .configs import DVTConfig
from .io_utils import atomic_write_bytes, sha256_file

# The manifest `dvt export --format onnx` writes beside the graphs, and its format tag (written by the PyTorch
# backend's exporter, read by the ONNX Runtime engine).
ONNX_MANIFEST = "dvt_onnx.json"
ONNX_FORMAT = "dvt-onnx-v1"


def write_manifest(out_dir: str | os.PathLike, name: str, manifest: dict) -> Path:
    """Write `manifest` as out_dir/name, atomically, after every graph it lists."""
    path = Path(out_dir) / name
    atomic_write_bytes(path, json.dumps(manifest, indent=1).encode())
    return path


def stage_entry(path: Path, inputs: list[str], outputs: list[str]) -> dict:
    """The manifest entry of the graph file `path` (already in place)."""
    return {"file": path.name, "sha256": sha256_file(path), "inputs": inputs, "outputs": outputs}


def read_manifest(folder: str | os.PathLike, name: str, fmt: str, export_command: str) -> tuple[DVTConfig, list[dict]]:
    """(config, stage entries) of the export in `folder`, every graph file present and unchanged.

    Raises NotADirectoryError, FileNotFoundError or ValueError naming the file at fault.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is a file"
        raise NotADirectoryError(f"{folder} {problem}; pass the folder written by `{export_command}`")
    path = folder / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: export with `{export_command}` first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        found = manifest.get("format")
        config = DVTConfig.from_dict(manifest["config"])
        stages = manifest["stages"]
        # a stage is one graph, or one graph per batch gear
        entries = [entry for stage in stages for entry in stage.get("gears", [stage])]
        listed = [(folder / entry["file"], entry["sha256"]) for entry in entries]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ValueError(f"{path} is not a valid export manifest ({type(exc).__name__}: {exc})") from exc
    if found != fmt:
        raise ValueError(f"{path} is in format {found!r}, expected {fmt!r}")
    if len(stages) != config.num_exits:
        raise ValueError(f"{path} lists {len(stages)} stage graphs, but {config.name} has {config.num_exits} exits")
    for graph, expected in listed:
        if not graph.is_file():
            raise FileNotFoundError(f"{graph}, listed in {path}, is missing")
        digest = sha256_file(graph)
        if digest != expected:
            raise ValueError(
                f"{graph}: sha256 {digest} does not match {path.name}'s {expected}; "
                f"the graph was changed or damaged after export"
            )
    return config, stages
