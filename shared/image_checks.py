"""Checks of an image batch before a model sees it: one set of rules and messages for every backend.

Each backend states what it found (shape, dtype, which images are finite) in its own
terms; these functions decide and word the error, so PyTorch, MindSpore and ONNX Runtime
refuse the same batches with the same messages.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def check_image_shape(shape: Sequence[int], config) -> None:
    """ValueError unless `shape` is (B, C, H, W) with B >= 1 and the config's C, H, W.

    `config` is any model config: a square `img_size` (DVT, VT-ResNet) or a (height, width) pair (VT-FPN).
    """
    shape = tuple(int(d) for d in shape)
    channels = config.in_chans
    height, width = config.img_size if isinstance(config.img_size, tuple) else (config.img_size, config.img_size)
    if len(shape) != 4:
        problem = f"{len(shape)} dimensions instead of 4"
    elif shape[0] < 1:
        problem = "an empty batch"
    elif shape[1] != channels:
        problem = f"{shape[1]} channels instead of {channels}"
    elif shape[2:] != (height, width):
        problem = f"{shape[2]}x{shape[3]} pixels instead of {height}x{width}"
    else:
        return
    raise ValueError(
        f"{config.name} expects images of shape (B, {channels}, {height}, {width}) with B >= 1, got {shape}: {problem}"
    )


def check_image_dtype(dtype: object, is_floating: bool, model_dtype: object | None = None) -> None:
    """TypeError unless the images are floating point, in the dtype the model computes in if given.

    A model never casts its input: an integer or bool batch has not been normalised, and
    a float64 batch would fail deep inside the first layer with a message naming neither.
    """
    if not is_floating:
        raise TypeError(f"images must be floating point, got {dtype}; normalise them first")
    if model_dtype is not None and str(dtype) != str(model_dtype):
        raise TypeError(f"images are {dtype} but the model computes in {model_dtype}; convert them to {model_dtype}")


def check_finite(finite_per_image: np.ndarray) -> None:
    """ValueError naming the images that hold NaN or Inf values (`finite_per_image` is False there)."""
    bad = np.flatnonzero(~np.asarray(finite_per_image, dtype=bool))
    if bad.size:
        shown = ", ".join(str(i) for i in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"{bad.size} of {finite_per_image.size} images hold NaN or Inf values (batch index {shown}); "
            "no prediction on them could be trusted"
        )
