"""Training and evaluation data for DVT in PyTorch.

Fashion-MNIST lives in memory as one normalised tensor and is augmented a whole batch
at a time with an explicit torch.Generator: on a small CPU this is far faster than
per-image PIL transforms, and the generator's state is all a checkpoint needs to
replay the augmentation exactly. ImageNet-style folders (`train/CLASS/*.jpg`,
`val/CLASS/*.jpg`, or one `CLASS/*.jpg` folder split by --val-split) go through
torchvision's ImageFolder, read and augmented for the model by timm's transforms, each image
with random draws seeded by (run seed, epoch, image): the same on any worker, so a resumed
run replays them and the loaders' workers persist across epochs.
"""
from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from dvt_shared.datasets import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_IMAGE_SIZE,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    normalise_fashion_mnist,
)

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


@dataclass(frozen=True)
class FolderAugment:
    """How training images read from files are augmented: the arguments of timm's create_transform
    that the release's recipe sets (its flags --aa, --reprob, --remode, --recount, --train-interpolation...)."""

    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "const"
    re_count: int = 1
    interpolation: str | None = None  # None: the model's own
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float | None = None

    @classmethod
    def from_args(cls, args) -> "FolderAugment":
        return cls(
            auto_augment=args.aa, re_prob=args.random_erase, re_mode=args.remode, re_count=args.recount,
            interpolation=args.train_interpolation, scale=tuple(args.scale), ratio=tuple(args.ratio), hflip=args.hflip,
            color_jitter=args.color_jitter or None,
        )


def folder_transforms(config, augment: FolderAugment = FolderAugment()) -> tuple:
    """(train, eval) transforms of image files for the model `config` describes, built by timm from the
    model's own data config (`dvt_shared.data_config`: channels, size, mean, std, interpolation, crop):
    training takes a random resized crop, a flip and what `augment` adds; evaluation the model's centre crop."""
    from timm.data import create_transform

    from dvt_shared.data_config import data_config

    cfg = data_config(config)
    common = dict(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"])
    train = create_transform(
        **common, is_training=True, interpolation=augment.interpolation or cfg["interpolation"],
        auto_augment=augment.auto_augment, re_prob=augment.re_prob, re_mode=augment.re_mode, re_count=augment.re_count,
        scale=augment.scale, ratio=augment.ratio, hflip=augment.hflip, color_jitter=augment.color_jitter,
    )
    evaluation = create_transform(
        **common, is_training=False, interpolation=cfg["interpolation"], crop_pct=cfg["crop_pct"],
        crop_mode=cfg["crop_mode"],
    )
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
            "(expected train/CLASS/*.jpg and val/CLASS/*.jpg, or CLASS/*.jpg with --val-split)"
        )
    train, val = ImageFolder(os.path.join(root, "train")), ImageFolder(os.path.join(root, "val"))
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ and val/ hold different classes ({len(train.classes)} vs {len(val.classes)})")
    return train, val


def split_image_folder(root: str | os.PathLike, fraction: float, seed: int):
    """(train, val) Subsets of the ImageFolder `root` (CLASS/*.jpg): `fraction` of every class, drawn once
    from `seed`, held out for evaluation; each side has its own ImageFolder so its transform is its own."""
    from torchvision.datasets import ImageFolder

    root = os.fspath(root)
    if not 0 < fraction < 1:
        raise ValueError(f"--val-split must lie strictly between 0 and 1, got {fraction}")
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "val")):
        raise ValueError(
            f"{root} already holds train/ and val/: drop --val-split, or point --data at one class folder set"
        )
    train, val = ImageFolder(root), ImageFolder(root)
    targets = np.asarray(train.targets)
    generator = np.random.default_rng(seed)
    held_out = []
    for label, name in enumerate(train.classes):
        members = np.flatnonzero(targets == label)
        if len(members) < 2:
            raise ValueError(
                f"{root}: class {name!r} has {len(members)} image(s); --val-split needs 2 or more per class"
            )
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held_out.extend(generator.permutation(members)[:count].tolist())
    is_val = np.zeros(len(targets), dtype=bool)
    is_val[held_out] = True
    subset = torch.utils.data.Subset
    return subset(train, np.flatnonzero(~is_val).tolist()), subset(val, np.flatnonzero(is_val).tolist())


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random draws that augment image `index` in `epoch` of a run seeded `seed`."""
    return (seed * 1_000_003 + epoch * 100_003 + index) % 2**63


class SeededSamples(torch.utils.data.Dataset):
    """`dataset` read by (index, seed) keys, each item drawn with Python's, NumPy's and torch's generators
    seeded by `seed` (timm's transforms draw from all three), leaving the caller's generators as they were."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        python_state, numpy_state = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class EpochSampler(torch.utils.data.Sampler):
    """(index, seed) keys of this rank's full batches of an epoch (epoch_indices' order), from a start batch;
    `set_epoch` chooses them before each pass, so one DataLoader (and its workers) serves every epoch."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.batch_size, self.seed, self.rank, self.world_size = size, batch_size, seed, rank, world_size
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return ((self.size // self.world_size) // self.batch_size - self.start_batch) * self.batch_size

    def __iter__(self):
        order = epoch_indices(self.size, self.epoch, self.seed, self.rank, self.world_size)
        usable = len(order) // self.batch_size * self.batch_size
        for index in order[self.start_batch * self.batch_size:usable].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)


# Synthetic data: this many classes, and samples when --train-subset / --test-subset do not say.
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZES = (1024, 256)


class TrainingData:
    """What a run trains and evaluates on (Fashion-MNIST, an image folder or synthetic images): training
    batches per epoch (sharded, resumable mid-epoch) and this rank's evaluation batches."""

    def __init__(self, args, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        self.args, self.rank, self.world_size, self.pin_memory = args, rank, world_size, pin_memory
        self.train_loader = self.test_loader = None
        if args.val_split is not None and args.data in ("fmnist", "synthetic"):
            raise ValueError(f"--val-split splits an image folder; --data {args.data} has its own test set")
        if args.data == "fmnist":
            self.kind = "fmnist"
            self.train_set, self.test_set = fashion_mnist_splits(args.data_dir)
            self.classes = list(FASHION_MNIST_CLASSES)
            self.augment = BatchAugment(crop_padding=args.crop_padding, flip=args.flip, erase_prob=args.random_erase)
        elif args.data == "synthetic":
            self.kind = "synthetic"
            # the images are drawn once the model's input is known (set_model_input)
            self.sizes = (args.train_subset or SYNTHETIC_SIZES[0], args.test_subset or SYNTHETIC_SIZES[1])
            self.classes = [f"class{k}" for k in range(SYNTHETIC_CLASSES)]
            self.augment = None
        else:
            self.kind = "folder"
            if args.val_split is not None:
                self.train_set, self.test_set = split_image_folder(args.data, args.val_split, args.seed)
                self.classes = list(self.train_set.dataset.classes)
            else:
                self.train_set, self.test_set = image_folder_splits(args.data)
                self.classes = list(self.train_set.classes)
        if self.kind != "synthetic":
            self._take_subsets()
        per_rank = self.train_size // world_size
        self.steps_per_epoch = per_rank // args.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.train_size} training samples over {world_size} process(es) do not fill one "
                f"batch of {args.batch_size}; lower --batch-size or enlarge --train-subset"
            )

    @property
    def train_size(self) -> int:
        return self.sizes[0] if self.kind == "synthetic" else len(self.train_set)

    def _take_subsets(self) -> None:
        args = self.args
        subsets = (("train_set", args.train_subset, args.seed), ("test_set", args.test_subset, args.seed + 1))
        for name, size, seed in subsets:
            split = getattr(self, name)
            subset = seeded_subset(len(split), size, seed)
            if subset is None:
                continue
            if isinstance(split, TensorSplit):
                setattr(self, name, split.subset(subset))
            else:
                setattr(self, name, torch.utils.data.Subset(split, subset.tolist()))

    def set_model_input(self, config) -> None:
        """Fit the data to the model: Fashion-MNIST must match it; synthetic images take its input shape;
        a folder's images are read (grey or RGB), cropped, augmented and normalised for it."""
        if self.kind == "fmnist" and (config.in_chans, config.img_size) != (1, FASHION_MNIST_IMAGE_SIZE):
            raise ValueError(
                f"{config.name} takes {config.in_chans}-channel {config.img_size}x{config.img_size} images; "
                "Fashion-MNIST needs a 1-channel 28x28 config such as dvt_t2t_vit_fmnist "
                "(other models train on --data DIR)"
            )
        if self.kind == "synthetic":
            from dvt_shared.data_config import image_size

            generator = torch.Generator().manual_seed(self.args.seed)
            shape = (config.in_chans, *image_size(config))
            self.train_set, self.test_set = (
                TensorSplit(torch.randn(n, *shape, generator=generator),
                            torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=generator))
                for n in self.sizes
            )
        if self.kind != "folder":
            return
        loader = folder_loader(config)
        transforms = folder_transforms(config, FolderAugment.from_args(self.args))
        for split, transform in zip((self.train_set, self.test_set), transforms):
            folder = split
            while isinstance(folder, torch.utils.data.Subset):
                folder = folder.dataset
            folder.loader, folder.transform = loader, transform
        workers = self.args.workers
        common = dict(num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0)
        self.train_sampler = EpochSampler(
            len(self.train_set), self.args.batch_size, self.args.seed, self.rank, self.world_size,
        )
        self.train_loader = torch.utils.data.DataLoader(
            SeededSamples(self.train_set), batch_size=self.args.batch_size, sampler=self.train_sampler, drop_last=True,
            **common,
        )
        n = len(self.test_set)
        shard = list(range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size))
        self.test_loader = torch.utils.data.DataLoader(
            self.test_set, batch_size=self.args.eval_batch_size, sampler=shard, **common,
        )

    def train_batches(self, epoch: int, start_batch: int, augment_generator: torch.Generator):
        if self.kind == "folder":
            self.train_sampler.set_epoch(epoch, start_batch)
            yield from self.train_loader
            return
        order = epoch_indices(len(self.train_set), epoch, self.args.seed, self.rank, self.world_size)
        for images, labels in tensor_batches(self.train_set, order, self.args.batch_size, start_batch):
            yield (images if self.augment is None else self.augment(images, augment_generator)), labels

    def test_batches(self):
        if self.kind == "folder":
            yield from self.test_loader
            return
        yield from eval_batches(self.test_set, self.args.eval_batch_size, self.rank, self.world_size)

    def describe(self) -> dict:
        return {
            "data": os.path.abspath(self.args.data) if self.kind == "folder" else self.kind,
            "train_samples": self.train_size,
            "test_samples": len(self.test_set) if self.kind != "synthetic" else self.sizes[1],
            "classes": self.classes,
        }
