"""MindSpore's own checkpoint format, `.ckpt`: canonical tensors in and out under MindSpore's names.

The mirror image of `dvt_torch.checkpoint`, which reads and writes the release's `.pth`.
"""
from __future__ import annotations

import os
import zlib
from typing import Mapping

import mindspore as ms
import numpy as np
from mindspore import Tensor, nn

from dvt_shared.data_config import apply_data_config
from dvt_shared.io_utils import atomic_path
from dvt_shared.weight_format import read_weight_tensors, recorded_data_config, write_weight_tensors

from .convert import from_canonical, mindspore_names, release_key, to_canonical


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


# This backend's own weight format (dvt_shared.weight_format.WEIGHT_FORMATS).
CHECKPOINT_FORMAT = "ckpt"


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], None]:
    """(tensors by release key, None: a `.ckpt` records no GMACs) of a MindSpore checkpoint."""
    return load_ckpt(path), None


def write_checkpoint(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], exit_flops: list[float] | None = None,
) -> None:
    """Canonical tensors as a MindSpore `.ckpt`, atomically (`exit_flops` has no place in it)."""
    save_ckpt(tensors, path)


def load_weights(model: nn.Cell, path: str | os.PathLike) -> nn.Cell:
    """Load canonical `.safetensors` or MindSpore `.ckpt` weights into `model`, every tensor checked
    first (see `from_canonical`), with the data config a canonical file records as the model's `pretrained_cfg`;
    returns the model."""
    from_canonical(model, read_weight_tensors(path, CHECKPOINT_FORMAT, load_ckpt), source=os.fspath(path))
    recorded = recorded_data_config(path)
    if recorded is not None:
        apply_data_config(model, recorded)
    return model


def save_weights(model: nn.Cell, path: str | os.PathLike) -> None:
    """Write `model`'s weights as canonical `.safetensors` (with its config) or as a MindSpore `.ckpt`, atomically."""
    write_weight_tensors(path, to_canonical(model), model.config, CHECKPOINT_FORMAT, write_checkpoint)
