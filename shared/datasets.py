"""Fashion-MNIST from its IDX files, read with NumPy alone (no framework, no download).

IDX layout: a 4-byte magic (two zero bytes, a dtype byte, the number of dimensions), one
big-endian uint32 per dimension, then the row-major payload. Files may be gzip-compressed.
Every file is checked in full, so a truncated or foreign file fails with a ValueError
naming the file and what is wrong instead of yielding garbage arrays.
"""
from __future__ import annotations

import gzip
import os
import zlib

import numpy as np

from .io_utils import atomic_write_bytes

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

IDX_UBYTE = 0x08
IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801

FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
FASHION_MNIST_IMAGE_SIZE = 28
# Per-pixel mean and standard deviation of the 60000 training images, scaled to [0, 1]
# (computed by fashion_mnist_stats on the official files; a test recomputes them).
FASHION_MNIST_MEAN = 0.28604060
FASHION_MNIST_STD = 0.35302425

_GZIP_MAGIC = b"\x1f\x8b"
_HEADER_BYTES = 4
# More dimensions than this is no IDX file we know; it guards against reading a huge header.
_MAX_DIMS = 8


def _read_bytes(path: str) -> bytes:
    """The decompressed bytes of `path`, gzip recognised by its signature rather than its name."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: damaged or truncated gzip data ({exc})") from exc


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """The uint8 array stored in the IDX file `path` (raw or gzip).

    `expected_magic` (IDX_IMAGES_MAGIC or IDX_LABELS_MAGIC) additionally pins the number
    of dimensions. Raises ValueError naming the file for a wrong magic, an unsupported
    dtype, or a payload whose size differs from the product of the dimensions.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file {path} does not exist")
    data = _read_bytes(path)
    if len(data) < _HEADER_BYTES:
        raise ValueError(f"{path}: only {len(data)} bytes, too short for an IDX header")
    magic = int.from_bytes(data[:_HEADER_BYTES], "big")
    zeros, dtype, ndim = data[0:2], data[2], data[3]
    if zeros != b"\x00\x00":
        raise ValueError(
            f"{path}: bad IDX magic number 0x{magic:08x} (must start with two zero bytes); not an IDX file"
        )
    if dtype != IDX_UBYTE:
        raise ValueError(
            f"{path}: IDX dtype byte 0x{dtype:02x} is not supported (only 0x{IDX_UBYTE:02x}, unsigned bytes)"
        )
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: magic number 0x{magic:08x} ({ndim} dimensions), expected 0x{expected_magic:08x} "
            f"({expected_magic & 0xFF} dimensions)"
        )
    if not 1 <= ndim <= _MAX_DIMS:
        raise ValueError(f"{path}: IDX header declares {ndim} dimensions (1..{_MAX_DIMS} supported)")
    header_end = _HEADER_BYTES + 4 * ndim
    if len(data) < header_end:
        raise ValueError(
            f"{path}: truncated header, {ndim} dimension sizes need {header_end} bytes, file has {len(data)}"
        )
    shape = tuple(int.from_bytes(data[_HEADER_BYTES + 4 * i:_HEADER_BYTES + 4 * (i + 1)], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    payload = len(data) - header_end
    if payload != expected:
        problem = "truncated" if payload < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {problem}: dimensions {shape} need {expected} payload bytes, the file holds {payload}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_end).reshape(shape).copy()


def encode_idx(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array (the inverse of read_idx, before any compression)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"IDX encoding supports uint8 arrays only, got {array.dtype}")
    if not 1 <= array.ndim <= _MAX_DIMS:
        raise ValueError(f"IDX arrays have 1..{_MAX_DIMS} dimensions, got {array.ndim}")
    header = bytes((0, 0, IDX_UBYTE, array.ndim)) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: str | os.PathLike, array: np.ndarray, compress: bool | None = None) -> None:
    """Write a uint8 array as an IDX file, atomically; gzip when `compress` (default: the name ends in .gz)."""
    path = os.fspath(path)
    data = encode_idx(array)
    if compress if compress is not None else path.endswith(".gz"):
        # mtime=0 keeps the output byte-identical from run to run.
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)


def _locate(data_dir: str, stem: str) -> str:
    for name in (stem, stem + ".gz"):
        path = os.path.join(data_dir, name)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {data_dir}. Install the dataset with "
        f"`apt-get install dataset-fashion-mnist` (files land in {DEFAULT_FASHION_MNIST_DIR}) or pass "
        f"--data-dir DIR pointing at a directory holding the four IDX files: "
        f"{', '.join(FASHION_MNIST_FILES.values())} (raw or .gz)"
    )


def load_fashion_mnist(data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """train_images (60000, 28, 28) uint8, train_labels (60000,) uint8, test_images, test_labels."""
    data_dir = os.fspath(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
        # _locate's message carries the install hint; the directory itself is the first thing missing.
        _locate(data_dir, FASHION_MNIST_FILES["train_images"])
    out = {}
    for key, stem in FASHION_MNIST_FILES.items():
        path = _locate(data_dir, stem)
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        out[key] = read_idx(path, expected_magic=magic)
    for split in ("train", "test"):
        images, labels = out[f"{split}_images"], out[f"{split}_labels"]
        side = FASHION_MNIST_IMAGE_SIZE
        if images.shape[1:] != (side, side):
            raise ValueError(f"{split} images in {data_dir} are {images.shape[1:]}, expected ({side}, {side})")
        if len(images) != len(labels):
            raise ValueError(f"{data_dir}: {len(images)} {split} images but {len(labels)} {split} labels")
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise ValueError(
                f"{data_dir}: {split} label {int(labels.max())} is out of range 0..{len(FASHION_MNIST_CLASSES) - 1}"
            )
    return out


def normalise_fashion_mnist(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) grey images -> float32 (N, 1, H, W) model input: scaled to [0, 1], then standardised."""
    scaled = np.asarray(images).astype(np.float32)[:, None] / 255.0
    return ((scaled - FASHION_MNIST_MEAN) / FASHION_MNIST_STD).astype(np.float32)


def fashion_mnist_stats(images: np.ndarray) -> tuple[float, float]:
    """(mean, std) of uint8 images scaled to [0, 1], over every pixel, in float64."""
    scaled = images.astype(np.float64) / 255.0
    return float(scaled.mean()), float(scaled.std())
