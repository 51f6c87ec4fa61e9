"""Real early exit in MindSpore: the shared compaction loop over a `DVT`'s stages.

In graph mode each stage is compiled once for a dynamic batch size, so compaction
(smaller and smaller batches) never triggers a recompilation.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, AdaptiveEngine, Prediction

from .dvt import DVT, ReuseState, check_images

__all__ = ["AdaptiveDVT", "MindSporeEngine", "Prediction", "dynamic_stage_inputs"]


def dynamic_stage_inputs(model: DVT, index: int) -> tuple:
    """Input placeholders of stage `index` with a dynamic batch axis (None where unused)."""
    config = model.config
    images = Tensor(shape=[None, config.in_chans, config.img_size, config.img_size], dtype=ms.float32)
    if index == 0:
        return images, None, None
    stage = model.stage(index)
    tokens = config.num_tokens[index - 1]
    features = Tensor(shape=[None, tokens, config.embed_dim], dtype=ms.float32) if stage.feature_reuse else None
    relations = (
        Tensor(shape=[None, config.relation_channels, tokens, tokens], dtype=ms.float32)
        if stage.relation_reuse else None
    )
    return images, features, relations


class MindSporeEngine(AdaptiveEngine):
    """Batch handling of the early-exit loop on MindSpore tensors; subclasses run the stages."""

    # The dtype the stages compute in; exported graphs are float32.
    input_dtype = ms.float32

    def _num_images(self, images: Tensor) -> int:
        check_images(images, self.config, self.input_dtype)
        return images.shape[0]

    def _take(self, images: Tensor, rows: np.ndarray) -> Tensor:
        return ops.gather(images, Tensor(rows.astype(np.int32)), 0)

    def _take_state(self, state: tuple, rows: np.ndarray) -> tuple:
        index = Tensor(rows.astype(np.int32))
        taken = [None if t is None else ops.gather(t, index, 0) for t in state]
        return state._make(taken) if isinstance(state, ReuseState) else tuple(taken)


class AdaptiveDVT(MindSporeEngine):
    """`AdaptiveDVT(model, thresholds).predict(images)`: each image runs only the stages it needs."""

    def __init__(self, model: DVT, thresholds, max_batch: int = DEFAULT_MAX_BATCH):
        super().__init__(model.config, thresholds, max_batch)
        self.model = model
        self.input_dtype = model.dtype
        model.set_train(False)
        if ms.get_context("mode") == ms.GRAPH_MODE:
            for index in range(model.num_exits):
                model.stage(index).set_inputs(*dynamic_stage_inputs(model, index))

    def _run_stage(self, index: int, images: Tensor, state: ReuseState | None):
        logits, state = self.model.run_stage(index, images, state)
        return logits.asnumpy().astype(np.float32), state
