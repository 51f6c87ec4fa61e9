"""One notion of a labelled data set, shared by every command that reads one (train, calibrate, evaluate,
serve --budget, the demo): what `--data` names, split into `train` and `val`, checked, and decoded into a
model's input by its data config. NumPy and Pillow only (pyarrow for parquet, imported when read).

`--data` takes
- `fmnist`: the embedded Fashion-MNIST (its 60,000 training images are `train`, its 10,000 test images `val`);
- an image folder: `DIR/train/CLASS/*` and `DIR/val/CLASS/*`, or `DIR/CLASS/*` split by `val_split`
  (that fraction of every class, drawn once from `seed`, is `val`); class names are the folders' names,
  sorted, as torchvision's ImageFolder orders them;
- parquet files of encoded images (a binary column `image` or `bytes`) with a label column (class
  indices, or class names): one `.parquet` file or a folder of them, split by `val_split`, or a folder
  holding `train/` and `val/` folders of them.

Bad data sets raise `DataError` naming the problem: one class, an empty class folder, class folders that
differ between train/ and val/, a missing label column. Images that cannot be read are skipped with a
count and the first one named (a damaged file among thousands should not stop a run; the warning says
what was left out), and images of the other kind (grey among RGB, or RGB among grey) are converted to the
model's channels, said once.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field

import numpy as np

from .data_config import DataConfig
from .datasets import FASHION_MNIST_CLASSES, load_fashion_mnist

FMNIST = "fmnist"
# What a folder's images are recognised by (lower-cased).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
# The binary column of a parquet file holding encoded images, the first of these it has.
PARQUET_IMAGE_COLUMNS = ("image", "bytes")
DEFAULT_LABEL_COLUMN = "label"
SPLITS = ("train", "val")
# Fashion-MNIST calls its evaluation split `test`.
SPLIT_ALIASES = {"test": "val"}


class DataError(ValueError):
    """A data set that cannot be used as given; the message names the problem and the files."""


@dataclass(frozen=True)
class ImageRef:
    """One encoded image: a file, or bytes read from a parquet row; `name` names it in messages."""

    name: str
    path: str | None = None
    data: bytes | None = field(default=None, repr=False)

    def open(self):
        """The image, opened by PIL (its header read; pixels on `load()`)."""
        from PIL import Image

        return Image.open(self.path if self.data is None else io.BytesIO(self.data))


@dataclass
class Split:
    """One split: its labels (int64) and either encoded images (`refs`) or Fashion-MNIST's uint8 pixels."""

    name: str
    labels: np.ndarray
    refs: list[ImageRef] | None = None
    pixels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows) -> "Split":
        rows = np.asarray(rows, dtype=np.int64)
        return Split(self.name, self.labels[rows], [self.refs[r] for r in rows] if self.refs is not None else None,
                     self.pixels[rows] if self.pixels is not None else None)

    def sample(self, limit: int | None, seed: int = 0) -> "Split":
        """At most `limit` images drawn once from `seed` (a seeded permutation's first `limit`), or all of them."""
        if limit is None or limit >= len(self):
            return self if limit is None else self.take(np.random.default_rng(seed).permutation(len(self)))
        return self.take(np.random.default_rng(seed).permutation(len(self))[:limit])


@dataclass
class DataSet:
    """A labelled data set: its kind (fmnist, folder, parquet), where it is, its class names and its two splits.
    `named`: whether the data name their classes (False: parquet labels given as indices alone, whose classes are
    called by their index)."""

    kind: str
    location: str
    classes: tuple[str, ...]
    train: Split
    val: Split
    named: bool = True

    def split(self, name: str) -> Split:
        name = SPLIT_ALIASES.get(name, name)
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}; the splits are {', '.join(SPLITS)}")
        return getattr(self, name)

    def describe(self) -> dict:
        return {"data": self.location if self.kind != FMNIST else FMNIST, "kind": self.kind,
                "train_samples": len(self.train), "test_samples": len(self.val), "classes": list(self.classes)}


def open_data(spec: str, val_split: float | None = None, seed: int = 0, data_dir: str | None = None,
              label_column: str = DEFAULT_LABEL_COLUMN, class_names=None) -> DataSet:
    """The data set `spec` names (module docstring), checked. `class_names` (the weights') give integer parquet
    labels their names; `data_dir` is where Fashion-MNIST's IDX files are."""
    if val_split is not None and not 0 < val_split < 1:
        raise DataError(f"--val-split must lie strictly between 0 and 1, got {val_split}")
    if spec == FMNIST:
        if val_split is not None:
            raise DataError("--val-split splits an image folder or parquet files; fmnist has its own test set")
        raw = load_fashion_mnist(data_dir)
        splits = [Split(name, raw[f"{part}_labels"].astype(np.int64), pixels=raw[f"{part}_images"])
                  for name, part in (("train", "train"), ("val", "test"))]
        return DataSet(FMNIST, data_dir or FMNIST, FASHION_MNIST_CLASSES, *splits)
    if not os.path.exists(spec):
        raise DataError(f"--data {spec}: no such file or folder (pass 'fmnist', an image folder or parquet files)")
    location = os.path.abspath(spec)
    has_splits = os.path.isdir(spec) and all(os.path.isdir(os.path.join(spec, s)) for s in SPLITS)
    if has_splits:
        if val_split is not None:
            raise DataError(f"{spec} already holds train/ and val/: drop --val-split, or point --data at one "
                            "set of class folders")
        parts = [os.path.join(spec, s) for s in SPLITS]
        kind = "parquet" if _parquet_files(parts[0]) else "folder"
        if kind == "folder":
            folders = [_class_folders(part) for part in parts]
            if list(folders[0]) != list(folders[1]):
                raise DataError(f"{spec}: train/ and val/ hold different class folders: train/ has "
                                f"{sorted(folders[0])}, val/ has {sorted(folders[1])}")
            splits = [_folder_split(name, part_folders) for name, part_folders in zip(SPLITS, folders)]
            return DataSet(kind, location, tuple(folders[0]), *splits)
        tables = [_read_parquet(_parquet_files(part) or [part], label_column) for part in parts]
        classes, label_arrays, named = _parquet_labels([t[1] for t in tables], label_column, class_names, spec)
        splits = [Split(name, labels, refs) for name, (refs, _), labels in zip(SPLITS, tables, label_arrays)]
        return DataSet(kind, location, classes, *splits, named=named)
    files = [spec] if spec.endswith(".parquet") and os.path.isfile(spec) else (
        _parquet_files(spec) if os.path.isdir(spec) else None)
    if files is None:
        raise DataError(f"--data {spec}: a file that is not parquet; pass 'fmnist', an image folder "
                        "(train/CLASS/*, val/CLASS/*, or CLASS/* with --val-split) or parquet files")
    if files:
        refs, raw_labels = _read_parquet(files, label_column)
        classes, (labels,), named = _parquet_labels([raw_labels], label_column, class_names, spec)
        whole, kind = Split("all", labels, refs), "parquet"
    else:
        folders = _class_folders(spec)
        classes, kind, named = tuple(folders), "folder", True
        whole = _folder_split("all", folders)
    if val_split is None:
        raise DataError(f"{spec} holds no train/ and val/ folders: pass --val-split F to hold out the fraction F of "
                        "every class for evaluation (the same F and --seed as in training: the same images)")
    train_rows, val_rows = held_out_split(whole.labels, classes, val_split, seed, spec)
    train, val = whole.take(train_rows), whole.take(val_rows)
    train.name, val.name = SPLITS
    return DataSet(kind, location, classes, train, val, named)


def held_out_split(labels: np.ndarray, classes, fraction: float, seed: int, source: str):
    """(train rows, val rows): `fraction` of every class (at least one image, never all) drawn once from `seed`."""
    generator = np.random.default_rng(seed)
    held_out = []
    for label, name in enumerate(classes):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            raise DataError(f"{source}: class {name!r} has {len(members)} image(s); --val-split needs 2 or more "
                            "per class")
        count = min(max(round(fraction * len(members)), 1), len(members) - 1)
        held_out.extend(generator.permutation(members)[:count].tolist())
    is_val = np.zeros(len(labels), dtype=bool)
    is_val[held_out] = True
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def folder_images(folder: str) -> list[str]:
    """The images under `folder` (recursive, by extension, hidden files and folders left out), sorted."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, name) for name in sorted(files) if is_image_file(name)]
    return found


def _class_folders(root: str) -> dict[str, list[str]]:
    """Class name -> its image files, for `root`/CLASS/* (sorted by name); DataError for fewer than two classes,
    an empty class folder, or images outside any class folder."""
    names = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    loose = [f for f in sorted(os.listdir(root)) if is_image_file(f) and os.path.isfile(os.path.join(root, f))]
    if loose and not names:
        raise DataError(f"{root} holds images but no class folders: put each class's images in a folder named "
                        f"after the class ({root}/CLASS/*.png), e.g. {loose[0]}")
    folders = {name: folder_images(os.path.join(root, name)) for name in names}
    empty = [name for name, files in folders.items() if not files]
    if empty:
        raise DataError(f"{root}: class folder(s) {empty} hold no images ({', '.join(IMAGE_EXTENSIONS)}); "
                        "remove them or add images")
    if len(folders) < 2:
        found = f"only the class {names[0]!r}" if names else "no class folders"
        raise DataError(f"{root} has {found}: a classifier needs two classes or more ({root}/CLASS/*)")
    return folders


def _folder_split(name: str, folders: dict[str, list[str]]) -> Split:
    """The split of the class folders `folders` (`_class_folders`): every image, labelled by its folder."""
    refs = [ImageRef(path, path=path) for files in folders.values() for path in files]
    labels = np.concatenate([np.full(len(files), k, np.int64) for k, files in enumerate(folders.values())])
    return Split(name, labels, refs)


def _parquet_files(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.endswith(".parquet") and not f.startswith(".")) if os.path.isdir(folder) else []


def parquet_image_column(schema, source: str) -> str:
    """The binary column of encoded images of a parquet schema; DataError naming the columns it has."""
    import pyarrow as pa

    column = next((name for name in PARQUET_IMAGE_COLUMNS if name in schema.names), None)
    if column is None or not (pa.types.is_binary(schema.field(column).type)
                              or pa.types.is_large_binary(schema.field(column).type)):
        raise DataError(f"{source} has no binary column {' or '.join(map(repr, PARQUET_IMAGE_COLUMNS))} of encoded "
                        f"images (PNG, JPEG, ...); its columns: {', '.join(schema.names)}")
    return column


def _read_parquet(files: list[str], label_column: str) -> tuple[list[ImageRef], list]:
    """(image refs named FILE#ROW or by a `path` column, raw labels) of parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    refs, labels = [], []
    for path in files:
        try:
            schema = pq.read_schema(path)
        except (OSError, pa.ArrowException) as exc:
            raise DataError(f"{path}: cannot read it as a parquet file ({exc})") from exc
        column = parquet_image_column(schema, path)
        if label_column not in schema.names:
            raise DataError(f"{path} has no label column {label_column!r} (its columns: {', '.join(schema.names)}); "
                            "name it with --label-column")
        has_path = "path" in schema.names
        table = pq.read_table(path, columns=[column, label_column] + (["path"] if has_path else []))
        names = table.column("path").to_pylist() if has_path else [f"{path}#{i}" for i in range(table.num_rows)]
        refs += [ImageRef(str(name), data=data) for name, data in zip(names, table.column(column).to_pylist())]
        labels += table.column(label_column).to_pylist()
    return refs, labels


def _parquet_labels(raw: list[list], column: str, class_names, source: str) -> tuple[tuple[str, ...], list, bool]:
    """(class names, int64 labels per split, whether the data named the classes) of parquet labels: class names
    (strings), or class indices (named by `class_names` where given, else by their index)."""
    values = [v for labels in raw for v in labels]
    if any(v is None for v in values):
        raise DataError(f"{source}: the label column {column!r} has empty values")
    if all(isinstance(v, str) for v in values):
        classes = tuple(class_names) if class_names is not None else tuple(sorted(set(values)))
        unknown = sorted(set(values) - set(classes))
        if unknown:
            raise DataError(f"{source}: labels {unknown[:5]} are not among the model's classes {list(classes)}")
        index = {name: k for k, name in enumerate(classes)}
        return classes, [np.asarray([index[v] for v in labels], np.int64) for labels in raw], True
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        raise DataError(f"{source}: the label column {column!r} must hold class indices (integers) or class names "
                        "(strings)")
    count = max(values) + 1 if values else 0
    classes = tuple(class_names) if class_names is not None else tuple(str(k) for k in range(count))
    if min(values, default=0) < 0 or count > len(classes):
        raise DataError(f"{source}: class indices in {column!r} run from {min(values)} to {max(values)}; the model "
                        f"has {len(classes)} classes")
    if len(classes) < 2:
        raise DataError(f"{source} has only one class: a classifier needs two classes or more")
    return classes, [np.asarray(labels, np.int64) for labels in raw], class_names is not None


def check_classes(data: DataSet, model_data: DataConfig, num_classes: int, source: str) -> None:
    """DataError unless the model's classes are the data set's: the same names in the same order where both the
    weights and the data name them, else the same count (labels given as indices alone: indices the model has)."""
    if not data.named:
        if len(data.classes) > num_classes:
            raise DataError(f"{source} has {num_classes} classes; the class indices of {data.location} run to "
                            f"{len(data.classes) - 1}")
        return
    if model_data.class_names is not None and tuple(model_data.class_names) != tuple(data.classes):
        raise DataError(f"{source} was trained on the classes {list(model_data.class_names)}; {data.location} "
                        f"holds {list(data.classes)}")
    if len(data.classes) != num_classes:
        raise DataError(f"{source} has {num_classes} classes; {data.location} holds {len(data.classes)} "
                        f"({list(data.classes)})")


def _unreadable() -> tuple:
    """Why PIL cannot read an image: an unknown format or a damaged file (OSError, SyntaxError, ValueError), or a
    decompression bomb."""
    from PIL import Image

    return OSError, SyntaxError, ValueError, Image.DecompressionBombError


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def decode(ref: ImageRef, data: DataConfig) -> tuple[np.ndarray, int]:
    """(the model's float32 (C, H, W) input, the image's own channel count) of one encoded image; ValueError
    naming the image where it cannot be read."""
    from .transforms import eval_array, image_channels

    try:
        with ref.open() as image:
            return eval_array(image, data), image_channels(image.mode)
    except _unreadable() as exc:
        raise ValueError(f"{ref.name}: cannot read it as an image ({exc})") from None


def report_skipped(skipped: list[str], total: int, where: str) -> None:
    """Warn once about unreadable images left out (a count and the first named); DataError if all of them were."""
    if not skipped:
        return
    if len(skipped) == total:
        raise DataError(f"{where}: none of its {total} images can be read (first: {skipped[0]})")
    _warn(f"{where}: skipped {len(skipped)} unreadable image(s) of {total} (first: {skipped[0]})")


def report_converted(own: np.ndarray, channels: int, where: str) -> None:
    """Say once how many images (`own`: each image's channel count) were converted to the model's `channels`
    (grey among RGB, or RGB among grey)."""
    kinds = {1: "grey", 3: "RGB"}
    other = int((own != channels).sum())
    if other and channels in kinds:  # a model of other channel counts reads no image file (to_channels says so)
        _warn(f"{where}: {other} of {len(own)} images are {kinds[4 - channels]}; converted to the model's "
              f"{channels} channel(s) ({kinds[channels]})")


def load_split(split: Split, data: DataConfig, where: str, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(float32 (n, C, H, W) model input, int64 labels) of a split, decoded as the model's data config says."""
    from .transforms import normalise_pixels

    if split.pixels is not None:
        if (data.channels, *data.image_size) != (1, *split.pixels.shape[1:]):
            raise DataError(f"{where}: Fashion-MNIST's images are 1x{split.pixels.shape[1]}x{split.pixels.shape[2]}; "
                            f"the model takes {'x'.join(map(str, data.input_size))}")
        return normalise_pixels(split.pixels[:, None], data), split.labels
    from tqdm import tqdm

    images, labels, channels, skipped = [], [], [], []
    for ref, label in tqdm(zip(split.refs, split.labels), total=len(split), desc=f"decoding {where}", unit="image",
                           leave=False, disable=not progress or len(split) < 256):
        try:
            array, own = decode(ref, data)
        except ValueError as exc:
            skipped.append(str(exc))
            continue
        images.append(array)
        labels.append(label)
        channels.append(own)
    report_skipped(skipped, len(split), where)
    report_converted(np.asarray(channels), data.channels, where)
    return np.stack(images), np.asarray(labels, np.int64)


def scan_images(split: Split, channels: int, where: str) -> Split:
    """`split` without the images whose header cannot be read (said with a count and the first named), and the
    images of the other kind said once: the check before training, which decodes images as it goes."""
    if split.refs is None:
        return split
    from tqdm import tqdm

    from .transforms import image_channels

    keep, own, skipped = [], [], []
    for row, ref in enumerate(tqdm(split.refs, desc=f"checking {where}", unit="image", leave=False,
                                   disable=len(split) < 2048)):
        try:
            with ref.open() as image:
                own.append(image_channels(image.mode))
        except _unreadable() as exc:
            skipped.append(f"{ref.name}: cannot read it as an image ({exc})")
            continue
        keep.append(row)
    report_skipped(skipped, len(split), where)
    report_converted(np.asarray(own), channels, where)
    return split.take(keep) if skipped else split


def channel_statistics(split: Split, data: DataConfig, where: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of a split's images at the model's size, scaled to [0, 1] (`--mean auto`)."""
    unit = data.replace(mean=(0.0,) * data.channels, std=(1.0,) * data.channels)
    images, _ = load_split(split, unit, where)
    pixels = images.astype(np.float64).transpose(1, 0, 2, 3).reshape(data.channels, -1)
    return tuple(float(v) for v in pixels.mean(axis=1)), tuple(float(v) for v in pixels.std(axis=1))
