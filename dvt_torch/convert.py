"""PyTorch model <-> canonical tensors (release key names, float32 NumPy arrays).

The canonical keys are the model's own state-dict keys, persistent buffers included
(the performers' `w`, the sinusoid `pos_embed`, BatchNorm's running statistics), so the
conversion renames nothing. BatchNorm's `num_batches_tracked` is the one exception: it
is a step counter, not a weight, that only a momentum-free BatchNorm reads (none here)
and MindSpore has no counterpart for, so it stays out and a load leaves the model's own.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from torch import nn

from dvt_shared.weight_format import check_state_dict

_STEP_COUNTER = "num_batches_tracked"


def _canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without BatchNorm's step counters."""
    return {key: value for key, value in model.state_dict().items() if key.rpartition(".")[2] != _STEP_COUNTER}


def to_canonical(model: nn.Module) -> dict[str, np.ndarray]:
    """Every state-dict tensor of `model` (step counters aside) as a float32 NumPy array, by release key."""
    return {
        key: value.detach().cpu().numpy().astype(np.float32, copy=True)
        for key, value in _canonical_state(model).items()
    }


def from_canonical(model: nn.Module, tensors: Mapping[str, np.ndarray], source: str = "the weights") -> nn.Module:
    """Load canonical `tensors` into `model` in place and return it.

    Raises ValueError naming every missing, unexpected and mis-shaped tensor before
    anything is loaded, so a failed load leaves the model as it was.
    """
    state = _canonical_state(model)
    check_state_dict({key: tuple(value.shape) for key, value in state.items()}, tensors, source=source)
    loaded = {key: torch.as_tensor(np.asarray(tensors[key]), dtype=value.dtype) for key, value in state.items()}
    model.load_state_dict({**model.state_dict(), **loaded}, strict=True)
    return model
