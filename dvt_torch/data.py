"""Training and evaluation data for DVT in PyTorch.

Fashion-MNIST lives in memory as one normalised tensor and is augmented a whole batch
at a time with an explicit torch.Generator: on a small CPU this is far faster than
per-image PIL transforms, and the generator's state is all a checkpoint needs to
replay the augmentation exactly. Image folders (`train/CLASS/*.jpg`, `val/CLASS/*.jpg`, or one
`CLASS/*.jpg` folder split by --val-split) and parquet files of encoded images are opened and
checked by `dvt_shared.data_sources`, read for the model's channels and augmented by size (pad and
random crop at 64 px or less, timm's random resized crop above), evaluated by the shared evaluation
transform; each image's random draws are seeded by (run seed, epoch, image): the same on any worker,
so a resumed run replays them and the loaders' workers persist across epochs.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from dvt_shared.data_config import DataConfig, default_data_config
from dvt_shared.data_sources import FMNIST, Split, channel_statistics, open_data, scan_images
from dvt_shared.datasets import (
    FASHION_MNIST_IMAGE_SIZE,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
)
from dvt_shared.train_options import DEFAULT_RRC_SCALE, small_image_pipeline
from dvt_shared.transforms import normalise_pixels

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


class ToChannels:
    """A PIL image as grey or RGB for a model of `channels` input channels (16-bit grey scaled, not clipped)."""

    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, image):
        from dvt_shared.transforms import to_channels

        return to_channels(image, self.channels)


class ResizeCentreCrop:
    """The evaluation geometry of a data config: the short side to floor(size / crop_pct), the centre cropped."""

    def __init__(self, data: DataConfig):
        self.data = data

    def __call__(self, image):
        from dvt_shared.transforms import resize_and_centre_crop

        return resize_and_centre_crop(image, self.data.image_size, self.data.crop_pct, self.data.interpolation)


class EvalTransform:
    """A PIL image -> the model's float32 (C, H, W) tensor by `dvt_shared.transforms.eval_array`: the very pixels
    `dvt evaluate` and `dvt predict` give the model, so training's test accuracy is theirs."""

    def __init__(self, data: DataConfig):
        self.data = data

    def __call__(self, image) -> torch.Tensor:
        from dvt_shared.transforms import eval_array

        return torch.from_numpy(eval_array(image, self.data))


@dataclass(frozen=True)
class FolderAugment:
    """How training images read from files are augmented: the arguments of timm's create_transform
    that the release's recipe sets (its flags --aa, --reprob, --remode, --recount, --train-interpolation...),
    or, for small images, pad-and-random-crop (`small`, `crop_padding`)."""

    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "const"
    re_count: int = 1
    interpolation: str | None = None  # None: the model's own
    scale: tuple[float, float] = DEFAULT_RRC_SCALE
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float | None = None
    small: bool = False
    crop_padding: int = 0

    @classmethod
    def from_args(cls, args, side: int) -> "FolderAugment":
        small = small_image_pipeline(args, side)
        return cls(
            auto_augment=args.aa, re_prob=args.random_erase, re_mode=args.remode, re_count=args.recount,
            interpolation=args.train_interpolation, scale=tuple(args.scale or DEFAULT_RRC_SCALE),
            ratio=tuple(args.ratio), hflip=args.hflip, color_jitter=args.color_jitter or None, small=small,
            crop_padding=args.crop_padding or 0,
        )


def folder_transforms(data: DataConfig, augment: FolderAugment = FolderAugment()) -> tuple:
    """(train, eval) transforms of image files for a model whose data config is `data` (channels, size, mean,
    std, interpolation, crop). Evaluation is the shared evaluation transform; training is pad-and-random-crop
    with a flip for small images (`augment.small`), else timm's random resized crop, flip and what `augment`
    adds. Both start from the image converted to the model's channels."""
    from torchvision import transforms

    channels = ToChannels(data.channels)
    if augment.small:
        steps = [channels, ResizeCentreCrop(data), transforms.RandomCrop(data.image_size, padding=augment.crop_padding,
                                                                         fill=0)]
        if augment.hflip > 0:
            steps.append(transforms.RandomHorizontalFlip(augment.hflip))
        steps += [transforms.ToTensor(), transforms.Normalize(data.mean, data.std)]
        if augment.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            steps.append(RandomErasing(augment.re_prob, mode=augment.re_mode, max_count=augment.re_count,
                                       device="cpu"))
        train = transforms.Compose(steps)
    else:
        from timm.data import create_transform

        timm_train = create_transform(
            input_size=data.input_size, mean=data.mean, std=data.std, is_training=True,
            interpolation=augment.interpolation or data.interpolation, auto_augment=augment.auto_augment,
            re_prob=augment.re_prob, re_mode=augment.re_mode, re_count=augment.re_count, scale=augment.scale,
            ratio=augment.ratio, hflip=augment.hflip, color_jitter=augment.color_jitter,
        )
        train = transforms.Compose([channels, timm_train])
    return train, EvalTransform(data)


class ImageItems(torch.utils.data.Dataset):
    """A split of encoded images (image files, or parquet rows) with their labels, each opened with PIL and
    transformed by `transform` (set for the model by `TrainingData.set_model_input`)."""

    def __init__(self, split: Split):
        self.split = split
        self.transform = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        with self.split.refs[index].open() as image:
            image.load()
            return self.transform(image), int(self.split.labels[index])


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
    """What a run trains and evaluates on (Fashion-MNIST, an image folder, parquet files or synthetic images,
    opened by `dvt_shared.data_sources`): training batches per epoch (sharded, resumable mid-epoch) and this
    rank's evaluation batches."""

    def __init__(self, args, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
        self.args, self.rank, self.world_size, self.pin_memory = args, rank, world_size, pin_memory
        self.train_loader = self.test_loader = None
        self.steps_per_epoch = None
        if args.data == "synthetic":
            if args.val_split is not None:
                raise ValueError("--val-split splits an image folder or parquet files; --data synthetic has its own "
                                 "test set")
            self.kind, self.location = "synthetic", "synthetic"
            # the images are drawn once the model's input is known (set_model_input)
            self.sizes = (args.train_subset or SYNTHETIC_SIZES[0], args.test_subset or SYNTHETIC_SIZES[1])
            self.classes = [f"class{k}" for k in range(SYNTHETIC_CLASSES)]
            self.augment = None
            return
        dataset = open_data(args.data, args.val_split, args.seed, args.data_dir, args.label_column)
        self.kind, self.location, self.classes = dataset.kind, dataset.location, list(dataset.classes)
        self.train_split, self.test_split = dataset.train, dataset.val
        subsets = (("train_split", args.train_subset, args.seed), ("test_split", args.test_subset, args.seed + 1))
        for name, size, seed in subsets:
            split = getattr(self, name)
            rows = seeded_subset(len(split), size, seed)
            if rows is not None:
                setattr(self, name, split.take(rows.numpy()))

    @property
    def train_size(self) -> int:
        return self.sizes[0] if self.kind == "synthetic" else len(self.train_split)

    def set_model_input(self, config, data: DataConfig) -> None:
        """Fit the data to the model and its data config `data`: Fashion-MNIST must match it and is normalised by
        it; synthetic images take its input shape; a folder's or parquet file's images are checked, read (grey or
        RGB), cropped, augmented and normalised for it. The batch size must be set (`resolve_defaults`)."""
        args = self.args
        if self.kind == FMNIST:
            if (config.in_chans, config.img_size) != (1, FASHION_MNIST_IMAGE_SIZE):
                raise ValueError(
                    f"{config.name} takes {config.in_chans}-channel {config.img_size}x{config.img_size} images; "
                    "Fashion-MNIST needs a 1-channel 28x28 config such as dvt_t2t_vit_fmnist "
                    "(other models train on --data DIR)"
                )
            self.train_set, self.test_set = (
                TensorSplit(torch.from_numpy(normalise_pixels(split.pixels[:, None], data)),
                            torch.as_tensor(split.labels).long())
                for split in (self.train_split, self.test_split)
            )
            self.augment = BatchAugment(crop_padding=args.crop_padding, flip=args.flip, erase_prob=args.random_erase,
                                        pad_value=-data.mean[0] / data.std[0])
        elif self.kind == "synthetic":
            generator = torch.Generator().manual_seed(args.seed)
            self.train_set, self.test_set = (
                TensorSplit(torch.randn(n, *data.input_size, generator=generator),
                            torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=generator))
                for n in self.sizes
            )
        else:
            self._image_loaders(data)
        per_rank = self.train_size // self.world_size
        self.steps_per_epoch = per_rank // args.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"{self.train_size} training samples over {self.world_size} process(es) do not fill one "
                f"batch of {args.batch_size}; lower --batch-size or enlarge --train-subset"
            )

    def _image_loaders(self, data: DataConfig) -> None:
        args = self.args
        # unreadable images are left out (counted, the first named), the other kind of image said once
        self.train_split = scan_images(self.train_split, data.channels, f"{self.location} (train)")
        self.test_split = scan_images(self.test_split, data.channels, f"{self.location} (val)")
        self.train_set, self.test_set = ImageItems(self.train_split), ImageItems(self.test_split)
        transforms = folder_transforms(data, FolderAugment.from_args(args, max(data.image_size)))
        self.train_set.transform, self.test_set.transform = transforms
        workers = args.workers
        common = dict(num_workers=workers, pin_memory=self.pin_memory, persistent_workers=workers > 0)
        self.train_sampler = EpochSampler(len(self.train_set), args.batch_size, args.seed, self.rank, self.world_size)
        self.train_loader = torch.utils.data.DataLoader(
            SeededSamples(self.train_set), batch_size=args.batch_size, sampler=self.train_sampler, drop_last=True,
            **common,
        )
        n = len(self.test_set)
        shard = list(range(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size))
        self.test_loader = torch.utils.data.DataLoader(
            self.test_set, batch_size=args.eval_batch_size, sampler=shard, **common,
        )

    @property
    def images(self) -> bool:
        """Whether the data are image files or parquet rows, read by loaders (not tensors in memory)."""
        return self.kind in ("folder", "parquet")

    def train_batches(self, epoch: int, start_batch: int, augment_generator: torch.Generator):
        if self.images:
            self.train_sampler.set_epoch(epoch, start_batch)
            yield from self.train_loader
            return
        order = epoch_indices(len(self.train_set), epoch, self.args.seed, self.rank, self.world_size)
        for images, labels in tensor_batches(self.train_set, order, self.args.batch_size, start_batch):
            yield (images if self.augment is None else self.augment(images, augment_generator)), labels

    def test_batches(self):
        if self.images:
            yield from self.test_loader
            return
        yield from eval_batches(self.test_set, self.args.eval_batch_size, self.rank, self.world_size)

    def describe(self) -> dict:
        return {
            "data": self.location if self.images else self.kind,
            "train_samples": self.train_size,
            "test_samples": len(self.test_split) if self.kind != "synthetic" else self.sizes[1],
            "classes": self.classes,
        }


def training_data_config(args, config, data: TrainingData, init: DataConfig | None) -> DataConfig:
    """The data config a run trains with and records in its weights: the model's input size; class names from
    the data; mean, std, interpolation and crop as given (`--mean auto`: computed from the training images),
    else the --init-weights' (a grey model's statistics repeated for an RGB one), else the rule by channels."""
    base = default_data_config(config)
    channels = config.in_chans
    if init is not None:
        stats = {}
        if init.channels == channels:
            stats = dict(mean=init.mean, std=init.std)
        elif init.channels == 1:
            stats = dict(mean=init.mean * channels, std=init.std * channels)
        base = base.replace(interpolation=init.interpolation, crop_pct=init.crop_pct, **stats)
    if args.interpolation is not None:
        base = base.replace(interpolation=args.interpolation)
    if args.crop_pct is not None:
        base = base.replace(crop_pct=args.crop_pct)
    base = base.replace(class_names=tuple(data.classes))
    wanted = {name: getattr(args, name) for name in ("mean", "std")}
    if any(value == ["auto"] for value in wanted.values()):
        if not data.images:
            raise ValueError(f"--mean/--std auto computes the statistics of an image folder or parquet files, not "
                             f"of --data {data.kind}")
        mean, std = channel_statistics(data.train_split, base, f"{data.location} (train)")
        wanted = {name: (dict(mean=mean, std=std)[name] if value == ["auto"] else value)
                  for name, value in wanted.items()}
    for name, value in wanted.items():
        if value is None:
            continue
        try:
            numbers = tuple(float(v) for v in value)
        except ValueError:
            raise ValueError(f"--{name} takes numbers, one per channel, or 'auto'; got {' '.join(value)}") from None
        if len(numbers) == 1:
            numbers *= channels
        if len(numbers) != channels:
            raise ValueError(f"--{name} has {len(numbers)} values; {config.name} takes {channels} channel(s)")
        base = base.replace(**{name: numbers})
    return base
