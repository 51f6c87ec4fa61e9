"""MindSpore model <-> canonical tensors (release key names, float32 NumPy arrays), and `.ckpt` files.

MindSpore names parameters by attribute path, and the attributes carry the PyTorch module
names, so a name differs from its release key in one way only: normalisation layers'
parameters are `gamma`/`beta` where PyTorch has `weight`/`bias`, and BatchNorm's running
statistics are `moving_mean`/`moving_variance` where PyTorch has `running_mean`/`running_var`.
`release_key` and `mindspore_names` are that mapping, one direction each.
"""
from __future__ import annotations

import os
import zlib
from typing import Any, Mapping

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

from dvt_shared.io_utils import atomic_path
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


def save_ckpt(model_or_tensors: nn.Cell | Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write a model, or canonical tensors, as a MindSpore `.ckpt` under MindSpore's own names.

    The file loads with `mindspore.load_checkpoint(path, net)` and carries a CRC32 that
    `load_ckpt` checks. It is written to a temporary name beside `path` and renamed over
    it, so `path` is never half-written.
    """
    tensors = to_canonical(model_or_tensors) if isinstance(model_or_tensors, nn.Cell) else model_or_tensors
    names = mindspore_names(tensors)
    entries = [{"name": names[key], "data": Tensor(np.asarray(value))} for key, value in tensors.items()]
    # MindSpore appends .ckpt to any other name, so the temporary name ends in it.
    with atomic_path(path, suffix=".ckpt") as tmp:
        ms.save_checkpoint(entries, tmp, crc_check=True)


# MindSpore ends a checkpoint saved with crc_check=True with this marker and the CRC32 of
# everything before it, as 10 big-endian bytes.
_CRC_MARKER = b"crc_num"
_CRC_BYTES = 10
_CHUNK_BYTES = 1 << 20


def _check_crc(path: str) -> None:
    """ValueError if the checkpoint carries a CRC32 (save_ckpt's do) that its contents do not match.

    Checked here rather than by MindSpore, which reports a mismatch as a permission problem.
    """
    size = os.path.getsize(path)
    trailer = len(_CRC_MARKER) + _CRC_BYTES
    with open(path, "rb") as handle:
        handle.seek(max(0, size - trailer))
        tail = handle.read()
        if not tail.startswith(_CRC_MARKER):
            return
        handle.seek(0)
        actual, remaining = 0, size - trailer
        while remaining > 0:
            chunk = handle.read(min(_CHUNK_BYTES, remaining))
            if not chunk:
                break
            actual = zlib.crc32(chunk, actual)
            remaining -= len(chunk)
    recorded = int.from_bytes(tail[len(_CRC_MARKER):], "big")
    if actual != recorded:
        raise ValueError(
            f"{path} is damaged: the CRC32 of its contents is {actual:#010x}, it was {recorded:#010x} when written"
        )


def load_ckpt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a MindSpore `.ckpt`, by release key, in file order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a checkpoint")
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_crc(path)
    try:
        params = ms.load_checkpoint(path)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{path} is not a readable MindSpore checkpoint ({exc})") from exc
    return {release_key(name): param.asnumpy() for name, param in params.items()}
