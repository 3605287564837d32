"""Source and target data for adaptation: checked before training, then paired batch by batch.

The source is labelled (`(x, y)` arrays or a dataset of `(images, labels)`), the target is images
only. Both are checked in one pass each (counts, image shape, finite pixels; the source's labels
against the classifier's head) and must share one image size and channel count. Training batches
pair `batch_size` source images with `batch_size` target images; an epoch is one pass over the
larger domain (its last partial batch dropped) while the smaller one repeats.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import tensorflow as tf

from keras_transfer import datacheck
from keras_transfer._validate import check_int
from keras_transfer.heads import HeadSpec

_RESIZE_HINT = (
    "kt.adapt does not resize: bring both domains to the classifier's input first, e.g. "
    "tf.image.resize(x, (height, width)) for the size and np.repeat(x, 3, axis=-1) (or "
    "tf.image.grayscale_to_rgb) for greyscale images."
)


@dataclasses.dataclass
class Domain:
    """One domain's data, checked: a dataset's unbatched elements, or the arrays."""

    name: str
    elements: tf.data.Dataset | None  # (images[, labels]) one by one; None for arrays
    count: int
    image_shape: tuple[int, ...]
    labelled: bool
    arrays: tuple | None = None  # (x,) or (x, y) for arrays: reshuffled here every pass


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape)


def _array_images(x, name: str) -> np.ndarray:
    try:
        x = np.asarray(x)
    except ValueError as error:
        raise ValueError(
            f"`{name}` holds images of several sizes or channel counts; they must share one "
            f"shape. {_RESIZE_HINT} Received: {error}"
        ) from None
    if x.ndim == 3 and x.dtype != object:
        x = x[..., None]
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.number):
        raise ValueError(
            f"`{name}` images must be a numeric array of shape (N, height, width[, channels]). "
            f"Received: shape {x.shape}, dtype {x.dtype}."
        )
    return x


def _batched(dataset: tf.data.Dataset, images_spec, batch_size: int) -> tf.data.Dataset:
    return dataset.batch(batch_size) if images_spec.shape.rank == 3 else dataset


def _shapes_pass(dataset: tf.data.Dataset):
    """Per-batch (count, image shape, finite pixels) over a batched dataset of images."""

    def stats(images):
        finite = (
            tf.reduce_all(tf.math.is_finite(images))
            if images.dtype.is_floating
            else tf.constant(True)
        )
        return tf.shape(images)[0], tf.shape(images)[1:], finite

    return dataset.map(stats, num_parallel_calls=tf.data.AUTOTUNE)


def _one_shape(shapes: set, name: str) -> tuple[int, ...]:
    if len(shapes) > 1:
        listed = ", ".join(_shape_text(s) for s in sorted(shapes))
        raise ValueError(
            f"`{name}` holds images of several sizes or channel counts ({listed}); they must "
            f"share one. {_RESIZE_HINT}"
        )
    (shape,) = shapes
    if len(shape) != 3:
        raise ValueError(
            f"`{name}` images must be (height, width, channels) each. Received images of shape "
            f"{_shape_text(shape)}."
        )
    return shape


def _empty(name: str, what: str) -> ValueError:
    return ValueError(f"`{name}` is empty: adaptation needs {what}. Received: 0 images in {name}.")


def source_domain(
    source, head: HeadSpec | None, *, batch_size: int = 64, name: str = "source"
) -> Domain:
    """Checks labelled source data, labels against `head` when given (one pass).

    Raises:
        TypeError: For data that is neither `(x, y)` arrays nor a dataset.
        ValueError: For empty data, lengths that differ, images of several shapes, non-finite
            pixels, or labels outside the head's range (named with the fix).
    """
    if isinstance(source, tf.data.Dataset):
        spec = source.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2:
            raise ValueError(
                f"`{name}` must give (images, labels) pairs: the source domain is labelled. "
                f"Received elements of spec {spec!r}. Map it to pairs, e.g. ds.map(lambda x: "
                "(x['image'], x['label'])), or pass (x, y) arrays."
            )
        batched = _batched(source.map(lambda *e: (e[0], e[1])), spec[0], batch_size)
        if head is not None:
            datacheck.check_spec(head, batched.element_spec, name)
        stats, shapes, count = datacheck.DataStats(), set(), 0
        one_pass = datacheck.stats_source(batched).map(
            lambda x, y: (datacheck.batch_stats(x, y), tf.shape(x)[1:]),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        for batch_stats, shape in one_pass:
            stats.update(batch_stats)
            shapes.add(tuple(int(d) for d in shape))
        count = stats.examples
        if not count:
            raise _empty(name, "labelled source images")
        shape = _one_shape(shapes, name)
        if head is not None:
            datacheck.raise_for(head, batched.element_spec[1], stats, name)
        elements = source.map(lambda *e: (e[0], e[1]))
        if spec[0].shape.rank == 4:
            elements = elements.unbatch()
        return Domain(name, elements, count, shape, True)
    if not isinstance(source, tuple | list) or len(source) != 2:
        raise TypeError(
            f"`{name}` must be an (x, y) tuple of arrays or a tf.data.Dataset of (images, "
            f"labels): the source domain is labelled. Received: {type(source).__name__}"
        )
    x = _array_images(source[0], name)
    y = np.asarray(source[1])
    if len(x) != len(y):
        raise ValueError(
            f"`{name}` images and labels differ in length: {len(x)} images, {len(y)} labels. "
            "Pass one label per image."
        )
    if not len(x):
        raise _empty(name, "labelled source images")
    if head is not None:
        label_spec = tf.TensorSpec((None, *y.shape[1:]), tf.as_dtype(y.dtype))
        datacheck.check_spec(head, (tf.TensorSpec((None, *x.shape[1:])), label_spec), name)
        stats = _array_stats(x, y)
        datacheck.raise_for(head, label_spec, stats, name)
    else:
        stats = _array_stats(x, y)
        if not stats.pixels_finite:
            datacheck.raise_for(HeadSpec("regression", 1, None, "-"), None, stats, name)
    return Domain(name, None, len(x), tuple(x.shape[1:]), True, arrays=(x, y))


def _array_stats(x: np.ndarray, y: np.ndarray) -> datacheck.DataStats:
    values = y.astype("float64", copy=False)
    finite = np.isfinite(values)
    safe = np.where(finite, values, 0.0)
    pixels = bool(np.isfinite(x).all()) if x.dtype.kind == "f" else True
    return datacheck.DataStats(
        batches=1,
        examples=len(x),
        label_min=float(safe.min()) if safe.size else np.inf,
        label_max=float(safe.max()) if safe.size else -np.inf,
        labels_finite=bool(finite.all()),
        labels_integral=bool(np.all(safe == np.round(safe))),
        pixels_finite=pixels,
        first_bad_pixels=None if pixels else 0,
    )


def _labels_ignored(name: str) -> None:
    warnings.warn(
        f"`{name}` has labels; unsupervised adaptation ignores them (only its images are "
        "used). Score on labelled target data with `validation_data=` instead.",
        UserWarning,
        stacklevel=4,
    )


def _bad_pixels(name: str) -> ValueError:
    return ValueError(
        f"`{name}` has non-finite pixel values (NaN or inf); training on them would turn the "
        "weights into NaN. Drop or repair those images."
    )


def target_domain(target, *, batch_size: int = 64, name: str = "target") -> Domain:
    """Checks unlabelled target images (one pass); labels, if any, are dropped with a warning.

    Raises:
        TypeError: For data that is neither an array nor a dataset.
        ValueError: For empty data, images of several shapes or non-finite pixels.
    """
    if isinstance(target, tf.data.Dataset):
        spec = target.element_spec
        if isinstance(spec, dict):
            raise ValueError(
                f"`{name}` must give images (or (images, labels) pairs, labels ignored). "
                f"Received elements of spec {spec!r}. Map it, e.g. ds.map(lambda x: x['image'])."
            )
        if isinstance(spec, tuple):
            if len(spec) >= 2:
                _labels_ignored(name)
            target, spec = target.map(lambda *e: e[0]), spec[0]
        batched = _batched(target, spec, batch_size)
        shapes, count, finite = set(), 0, True
        for n, shape, ok in _shapes_pass(batched):
            shapes.add(tuple(int(d) for d in shape))
            count += int(n)
            finite &= bool(ok)
        if not count:
            raise _empty(name, "unlabelled target images")
        shape = _one_shape(shapes, name)
        if not finite:
            raise _bad_pixels(name)
        elements = target.unbatch() if spec.shape.rank == 4 else target
        return Domain(name, elements, count, shape, False)
    if isinstance(target, tuple) and len(target) == 2:
        _labels_ignored(name)
        target = target[0]
    if isinstance(target, str | bytes | dict) or target is None:
        raise TypeError(
            f"`{name}` must be an array of images (N, height, width[, channels]) or a "
            f"tf.data.Dataset of images. Received: {type(target).__name__}"
        )
    x = _array_images(target, name)
    if not len(x):
        raise _empty(name, "unlabelled target images")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise _bad_pixels(name)
    return Domain(name, None, len(x), tuple(x.shape[1:]), False, arrays=(x,))


def check_compatible(
    source: Domain,
    target: Domain,
    batch_size: int,
    model_shape: tuple | None = None,
    replicas: int = 1,
) -> None:
    """Refuses domains of different image shapes, not the model's, or smaller than a batch.

    `batch_size` is per replica; a step takes `batch_size * replicas` images of each domain.
    """
    if source.image_shape != target.image_shape:
        raise ValueError(
            f"`source` images are {_shape_text(source.image_shape)} (height x width x "
            f"channels) but `target` images are {_shape_text(target.image_shape)}; both domains "
            f"must share one size and channel count. {_RESIZE_HINT}"
        )
    if model_shape is not None and (
        len(model_shape) != len(source.image_shape)
        or any(
            m is not None and m != s for m, s in zip(model_shape, source.image_shape, strict=True)
        )
    ):
        raise ValueError(
            f"`source` and `target` images are {_shape_text(source.image_shape)} but the "
            f"classifier takes {_shape_text(['?' if d is None else d for d in model_shape])}. "
            f"{_RESIZE_HINT}"
        )
    step = batch_size * replicas
    for domain in (source, target):
        if domain.count < step:
            per = f" ({batch_size} per replica x {replicas} replicas)" if replicas > 1 else ""
            raise ValueError(
                f"`{domain.name}` has {domain.count} images, fewer than one batch of {step}"
                f"{per}: every step pairs a full batch of each domain. Pass more "
                f"{domain.name} images or a smaller `batch_size`. Received: "
                f"batch_size={batch_size}."
            )


def steps_per_epoch(source: Domain, target: Domain, batch_size: int) -> int:
    """Full batches in the larger domain: one epoch passes over it once."""
    return max(source.count // batch_size, target.count // batch_size)


def _repeated_batches(domain: Domain, batch_size: int, seed: int | None) -> tf.data.Dataset:
    if domain.arrays is None:  # a dataset: its own order, repeated
        return domain.elements.repeat().batch(batch_size, drop_remainder=True)
    # Arrays: shuffle indices (a small buffer) and gather each batch, every pass a new order.
    tensors = tuple(tf.convert_to_tensor(a) for a in domain.arrays)
    indices = tf.data.Dataset.range(domain.count).shuffle(
        domain.count, seed=seed, reshuffle_each_iteration=True
    )
    batches = indices.repeat().batch(batch_size, drop_remainder=True)
    if len(tensors) == 1:
        return batches.map(lambda i: tf.gather(tensors[0], i))
    return batches.map(lambda i: tuple(tf.gather(t, i) for t in tensors))


def paired(source: Domain, target: Domain, batch_size: int, seed: int | None = 0):
    """`((source_images, labels), target_images)` batches, `steps_per_epoch` of them."""
    steps = steps_per_epoch(source, target, batch_size)
    pairs = tf.data.Dataset.zip(
        _repeated_batches(source, batch_size, seed),
        _repeated_batches(target, batch_size, None if seed is None else seed + 1),
    )
    pairs = pairs.map(
        lambda s, t: ((tf.cast(s[0], tf.float32), s[1]), tf.cast(t, tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    pairs = pairs.take(steps).apply(tf.data.experimental.assert_cardinality(steps))
    return pairs.prefetch(tf.data.AUTOTUNE)


def pair_domains(source, target, *, batch_size: int = 64, seed: int | None = 0) -> tf.data.Dataset:
    """Training batches for a `kt.adaptation` model: labelled source paired with target images.

    Each element is `((source_images, source_labels), target_images)`, `batch_size` images of
    each domain, pixels cast to float32. One epoch passes once over the larger domain (its last
    partial batch is dropped); the smaller repeats. Arrays are reshuffled every pass (seeded);
    datasets keep their own order.

    Args:
        source: `(x, y)` arrays or a `tf.data.Dataset` of `(images, labels)` (batched or not).
        target: An image array or a dataset of images; labels, if present, are ignored with a
            warning.
        batch_size: Images of each domain per batch (the global batch under a strategy).
        seed: Shuffling seed for arrays; None for unseeded.

    Returns:
        A `tf.data.Dataset` of known length (the steps of one epoch).

    Raises:
        ValueError: For empty domains, domains of different image shapes, or either domain
            smaller than one batch.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> data = kt.adaptation.pair_domains(
    ...     (np.zeros((10, 8, 8, 3)), np.zeros(10)), np.ones((4, 8, 8, 3)), batch_size=4)
    >>> int(data.cardinality())
    2
    """
    batch_size = check_int("batch_size", batch_size, minimum=2)
    src = source_domain(source, None, batch_size=batch_size)
    tgt = target_domain(target, batch_size=batch_size)
    check_compatible(src, tgt, batch_size)
    return paired(src, tgt, batch_size, seed)


def validation_dataset(data, head: HeadSpec, batch_size: int) -> tf.data.Dataset | None:
    """Labelled validation data as `(images, labels)` batches, checked against the head."""
    if data is None:
        return None
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not isinstance(spec, tuple) or len(spec) < 2:
            raise ValueError(
                "`validation_data` must give (images, labels) pairs (e.g. labelled target "
                f"images, for scoring). Received elements of spec {spec!r}."
            )
        batched = _batched(data.map(lambda *e: (e[0], e[1])), spec[0], batch_size)
        datacheck.check_dataset(head, batched, "validation_data")
        return batched
    domain = source_domain(data, head, batch_size=batch_size, name="validation_data")
    return tf.data.Dataset.from_tensor_slices(domain.arrays).batch(batch_size)
