"""The evaluation input pipeline, defined once: an image (PIL) -> the float32 (C, H, W) array a model takes.

Three-channel models get the release's evaluation transform (bicubic resize of the short side
to size / 0.875, centre crop, ImageNet mean and std), with torchvision's rounding so that
training's evaluation (`dvt_torch.data`) and `dvt predict` see the same pixels. One-channel
models get grey images resized to the model's size and Fashion-MNIST's normalisation.
NumPy and Pillow only.
"""
from __future__ import annotations

import numpy as np

from .datasets import normalise_fashion_mnist

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The release evaluates at 224 after resizing the short side to 256.
EVAL_CROP_RATIO = 224 / 256

# PIL modes of 16- and 32-bit grey images, whose convert("L") clips every value above 255.
_WIDE_GREY_MODES = {"I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16, "I": 16}


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


def resize_and_centre_crop(image, img_size: int):
    """The short side to int(img_size / 0.875) (bicubic), then the centre img_size x img_size, as torchvision rounds."""
    from PIL import Image

    short = int(img_size / EVAL_CROP_RATIO)
    width, height = image.size
    if width <= height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.BICUBIC)
    left, top = int(round((size[0] - img_size) / 2.0)), int(round((size[1] - img_size) / 2.0))
    return image.crop((left, top, left + img_size, top + img_size))


def eval_array(image, in_chans: int, img_size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """`image` as a model with `in_chans` channels and `img_size` inputs takes it: float32 (C, H, W)."""
    from PIL import Image

    image = eight_bit(image)
    if in_chans == 1:
        grey = image.convert("L").resize((img_size, img_size), Image.BILINEAR)
        return normalise_fashion_mnist(np.asarray(grey)[None])[0]
    rgb = resize_and_centre_crop(image.convert("RGB"), img_size)
    return normalise_pixels(np.asarray(rgb).transpose(2, 0, 1)[None], mean, std)[0]


def normalise_pixels(pixels: np.ndarray, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """8-bit images (N, C, H, W) already at the model's size -> its float32 input, as `eval_array` ends:
    one channel by Fashion-MNIST's statistics, three by `mean` and `std` after scaling to [0, 1]."""
    pixels = np.asarray(pixels)
    if pixels.shape[1] == 1:
        return normalise_fashion_mnist(pixels[:, 0])
    array = pixels.astype(np.float32) / 255.0
    array = (array - np.reshape(mean, (1, 3, 1, 1)).astype(np.float32)) / np.reshape(std, (1, 3, 1, 1)).astype(
        np.float32)
    return array.astype(np.float32)
