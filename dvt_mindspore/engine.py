"""Real early exit in MindSpore: the shared compaction loop over a `DVT`'s stages.

In graph mode a stage is compiled either for fixed batch sizes ("gears", the shapes Ascend's
inference stack takes: a compacted batch is padded up to the next gear, and each gear
compiles once per process) or once for a dynamic batch axis (`gears="dynamic"`).

`precision="fp16"` computes as Ascend does: matmuls and convolutions in fp16, normalisation,
softmax, exponentials and reductions in fp32, through MindSpore's operator-level mixed
precision (`mindspore.amp.auto_mixed_precision(..., "auto")`). That mechanism casts per
primitive, so it reaches the BatchMatMul/MatMul primitives and `ops.softmax` inside our
cells; the cell-level ones (`Cell.to_float`, the "O1" rewrite) would cast whole cells or
need the network rewritten, and would leave the softmax in `Attention` in fp16. One fp32
island: the T2T stem's performer (see `mixed_precision`).
"""
from __future__ import annotations

from collections.abc import Sequence

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn, ops

from dvt_shared.adaptive import (
    DEFAULT_MAX_BATCH,
    AdaptiveEngine,
    Prediction,
    check_gears,
    gear_pieces,
    power_of_two_gears,
    reuse_tensor_names,
)
from dvt_shared.cascade import ReuseState
from dvt_shared.exit_policy import MAX_SOFTMAX, ExitPolicy

from .dvt import DVT, check_images
from .layers import TokenPerformer

__all__ = [
    "AdaptiveDVT", "AllExitLogits", "DEFAULT_GEARS", "MindSporeEngine", "PRECISIONS", "Prediction", "SelectedRows",
    "StageGraph",
    "mixed_precision", "stage_inputs",
]

# Measured with benchmarks/early_exit.py (README): static gears run faster than the dynamic axis.
DEFAULT_GEARS = "powers-of-two"
PRECISIONS = ("fp32", "fp16")


def stage_inputs(model: DVT, index: int, batch: int | None = None) -> tuple:
    """What stage `index`'s graph takes (images, then the reuse tensors it reads): zeros of `batch`
    rows, or placeholders with a dynamic batch axis for `batch=None`."""
    config = model.config
    shapes = [(config.in_chans, config.img_size, config.img_size)]
    if index > 0:
        stage = model.stage(index)
        tokens = config.num_tokens[index - 1]
        if stage.feature_reuse:
            shapes.append((tokens, config.embed_dim))
        if stage.relation_reuse:
            shapes.append((config.relation_channels, tokens, tokens))
    if batch is None:
        return tuple(Tensor(shape=[None, *shape], dtype=ms.float32) for shape in shapes)
    return tuple(Tensor(np.zeros((batch, *shape), dtype=np.float32)) for shape in shapes)


class StageGraph(nn.Cell):
    """Stage `index` with exactly the tensors it consumes and produces: what the engine compiles and
    `dvt export --format mindir` writes."""

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
        # float32 between graphs whatever the precision inside: one contract for every graph
        out = (logits.astype(ms.float32),)
        if self.gives_features:
            out = out + (next_features.astype(ms.float32),)
        if self.gives_relations:
            out = out + (next_relations.astype(ms.float32),)
        return out


def mixed_precision(graph: nn.Cell, precision: str) -> nn.Cell:
    """`graph` computing at `precision`: "fp32" as it is, "fp16" the way Ascend runs it (see the module doc)."""
    if precision not in PRECISIONS:
        raise ValueError(f"MindSpore precision must be one of {PRECISIONS}, got {precision!r} (bf16 is PyTorch's)")
    if precision == "fp32":
        return graph
    # The T2T stem's performer stays fp32: its positive random features exp(w.x - |x|^2/2) exceed
    # fp16's 65504 on real images (the shipped model's stem gives inf, then NaN, on every one),
    # and `to_float` takes precedence over the operator lists (no-op casts at fp32).
    for _, cell in graph.cells_and_names():
        if isinstance(cell, TokenPerformer):
            cell.to_float(ms.float32)
    # Operator-level lists: MatMul/BatchMatMul/Conv2D/Dense in fp16; LayerNorm, Softmax, Exp, sums in fp32.
    return ms.amp.auto_mixed_precision(graph, "auto", dtype=ms.float16)


class AllExitLogits:
    """`AllExitLogits(model, precision)(images)`: float32 logits of every exit at `precision`, stage by
    stage, through graphs that compile once per shape (what `all_exit_logits` runs below fp32)."""

    def __init__(self, model: DVT, precision: str = "fp32"):
        self.model = model
        model.set_train(False)
        self.graphs = [mixed_precision(StageGraph(model, index), precision) for index in range(model.num_exits)]

    def __call__(self, images: Tensor) -> tuple[Tensor, ...]:
        check_images(images, self.model.config, self.model.dtype)
        outputs, state = [], ()
        for graph in self.graphs:
            logits, *state = graph(images, *state)
            outputs.append(logits)
        return tuple(outputs)


class SelectedRows:
    """Rows `index` of `tensors` (the images, or a ReuseState), selected lazily: the engine gathers once per
    stage input, when a stage runs, however many times rows were selected since (compaction, chunking, gear
    padding)."""

    def __init__(self, tensors: tuple, index: np.ndarray):
        self.tensors, self.index = tensors, index

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the first tensor's selected rows."""
        return (self.index.size, *self.tensors[0].shape[1:])

    def take(self, rows: np.ndarray) -> "SelectedRows":
        return SelectedRows(self.tensors, self.index[rows])

    def gathered(self, rows: np.ndarray) -> tuple:
        """The tensors at rows `index[rows]` as the stage graphs take them (positionally), without a copy where
        that is all of them in order."""
        held = self.tensors.positional() if isinstance(self.tensors, ReuseState) else self.tensors
        index = self.index[rows]
        if index.size == held[0].shape[0] and np.array_equal(index, np.arange(index.size)):
            return held
        index = Tensor(index.astype(np.int32))
        return tuple(ops.gather(t, index, 0) for t in held)


class MindSporeEngine(AdaptiveEngine):
    """Batch handling of the early-exit loop on MindSpore tensors, over `self.graphs` (one callable
    per stage: images and the previous stage's reuse tensors in, logits and its own out).

    With gears, a batch runs as the pieces `gear_pieces` plans: a gear run full, or rows padded
    up to a gear with copies of the piece's first row. Rows of a batch never mix, so neither
    padding nor splitting can change the real rows' results.
    """

    # The dtype the stages take; exported graphs are float32.
    input_dtype = ms.float32
    # Batch sizes the stages are run at; None for any size (a dynamic batch axis, or PyNative).
    gears: tuple[int, ...] | None = None
    graphs: list

    def to_backend(self, images: np.ndarray) -> ms.Tensor:
        return ms.Tensor(images)

    def to_numpy(self, images) -> np.ndarray:
        if isinstance(images, SelectedRows):
            return images.gathered(np.arange(images.index.size))[0].asnumpy()
        return images.asnumpy()

    def num_images(self, images) -> int:
        if isinstance(images, SelectedRows):
            return images.index.size
        check_images(images, self.config, self.input_dtype)
        return images.shape[0]

    def take(self, images, rows: np.ndarray) -> SelectedRows:
        if isinstance(images, SelectedRows):
            return images.take(rows)
        return SelectedRows((images,), rows)

    def take_state(self, state: SelectedRows, rows: np.ndarray) -> SelectedRows:
        return state.take(rows)

    @staticmethod
    def _joined(groups: list[SelectedRows]) -> tuple:
        """The tensors of several groups' selected rows, gathered once per group, then joined."""
        held = [g.gathered(np.arange(g.index.size)) for g in groups]
        return tuple(ops.cat(parts, axis=0) for parts in zip(*held))

    def concat(self, batches: list) -> SelectedRows:
        groups = [b if isinstance(b, SelectedRows) else SelectedRows((b,), np.arange(b.shape[0])) for b in batches]
        if len(groups) == 1:
            return groups[0]
        return SelectedRows(self._joined(groups), np.arange(sum(g.index.size for g in groups)))

    def concat_states(self, states: list[SelectedRows]) -> SelectedRows:
        if len(states) == 1:
            return states[0]
        # one batch of rows from several requests
        names = [name for name, t in zip(ReuseState._fields, states[0].tensors) if t is not None]
        joined = ReuseState.from_positional(list(self._joined(states)), names)
        return SelectedRows(joined, np.arange(sum(s.index.size for s in states)))

    def run_stage(self, index: int, images, state: SelectedRows | None):
        if not isinstance(images, SelectedRows):  # a whole chunk, checked by `predict`
            images = SelectedRows((images,), np.arange(images.shape[0]))
        batch = images.index.size
        pieces = gear_pieces(batch, self.gears) if self.gears is not None else [(batch, batch)]
        logits, outputs, start = [], [], 0
        for rows, gear in pieces:
            # the piece's rows, then copies of its first row up to the gear
            piece = np.concatenate([np.arange(start, start + rows), np.full(gear - rows, start)])
            inputs = images.gathered(piece) + (state.gathered(piece) if state is not None else ())
            out = self.graphs[index](*inputs)
            logits.append(out[0].asnumpy()[:rows].astype(np.float32))
            outputs.append(tuple(out[1:]))
            start += rows
        if not outputs[0]:
            return np.concatenate(logits), None
        offsets = np.cumsum([0] + [gear for _, gear in pieces[:-1]])
        real = np.concatenate([offset + np.arange(rows) for offset, (rows, _) in zip(offsets, pieces)])
        tensors = outputs[0] if len(outputs) == 1 else tuple(ops.cat(parts, axis=0) for parts in zip(*outputs))
        state = ReuseState.from_positional(tensors, reuse_tensor_names(self.config, index))
        return np.concatenate(logits), SelectedRows(state, real)


def resolve_gears(gears, max_batch: int) -> tuple[int, ...] | None:
    """The gear tuple for `gears` ("powers-of-two", "dynamic" -> None, or batch sizes)."""
    if isinstance(gears, str):
        if gears == "dynamic":
            return None
        if gears == "powers-of-two":
            return power_of_two_gears(max_batch)
        raise ValueError(f"gears must be 'powers-of-two', 'dynamic' or a list of batch sizes, got {gears!r}")
    return check_gears(gears, max_batch)


class AdaptiveDVT(MindSporeEngine):
    """`AdaptiveDVT(model, thresholds).predict(images)`: each image runs only the stages it needs.

    gears: "powers-of-two" (1, 2, 4, ... up to max_batch), a list of batch sizes, or "dynamic"
    (one graph per stage with a dynamic batch axis); used in graph mode only.
    precision: "fp32" or "fp16" (matmuls and convolutions in fp16, as on Ascend).
    """

    def __init__(
        self, model: DVT, thresholds, max_batch: int = DEFAULT_MAX_BATCH,
        gears: str | Sequence[int] = DEFAULT_GEARS, precision: str = "fp32", exit_policy: ExitPolicy = MAX_SOFTMAX,
    ):
        super().__init__(model.config, thresholds, max_batch, exit_policy)
        self.model = model
        self.input_dtype = model.dtype
        self.precision = precision
        model.set_train(False)
        # The engine's own graph cells, whose compile caches hold exactly this engine's shapes (the
        # model's cells are shared; fp16 marks its T2T performers fp32, a no-op at fp32).
        self.graphs = [mixed_precision(StageGraph(model, index), precision) for index in range(model.num_exits)]
        resolved = resolve_gears(gears, max_batch)
        graph_mode = ms.get_context("mode") == ms.GRAPH_MODE
        self.gears = resolved if graph_mode else None
        if graph_mode and resolved is None:
            for index, graph in enumerate(self.graphs):
                graph.set_inputs(*stage_inputs(model, index))

    def compiled_shapes(self) -> list[int]:
        """How many graphs each stage has compiled so far in this process."""
        return [len(graph.compile_cache) for graph in self.graphs]
