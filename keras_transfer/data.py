"""Input pipelines: image folders, TFDS datasets (local data only) and numpy arrays.

Every function returns batched, prefetched `tf.data.Dataset`s of `(images, labels)` with float32
pixels in [0, 255] (the models do their own preprocessing) and the class names attached as
`dataset.class_names`. Bad data is refused before any pipeline is built, with a message naming the
file or value and the fix.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np
import tensorflow as tf

from keras_transfer._validate import check_int, image_hw

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_IGNORED = (".DS_Store", "Thumbs.db", "desktop.ini")
AUTOTUNE = tf.data.AUTOTUNE


def _check_batch_size(batch_size, n: int) -> int:
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if batch_size > n:
        raise ValueError(
            f"`batch_size`={batch_size} is larger than the dataset ({n} examples): every epoch "
            f"would be one short batch. Use batch_size <= {n}."
        )
    return batch_size


def _check_split(validation_split) -> float | None:
    if validation_split is None:
        return None
    if not isinstance(validation_split, float) or not 0.0 < validation_split < 1.0:
        raise ValueError(
            "`validation_split` must be a float in (0, 1), e.g. 0.2. "
            f"Received: validation_split={validation_split!r}"
        )
    return validation_split


def _finish(ds: tf.data.Dataset, class_names, batch_size: int, shuffle: bool, seed: int, n: int):
    if shuffle:
        ds = ds.shuffle(n, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size).prefetch(AUTOTUNE)
    ds.class_names = list(class_names)
    return ds


def _split_indices(labels: np.ndarray, validation_split: float, seed: int):
    """Stratified split: each class keeps the same share in validation."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        k = int(round(len(idx) * validation_split))
        val.extend(idx[:k])
        train.extend(idx[k:])
    return np.sort(train), np.sort(val)


def scan_image_folder(directory: str | os.PathLike, *, skip_corrupt: bool = False):
    """Lists a class-per-subfolder image tree and checks every file decodes.

    Args:
        directory: Folder with one subfolder per class, images directly inside each.
        skip_corrupt: Drop files that fail to decode instead of raising.

    Returns:
        `(paths, labels, class_names)`: lists of file paths and int labels, sorted class names.

    Raises:
        ValueError: for a missing folder, fewer than two classes, an empty class folder, nested
            folders, non-image files, or corrupt/truncated images (all listed).
    """
    root = pathlib.Path(directory)
    if not root.is_dir():
        raise ValueError(
            f"`directory` must be an existing folder with one subfolder per class. "
            f"Received: directory={str(directory)!r}, which is not a folder."
        )
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise ValueError(
            f"{str(directory)!r} has {len(class_dirs)} class folder(s) "
            f"({[p.name for p in class_dirs]}); classification needs at least 2. Put each "
            "class's images in its own subfolder: <directory>/<class name>/<image files>."
        )
    paths, labels = [], []
    for label, class_dir in enumerate(class_dirs):
        # os.scandir: its entries know whether they are folders without a stat call per file
        # (4x faster than pathlib at 60,000 files).
        with os.scandir(class_dir) as entries:
            files = sorted((e for e in entries if e.name not in _IGNORED), key=lambda e: e.name)
        nested = [p for p in files if p.is_dir()]
        if nested:
            raise ValueError(
                f"Class folder {str(class_dir)!r} holds subfolders {[p.name for p in nested]}; "
                "expected image files directly inside each class folder "
                "(<directory>/<class>/<image>). Move the images up or point `directory` lower."
            )
        others = [p for p in files if os.path.splitext(p.name)[1].lower() not in IMAGE_EXTENSIONS]
        if others:
            raise ValueError(
                f"Non-image files in {str(class_dir)!r}: {[p.name for p in others[:10]]}. "
                f"Expected only {', '.join(IMAGE_EXTENSIONS)} files. Move them out of the folder."
            )
        if not files:
            raise ValueError(
                f"Class folder {str(class_dir)!r} is empty. Add images of class "
                f"{class_dir.name!r} or remove the folder."
            )
        paths.extend(entry.path for entry in files)
        labels.extend([label] * len(files))
    problems = undecodable(paths)
    if problems and not skip_corrupt:
        raise ValueError(
            f"{len(problems)} corrupt or truncated image file(s) in {str(directory)!r}: "
            f"{problems[:20]}{' ...' if len(problems) > 20 else ''}. Remove or replace them, "
            "or pass skip_corrupt=True to leave them out."
        )
    bad = set(problems)
    keep = [i for i, path in enumerate(paths) if path not in bad]
    return [paths[i] for i in keep], [labels[i] for i in keep], [p.name for p in class_dirs]


def undecodable(paths: Sequence[str]) -> list[str]:
    """The files among `paths` that cannot be read or decoded, or decode to no pixels.

    Decodes in parallel in a `tf.data` pass (one file at a time in eager mode took about 4x as
    long as an epoch of decoding), keeping nothing but each file's name.
    """
    if not paths:
        return []

    def nonempty(path):
        image = tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
        return path, tf.size(image) > 0

    ds = tf.data.Dataset.from_tensor_slices(list(paths))
    ds = ds.map(nonempty, num_parallel_calls=AUTOTUNE, deterministic=False).ignore_errors()
    good = set()
    for names, ok in ds.batch(1024).as_numpy_iterator():
        good.update(name.decode() for name in names[ok])
    return [path for path in paths if path not in good]


def from_folder(
    directory: str | os.PathLike,
    *,
    image_size: int | tuple[int, int] = 224,
    batch_size: int = 32,
    validation_split: float | None = None,
    seed: int = 0,
    channels: int = 3,
    shuffle: bool = True,
    skip_corrupt: bool = False,
    cache: bool = True,
):
    """Builds datasets from an image folder with one subfolder per class.

    Images are decoded in parallel, resized to `image_size`, cached in memory (decoded once)
    and prefetched.

    Args:
        directory: `<directory>/<class name>/<image>`; classes are the sorted subfolder names.
        image_size: Size the images are resized to; use the model's input size.
        batch_size: Examples per batch.
        validation_split: Fraction held out for validation (stratified, seeded); None for none.
        seed: Seed of the split and of shuffling.
        channels: 3 (RGB) or 1 (greyscale).
        shuffle: Shuffle the training examples each epoch.
        skip_corrupt: Leave out files that fail to decode instead of raising.
        cache: Keep decoded images in memory after the first epoch. Without it nothing but the
            batches in flight is held: shuffling then reorders the file names before decoding.

    Returns:
        A dataset, or `(train, validation)` when `validation_split` is set; each has
        `class_names`.

    Raises:
        ValueError: see `scan_image_folder`; also a batch larger than the data.

    Example:
    >>> import keras_transfer as kt
    >>> train, val = kt.data.from_folder(
    ...     "photos/", image_size=160, validation_split=0.2
    ... )  # doctest: +SKIP
    """
    size = image_hw(image_size)
    validation_split = _check_split(validation_split)
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: channels={channels!r}")
    paths, labels, class_names = scan_image_folder(directory, skip_corrupt=skip_corrupt)
    paths, labels = np.array(paths), np.array(labels, dtype="int32")
    _check_batch_size(batch_size, len(paths))

    def load(path, label):
        image = tf.io.decode_image(
            tf.io.read_file(path), channels=channels, expand_animations=False
        )
        # The resize to a constant size already gives the static (height, width, channels)
        # shape; an ensure_shape would be one more op per image for nothing.
        return tf.image.resize(tf.cast(image, tf.float32), size), label

    def make(indices, training):
        ds = tf.data.Dataset.from_tensor_slices((paths[indices], labels[indices]))
        reshuffle = shuffle and training
        if reshuffle and not cache:
            # Shuffle the file names, not the decoded images: a buffer of every example after
            # decoding would hold them all in memory (2.2 GB for 60,000 at 96 px, greyscale).
            ds = ds.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
            reshuffle = False
        ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
        if cache:
            ds = ds.cache()
        return _finish(ds, class_names, batch_size, reshuffle, seed, len(indices))

    if validation_split is None:
        return make(np.arange(len(paths)), True)
    train, val = _split_indices(labels, validation_split, seed)
    return make(train, True), make(val, False)


def _check_arrays(x, y, num_classes: int | None):
    try:
        x = np.asarray(x)
    except ValueError as error:
        raise ValueError(
            "`x` holds images of mixed sizes or channel counts; they must share one shape. "
            "Resize them to one size (e.g. with tf.image.resize) first. "
            f"Received: {error}"
        ) from error
    if x.dtype == object:
        raise ValueError(
            "`x` holds images of mixed sizes or channel counts; they must share one shape "
            "(N, height, width[, channels]). Resize them to one size first."
        )
    y = np.asarray(y)
    if len(x) != len(y):
        raise ValueError(
            f"`x` and `y` must have the same length. Received: len(x)={len(x)}, len(y)={len(y)}. "
            "Pass one label per image."
        )
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(
            "`x` must have shape (N, height, width) or (N, height, width, 1 or 3). "
            f"Received: x.shape={x.shape}"
        )
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"`x` must be numeric pixels in [0, 255]. Received: dtype {x.dtype}")
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if x.dtype.kind == "f" else []
    if len(bad) and bad.any():
        raise ValueError(
            f"`x` holds NaN or inf values in {int(bad.sum())} image(s), e.g. at index "
            f"{int(np.flatnonzero(bad)[0])}. Drop or repair those images."
        )
    if y.ndim == 1:
        if not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.mod(y, 1) == 0):
                y = y.astype("int64")
            else:
                raise ValueError(
                    "`y` must hold integer class ids 0..num_classes-1. "
                    f"Received: dtype {y.dtype}, e.g. {y[:3].tolist()}"
                )
        n = num_classes if num_classes is not None else int(y.max()) + 1
        out = (y < 0) | (y >= n)
        if out.any():
            raise ValueError(
                f"`y` holds labels outside [0, {n - 1}]: {sorted(set(y[out].tolist()))[:10]} "
                f"(first at index {int(np.flatnonzero(out)[0])}). Labels must be class ids "
                "0..num_classes-1; remap them, or fix `num_classes`/`class_names`."
            )
        if len(np.unique(y)) < 2:
            raise ValueError(
                f"`y` holds a single class ({np.unique(y).tolist()}); classification needs at "
                "least 2 classes with examples."
            )
        return x, y.astype("int32"), n
    return x, y.astype("float32"), y.shape[-1]


def _check_sample_weight(sample_weight, n: int) -> np.ndarray | None:
    if sample_weight is None:
        return None
    w = np.asarray(sample_weight)
    if w.dtype == object or not np.issubdtype(w.dtype, np.number) or w.dtype.kind == "c":
        raise ValueError(
            f"`sample_weight` must be real numbers, one per image. Received: dtype {w.dtype}"
        )
    w = w.astype("float32")
    if w.shape != (n,):
        raise ValueError(
            f"`sample_weight` must have shape ({n},), one weight per image. Received: shape "
            f"{w.shape}"
        )
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        raise ValueError(
            f"`sample_weight` must be finite and >= 0. Received: {w[bad][:5].tolist()} at "
            f"indices {np.flatnonzero(bad)[:5].tolist()}"
        )
    if not (w > 0).any():
        raise ValueError("`sample_weight` is all zeros: no example would train. Pass weights > 0.")
    return w


def from_arrays(
    x,
    y,
    *,
    class_names: Sequence[str] | None = None,
    batch_size: int = 32,
    validation_split: float | None = None,
    shuffle: bool = True,
    seed: int = 0,
    sample_weight=None,
):
    """Builds datasets from in-memory images and labels.

    Args:
        x: Images, `(N, height, width)` or `(N, height, width, 1 or 3)`, pixels in [0, 255].
        y: Integer class ids `(N,)`, or one-hot / multi-hot / regression targets `(N, K)`.
        class_names: Names of the classes; defaults to `"0"`, `"1"`, ...
        batch_size: Examples per batch.
        validation_split: Fraction held out for validation (stratified, seeded), or None.
        shuffle: Shuffle the training examples each epoch.
        seed: Seed of the split and of shuffling.
        sample_weight: Optional per-example loss weights `(N,)` (e.g. from
            `kt.importance_weights`): finite, >= 0, not all 0. The datasets then yield
            `(images, labels, weights)` and Keras weights each example's loss by them (a
            weight of 0 leaves the example out of the gradient).

    Returns:
        A dataset, or `(train, validation)`, each with `class_names`.

    Raises:
        ValueError: for mismatched lengths, NaN/inf pixels, mixed image shapes, labels out of
            range, a single class, or bad `sample_weight`.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> ds = kt.data.from_arrays(np.zeros((4, 8, 8)), [0, 1, 0, 1], batch_size=2)
    >>> ds.class_names
    ['0', '1']
    """
    num_classes = len(class_names) if class_names is not None else None
    x, y, n = _check_arrays(x, y, num_classes)
    validation_split = _check_split(validation_split)
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    _check_batch_size(batch_size, len(x))
    w = _check_sample_weight(sample_weight, len(x))
    x = x.astype("float32", copy=False)

    def make(indices, training):
        parts = (x[indices], y[indices]) + (() if w is None else (w[indices],))
        ds = tf.data.Dataset.from_tensor_slices(parts)
        return _finish(ds, names, batch_size, shuffle and training, seed, len(indices))

    if validation_split is None:
        return make(np.arange(len(x)), True)
    train, val = _split_indices(y if y.ndim == 1 else np.zeros(len(y)), validation_split, seed)
    return make(train, True), make(val, False)


def from_tfds(
    name_or_builder,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] = 224,
    batch_size: int = 32,
    shuffle: bool = True,
    seed: int = 0,
    image_key: str = "image",
    label_key: str = "label",
):
    """Builds a dataset from a TFDS dataset that is already prepared on disk. Never downloads.

    Args:
        name_or_builder: A TFDS name (`"tf_flowers"`) or a `tfds.core.DatasetBuilder` (e.g.
            `tfds.folder_dataset.ImageFolder(root)` or your own `GeneratorBasedBuilder`).
        split: TFDS split, e.g. `"train"` or `"train[:80%]"`.
        data_dir: TFDS data folder; TFDS's default when None.
        image_size: Size the images are resized to.
        batch_size: Examples per batch.
        shuffle: Shuffle the examples each epoch.
        seed: Seed of shuffling.
        image_key: Feature holding the image.
        label_key: Feature holding the class label.

    Returns:
        A dataset with `class_names` from the label feature.

    Raises:
        ValueError: when the dataset is not prepared locally (with the command that prepares it).
    """
    import tensorflow_datasets as tfds

    size = image_hw(image_size)
    if isinstance(name_or_builder, str):
        try:
            builder = tfds.builder(name_or_builder, data_dir=data_dir)
        except Exception as error:  # unknown names raise TFDS's own DatasetNotFoundError
            raise ValueError(
                f"Unknown TFDS dataset {name_or_builder!r}: {error}. "
                "See tfds.list_builders(), or pass a DatasetBuilder."
            ) from error
    else:
        builder = name_or_builder
    # ImageFolder reads its folder directly; every other builder must already be prepared on disk.
    reads_directly = isinstance(builder, tfds.folder_dataset.ImageFolder)
    if not reads_directly and not builder.is_prepared():
        raise ValueError(
            f"TFDS dataset {builder.name!r} is not prepared in {builder.data_dir!r}; "
            "keras_transfer never downloads. Prepare it once where the internet is reachable "
            f"(`tfds build {builder.name} --data_dir ...`) and pass data_dir=, or use "
            "kt.data.from_folder."
        )
    label_feature = builder.info.features[label_key]
    class_names = list(getattr(label_feature, "names", [])) or [
        str(i) for i in range(label_feature.num_classes)
    ]
    ds = builder.as_dataset(split=split, shuffle_files=False)
    n = int(ds.cardinality())
    if n > 0:
        _check_batch_size(batch_size, n)

    def convert(example):
        image = tf.cast(example[image_key], tf.float32)
        if image.shape.rank == 2:
            image = image[..., None]
        return tf.image.resize(image, size), tf.cast(example[label_key], tf.int32)

    ds = ds.map(convert, num_parallel_calls=AUTOTUNE)
    return _finish(ds, class_names, batch_size, shuffle, seed, max(n, 1024))
