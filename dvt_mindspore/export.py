"""MindIR export, one graph per stage, and the early-exit engine over the loaded graphs.

The MindSpore twin of `dvt_torch.export` (ONNX): stage k's graph takes the images and stage
k-1's reuse state (dynamic batch axis) and returns its logits and the reuse state stage
k+1 needs. `ms.load` + `nn.GraphCell` run them, on CPU here and on Ascend for serving.
"""
from __future__ import annotations

from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, reuse_tensor_names
from dvt_shared.export_manifest import read_manifest, stage_entry, write_manifest
from dvt_shared.io_utils import atomic_path, check_writable_dir

from .dvt import DVT
from .engine import MindSporeEngine, dynamic_stage_inputs

MANIFEST = "dvt_mindir.json"
FORMAT = "dvt-mindir-v1"


class StageGraph(nn.Cell):
    """Stage `index` with exactly the tensors it consumes and produces, for export."""

    def __init__(self, model: DVT, index: int):
        super().__init__()
        self.stage = model.stage(index)
        self.takes_features = self.stage.feature_reuse
        self.takes_relations = self.stage.relation_reuse
        self.gives_features = self.stage.keep_features
        self.gives_relations = self.stage.keep_relations

    def construct(self, images, *reuse):
        features = reuse[0] if self.takes_features else None
        relations = reuse[-1] if self.takes_relations else None
        logits, next_features, next_relations = self.stage(images, features, relations)
        out = (logits,)
        if self.gives_features:
            out = out + (next_features,)
        if self.gives_relations:
            out = out + (next_relations,)
        return out


def export_mindir(model: DVT, out_dir) -> Path:
    """Write one MindIR graph per stage and the manifest into `out_dir`; returns the manifest path."""
    out_dir = Path(check_writable_dir(out_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    model.set_train(False)
    config = model.config
    stages = []
    for index in range(model.num_exits):
        inputs = tuple(t for t in dynamic_stage_inputs(model, index) if t is not None)
        path = out_dir / f"stage{index}.mindir"
        # ms.export appends .mindir to any name lacking it
        with atomic_path(path, suffix=".mindir") as tmp:
            ms.export(StageGraph(model, index), *inputs, file_name=tmp, file_format="MINDIR")
        previous = ["prev_" + name for name in reuse_tensor_names(config, index - 1)]
        stages.append(stage_entry(path, ["images"] + previous, ["logits"] + reuse_tensor_names(config, index)))
    return write_manifest(out_dir, MANIFEST, {"format": FORMAT, "config": config.to_dict(), "stages": stages})


class MindIRAdaptiveDVT(MindSporeEngine):
    """The shared early-exit loop over per-stage MindIR graphs loaded with `ms.load`."""

    def __init__(self, mindir_dir, thresholds, max_batch: int = DEFAULT_MAX_BATCH):
        mindir_dir = Path(mindir_dir)
        config, stages = read_manifest(mindir_dir, MANIFEST, FORMAT, "dvt export --format mindir")
        super().__init__(config, thresholds, max_batch)
        self.graphs = [nn.GraphCell(ms.load(str(mindir_dir / stage["file"]))) for stage in stages]

    def _run_stage(self, index: int, images: Tensor, state):
        outputs = self.graphs[index](images, *(state or ()))
        return outputs[0].asnumpy().astype(np.float32), tuple(outputs[1:])
