"""ONNX export, one graph per stage, for the ONNX Runtime engine of `dvt_onnx`.

Stage k's graph takes the images and stage k-1's reuse state and returns its logits and
the reuse state stage k+1 needs, so the engine can stop between graphs. A JSON manifest
beside the graphs names them, their inputs and outputs, and carries the config.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from dvt_shared.adaptive import reuse_tensor_names
from dvt_shared.data_config import model_data_config
from dvt_shared.export_manifest import ONNX_FORMAT, ONNX_MANIFEST, stage_entry, write_manifest
from dvt_shared.io_utils import atomic_path, check_writable_dir

from .dvt import DVT, ReuseState

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
    manifest = {"format": ONNX_FORMAT, "opset": opset, "config": config.to_dict(), "stages": stages,
                "data_config": model_data_config(model).to_dict()}
    return write_manifest(out_dir, ONNX_MANIFEST, manifest)
