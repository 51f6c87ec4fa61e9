"""ONNX export, one graph per stage, and an ONNX Runtime early-exit engine.

Stage k's graph takes the images and stage k-1's reuse state and returns its logits and
the reuse state stage k+1 needs, so the engine can stop between graphs. A JSON manifest
beside the graphs names them, their inputs and outputs, and carries the config.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, AdaptiveEngine, reuse_tensor_names
from dvt_shared.export_manifest import read_manifest, stage_entry, write_manifest
from dvt_shared.image_checks import check_finite, check_image_dtype, check_image_shape
from dvt_shared.io_utils import atomic_path, check_writable_dir

from .dvt import DVT, ReuseState

MANIFEST = "dvt_onnx.json"
FORMAT = "dvt-onnx-v1"
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
    out_dir = Path(check_writable_dir(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    images = torch.zeros(2, config.in_chans, config.img_size, config.img_size)
    stages, state = [], None
    for index in range(model.num_exits):
        # in eval mode: the exporter restores the wrapper's mode afterwards, and with it the model's
        graph = StageGraph(model, index).eval()
        args = (images, *(t for t in (state or ()) if t is not None))
        path = out_dir / f"stage{index}.onnx"
        with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph, args, tmp, dynamo=False, opset_version=opset, input_names=graph.inputs,
                output_names=graph.outputs, dynamic_axes={name: {0: "batch"} for name in graph.inputs + graph.outputs},
            )
            onnx.checker.check_model(tmp, full_check=True)
        stages.append(stage_entry(path, graph.inputs, graph.outputs))
        with torch.no_grad():
            _, state = model.run_stage(index, images, state)
    manifest = {"format": FORMAT, "opset": opset, "config": config.to_dict(), "stages": stages}
    return write_manifest(out_dir, MANIFEST, manifest)


class OnnxAdaptiveDVT(AdaptiveEngine):
    """The shared early-exit loop over the per-stage ONNX graphs, run by ONNX Runtime."""

    def __init__(self, onnx_dir, thresholds, max_batch: int = DEFAULT_MAX_BATCH, threads: int | None = None):
        import onnxruntime as ort

        onnx_dir = Path(onnx_dir)
        config, self.stages = read_manifest(onnx_dir, MANIFEST, FORMAT, "dvt export --format onnx")
        super().__init__(config, thresholds, max_batch)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.sessions = [
            ort.InferenceSession(str(onnx_dir / stage["file"]), options, providers=["CPUExecutionProvider"])
            for stage in self.stages
        ]

    def _num_images(self, images: np.ndarray) -> int:
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array, got {type(images).__name__}")
        check_image_shape(images.shape, self.config)
        check_image_dtype(images.dtype, images.dtype.kind == "f", np.dtype(np.float32))
        check_finite(np.isfinite(images).reshape(len(images), -1).all(axis=1))
        return images.shape[0]

    def _run_stage(self, index: int, images: np.ndarray, state):
        # ONNX Runtime reads a dense buffer: strided views (channels-last) are copied once here.
        feeds = {"images": np.ascontiguousarray(images)}
        feeds.update(state or {})
        outputs = self.sessions[index].run(None, feeds)
        names = self.stages[index]["outputs"]
        return outputs[0], {"prev_" + name: value for name, value in zip(names[1:], outputs[1:])}

    def _take(self, images: np.ndarray, rows: np.ndarray) -> np.ndarray:
        return images[rows]

    def _take_state(self, state: dict, rows: np.ndarray) -> dict:
        return {name: value[rows] for name, value in state.items()}
