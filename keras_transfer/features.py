"""Activations of a model at a named point, as numpy arrays: what transfer methods measure.

`extract(model, data, at="pooling")` runs the model's own preprocessing and backbone in inference
mode and returns the activations at `at` for every image, with the labels when the data has them.
The discrepancy measures, backbone ranking and the activation caches of `kt.fine_tune` all stand
on the same two pieces: `extractor` (a Functional model sharing the model's weights, from the
images to one or more taps) and `forward_fn` (one traced forward function per image shape, with
the batch dimension left open so a partial last batch reuses the trace).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import freezing
from keras_transfer._validate import check_int
from keras_transfer.heads import AUGMENTATION_NAME, LOGITS_NAME, POOLING_NAME

BACKBONE = "backbone"
NAMED_POINTS = (POOLING_NAME, LOGITS_NAME, BACKBONE)


def _augmentation_output(model: keras.Model):
    """Where the images enter the preprocessing: after augmentation (identity in inference)."""
    try:
        return model.get_layer(AUGMENTATION_NAME).output
    except ValueError:
        return model.inputs[0]


def backbone_tensors(model: keras.Model, backbone: keras.Model):
    """The backbone's input and output tensors in the full model's graph.

    The call that feeds the pooling layer when there is one (a model may call a backbone more
    than once), else the backbone's only call.
    """
    nodes = backbone._inbound_nodes
    if _has_layer(model, POOLING_NAME):
        output = model.get_layer(POOLING_NAME).input
        nodes = [n for n in nodes if any(t is output for t in n.output_tensors)]
    if len(nodes) >= 1 and nodes[0].output_tensors:
        return nodes[0].input_tensors[0], nodes[0].output_tensors[0]
    raise ValueError(
        f"The {POOLING_NAME!r} layer of {model.name!r} does not follow backbone "
        f"{backbone.name!r} directly; build the model with kt.build_classifier/build_regressor."
    )


def point_names(model: keras.Model) -> list[str]:
    """The names `extract(..., at=...)` accepts for `model`: named points, then backbone ops."""
    names = [n for n in NAMED_POINTS if n == BACKBONE or _has_layer(model, n)]
    try:
        names += [op.name for op in freezing.find_backbone(model).operations]
    except ValueError:
        pass
    return names


def _has_layer(model: keras.Model, name: str) -> bool:
    return any(layer.name == name for layer in model.layers)


def _tensor_at(model: keras.Model, at: str, stem_input):
    """The tensor at `at`, in a graph that starts at `stem_input` (the model's images)."""
    if at in (POOLING_NAME, LOGITS_NAME) and _has_layer(model, at):
        return keras.Model(stem_input, model.get_layer(at).output)
    backbone = freezing.find_backbone(model)
    backbone_in, backbone_out = backbone_tensors(model, backbone)
    if at == BACKBONE:
        return keras.Model(stem_input, backbone_out)
    names = [op.name for op in backbone.operations]
    if at not in names:
        import difflib

        close = difflib.get_close_matches(str(at), point_names(model), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown `at` point {at!r} for model {model.name!r}.{hint} Use one of "
            f"{list(NAMED_POINTS)} or a backbone layer name (kt.unfreeze_points("
            f"kt.find_backbone(model)) lists the block ends). Received: at={at!r}"
        )
    stem = keras.Model(stem_input, backbone_in)
    bottom = keras.Model(backbone.inputs[0], backbone.operations[names.index(at)].output)
    x = keras.Input(shape=stem_input.shape[1:], dtype=stem_input.dtype, name="images")
    return keras.Model(x, bottom(stem(x), training=False))


def extractor(model: keras.Model, at: str | Sequence[str] = POOLING_NAME) -> keras.Model:
    """A Functional model sharing `model`'s weights, from images to the activations at `at`.

    Args:
        model: A model built by `kt.build_classifier` / `kt.build_regressor`.
        at: `"pooling"` (the pooled features), `"logits"`, `"backbone"` (the backbone's output
            feature map), the name of a backbone layer (its output), or a list of these.

    Returns:
        A `keras.Model` taking the model's input (augmentation is skipped: it is the identity in
        inference) and returning one tensor, or a list for a list of points.

    Raises:
        ValueError: for an unknown point, naming the close matches.
    """
    points = [at] if isinstance(at, str) else list(at)
    if not points:
        raise ValueError("`at` must name at least one point. Received: at=[]")
    if at == LOGITS_NAME and not _has_layer(model, LOGITS_NAME):
        from keras_transfer import heads

        return heads.logits_model(model)  # a legacy head: the activation is fused
    start = _augmentation_output(model)
    x = keras.Input(shape=start.shape[1:], dtype=start.dtype, name="images")
    outputs = [_tensor_at(model, point, start)(x, training=False) for point in points]
    return keras.Model(x, outputs[0] if isinstance(at, str) else outputs)


def forward_fn(
    network: keras.Model | Callable, *, jit_compile: bool = False
) -> Callable[[tf.Tensor], list[tf.Tensor]]:
    """One traced inference-mode forward function of `network`, shared by every dataset.

    Traced once per image dtype and shape with the batch dimension open, so the last partial
    batch and the validation data reuse the training data's trace. Returns a list of tensors.
    """

    def forward(images):
        outputs = network(images, training=False) if isinstance(network, keras.Model) else None
        if outputs is None:
            outputs = network(images)
        return [tf.convert_to_tensor(t) for t in tf.nest.flatten(outputs)]

    traced = tf.function(forward, jit_compile=bool(jit_compile), autograph=False)
    concrete = {}

    def call(images):
        images = tf.convert_to_tensor(images)
        key = (images.dtype, tuple(images.shape[1:]))
        if key not in concrete:
            spec = tf.TensorSpec((None, *images.shape[1:]), images.dtype)
            concrete[key] = traced.get_concrete_function(spec)
        return concrete[key](images)

    return call


def _as_batches(data, batch_size: int) -> tuple[tf.data.Dataset, bool]:
    """`(batched dataset of (images[, labels]), has_labels)` from arrays, a tuple or a dataset."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        has_labels = isinstance(spec, tuple) and len(spec) >= 2
        images = spec[0] if isinstance(spec, tuple) else spec
        if images.shape.rank == 3:  # unbatched images
            data = data.batch(batch_size)
        return data, has_labels
    if isinstance(data, tuple) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if len(x) != len(y):
            raise ValueError(
                f"Images and labels differ in length: {len(x)} images, {len(y)} labels. Pass "
                "`(x, y)` with one label per image."
            )
        return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size), True
    if isinstance(data, np.ndarray) or hasattr(data, "__array__"):
        x = np.asarray(data)
        if x.ndim != 4:
            raise ValueError(
                "Images must be an array of shape (N, height, width, channels). "
                f"Received: an array of shape {x.shape}."
            )
        return tf.data.Dataset.from_tensor_slices(x).batch(batch_size), False
    raise TypeError(
        "`data` must be an array of images, an `(images, labels)` tuple of arrays or a "
        f"tf.data.Dataset of images or (images, labels). Received: {type(data).__name__}"
    )


def extract(
    model: keras.Model,
    data,
    *,
    at: str = POOLING_NAME,
    batch_size: int = 64,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Activations of `model` at `at` for every image of `data`, in inference mode.

    The model's own preprocessing runs in the graph, so raw pixels go in as they would to
    `model.predict`. One pass over `data`: a reshuffling dataset's labels line up with its
    features.

    Args:
        model: A model built by `kt.build_classifier` / `kt.build_regressor`.
        data: An array of images `(N, H, W, C)`, an `(images, labels)` tuple of arrays, or a
            `tf.data.Dataset` of image batches or `(images, labels[, ...])` batches.
        at: `"pooling"` (default), `"logits"`, `"backbone"` or a backbone layer name.
        batch_size: Batch size for arrays (datasets are used as batched).

    Returns:
        The features as a numpy array `(N, ...)`, or `(features, labels)` when `data` has labels.

    Raises:
        ValueError: for an unknown `at`, a bad `batch_size` or images and labels of different
            lengths.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> kt.features.extract(model, np.zeros((3, 32, 32, 3), "float32")).shape
    (3, 1280)
    """
    check_int("batch_size", batch_size, minimum=1)
    network = extractor(model, at)
    batches, has_labels = _as_batches(data, batch_size)
    forward = forward_fn(network)
    features, labels = [], []
    for element in batches:
        images = element[0] if has_labels else element
        features.append(forward(images)[0].numpy())
        if has_labels:
            labels.append(np.asarray(element[1]))
    if not features:
        raise ValueError("`data` is empty: no images to extract features from.")
    out = np.concatenate(features)
    return (out, np.concatenate(labels)) if has_labels else out
