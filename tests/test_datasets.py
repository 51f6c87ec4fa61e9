"""The NumPy IDX reader and the Fashion-MNIST loader (synthetic files, plus the real ones where installed)."""
import gzip
import os

import numpy as np
import pytest

from dvt_shared.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    encode_idx,
    fashion_mnist_stats,
    load_fashion_mnist,
    read_idx,
    write_idx,
)


def _images(n=5, side=28, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, side, side), dtype=np.uint8)


def _fake_dataset(root, n_train=12, n_test=6, gz_for=("train_images", "test_labels")):
    """The four Fashion-MNIST files in `root`, some gzip-compressed, some raw."""
    rng = np.random.default_rng(1)
    arrays = {
        "train_images": _images(n_train), "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": _images(n_test, seed=2), "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for key, array in arrays.items():
        name = FASHION_MNIST_FILES[key] + (".gz" if key in gz_for else "")
        write_idx(os.path.join(root, name), array)
    return arrays


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("array", [_images(), np.arange(7, dtype=np.uint8)], ids=["images", "labels"])
def test_round_trip_raw_and_gzip(tmp_path, suffix, array):
    path = tmp_path / f"data-idx{suffix}"
    write_idx(path, array)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    out = read_idx(path, expected_magic=IDX_IMAGES_MAGIC if array.ndim == 3 else IDX_LABELS_MAGIC)
    assert out.dtype == np.uint8 and out.shape == array.shape
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_header_layout_is_big_endian():
    data = encode_idx(np.zeros((2, 3, 4), dtype=np.uint8))
    assert data[:4] == bytes.fromhex("00000803")
    assert data[4:16] == bytes.fromhex("00000002 00000003 00000004")
    assert len(data) == 16 + 24


def test_gzip_detected_by_content_not_name(tmp_path):
    path = tmp_path / "no-suffix"
    path.write_bytes(gzip.compress(encode_idx(np.arange(4, dtype=np.uint8))))
    np.testing.assert_array_equal(read_idx(path), np.arange(4))


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload_is_named(tmp_path, compress):
    data = encode_idx(_images(3))[:-100]
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(ValueError, match=r"cut-idx3-ubyte: truncated: dimensions \(3, 28, 28\) need 2352 payload "
                                         r"bytes, the file holds 2252"):
        read_idx(path)


def test_truncated_gzip_stream(tmp_path):
    path = tmp_path / "cut.gz"
    path.write_bytes(gzip.compress(encode_idx(_images(3)))[:-20])
    with pytest.raises(ValueError, match=r"cut.gz: damaged or truncated gzip data"):
        read_idx(path)


def test_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(encode_idx(_images(1))[:9])
    with pytest.raises(ValueError, match=r"short: truncated header, 3 dimension sizes need 16 bytes, file has 9"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short for an IDX header"):
        read_idx(path)


def test_trailing_bytes(tmp_path):
    path = tmp_path / "long"
    path.write_bytes(encode_idx(np.arange(4, dtype=np.uint8)) + b"\x00")
    with pytest.raises(ValueError,
                       match=r"long: has trailing bytes: dimensions \(4,\) need 4 payload bytes, the file holds 5"):
        read_idx(path)


def test_wrong_magic(tmp_path):
    path = tmp_path / "notidx"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=r"notidx: bad IDX magic number 0x504b0304"):
        read_idx(path)


def test_unsupported_dtype(tmp_path):
    path = tmp_path / "floats"
    path.write_bytes(bytes((0, 0, 0x0D, 1)) + (1).to_bytes(4, "big") + bytes(4))
    with pytest.raises(ValueError, match=r"floats: IDX dtype byte 0x0d is not supported"):
        read_idx(path)


def test_labels_where_images_expected(tmp_path):
    path = tmp_path / "labels"
    write_idx(path, np.arange(3, dtype=np.uint8))
    with pytest.raises(ValueError,
                       match=r"magic number 0x00000801 \(1 dimensions\), expected 0x00000803 \(3 dimensions\)"):
        read_idx(path, expected_magic=IDX_IMAGES_MAGIC)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_idx(tmp_path / "nothing")


def test_load_mixed_raw_and_gzip(tmp_path):
    arrays = _fake_dataset(tmp_path)
    data = load_fashion_mnist(tmp_path)
    assert set(data) == set(arrays)
    for key, array in arrays.items():
        np.testing.assert_array_equal(data[key], array)


def test_raw_file_preferred_over_gzip(tmp_path):
    _fake_dataset(tmp_path, gz_for=())
    write_idx(tmp_path / (FASHION_MNIST_FILES["test_labels"] + ".gz"), np.zeros(99, dtype=np.uint8))
    assert load_fashion_mnist(tmp_path)["test_labels"].shape == (6,)


def test_missing_directory_says_how_to_get_the_data(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_fashion_mnist(tmp_path / "absent")
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message and "--data-dir DIR" in message
    assert "train-images-idx3-ubyte" in message


def test_missing_one_file(tmp_path):
    _fake_dataset(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[.gz\] not found"):
        load_fashion_mnist(tmp_path)


def test_inconsistent_splits(tmp_path):
    _fake_dataset(tmp_path, gz_for=())
    write_idx(tmp_path / FASHION_MNIST_FILES["train_labels"], np.zeros(5, dtype=np.uint8))
    with pytest.raises(ValueError, match="12 train images but 5 train labels"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / FASHION_MNIST_FILES["train_labels"], np.full(12, 10, dtype=np.uint8))
    with pytest.raises(ValueError, match="train label 10 is out of range 0..9"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / FASHION_MNIST_FILES["train_labels"], np.zeros(12, dtype=np.uint8))
    write_idx(tmp_path / FASHION_MNIST_FILES["test_images"], _images(6, side=32))
    with pytest.raises(ValueError, match=r"test images .* are \(32, 32\), expected \(28, 28\)"):
        load_fashion_mnist(tmp_path)


def test_stats():
    images = np.array([[[0, 255]]], dtype=np.uint8)
    assert fashion_mnist_stats(images) == (0.5, 0.5)
    assert len(FASHION_MNIST_CLASSES) == 10


@pytest.mark.skipif(not os.path.isdir(DEFAULT_FASHION_MNIST_DIR), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist():
    data = load_fashion_mnist()
    assert data["train_images"].shape == (60000, 28, 28) and data["train_images"].dtype == np.uint8
    assert data["test_images"].shape == (10000, 28, 28)
    assert data["train_labels"].shape == (60000,) and data["test_labels"].shape == (10000,)
    np.testing.assert_array_equal(np.bincount(data["train_labels"]), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(data["test_labels"]), [1000] * 10)
    mean, std = fashion_mnist_stats(data["train_images"])
    assert mean == pytest.approx(FASHION_MNIST_MEAN, abs=1e-8) and std == pytest.approx(FASHION_MNIST_STD, abs=1e-8)
