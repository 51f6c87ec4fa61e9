"""ONNX export, one graph per stage, and an ONNX Runtime early-exit engine.

Stage k's graph takes the images and stage k-1's reuse state and returns its logits and
the reuse state stage k+1 needs, so the engine can stop between graphs. A JSON manifest
beside the graphs names them, their inputs and outputs, and carries the config.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, AdaptiveEngine, reuse_tensor_names
from dvt_shared.configs import DVTConfig
from dvt_shared.io_utils import atomic_write_bytes

from .dvt import DVT, ReuseState

MANIFEST = "dvt_onnx.json"
OPSET = 17


class StageGraph(nn.Module):
    """Stage `index` of a DVT with plain tensor inputs and outputs, for tracing."""

    def __init__(self, model: DVT, index: int):
        super().__init__()
        self.model, self.index = model, index
        self.inputs = ["images"] + ["prev_" + name for name in reuse_tensor_names(model.config, index - 1)]
        self.outputs = ["logits"] + reuse_tensor_names(model.config, index)

    def forward(self, images, *reuse):
        state = None
        if self.index:
            features = reuse[0] if self.model.config.feature_reuse else None
            relations = reuse[-1] if self.model.config.relation_reuse else None
            state = ReuseState(features, relations)
        logits, state = self.model.run_stage(self.index, images, state)
        return (logits, *(t for t in state if t is not None))


def export_onnx(model: DVT, out_dir, opset: int = OPSET) -> Path:
    """Write one ONNX graph per stage and the manifest into `out_dir`; returns the manifest path."""
    import onnx

    model = model.eval()
    config = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = torch.zeros(2, config.in_chans, config.img_size, config.img_size)
    stages, state = [], None
    for index in range(model.num_exits):
        # in eval mode: the exporter restores the wrapper's mode afterwards, and with it the model's
        graph = StageGraph(model, index).eval()
        args = (images, *(t for t in (state or ()) if t is not None))
        path = out_dir / f"stage{index}.onnx"
        tmp = out_dir / f".stage{index}.onnx.tmp"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, args, str(tmp), dynamo=False, opset_version=opset, input_names=graph.inputs,
                output_names=graph.outputs, dynamic_axes={name: {0: "batch"} for name in graph.inputs + graph.outputs},
            )
        onnx.checker.check_model(str(tmp), full_check=True)
        tmp.replace(path)
        stages.append({"file": path.name, "inputs": graph.inputs, "outputs": graph.outputs})
        with torch.no_grad():
            _, state = model.run_stage(index, images, state)
    manifest = {"format": "dvt-onnx-v1", "opset": opset, "config": config.to_dict(), "stages": stages}
    atomic_write_bytes(out_dir / MANIFEST, json.dumps(manifest, indent=1).encode())
    return out_dir / MANIFEST


class OnnxAdaptiveDVT(AdaptiveEngine):
    """The shared early-exit loop over the per-stage ONNX graphs, run by ONNX Runtime."""

    def __init__(self, onnx_dir, thresholds, max_batch: int = DEFAULT_MAX_BATCH, threads: int | None = None):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        manifest_path = onnx_dir / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found: export with `dvt export --format onnx` first")
        manifest = json.loads(manifest_path.read_text())
        config = DVTConfig.from_dict(manifest["config"])
        super().__init__(config, thresholds, max_batch)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = [
            ort.InferenceSession(str(onnx_dir / stage["file"]), options, providers=["CPUExecutionProvider"])
            for stage in manifest["stages"]
        ]
        self.stages = manifest["stages"]

    def _num_images(self, images: np.ndarray) -> int:
        expected = (self.config.in_chans, self.config.img_size, self.config.img_size)
        if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[1:] != expected or not len(images):
            shape = getattr(images, "shape", type(images).__name__)
            raise ValueError(f"{self.config.name} expects a float32 numpy array (B, {', '.join(map(str, expected))}), got {shape}")
        return images.shape[0]

    def _run_stage(self, index: int, images: np.ndarray, state):
        feeds = {"images": np.ascontiguousarray(images, dtype=np.float32)}
        feeds.update(state or {})
        outputs = self.sessions[index].run(None, feeds)
        names = self.stages[index]["outputs"]
        return outputs[0], {"prev_" + name: value for name, value in zip(names[1:], outputs[1:])}

    def _take(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return images[rows]

    def _take_state(self, state: dict, rows: np.ndarray) -> dict:
        return {name: value[rows] for name, value in state.items()}
