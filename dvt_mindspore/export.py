"""MindIR export, one graph per stage (and per batch gear), and the early-exit engine over them.

The MindSpore twin of `dvt_torch.export` (ONNX): stage k's graph takes the images and stage
k-1's reuse state and returns its logits and the reuse state stage k+1 needs. With gears,
each stage is written once per fixed batch size (`stage{k}_b{gear}.mindir`, the static
shapes Ascend's converter and ACL take); without, once with a dynamic batch axis.
`ms.load` + `nn.GraphCell` run them, on CPU here and on Ascend for serving.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mindspore as ms
from mindspore import nn

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, check_gears, reuse_tensor_names
from dvt_shared.data_config import model_data_config
from dvt_shared.exit_policy import MAX_SOFTMAX, ExitPolicy
from dvt_shared.export_manifest import read_manifest, stage_entry, write_manifest
from dvt_shared.io_utils import atomic_path, check_writable_dir

from .dvt import DVT
from .engine import MindSporeEngine, StageGraph, stage_inputs

MANIFEST = "dvt_mindir.json"
FORMAT = "dvt-mindir-v1"


def _export_graph(graph: StageGraph, inputs: tuple, path: Path) -> None:
    # ms.export appends .mindir to any name lacking it
    with atomic_path(path, suffix=".mindir") as tmp:
        ms.export(graph, *inputs, file_name=tmp, file_format="MINDIR")


def export_mindir(model: DVT, out_dir, gears: Sequence[int] | None = None) -> Path:
    """Write the stage graphs and the manifest into `out_dir`; returns the manifest path.

    gears: batch sizes to write each stage for (static shapes), or None for one graph per stage
    with a dynamic batch axis.
    """
    out_dir = Path(check_writable_dir(out_dir))
    gears = None if gears is None else check_gears(gears, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.set_train(False)
    config = model.config
    stages = []
    for index in range(model.num_exits):
        graph = StageGraph(model, index)
        names = (["images"] + ["prev_" + name for name in reuse_tensor_names(config, index - 1)],
                 ["logits"] + reuse_tensor_names(config, index))
        if gears is None:
            path = out_dir / f"stage{index}.mindir"
            _export_graph(graph, stage_inputs(model, index), path)
            stages.append(stage_entry(path, *names))
            continue
        entries = []
        for gear in gears:
            path = out_dir / f"stage{index}_b{gear}.mindir"
            _export_graph(graph, stage_inputs(model, index, gear), path)
            entries.append({"batch": gear, **stage_entry(path, *names)})
        stages.append({"gears": entries, "inputs": names[0], "outputs": names[1]})
    manifest = {"format": FORMAT, "config": config.to_dict(), "stages": stages,
                "data_config": model_data_config(model).to_dict()}
    if gears is not None:
        manifest["gears"] = list(gears)
    return write_manifest(out_dir, MANIFEST, manifest)


class MindIRAdaptiveDVT(MindSporeEngine):
    """The shared early-exit loop over per-stage MindIR graphs loaded with `ms.load`.

    Graphs exported with gears run a batch padded up to the next gear; `max_batch` defaults to
    the largest gear then.
    """

    def __init__(self, mindir_dir, thresholds, max_batch: int | None = None, exit_policy: ExitPolicy = MAX_SOFTMAX):
        mindir_dir = Path(mindir_dir)
        config, stages = read_manifest(mindir_dir, MANIFEST, FORMAT, "dvt export --format mindir")
        gears = [entry["batch"] for entry in stages[0]["gears"]] if "gears" in stages[0] else None
        if max_batch is None:
            max_batch = DEFAULT_MAX_BATCH if gears is None else max(gears)
        super().__init__(config, thresholds, max_batch, exit_policy)
        if gears is None:
            self.graphs = [nn.GraphCell(ms.load(str(mindir_dir / stage["file"]))) for stage in stages]
            return
        self.gears = check_gears(gears, max_batch)
        self._gear_graphs = [
            {entry["batch"]: nn.GraphCell(ms.load(str(mindir_dir / entry["file"]))) for entry in stage["gears"]}
            for stage in stages
        ]
        self.graphs = [self._gear_runner(index) for index in range(len(stages))]

    def _gear_runner(self, index: int):
        graphs = self._gear_graphs[index]
        return lambda images, *reuse: graphs[images.shape[0]](images, *reuse)
