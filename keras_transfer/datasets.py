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
DATASET_CLASS_NAMES: dict[str, tuple[str, ...]] = {"fashion_mnist": FASHION_MNIST_CLASS_NAMES}

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


# Built-in datasets by the name the CLI uses: name -> loader taking the keywords above.
DATASETS = {"fashion_mnist": fashion_mnist}


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
