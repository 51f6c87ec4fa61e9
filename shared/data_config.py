"""The input each model expects, in the terms of timm's `pretrained_cfg`.

`timm.data.resolve_data_config(model=m)` reads `m.pretrained_cfg`; both backends build it
from here, so the evaluation transform a timm user gets is the one this project evaluates
with: one-channel 28x28 models take Fashion-MNIST's normalisation at their own size,
three-channel models the release's (bicubic resize of the short side to size / 0.875,
centre crop, ImageNet mean and std); other channel counts are only scaled to [0, 1].
"""
from __future__ import annotations

from .datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .models import family_of

# The release's evaluation statistics and crop (torchvision's ImageNet mean/std, 224 of 256).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_CROP_PCT = 0.875


def image_size(config) -> tuple[int, int]:
    """(height, width) of a config's input: a square `img_size` or VT-FPN's pair."""
    size = config.img_size
    return tuple(size) if isinstance(size, tuple) else (size, size)


def data_config(config) -> dict:
    """input_size, mean, std, interpolation, crop_pct and crop_mode of any model config."""
    if config.in_chans == 1:
        # Fashion-MNIST is stored at the model's size: nothing to crop, bilinear as `dvt predict` resizes.
        mean, std, interpolation, crop_pct = (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), "bilinear", 1.0
    elif config.in_chans == 3:
        mean, std, interpolation, crop_pct = IMAGENET_MEAN, IMAGENET_STD, "bicubic", RELEASE_CROP_PCT
    else:
        # No data set of ours has this many channels: no statistics to apply, pixels only scaled to [0, 1].
        mean, std, interpolation, crop_pct = (0.0,) * config.in_chans, (1.0,) * config.in_chans, "bilinear", 1.0
    return dict(
        input_size=(config.in_chans, *image_size(config)), mean=mean, std=std, interpolation=interpolation,
        crop_pct=crop_pct, crop_mode="center",
    )


def pool_size(config) -> tuple[int, int] | None:
    """timm's `pool_size`: (height, width) of the feature map `forward_features` returns at the config's
    input size, the map the global pool averages.

    A plain ResNet's is layer4's output, derived from the trunk's geometry (the stem, then three
    3x3/2 convolutions: 224 -> 7, 28 with the small stem -> 4). The other models have none, as
    timm's ViTs: DVT and VT-ResNet return tokens (B, N, C), VT-FPN four maps of four sizes.
    """
    if getattr(config, "family", None) != "resnet":
        return None
    height, width = image_size(config)
    return config.trunk.stage_sizes(height)[3], config.trunk.stage_sizes(width)[3]


def pretrained_cfg(config) -> dict:
    """timm's pretrained_cfg of the model built from `config` (either backend), without weights to fetch.

    `fixed_input_size`: every model checks that its input has the config's size (token grids
    and resampling matrices are built for it), so timm must not pick another.
    """
    classifier, first_conv = family_of(config).layer_names(config)
    return dict(
        architecture=config.name, url="", hf_hub_id=None, num_classes=config.num_classes,
        pool_size=pool_size(config), fixed_input_size=True, first_conv=first_conv, classifier=classifier,
        **data_config(config),
    )
