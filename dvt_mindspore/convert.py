"""MindSpore model <-> canonical tensors (release key names, float32 NumPy arrays).

MindSpore names parameters by attribute path, and the attributes carry the PyTorch module
names, so a name differs from its release key in one way only: normalisation layers'
parameters are `gamma`/`beta` where PyTorch has `weight`/`bias`, and BatchNorm's running
statistics are `moving_mean`/`moving_variance` where PyTorch has `running_mean`/`running_var`.
`release_key` and `mindspore_names` are that mapping, one direction each.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from mindspore import Tensor, nn

from dvt_shared.weight_format import check_state_dict

_MINDSPORE_NORM_NAMES = {
    "gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_variance": "running_var",
}


def release_key(name: str) -> str:
    """The release key of MindSpore parameter `name` (gamma/beta -> weight/bias, moving_* -> running_*)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in _MINDSPORE_NORM_NAMES:
        return f"{prefix}.{_MINDSPORE_NORM_NAMES[leaf]}" if prefix else _MINDSPORE_NORM_NAMES[leaf]
    return name


def mindspore_names(tensors: Mapping[str, Any]) -> dict[str, str]:
    """MindSpore parameter name of every release key in `tensors` (arrays or shapes).

    In these architectures only normalisation layers have a one-dimensional `weight`;
    their `weight`/`bias` become `gamma`/`beta` and their `running_mean`/`running_var`
    `moving_mean`/`moving_variance`; every other key stays as it is.
    """
    norms = {
        key[: -len(".weight")] for key, value in tensors.items()
        if key.endswith(".weight") and len(_shape(value)) == 1
    }
    inverse = {leaf: ms_leaf for ms_leaf, leaf in _MINDSPORE_NORM_NAMES.items()}
    names = {}
    for key in tensors:
        prefix, _, leaf = key.rpartition(".")
        names[key] = f"{prefix}.{inverse[leaf]}" if prefix in norms and leaf in inverse else key
    return names


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def to_canonical(model: nn.Cell) -> dict[str, np.ndarray]:
    """Every parameter of `model`, frozen ones included, as a float32 NumPy array by release key."""
    return {
        release_key(name): param.asnumpy().astype(np.float32, copy=True)
        for name, param in model.parameters_and_names()
    }


def from_canonical(model: nn.Cell, tensors: Mapping[str, np.ndarray], source: str = "the weights") -> nn.Cell:
    """Load canonical `tensors` into `model` in place and return it.

    Raises ValueError naming every missing, unexpected and mis-shaped tensor before
    anything is loaded, so a failed load leaves the model as it was.
    """
    params = {release_key(name): param for name, param in model.parameters_and_names()}
    check_state_dict({key: tuple(param.shape) for key, param in params.items()}, tensors, source=source)
    for key, param in params.items():
        param.set_data(Tensor(np.asarray(tensors[key]), dtype=param.dtype))
    return model
