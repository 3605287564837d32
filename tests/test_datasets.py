"""Tests for `keras_transfer.datasets`: local Fashion-MNIST files, few-shot subsets, errors."""

from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np
import pytest

from keras_transfer import datasets


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion_mnist(tmp_path, monkeypatch):
    """A small Fashion-MNIST in a fake Keras home; the Debian directory made to look absent."""
    directory = tmp_path / "datasets" / "fashion-mnist"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("t10k", 30)):
        labels = np.arange(count) % 10
        images = rng.integers(0, 256, size=(count, 28, 28))
        images[:, 0, 0] = np.arange(count)  # identifies each image
        _write_idx(directory / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(directory / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    return directory


def test_reads_raw_images_and_labels(fake_fashion_mnist):
    x, y = datasets.fashion_mnist(split="train")
    assert x.shape == (60, 28, 28, 1) and x.dtype == np.uint8
    assert y.shape == (60,) and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0, 0, 0], np.arange(60))
    np.testing.assert_array_equal(y, np.arange(60) % 10)

    x_test, _ = datasets.fashion_mnist(split="test")
    assert x_test.shape == (30, 28, 28, 1)


def test_per_class_is_balanced_and_deterministic(fake_fashion_mnist):
    x, y = datasets.fashion_mnist(per_class=3, seed=1)
    assert x.shape == (30, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(y), [3] * 10)
    # Labels follow their images: image i has label i % 10.
    np.testing.assert_array_equal(x[:, 0, 0, 0] % 10, y)

    again, _ = datasets.fashion_mnist(per_class=3, seed=1)
    other, _ = datasets.fashion_mnist(per_class=3, seed=2)
    np.testing.assert_array_equal(x, again)
    assert not np.array_equal(x, other)


def test_resize_and_channels(fake_fashion_mnist):
    x, _ = datasets.fashion_mnist(split="test", per_class=1, image_size=32, channels=3)
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 255.0
    np.testing.assert_array_equal(x[..., 0], x[..., 2])

    x, _ = datasets.fashion_mnist(split="test", per_class=1, image_size=(20, 24))
    assert x.shape == (10, 20, 24, 1)


def test_bad_arguments_name_the_argument(fake_fashion_mnist):
    with pytest.raises(ValueError, match="split='validation'"):
        datasets.fashion_mnist(split="validation")
    with pytest.raises(ValueError, match="per_class=0"):
        datasets.fashion_mnist(per_class=0)
    with pytest.raises(ValueError, match="per_class=7.*per_class <= 6"):
        datasets.fashion_mnist(per_class=7)
    with pytest.raises(TypeError, match="per_class=2.5"):
        datasets.fashion_mnist(per_class=2.5)
    with pytest.raises(ValueError, match="channels=2"):
        datasets.fashion_mnist(channels=2)
    with pytest.raises(ValueError, match="image_size=-1"):
        datasets.fashion_mnist(image_size=-1)
    with pytest.raises(ValueError, match="Unknown built-in dataset 'mnist'"):
        datasets.load("mnist")


def test_missing_files_error_names_both_places_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "debian")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    with pytest.raises(FileNotFoundError) as info:
        datasets.fashion_mnist()
    message = str(info.value)
    assert str(tmp_path / "debian") in message
    assert str(tmp_path / "keras" / "datasets" / "fashion-mnist") in message
    assert "apt-get install dataset-fashion-mnist" in message and "make assets" in message


def test_truncated_file_is_reported(fake_fashion_mnist):
    path = fake_fashion_mnist / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + (30).to_bytes(4, "big") + b"\x00" * 5)
    with pytest.raises(ValueError, match="truncated"):
        datasets.fashion_mnist(split="test")


@pytest.mark.skipif(
    not datasets.DEBIAN_FASHION_MNIST_DIR.is_dir() and not os.environ.get("CI"),
    reason="Debian dataset-fashion-mnist not installed; run `make assets`",
)
def test_real_fashion_mnist_from_the_debian_package():
    x, y = datasets.fashion_mnist(split="test")
    assert x.shape == (10_000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(y), [1000] * 10)
    assert len(datasets.CLASS_NAMES) == 10 and datasets.CLASS_NAMES[9] == "Ankle boot"
    assert datasets.load("fashion_mnist", split="test", per_class=2)[0].shape == (20, 28, 28, 1)


def _photo_patch(row: np.ndarray, side: int = 28) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photo, top, left = row
    return load_sample_images().images[photo][top : top + side, left : left + side]


def test_fashion_mnist_m_blends_each_image_with_a_photo_patch(fake_fashion_mnist):
    x, y = datasets.fashion_mnist_m("train", per_class=3, seed=4)
    source, source_labels = datasets.fashion_mnist(split="train", per_class=3, seed=4)
    assert x.shape == (30, 28, 28, 3) and x.dtype == np.uint8
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, source_labels)  # the same examples, their own labels

    # Example 0 against |a - b| by hand, b the patch the full split assigns to that example.
    index = int(datasets.few_shot_indices(np.arange(60) % 10, 3, seed=4)[0])
    patches = datasets.fashion_mnist_m_patches(60, split="train", seed=4)
    a = source[0].astype(np.int64)  # (28, 28, 1), broadcast over R, G, B
    b = _photo_patch(patches[index]).astype(np.int64)
    np.testing.assert_array_equal(x[0], np.abs(a - b).astype(np.uint8))
    assert not np.array_equal(x[0, ..., 0], x[0, ..., 1])  # colour comes from the photo

    # A subset is the full dataset's examples on the same backgrounds.
    full, _ = datasets.fashion_mnist_m("train", seed=4)
    np.testing.assert_array_equal(full[datasets.few_shot_indices(np.arange(60) % 10, 3, 4)], x)


def test_fashion_mnist_m_is_deterministic_in_the_seed(fake_fashion_mnist):
    x, _ = datasets.fashion_mnist_m("test", seed=1)
    again, _ = datasets.fashion_mnist_m("test", seed=1)
    other, _ = datasets.fashion_mnist_m("test", seed=2)
    np.testing.assert_array_equal(x, again)
    assert x.shape == (30, 28, 28, 3) and not np.array_equal(x, other)
    train = datasets.fashion_mnist_m_patches(30, split="train", seed=1)
    assert not np.array_equal(train, datasets.fashion_mnist_m_patches(30, split="test", seed=1))


def test_fashion_mnist_m_resize_channels_and_load(fake_fashion_mnist):
    rgb, _ = datasets.fashion_mnist_m("test", per_class=1)
    x, y = datasets.fashion_mnist_m("test", per_class=1, image_size=(20, 24))
    assert x.shape == (10, 20, 24, 3) and x.dtype == np.float32
    assert 0.0 <= x.min() and x.max() <= 255.0
    grey, _ = datasets.fashion_mnist_m("test", per_class=1, channels=1)
    assert grey.shape == (10, 28, 28, 1) and grey.dtype == np.uint8
    luma = np.rint(rgb @ np.array([0.299, 0.587, 0.114]))
    np.testing.assert_array_equal(grey[..., 0], luma)
    loaded, labels = datasets.load("fashion_mnist_m", split="test", per_class=1, channels=3)
    np.testing.assert_array_equal(loaded, rgb)
    assert datasets.DATASET_CLASS_NAMES["fashion_mnist_m"] == datasets.CLASS_NAMES


def test_fashion_mnist_m_bad_arguments_name_the_argument(tmp_path, monkeypatch):
    # Refused before any file is read: no dataset is installed here.
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"Expected one of \['test', 'train'\].*split='val'"):
        datasets.fashion_mnist_m("val")
    with pytest.raises(ValueError, match="per_class=0"):
        datasets.fashion_mnist_m(per_class=0)
    with pytest.raises(TypeError, match="per_class=1.5"):
        datasets.fashion_mnist_m(per_class=1.5)
    with pytest.raises(TypeError, match="e.g. seed=0. Received: seed=0.5"):
        datasets.fashion_mnist_m(seed=0.5)
    with pytest.raises(ValueError, match="seed=-1"):
        datasets.fashion_mnist_m(seed=-1)
    with pytest.raises(ValueError, match="3 .RGB.*channels=2"):
        datasets.fashion_mnist_m(channels=2)
    with pytest.raises(ValueError, match="image_size=0.*E.g. image_size=224"):
        datasets.fashion_mnist_m(image_size=0)
    with pytest.raises(FileNotFoundError, match="make assets"):
        datasets.fashion_mnist_m()
