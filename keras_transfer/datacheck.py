"""Checks a user's own training data against the model's head, at almost no cost.

`kt.data` refuses bad arrays and folders up front, but people with their own `tf.data` pipelines
get nothing from it: a label outside the head's range fails mid-fit with a raw error from the loss
op, and NaN pixels train silently. `fit_phases` (and so `fine_tune`) checks:

- the label shape against the head, from the dataset's spec, before anything runs;
- label values and pixels on every batch. A cached run checks them in its caching pass, before
  any training. A plain run checks them in the input pipeline itself (`validating`, a `map` of a
  few reductions per batch); the first bad batch stops the run before its step, the model's
  weights are restored to where they were when training began, and the error names the value and
  the fix (`raise_for`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from keras_transfer.heads import HeadSpec

logger = logging.getLogger(__name__)


def _label_form(head: HeadSpec, spec: tf.TensorSpec) -> str:
    """`"sparse"` (class ids), `"dense"` (one value per output), from the labels' spec."""
    shape = spec.shape
    rank = shape.rank
    last = shape[-1] if rank else None
    if head.kind == "multiclass":
        if rank == 1 or (rank == 2 and last == 1 and head.num_outputs != 1):
            return "sparse"
        if rank == 2 and last in (head.num_outputs, None):
            return "dense"
    elif rank == 2 and last in (head.num_outputs, None) or rank == 1 and head.num_outputs == 1:
        return "dense"
    return "bad"


def check_spec(head: HeadSpec, element_spec, name: str = "train_data") -> None:
    """Refuses labels whose shape cannot fit the head, from the dataset's spec alone."""
    if not isinstance(element_spec, tuple) or len(element_spec) < 2:
        raise ValueError(
            f"`{name}` must give (images, labels) batches to train on. Received elements of "
            f"spec {element_spec!r}. Map it to pairs, e.g. ds.map(lambda x: (x['image'], "
            "x['label'])), or use kt.data.from_folder / from_arrays."
        )
    labels = element_spec[1]
    if not isinstance(labels, tf.TensorSpec):
        raise ValueError(f"`{name}` labels must be one tensor per batch. Received: {labels!r}.")
    if _label_form(head, labels) == "bad":
        expected = {
            "multiclass": f"(batch,) class ids or (batch, {head.num_outputs}) one-hot rows",
            "multilabel": f"(batch, {head.num_outputs}) rows of 0/1 labels",
            "regression": f"(batch, {head.num_outputs}) targets",
        }[head.kind]
        raise ValueError(
            f"`{name}` labels have shape {labels.shape.as_list()} but the {head.kind} head "
            f"with {head.num_outputs} outputs needs {expected}. Reshape the labels or build "
            "the model with matching num_classes / outputs."
        )


@dataclass
class DataStats:
    """What one pass over the data found: label range and non-finite values."""

    batches: int = 0
    examples: int = 0
    label_min: float = np.inf
    label_max: float = -np.inf
    labels_finite: bool = True
    labels_integral: bool = True
    pixels_finite: bool = True
    first_bad_pixels: int | None = None

    def reset(self) -> None:
        self.__init__()

    def update(self, stats) -> None:
        count, low, high, finite, integral, pixels = (np.asarray(s) for s in stats)
        if self.pixels_finite and not pixels:
            self.first_bad_pixels = self.batches
        self.batches += 1
        self.examples += int(count)
        self.label_min = min(self.label_min, float(low))
        self.label_max = max(self.label_max, float(high))
        self.labels_finite &= bool(finite)
        self.labels_integral &= bool(integral)
        self.pixels_finite &= bool(pixels)


def batch_stats(images, labels, *rest):
    """Per-batch statistics as small tensors (usable in `tf.data.Dataset.map` and eagerly)."""
    values = tf.cast(labels, tf.float32)
    finite = tf.math.is_finite(values)
    safe = tf.where(finite, values, tf.zeros_like(values))
    if images.dtype.is_floating:
        pixels = tf.reduce_all(tf.math.is_finite(images))
    else:
        pixels = tf.constant(True)
    return (
        tf.shape(images)[0],
        tf.reduce_min(tf.concat([tf.reshape(safe, [-1]), [np.inf]], 0)),
        tf.reduce_max(tf.concat([tf.reshape(safe, [-1]), [-np.inf]], 0)),
        tf.reduce_all(finite),
        tf.reduce_all(tf.equal(safe, tf.round(safe))),
        pixels,
    )


def array_stats(images, labels, *rest):
    """`batch_stats` in numpy, for a batch already read eagerly (the caching pass): a few
    vectorised reductions instead of a dozen eager TensorFlow ops per batch."""
    values = np.asarray(labels).astype(np.float32, copy=False)
    finite = np.isfinite(values)
    safe = np.where(finite, values, 0.0)
    pixels = True
    if tf.as_dtype(images.dtype).is_floating:
        pixels = bool(np.isfinite(np.asarray(images).astype(np.float32, copy=False)).all())
    return (
        len(images),
        safe.min(initial=np.inf),
        safe.max(initial=-np.inf),
        bool(finite.all()),
        bool((safe == np.round(safe)).all()),
        pixels,
    )


def problem(head: HeadSpec, label_spec: tf.TensorSpec, stats: DataStats, name: str) -> str | None:
    """What is wrong with the data for `head`, as an error message naming the fix; or None."""
    if not stats.pixels_finite:
        return (
            f"`{name}` has non-finite pixel values (NaN or inf), first in batch "
            f"{stats.first_bad_pixels}; training on them would turn the weights into NaN. Drop "
            "or repair those images, e.g. ds.filter(lambda x, y: tf.reduce_all("
            "tf.math.is_finite(x)))."
        )
    if not stats.labels_finite:
        return f"`{name}` has non-finite labels (NaN or inf). Drop or repair those examples."
    if head.kind == "regression" or stats.examples == 0:
        return None
    form = _label_form(head, label_spec)
    if form == "sparse":
        if not stats.labels_integral:
            return (
                f"`{name}` has non-integer class ids (e.g. between {stats.label_min:g} and "
                f"{stats.label_max:g}); a {head.num_outputs}-class head needs ids 0..."
                f"{head.num_outputs - 1}. Map the labels to class indices."
            )
        if stats.label_min < 0:
            return (
                f"`{name}` has a negative label {stats.label_min:g}; a {head.num_outputs}-class "
                f"head needs class ids 0...{head.num_outputs - 1}. Map the labels to indices "
                "(e.g. with kt.data.from_folder, which numbers classes from 0)."
            )
        if stats.label_max >= head.num_outputs:
            return (
                f"`{name}` has label {stats.label_max:g}, outside the range 0..."
                f"{head.num_outputs - 1} of the {head.num_outputs}-class head. Build the model "
                f"with num_classes={int(stats.label_max) + 1} or fix the label mapping."
            )
    elif stats.label_min < 0 or stats.label_max > 1:
        return (
            f"`{name}` has label values from {stats.label_min:g} to {stats.label_max:g}; the "
            f"{head.kind} head needs rows of values in [0, 1] (one-hot or 0/1 per label)."
        )
    return None


def stats_source(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A pass over `dataset` that leaves a reshuffling source's order sequence untouched."""
    from keras_transfer import caching

    if caching.shuffles(dataset):
        copy = caching.detached_copy(dataset)
        if copy is not None:
            return copy
    return dataset


def check_dataset(head: HeadSpec, dataset: tf.data.Dataset, name: str = "train_data") -> DataStats:
    """One pass over `dataset` (no model runs); raises `ValueError` for data that cannot train.

    Raises:
        ValueError: for labels outside the head's range, negative or non-integer class ids,
            multi-label values outside [0, 1], or non-finite labels or pixels.
    """
    check_spec(head, dataset.element_spec, name)
    stats = DataStats()
    pass_ = stats_source(dataset).map(batch_stats, num_parallel_calls=tf.data.AUTOTUNE)
    for batch in pass_:
        stats.update(batch)
    raise_for(head, dataset.element_spec[1], stats, name)
    return stats


def raise_for(head: HeadSpec, label_spec, stats: DataStats, name: str) -> None:
    message = problem(head, label_spec, stats, name)
    if message is not None:
        raise ValueError(message)


MARKER = "keras_transfer data check failed"


def _batch_ok(head: HeadSpec, label_spec: tf.TensorSpec, images, labels) -> tf.Tensor:
    """In-graph: whether a batch's labels and pixels fit the head (see `problem`)."""
    ok = tf.constant(True)
    if images.dtype.is_floating:
        ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(images)))
    values = tf.cast(labels, tf.float32)
    ok = tf.logical_and(ok, tf.reduce_all(tf.math.is_finite(values)))
    if head.kind == "regression":
        return ok
    safe = tf.where(tf.math.is_finite(values), values, tf.zeros_like(values))
    if _label_form(head, label_spec) == "sparse":
        in_range = tf.logical_and(safe >= 0, safe < head.num_outputs)
        ok = tf.logical_and(ok, tf.reduce_all(tf.logical_and(in_range, safe == tf.round(safe))))
    else:
        ok = tf.logical_and(ok, tf.reduce_all(tf.logical_and(safe >= 0, safe <= 1)))
    return ok


def validating(head: HeadSpec, dataset: tf.data.Dataset, name: str) -> tf.data.Dataset:
    """`dataset` with every batch checked as it is read: a bad one raises `InvalidArgumentError`
    carrying `MARKER` before the step that would train on it. Order and contents are unchanged."""
    label_spec = dataset.element_spec[1]

    def check(images, labels, *rest):
        ok = _batch_ok(head, label_spec, images, labels)
        with tf.control_dependencies([tf.debugging.Assert(ok, [f"{MARKER} ({name})"])]):
            return (tf.identity(images), labels, *rest)

    return dataset.map(check, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def explain(head: HeadSpec, datasets: dict, error: Exception) -> ValueError:
    """The `ValueError` for a batch `validating` refused: one full check finds what and where."""
    for name, dataset in datasets.items():
        if dataset is not None and f"({name})" in str(error):
            try:
                check_dataset(head, dataset, name)
            except ValueError as found:
                return found
            return ValueError(
                f"`{name}` gave a batch whose labels or pixels do not fit the {head.kind} head "
                f"with {head.num_outputs} outputs, but a second pass found none: its pipeline is "
                "random. Check the labels and pixels it produces."
            )
    return ValueError(str(error))
