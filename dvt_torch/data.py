"""Training and evaluation data for DVT in PyTorch.

Fashion-MNIST lives in memory as one normalised tensor and is augmented a whole batch
at a time with an explicit torch.Generator: on a small CPU this is far faster than
per-image PIL transforms, and the generator's state is all a checkpoint needs to
replay the augmentation exactly. ImageNet-style folders (`train/CLASS/*.jpg`,
`val/CLASS/*.jpg`) go through torchvision's ImageFolder, read and transformed for the model (timm).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from dvt_shared.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, load_fashion_mnist, normalise_fashion_mnist
# timm's RandomErasing defaults: erased area fraction and log-uniform aspect-ratio range.
ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 1 / 0.3)


@dataclass
class TensorSplit:
    """A whole split in memory: images (N, C, H, W) float32 normalised, labels (N,) int64."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> "TensorSplit":
        return TensorSplit(self.images[indices], self.labels[indices])


def normalise_uint8(images) -> torch.Tensor:
    """uint8 (N, H, W) grey images -> float32 (N, 1, H, W), scaled to [0, 1] then standardised."""
    return torch.from_numpy(normalise_fashion_mnist(np.asarray(images)))


def fashion_mnist_splits(data_dir: str | os.PathLike | None = None) -> tuple[TensorSplit, TensorSplit]:
    """(train, test) Fashion-MNIST as normalised tensors; see dvt_shared.datasets.load_fashion_mnist."""
    raw = load_fashion_mnist(data_dir)
    return tuple(
        TensorSplit(normalise_uint8(raw[f"{split}_images"]), torch.as_tensor(raw[f"{split}_labels"]).long())
        for split in ("train", "test")
    )


def _uniform(n: int, generator: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def random_crop(x: torch.Tensor, padding: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Pad every image by `padding` with `fill`, then cut a random window of the original size from each."""
    if padding <= 0:
        return x
    batch, _, height, width = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4, value=fill)
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator)
    rows = (top[:, None] + torch.arange(height))[:, :, None]
    cols = (left[:, None] + torch.arange(width))[:, None, :]
    # Advanced indices around a slice put the batch/row/col axes first: (B, H, W, C).
    crops = padded[torch.arange(batch)[:, None, None], :, rows, cols]
    return crops.permute(0, 3, 1, 2).contiguous()


def random_flip(x: torch.Tensor, generator: torch.Generator, prob: float = 0.5) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator) < prob)[:, None, None, None]
    return torch.where(flip, x.flip(-1), x)


def random_erase(x: torch.Tensor, prob: float, generator: torch.Generator, fill: float = 0.0) -> torch.Tensor:
    """timm-style random erasing, vectorised: one rectangle per chosen image set to `fill`.

    The rectangle's area and aspect ratio follow timm's defaults; where it would not fit it
    is clamped to the image rather than re-drawn, so every image costs the same draws.
    """
    if prob <= 0:
        return x
    batch, _, height, width = x.shape
    apply = torch.rand(batch, generator=generator) < prob
    area = _uniform(batch, generator, *ERASE_AREA) * height * width
    ratio = torch.exp(_uniform(batch, generator, math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])))
    h = torch.sqrt(area * ratio).round().clamp(1, height).long()
    w = torch.sqrt(area / ratio).round().clamp(1, width).long()
    top = (torch.rand(batch, generator=generator) * (height - h + 1)).long()
    left = (torch.rand(batch, generator=generator) * (width - w + 1)).long()
    rows, cols = torch.arange(height)[None, :], torch.arange(width)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    mask = (in_rows[:, :, None] & in_cols[:, None, :] & apply[:, None, None])[:, None]
    return x.masked_fill(mask, fill)


@dataclass(frozen=True)
class BatchAugment:
    """Train-time augmentation of a normalised batch: crop with padding, horizontal flip, erasing.

    `pad_value` is what padding adds, in normalised units (a black border for Fashion-MNIST).
    """

    crop_padding: int = 2
    flip: bool = True
    erase_prob: float = 0.0
    pad_value: float = -FASHION_MNIST_MEAN / FASHION_MNIST_STD

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = random_crop(x, self.crop_padding, self.pad_value, generator)
        if self.flip:
            x = random_flip(x, generator)
        return random_erase(x, self.erase_prob, generator)


def seeded_subset(n: int, size: int | None, seed: int) -> torch.Tensor | None:
    """`size` indices of range(n) drawn once from `seed` (sorted), or None for the whole set."""
    if size is None or size >= n:
        return None
    if size < 1:
        raise ValueError(f"a subset needs at least one sample, got {size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:size].sort().values


def epoch_indices(n: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """This rank's shuffled sample order for `epoch`, like DistributedSampler(drop_last=True).

    Every rank draws the same permutation from (seed, epoch), so the shards are disjoint
    without communication and any epoch can be replayed on resume.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator)
    per_rank = n // world_size
    return order[: per_rank * world_size][rank::world_size]


def tensor_batches(
    split: TensorSplit, indices: torch.Tensor, batch_size: int, start_batch: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Full batches of `split` in the order `indices`, from batch `start_batch` (a partial last batch is dropped)."""
    for b in range(start_batch, len(indices) // batch_size):
        chosen = indices[b * batch_size:(b + 1) * batch_size]
        yield split.images[chosen], split.labels[chosen]


def eval_batches(split: TensorSplit, batch_size: int, rank: int = 0, world_size: int = 1):
    """This rank's contiguous share of `split`, in batches, every sample kept."""
    n = len(split)
    begin, end = n * rank // world_size, n * (rank + 1) // world_size
    for start in range(begin, end, batch_size):
        stop = min(start + batch_size, end)
        yield split.images[start:stop], split.labels[start:stop]


def _grey_image(path: str):
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.open(handle).convert("L")


def _rgb_image(path: str):
    from PIL import Image

    with open(path, "rb") as handle:
        return Image.open(handle).convert("RGB")


# How an image file is read for a model of this many input channels.
FOLDER_LOADERS = {1: _grey_image, 3: _rgb_image}


def folder_loader(config):
    """The function that reads an image file for the model `config` describes: grey or RGB."""
    if config.in_chans not in FOLDER_LOADERS:
        raise ValueError(
            f"{config.name} takes {config.in_chans}-channel images; image folders are read as grey (1 channel) "
            "or RGB (3 channels)"
        )
    return FOLDER_LOADERS[config.in_chans]


def folder_transforms(config) -> tuple:
    """(train, eval) transforms of image files for the model `config` describes, built by timm from the
    model's own data config (`dvt_shared.data_config`: channels, size, mean, std, interpolation, crop):
    training takes a random resized crop and a horizontal flip, evaluation the model's centre crop."""
    from timm.data import create_transform

    from dvt_shared.data_config import data_config

    cfg = data_config(config)
    common = dict(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"], interpolation=cfg["interpolation"])
    train = create_transform(**common, is_training=True, hflip=0.5, color_jitter=None)
    evaluation = create_transform(**common, is_training=False, crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    return train, evaluation


def image_folder_splits(root: str | os.PathLike):
    """(train, val) torchvision ImageFolders of `root`/train and `root`/val; how their images are read and
    transformed is set for a model with `folder_loader` and `folder_transforms`."""
    from torchvision.datasets import ImageFolder

    root = os.fspath(root)
    missing = [s for s in ("train", "val") if not os.path.isdir(os.path.join(root, s))]
    if missing:
        raise FileNotFoundError(
            f"{root} is not an image-folder dataset: missing {', '.join(missing)}/ "
            "(expected train/CLASS/*.jpg and val/CLASS/*.jpg)"
        )
    train, val = ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "val"))
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ and val/ hold different classes ({len(train.classes)} vs {len(val.classes)})")
    return train, val
