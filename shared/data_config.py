"""The input each model expects and the names of its classes: its data config, in the terms of timm's
`pretrained_cfg`.

A `DataConfig` travels with trained weights (the canonical metadata's `dvt.data_config`): input
size, mean, std, interpolation, crop and the class names, in the order the model was trained on
them. Every reader (predict, evaluate, calibrate, serve, the export manifests, timm's
`resolve_data_config` through `pretrained_cfg`) takes it from there. Weights that record none get
`default_data_config`, the rule by channel count: one-channel 28x28 models Fashion-MNIST's
statistics and class names, three-channel models the release's evaluation transform (bicubic
resize of the short side to size / 0.875, centre crop, ImageNet mean and std); other channel
counts are only scaled to [0, 1].
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace

from .datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_IMAGE_SIZE, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from .models import family_of

# The release's evaluation statistics and crop (torchvision's ImageNet mean/std, 224 of 256).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_CROP_PCT = 0.875
# Resampling filters by timm's names (PIL's filters of the same names).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
CROP_MODES = ("center",)


@dataclass(frozen=True)
class DataConfig:
    """How images become a model's input, and what its class indices mean.

    input_size: (channels, height, width); mean, std: one value per channel, of pixels scaled to [0, 1];
    the short side is resized to floor(size / crop_pct) with `interpolation`, then the centre cropped;
    class_names: one per class in the order of the model's outputs, or None where unknown.
    """

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"input_size must be (channels, height, width) of sizes >= 1, got {self.input_size!r}")
        mean, std = tuple(float(v) for v in self.mean), tuple(float(v) for v in self.std)
        if len(mean) != size[0] or len(std) != size[0]:
            raise ValueError(f"mean {list(mean)} and std {list(std)} need one value per channel ({size[0]})")
        if not all(math.isfinite(v) for v in mean) or not all(math.isfinite(v) and v > 0 for v in std):
            raise ValueError(f"mean must be finite and std finite and > 0; got mean {list(mean)}, std {list(std)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}")
        if not 0 < float(self.crop_pct) <= 1:
            raise ValueError(f"crop_pct must lie in (0, 1], got {self.crop_pct}")
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not one of {', '.join(CROP_MODES)}")
        names = self.class_names
        if names is not None:
            names = tuple(names)
            if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError(f"class_names must be distinct non-empty strings, got {list(names)}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))
        object.__setattr__(self, "class_names", names)

    @property
    def channels(self) -> int:
        return self.input_size[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return self.input_size[1], self.input_size[2]

    def replace(self, **changes) -> "DataConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["input_size"], values["mean"], values["std"] = list(self.input_size), list(self.mean), list(self.std)
        values["class_names"] = list(self.class_names) if self.class_names is not None else None
        return values

    @classmethod
    def from_dict(cls, values: dict) -> "DataConfig":
        if not isinstance(values, dict):
            raise ValueError(f"a data config is a JSON object, got {type(values).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(known)}")
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"incomplete data config ({exc})") from exc

    def timm_cfg(self) -> dict:
        """The fields of timm's pretrained_cfg this config sets (timm names the class names `label_names`)."""
        return dict(input_size=self.input_size, mean=self.mean, std=self.std, interpolation=self.interpolation,
                    crop_pct=self.crop_pct, crop_mode=self.crop_mode, label_names=self.class_names)

    def check_model(self, config, source: str = "the data config") -> None:
        """ValueError unless a model of `config` takes these images and predicts these classes."""
        expected = (config.in_chans, *image_size(config))
        if self.input_size != expected:
            raise ValueError(f"{source} is for {'x'.join(map(str, self.input_size))} images; {config.name} takes "
                             f"{'x'.join(map(str, expected))}")
        if self.class_names is not None and len(self.class_names) != config.num_classes:
            raise ValueError(f"{source} names {len(self.class_names)} classes; {config.name} has "
                             f"{config.num_classes} outputs")

    def label(self, index: int) -> str:
        """The name of class `index`, or the index itself where the names are unknown."""
        return self.class_names[index] if self.class_names is not None else str(index)


def image_size(config) -> tuple[int, int]:
    """(height, width) of a config's input: a square `img_size` or VT-FPN's pair."""
    size = config.img_size
    return tuple(size) if isinstance(size, tuple) else (size, size)


def default_data_config(config) -> DataConfig:
    """The data config of a model whose weights record none: the rule by channel count (module docstring)."""
    size = (config.in_chans, *image_size(config))
    if config.in_chans == 1:
        # Fashion-MNIST is stored at the model's size: nothing to crop, bilinear as `dvt predict` resizes.
        fmnist = size == (1, FASHION_MNIST_IMAGE_SIZE, FASHION_MNIST_IMAGE_SIZE)
        names = FASHION_MNIST_CLASSES if fmnist and config.num_classes == len(FASHION_MNIST_CLASSES) else None
        return DataConfig(size, (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,), "bilinear", 1.0, class_names=names)
    if config.in_chans == 3:
        return DataConfig(size, IMAGENET_MEAN, IMAGENET_STD, "bicubic", RELEASE_CROP_PCT)
    # No data set of ours has this many channels: no statistics to apply, pixels only scaled to [0, 1].
    return DataConfig(size, (0.0,) * config.in_chans, (1.0,) * config.in_chans, "bilinear", 1.0)


_warned: set[str] = set()


def weights_data_config(config, metadata, source: str) -> DataConfig:
    """The data config weights record (checked against their config), or, for weights that record none,
    `default_data_config` with a warning said once per file."""
    recorded = getattr(metadata, "data_config", None)  # None: weights with no metadata (.pth, .ckpt)
    if recorded is not None:
        recorded.check_model(config, f"{source}'s data config")
        return recorded
    fallback = default_data_config(config)
    if source not in _warned:
        _warned.add(source)
        names = "Fashion-MNIST's class names, " if fallback.class_names == FASHION_MNIST_CLASSES else (
            "class indices for labels, ")
        warnings.warn(
            f"{source} records no data config (class names, normalisation): using the defaults for a "
            f"{config.in_chans}-channel model ({names}mean {list(fallback.mean)}, std {list(fallback.std)}); "
            "weights written by `dvt train` record theirs, and `dvt calibrate --data` records the data's class names",
            UserWarning, stacklevel=2,
        )
    return fallback


def data_config(config) -> dict:
    """input_size, mean, std, interpolation, crop_pct and crop_mode of any model config (the default rule)."""
    cfg = default_data_config(config).timm_cfg()
    cfg.pop("label_names")
    return cfg


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


def apply_data_config(model, data: DataConfig) -> None:
    """Set the data config weights record on the model that holds them: its `pretrained_cfg` (and so timm's
    `resolve_data_config`) gives their normalisation and class names."""
    data.check_model(model.config)
    model.pretrained_cfg = {**model.pretrained_cfg, **data.timm_cfg()}


def model_data_config(model) -> DataConfig:
    """The data config a model carries in its `pretrained_cfg` (the recorded one where `apply_data_config` set it)."""
    cfg = model.pretrained_cfg
    return DataConfig(tuple(cfg["input_size"]), tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"],
                      cfg["crop_pct"], cfg.get("crop_mode", "center"), cfg.get("label_names"))
