"""Real early exit in PyTorch: the shared compaction loop over a `DVT`'s stages."""
from __future__ import annotations

import numpy as np
import torch

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, AdaptiveEngine, Prediction

from .dvt import DVT, ReuseState, check_images

__all__ = ["AdaptiveDVT", "Prediction"]


class AdaptiveDVT(AdaptiveEngine):
    """`AdaptiveDVT(model, thresholds).predict(images)`: each image runs only the stages it needs."""

    def __init__(self, model: DVT, thresholds, max_batch: int = DEFAULT_MAX_BATCH):
        super().__init__(model.config, thresholds, max_batch)
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def _num_images(self, images: torch.Tensor) -> int:
        check_images(images, self.config, self.model.dtype)
        return images.shape[0]

    @torch.inference_mode()
    def _run_stage(self, index: int, images: torch.Tensor, state: ReuseState | None):
        logits, state = self.model.run_stage(index, images.to(self.device), state)
        return logits.float().cpu().numpy(), state

    def _take(self, images: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return images[torch.from_numpy(rows).to(images.device)]

    def _take_state(self, state: ReuseState, rows: np.ndarray) -> ReuseState:
        index = torch.from_numpy(rows).to(self.device)
        return ReuseState(*(None if t is None else t.index_select(0, index) for t in state))
