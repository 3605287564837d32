"""AdaBN (Li et al., 2016): re-estimate a classifier's BatchNorm statistics on the target domain.

A network trained on the source normalises every layer with the source's means and variances;
on a shifted domain those are wrong. `recalibrate_batchnorm` replaces each BatchNormalization
layer's moving mean and variance with the statistics of its inputs over unlabelled target
images, nothing else: no gradient step, the learned scale and offset stay. It works after any
training (source only, DANN, Deep CORAL, MMD) and leaves a plain model that exports as before,
now specialised to the target domain.

The statistics come from one pass in inference mode (augmentation and dropout off) in which
every BatchNormalization layer normalises with the current batch's statistics, as in training,
so each layer sees the inputs the re-estimated layers before it give, and accumulates them over
the whole set (the population mean and variance, not an exponential average).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from keras_transfer._validate import check_int
from keras_transfer.adaptation import data as domain_data


def batchnorm_layers(model: keras.Model) -> list[keras.layers.BatchNormalization]:
    """Every `BatchNormalization` layer of `model`, nested models included, each once."""
    found, seen, stack = [], set(), list(reversed(getattr(model, "layers", [])))
    while stack:
        layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        if isinstance(layer, keras.layers.BatchNormalization):
            found.append(layer)
        stack.extend(reversed(getattr(layer, "layers", []) or []))
    return found


def _batch_call(layer, captured: list):
    """A stand-in for `layer.call`: normalise with the batch's statistics and record them."""

    def call(inputs, training=None, mask=None):
        x = keras.ops.cast(inputs, "float32")
        rank = len(x.shape)
        axis = layer.axis % rank
        axes = tuple(i for i in range(rank) if i != axis)
        mean = keras.ops.mean(x, axis=axes)
        variance = keras.ops.var(x, axis=axes)
        captured.append((layer, mean, variance))
        shape = [1] * rank
        shape[axis] = x.shape[axis]
        scale = keras.ops.cast(layer.gamma, "float32") if layer.scale else 1.0
        offset = keras.ops.cast(layer.beta, "float32") if layer.center else 0.0
        inverse = keras.ops.rsqrt(variance + layer.epsilon) * scale
        outputs = (x - keras.ops.reshape(mean, shape)) * keras.ops.reshape(inverse, shape)
        outputs = outputs + (keras.ops.reshape(offset, shape) if layer.center else 0.0)
        return keras.ops.cast(outputs, inputs.dtype)

    return call


def recalibrate_batchnorm(classifier: keras.Model, images, *, batch_size: int = 256) -> list[str]:
    """Sets every BatchNorm layer's moving statistics to those of `images` (AdaBN).

    One pass over `images` in inference mode, each BatchNormalization layer normalising with
    its batch's statistics; each layer's moving mean becomes the mean of its inputs over all
    the images and its moving variance their variance (batches weighted by size). Trainable
    weights do not change. Use it after training on the source (or adapting) with the target
    domain's unlabelled training images, then predict on the target.

    Args:
        classifier: A Keras model with BatchNormalization layers (nested models included).
        images: Target images: an array `(N, height, width[, channels])` or a `tf.data.Dataset`
            of images or `(images, labels)` (labels ignored, with a warning), batched or not.
        batch_size: Images per forward pass (array data and unbatched datasets); larger
            batches estimate each layer's statistics from more images at once.

    Returns:
        The names of the layers recalibrated, in order.

    Raises:
        ValueError: When the model has no BatchNormalization layer, or for empty data, images
            of several shapes or non-finite pixels, or a bad `batch_size`.
        TypeError: For data that is neither an array nor a dataset.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_small_cnn(2, image_size=8, channels=3, widths=(4,), augmentation=None)
    >>> kt.adaptation.recalibrate_batchnorm(model, np.full((6, 8, 8, 3), 255.0))
    ['bn_0']
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    layers = batchnorm_layers(classifier)
    if not layers:
        raise ValueError(
            f"`classifier` {getattr(classifier, 'name', classifier)!r} has no "
            "BatchNormalization layer: there are no statistics to re-estimate on the target. "
            "recalibrate_batchnorm (AdaBN) applies to networks with BatchNorm, e.g. "
            "kt.build_small_cnn or kt.build_classifier('mobilenet_v2', ...)."
        )
    domain = domain_data.target_domain(images, batch_size=batch_size, name="images")
    if domain.arrays is not None:
        batches = tf.data.Dataset.from_tensor_slices(domain.arrays[0]).batch(batch_size)
    else:
        batches = domain.elements.batch(batch_size)
    dtype = classifier.inputs[0].dtype if getattr(classifier, "inputs", None) else "float32"
    captured: list = []
    sums = {id(layer): [0.0, 0.0, 0] for layer in layers}  # Σ n·mean, Σ n·(var + mean²), n
    for layer in layers:
        layer.call = _batch_call(layer, captured)  # the instance attribute shadows the method
    try:
        for batch in batches:
            captured.clear()
            classifier(tf.cast(batch, dtype), training=False)
            n = int(batch.shape[0])
            for layer, mean, variance in captured:
                mean = np.asarray(keras.ops.convert_to_numpy(mean), "float64")
                variance = np.asarray(keras.ops.convert_to_numpy(variance), "float64")
                entry = sums[id(layer)]
                entry[0] = entry[0] + n * mean
                entry[1] = entry[1] + n * (variance + mean**2)
                entry[2] += n
    finally:
        for layer in layers:
            del layer.call
    done = []
    for layer in layers:
        total_mean, total_square, count = sums[id(layer)]
        if not count:
            continue  # not on the path from the inputs to the outputs
        mean = total_mean / count
        variance = np.maximum(total_square / count - mean**2, 0.0)
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        done.append(layer.name)
    return done
