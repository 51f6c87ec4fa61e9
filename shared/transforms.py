"""The evaluation input pipeline, defined once: an image (PIL) -> the float32 (C, H, W) array a model takes,
as its data config (`dvt_shared.data_config.DataConfig`) says.

The image is converted to the model's channels (grey or RGB), its short side resized to
floor(size / crop_pct) with the config's interpolation, the centre cropped, scaled to [0, 1] and
standardised by the config's mean and std: timm's evaluation transform, with torchvision's rounding,
so that training's evaluation (`dvt_torch.data`) and `dvt predict` see the same pixels. NumPy and
Pillow only.
"""
from __future__ import annotations

import math

import numpy as np

from .data_config import DataConfig

# PIL modes of 16- and 32-bit grey images, whose convert("L") clips every value above 255.
_WIDE_GREY_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}
# The PIL mode an image is converted to for a model of this many channels.
CHANNEL_MODES = {1: "L", 3: "RGB"}


def eight_bit(image):
    """`image` loaded, with 16-bit grey scaled to 8 bits (0..65535 -> 0..255) instead of clipped."""
    from PIL import Image

    image.load()
    if image.mode not in _WIDE_GREY_MODES:
        return image
    # PNG's 16-bit grey opens as "I;16" or "I": its values stay in 0..65535.
    values = np.asarray(image, dtype=np.float64)
    scale = 255.0 / (2 ** _WIDE_GREY_MODES[image.mode] - 1)
    return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8), mode="L")


def image_channels(mode: str) -> int:
    """How many channels an image of PIL `mode` has as the project reads it: 1 for grey, 3 for colour."""
    return 1 if mode in ("1", "L", "LA", "I", "F") or mode in _WIDE_GREY_MODES else 3


def to_channels(image, channels: int):
    """`image` (loaded, 8-bit) as grey or RGB for a model of `channels` input channels."""
    if channels not in CHANNEL_MODES:
        raise ValueError(f"images are read as grey (1 channel) or RGB (3 channels), not {channels} channels")
    return eight_bit(image).convert(CHANNEL_MODES[channels])


def _pil_filter(name: str):
    from PIL import Image

    return getattr(Image.Resampling, name.upper())


def resize_and_centre_crop(image, size: tuple[int, int], crop_pct: float, interpolation: str):
    """The short side to floor(size / crop_pct), then the centre `size` (height, width), as timm and torchvision
    round (torchvision's Resize keeps the aspect ratio, truncating the long side)."""
    height, width = size
    scale = math.floor(min(height, width) / crop_pct)
    w, h = image.size
    if w <= h:
        new = (scale, int(scale * h / w))
    else:
        new = (int(scale * w / h), scale)
    if new != image.size:
        image = image.resize(new, _pil_filter(interpolation))
    left, top = int(round((new[0] - width) / 2.0)), int(round((new[1] - height) / 2.0))
    return image.crop((left, top, left + width, top + height))


def eval_array(image, data: DataConfig) -> np.ndarray:
    """`image` as the model `data` describes takes it: float32 (C, H, W)."""
    image = to_channels(image, data.channels)
    image = resize_and_centre_crop(image, data.image_size, data.crop_pct, data.interpolation)
    pixels = np.asarray(image)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return normalise_pixels(pixels[None], data)[0]


def normalise_pixels(pixels: np.ndarray, data: DataConfig) -> np.ndarray:
    """8-bit images (N, C, H, W) already at the model's size -> its float32 input, as `eval_array` ends:
    scaled to [0, 1], then standardised by the config's mean and std."""
    pixels = np.asarray(pixels)
    if pixels.ndim != 4 or pixels.shape[1] != data.channels:
        raise ValueError(f"pixels must be (N, {data.channels}, H, W), got {tuple(pixels.shape)}")
    shape = (1, data.channels, 1, 1)
    array = pixels.astype(np.float32) / 255.0
    mean = np.reshape(data.mean, shape).astype(np.float32)
    std = np.reshape(data.std, shape).astype(np.float32)
    return ((array - mean) / std).astype(np.float32)
