"""Real early exit in PyTorch: the shared compaction loop over a `DVT`'s stages.

`precision="bf16"` runs the stages under `torch.autocast` (CPU or CUDA, from the model's
device): matmuls, linears and convolutions in bfloat16, the ops autocast keeps in fp32
(softmax, norms, reductions where listed) in fp32; weights stay fp32.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from dvt_shared.adaptive import DEFAULT_MAX_BATCH, AdaptiveEngine, Prediction
from dvt_shared.exit_policy import MAX_SOFTMAX, ExitPolicy

from .dvt import DVT, ReuseState, check_images

__all__ = ["AdaptiveDVT", "PRECISIONS", "Prediction", "autocast_for"]

PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device | str, precision: str):
    """The context a forward pass at `precision` runs in on `device`."""
    if precision not in PRECISIONS:
        raise ValueError(f"PyTorch precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


class AdaptiveDVT(AdaptiveEngine):
    """`AdaptiveDVT(model, thresholds).predict(images)`: each image runs only the stages it needs.

    precision: "fp32", or "bf16" or "fp16" (autocast on the model's device).
    """

    def __init__(
        self, model: DVT, thresholds, max_batch: int = DEFAULT_MAX_BATCH, precision: str = "fp32",
        exit_policy: ExitPolicy = MAX_SOFTMAX,
    ):
        super().__init__(model.config, thresholds, max_batch, exit_policy)
        self.model = model.eval()
        self.device = next(model.parameters()).device
        autocast_for(self.device, precision)  # checks the name
        self.precision = precision

    def to_backend(self, images: np.ndarray) -> torch.Tensor:
        """The batch on the model's device: it stays there through every stage."""
        return torch.from_numpy(images).to(self.device)

    def to_numpy(self, images: torch.Tensor) -> np.ndarray:
        return images.cpu().numpy()

    def num_images(self, images: torch.Tensor) -> int:
        check_images(images, self.config, self.model.dtype)
        return images.shape[0]

    @torch.inference_mode()
    def run_stage(self, index: int, images: torch.Tensor, state: ReuseState | None):
        with autocast_for(self.device, self.precision):
            logits, state = self.model.run_stage(index, images.to(self.device), state)
        # only the logits leave the device: the decision reads them
        return logits.float().cpu().numpy(), state

    def take(self, images: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        return images.index_select(0, torch.from_numpy(rows).to(images.device))

    def take_state(self, state: ReuseState, rows: np.ndarray) -> ReuseState:
        index = torch.from_numpy(rows).to(self.device)
        return state.map(lambda t: t.index_select(0, index))

    def concat(self, batches: list[torch.Tensor]) -> torch.Tensor:
        return batches[0] if len(batches) == 1 else torch.cat([b.to(self.device) for b in batches])

    def concat_states(self, states: list[ReuseState]) -> ReuseState:
        return ReuseState(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*states)))
