"""MindSpore model <-> canonical tensors (release key names, float32 NumPy arrays), and `.ckpt` files.

MindSpore names parameters by attribute path, and the attributes carry the PyTorch module
names, so a name differs from its release key in one way only: LayerNorm's parameters
are `gamma`/`beta` where the release has `weight`/`bias`. `release_key` and
`mindspore_names` are that mapping, one direction each.
"""
from __future__ import annotations

import contextlib
import os
import secrets
from typing import Any, Mapping

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from dvt_shared.weight_format import check_state_dict

_MINDSPORE_NORM_NAMES = {"gamma": "weight", "beta": "bias"}


def release_key(name: str) -> str:
    """The release key of MindSpore parameter `name` (gamma/beta -> weight/bias)."""
    prefix, _, leaf = name.rpartition(".")
    if leaf in _MINDSPORE_NORM_NAMES:
        return f"{prefix}.{_MINDSPORE_NORM_NAMES[leaf]}" if prefix else _MINDSPORE_NORM_NAMES[leaf]
    return name


def mindspore_names(tensors: Mapping[str, Any]) -> dict[str, str]:
    """MindSpore parameter name of every release key in `tensors` (arrays or shapes).

    In this architecture only normalisation layers have a one-dimensional `weight`;
    their `weight`/`bias` become `gamma`/`beta`, every other key stays as it is.
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


def save_ckpt(model_or_tensors: nn.Cell | Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a model, or canonical tensors, as a MindSpore `.ckpt` under MindSpore's own names.

    The file loads with `mindspore.load_checkpoint(path, net)`. It is written to a
    temporary name beside `path` and renamed over it, so `path` is never half-written.
    """
    tensors = to_canonical(model_or_tensors) if isinstance(model_or_tensors, nn.Cell) else model_or_tensors
    names = mindspore_names(tensors)
    entries = [{"name": names[key], "data": Tensor(np.asarray(value))} for key, value in tensors.items()]
    path = os.fspath(path)
    parent, base = os.path.split(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {path}: directory {parent} does not exist")
    # MindSpore appends .ckpt to any other name, so the temporary name ends in it.
    tmp = os.path.join(parent, f".{base}.{secrets.token_hex(8)}.tmp.ckpt")
    try:
        ms.save_checkpoint(entries, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_ckpt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore `.ckpt`, by release key, in file order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable MindSpore checkpoint ({exc})") from exc
    return {release_key(name): param.asnumpy() for name, param in params.items()}
