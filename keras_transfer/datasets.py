"""Built-in real datasets, read from local files only: nothing here ever downloads.

Fashion-MNIST (Zalando SE, MIT licence) comes from the Debian package `dataset-fashion-mnist`
(`/usr/share/datasets/fashion-mnist/`) or, failing that, from the Keras cache
(`$KERAS_HOME/datasets/fashion-mnist/`, the files `keras.datasets.fashion_mnist` keeps). `make
assets` installs the Debian package when it is missing.

Example:

```python
from keras_transfer import datasets

x, y = datasets.fashion_mnist(split="train", per_class=20, seed=0)
x.shape  # (200, 28, 28, 1), uint8
datasets.FASHION_MNIST_CLASS_NAMES[y[0]]
```
"""

from __future__ import annotations

import functools
import gzip
import os
import pathlib

import numpy as np

from keras_transfer._validate import image_hw, is_int

__all__ = [
    "CLASS_NAMES",
    "DATASETS",
    "DATASET_CLASS_NAMES",
    "FASHION_MNIST_CLASS_NAMES",
    "fashion_mnist",
    "fashion_mnist_m",
    "fashion_mnist_m_patches",
    "fashion_mnist_dirs",
    "few_shot_indices",
    "load",
]

FASHION_MNIST_CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CLASS_NAMES = FASHION_MNIST_CLASS_NAMES
# Class names per built-in dataset, so callers (the CLI) can write `labels.txt` by dataset name.
DATASET_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "fashion_mnist": FASHION_MNIST_CLASS_NAMES,
    "fashion_mnist_m": FASHION_MNIST_CLASS_NAMES,
}

DEBIAN_FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def fashion_mnist_dirs() -> list[pathlib.Path]:
    """Returns the directories searched for Fashion-MNIST, in order.

    The Debian package's directory first, then `$KERAS_HOME/datasets/fashion-mnist` (default
    `~/.keras/datasets/fashion-mnist`).
    """
    keras_home = os.environ.get("KERAS_HOME") or "~/.keras"
    return [
        DEBIAN_FASHION_MNIST_DIR,
        pathlib.Path(keras_home).expanduser() / "datasets" / "fashion-mnist",
    ]


def _read_idx(path: pathlib.Path) -> np.ndarray:
    """Parses an IDX file (the MNIST format): 2 zero bytes, dtype code, rank, big-endian dims."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad header {data[:4]!r}).")
    rank = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(rank))
    array = np.frombuffer(data, dtype=_IDX_DTYPES[data[2]], offset=4 + 4 * rank)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} is truncated: header says {dims}, found {array.size} values.")
    return array.reshape(dims).astype(array.dtype.newbyteorder("="), copy=False)


def _find_files(split: str) -> tuple[pathlib.Path, pathlib.Path]:
    candidates = fashion_mnist_dirs()
    for directory in candidates:
        images, labels = (directory / name for name in _FILES[split])
        if images.is_file() and labels.is_file():
            return images, labels
    names = ", ".join(_FILES[split])
    raise FileNotFoundError(
        f"Fashion-MNIST files ({names}) not found in {' or '.join(map(str, candidates))}. "
        "Install them with `make assets` or `sudo apt-get install dataset-fashion-mnist`, or copy "
        "the four idx .gz files into the second directory; nothing is downloaded."
    )


def few_shot_indices(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Picks `per_class` indices of each class at random, deterministically for a given seed.

    Args:
        labels: Integer class labels, shape `(N,)`.
        per_class: How many examples to take from every class.
        seed: Seed of the random choice; the same seed gives the same subset.

    Returns:
        Sorted indices into `labels`, `per_class` for each class present.

    Raises:
        TypeError: If `per_class` is not an int.
        ValueError: If `per_class` is not positive or a class has fewer examples.
    """
    if not is_int(per_class):
        raise TypeError(f"`per_class` must be an int. Received: per_class={per_class!r}")
    if per_class < 1:
        raise ValueError(
            f"`per_class` must be a positive number of examples per class. "
            f"Received: per_class={per_class}"
        )
    rng = np.random.default_rng(seed)
    chosen = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(
                f"Class {cls} has only {len(members)} examples; received per_class={per_class}. "
                f"Use per_class <= {len(members)}."
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))


def fashion_mnist(
    *,
    split: str = "train",
    per_class: int | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Loads Fashion-MNIST from local files: 28x28 greyscale photos of 10 kinds of clothing.

    By default returns the raw images; the model builders accept greyscale input (replicated to
    three channels inside the model) and resize inside the model, so no preprocessing is needed.

    Args:
        split: `"train"` (60,000 images) or `"test"` (10,000 images).
        per_class: If set, a balanced few-shot subset with this many images per class, chosen
            with `seed`; the same seed always gives the same subset.
        seed: Seed for the few-shot subset.
        image_size: If set, images are resized (bilinear) to this size, an int for square images
            or `(height, width)`, and returned as float32 in [0, 255].
        channels: 1 for greyscale, or 3 to repeat the grey channel as RGB.

    Returns:
        `(images, labels)`: images of shape `(N, 28, 28, channels)` (uint8) or
        `(N, height, width, channels)` (float32 when resized); labels int64 of shape `(N,)`
        indexing `FASHION_MNIST_CLASS_NAMES`.

    Raises:
        TypeError: If `per_class` is not an int.
        ValueError: If `split`, `per_class`, `image_size` or `channels` is invalid.
        FileNotFoundError: If the dataset files are not installed.

    Example:

    ```python
    x, y = fashion_mnist(split="test", per_class=5, image_size=96, channels=3)
    x.shape  # (50, 96, 96, 3)
    ```
    """
    if split not in _FILES:
        raise ValueError(
            f"Unknown `split` for fashion_mnist. Expected one of {sorted(_FILES)}. "
            f"Received: split={split!r}"
        )
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels!r}")
    size = None if image_size is None else image_hw(image_size)

    images_path, labels_path = _find_files(split)
    images = _read_idx(images_path)
    labels = _read_idx(labels_path).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
            f"{labels.shape[0]} labels; reinstall the dataset files."
        )
    if per_class is not None:
        keep = few_shot_indices(labels, per_class, seed)
        images, labels = images[keep], labels[keep]
    images = images[..., None]
    if size is not None:
        import tensorflow as tf

        images = tf.image.resize(images.astype(np.float32), size).numpy()
    if channels == 3:
        images = np.repeat(images, 3, axis=-1)
    return images, labels


# Fashion-MNIST-M's background patches: one stream per split, so train and test differ.
_SPLIT_STREAMS = {"train": 0, "test": 1}
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, for channels=1


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple[np.ndarray, ...]:
    """scikit-learn's two sample photos (china.jpg, flower.jpg, 427x640 RGB uint8), read from the
    installed package; nothing is downloaded. Cached, read-only."""
    from sklearn.datasets import load_sample_images

    photos = tuple(np.asarray(image, dtype=np.uint8) for image in load_sample_images().images)
    for photo in photos:
        photo.setflags(write=False)
    return photos


def fashion_mnist_m_patches(
    count: int, *, split: str = "train", seed: int = 0, patch_size: int = 28
) -> np.ndarray:
    """Where Fashion-MNIST-M takes each image's background: `(photo, top, left)` per example.

    Row `i` is the patch blended into example `i` of the full `split` (before any few-shot
    subset), so a subset's images are those of the full dataset. Drawn from
    `np.random.default_rng((seed, split))` over scikit-learn's sample photos.

    Args:
        count: Number of examples in the split.
        split: `"train"` or `"test"`; each has its own random stream.
        seed: Seed of the draw.
        patch_size: Side of the square patch, in pixels.

    Returns:
        An int64 array of shape `(count, 3)`: photo index (into
        `sklearn.datasets.load_sample_images().images`), top row and left column.
    """
    photos = _sample_photos()
    rng = np.random.default_rng((seed, _SPLIT_STREAMS[split]))
    which = rng.integers(0, len(photos), size=count)
    heights = np.array([p.shape[0] for p in photos])[which]
    widths = np.array([p.shape[1] for p in photos])[which]
    top = np.floor(rng.random(count) * (heights - patch_size + 1)).astype(np.int64)
    left = np.floor(rng.random(count) * (widths - patch_size + 1)).astype(np.int64)
    return np.stack([which.astype(np.int64), top, left], axis=1)


def fashion_mnist_m(
    split: str = "train",
    *,
    per_class: int | None = None,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    channels: int = 3,
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST-M: Fashion-MNIST blended with patches of real colour photos (a domain shift).

    Built as MNIST-M was built from MNIST (Ganin et al., JMLR 2016, §5.2.2): for each 28x28
    image `a` a random 28x28 patch `b` of a colour photo is cut, and every output pixel is
    `|a - b|` per channel (the grey image repeated over R, G, B). The photos are the two that
    ship with scikit-learn (`sklearn.datasets.load_sample_images`: a Chinese temple and a
    flower), where Ganin et al. used BSDS500. Labels are the source images': example `i` of
    `fashion_mnist_m(split, per_class=k, seed=s)` is example `i` of
    `fashion_mnist(split=split, per_class=k, seed=s)` on its background
    (`fashion_mnist_m_patches(..., seed=s)`), so the same seed gives the same dataset.

    Args:
        split: `"train"` (60,000 images) or `"test"` (10,000 images).
        per_class: If set, a balanced few-shot subset with this many images per class, the
            examples `fashion_mnist` picks for the same `per_class` and `seed`.
        seed: Seed of the backgrounds and of the few-shot subset.
        image_size: If set, the blended images are resized (bilinear) to this size, an int or
            `(height, width)`, and returned as float32 in [0, 255].
        channels: 3 for RGB (the dataset), or 1 for its luminance (BT.601), e.g. for a
            greyscale model.

    Returns:
        `(images, labels)`: images of shape `(N, 28, 28, channels)` (uint8) or
        `(N, height, width, channels)` (float32 when resized); labels int64 of shape `(N,)`
        indexing `FASHION_MNIST_CLASS_NAMES`.

    Raises:
        TypeError: If `per_class` or `seed` is not an int.
        ValueError: If `split`, `per_class`, `seed`, `image_size` or `channels` is invalid.
        FileNotFoundError: If the Fashion-MNIST files are not installed.

    Example:

    ```python
    x, y = fashion_mnist_m("test", per_class=5, seed=0)
    x.shape, x.dtype  # (50, 28, 28, 3), uint8
    ```
    """
    if split not in _FILES:
        raise ValueError(
            f"Unknown `split` for fashion_mnist_m. Expected one of {sorted(_FILES)}. "
            f"Received: split={split!r}"
        )
    if not is_int(seed):
        raise TypeError(f"`seed` must be an int, e.g. seed=0. Received: seed={seed!r}")
    if seed < 0:
        raise ValueError(f"`seed` must be >= 0, e.g. seed=0. Received: seed={seed!r}")
    if channels not in (1, 3):
        raise ValueError(
            "`channels` must be 3 (RGB, the dataset) or 1 (its luminance). "
            f"Received: channels={channels!r}"
        )
    size = None if image_size is None else image_hw(image_size)
    if per_class is not None and not is_int(per_class):
        raise TypeError(f"`per_class` must be an int. Received: per_class={per_class!r}")
    if per_class is not None and per_class < 1:
        raise ValueError(
            "`per_class` must be a positive number of examples per class, or None for all. "
            f"Received: per_class={per_class}"
        )

    images, labels = fashion_mnist(split=split)
    patches = fashion_mnist_m_patches(len(images), split=split, seed=seed)
    if per_class is not None:
        keep = few_shot_indices(labels, per_class, seed)
        images, labels, patches = images[keep], labels[keep], patches[keep]
    photos = _sample_photos()
    side = images.shape[1]
    backgrounds = np.empty((len(images), side, side, 3), dtype=np.int16)
    for i, (photo, top, left) in enumerate(patches):
        backgrounds[i] = photos[photo][top : top + side, left : left + side]
    blended = np.abs(backgrounds - images.astype(np.int16)).astype(np.uint8)
    if channels == 1:
        blended = np.rint(blended @ _LUMA)[..., None].astype(np.uint8)
    if size is not None:
        import tensorflow as tf

        return tf.image.resize(blended.astype(np.float32), size).numpy(), labels
    return blended, labels


# Built-in datasets by the name the CLI uses: name -> loader taking the keywords above.
DATASETS = {"fashion_mnist": fashion_mnist, "fashion_mnist_m": fashion_mnist_m}


def load(name: str, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Loads a built-in dataset by name, e.g. `load("fashion_mnist", split="test")`.

    Raises:
        ValueError: If `name` is not a built-in dataset.
    """
    if name not in DATASETS:
        raise ValueError(
            f"Unknown built-in dataset {name!r}. Expected one of {sorted(DATASETS)}. "
            "For your own images pass an image folder instead."
        )
    return DATASETS[name](**kwargs)
