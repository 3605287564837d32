"""Builders: a `keras.applications` backbone plus a new head, as a plain Functional `keras.Model`.

The graph is always: raw pixels in [0, 255] -> optional augmentation (active only in training) ->
the backbone's own preprocessing -> backbone called with `training=False` -> pooling -> head
(`Dense(name="logits")` -> `Activation(name="predictions")`; the names live in `heads`).
Keras 3 passes the outer `training` flag on to nested models, overriding `training=False`, so the
builders make inference mode hold by construction: every BatchNormalization layer of the backbone
is frozen (a frozen Keras 3 BatchNorm always normalises with its moving statistics, which then
never change, whatever is unfrozen later), and the backbone's own Dropout layers (EfficientNet's
stochastic depth) get rate 0, which is what they compute in inference mode. Everything is a
built-in Keras layer or a registered keras_transfer layer, so `.keras` files reload without
`custom_objects` and SavedModel exports carry the preprocessing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import keras

from keras_transfer._validate import check_int, image_hw, is_int
from keras_transfer.backbones import Backbone, get_backbone
from keras_transfer.freezing import freeze_batchnorm

# keras_transfer.heads owns the names; INPUT_NAME and OUTPUT_NAME stay importable from here too.
from keras_transfer.heads import (
    AUGMENTATION_NAME,
    INPUT_NAME,
    LOGITS_NAME,
    OUTPUT_NAME,
    POOLING_NAME,
)
from keras_transfer.layers import BackbonePreprocessing

POOLING = ("avg", "max", "flatten")


@contextlib.contextmanager
def dtype_policy(dtype: str | None):
    """Builds layers under the Keras dtype policy `dtype` (None: leave the global one)."""
    if dtype is None:
        yield
        return
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(dtype)
    except ValueError as error:
        raise ValueError(
            "`dtype` must be a Keras dtype policy: 'float32', 'mixed_float16' or "
            f"'mixed_bfloat16'. Received: dtype={dtype!r}"
        ) from error
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def default_augmentation() -> list[keras.layers.Layer]:
    """A mild, label-preserving augmentation for photos: flips, small rotations and zooms."""
    return [
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomRotation(0.05),
        keras.layers.RandomZoom(0.1),
    ]


def _image_size(spec: Backbone, image_size) -> tuple[int, int]:
    if image_size is None:
        return (spec.default_size, spec.default_size)
    size = image_hw(image_size)
    if min(size) < spec.min_size:
        raise ValueError(
            f"`image_size` {image_size!r} is below {spec.name}'s minimum of {spec.min_size} px. "
            f"Use image_size >= {spec.min_size} (its ImageNet weights were trained at "
            f"{spec.default_size}), or pick a backbone with a smaller minimum."
        )
    return size


def _check_weights(spec: Backbone, weights, channels: int, size: tuple[int, int], kwargs) -> str:
    """Validates `weights` and returns the preprocessing mode the loaded weights expect."""
    if weights is None:
        return spec.preprocessing
    if not isinstance(weights, str | os.PathLike):
        raise TypeError(
            "`weights` must be 'imagenet', None (random init) or a path to a weights file. "
            f"Received: weights={weights!r}"
        )
    if str(weights) == "imagenet":
        if spec.imagenet_sizes and size[0] not in spec.imagenet_sizes:
            raise ValueError(
                f"{spec.name}'s ImageNet weights exist only at image_size "
                f"{spec.imagenet_sizes}. Received: image_size={size}. Use one of those sizes or "
                "weights=None."
            )
        from keras_transfer import weights as imported

        # Weights imported from torchvision expect torch's mean/std, not the Keras preprocessing.
        alpha = kwargs.get("alpha", 1.0)
        if spec.name not in imported.ARCHITECTURES:
            return spec.preprocessing
        # Offline by design: refuse before Keras would try to download the file. Keras loads its
        # largest size's file for a non-square input (and `keras_weight_path` for other sizes).
        rows = size[0] if size[0] == size[1] else max(imported.ARCHITECTURES[spec.name].sizes)
        path = imported.keras_weight_path(spec.name, alpha, rows, include_top=False)
        if not path.is_file():
            raise ValueError(
                f"weights='imagenet' for {spec.name} (alpha={alpha}, image_size={size[0]}) "
                f"needs {path.name} in the Keras cache ({path.parent}), which is missing. "
                f"Import it once with `keras-transfer weights fetch {spec.name}` (or "
                "`make assets`), or pass weights=None or a weights file."
            )
        if spec.name in imported.IMPORTED_PREPROCESSING and imported.imported_weights_available(
            spec.name, alpha, rows
        ):
            return imported.IMPORTED_PREPROCESSING[spec.name]
        return spec.preprocessing
    if not os.path.isfile(weights):
        raise ValueError(
            "`weights` must be 'imagenet', None or the path of an existing weights file. "
            f"Received: weights={str(weights)!r}, which is not a file. Check the path, or pass "
            "weights=None to start from random initialisation."
        )
    return spec.preprocessing


def _backbone_features(
    backbone: str | Backbone,
    *,
    image_size,
    weights,
    channels: int,
    augmentation,
    pooling: str | None,
    backbone_kwargs: dict,
) -> tuple[keras.KerasTensor, keras.KerasTensor, Backbone]:
    """Builds inputs -> augmentation -> preprocessing -> backbone -> pooling; returns (in, out)."""
    spec = get_backbone(backbone)
    size = _image_size(spec, image_size)
    check_input_arguments(channels, pooling)
    for reserved in ("include_top", "input_shape", "input_tensor", "pooling", "classes"):
        if reserved in backbone_kwargs:
            raise ValueError(
                f"`{reserved}` is set by the builder, not passed through to the backbone: the "
                "builder always takes the headless backbone and adds its own head. Received: "
                f"{reserved}={backbone_kwargs[reserved]!r}. Use `num_classes`, `image_size`, "
                "`channels` and `pooling` instead."
            )
    mode = _check_weights(spec, weights, channels, size, backbone_kwargs)

    inputs = keras.Input(shape=(*size, channels), name=INPUT_NAME, dtype="float32")
    x = inputs
    if augmentation:
        if augmentation == "default":
            augmentation = default_augmentation()
        if not isinstance(augmentation, keras.Sequential):
            if isinstance(augmentation, keras.layers.Layer):
                augmentation = [augmentation]
            augmentation = keras.Sequential(list(augmentation), name=AUGMENTATION_NAME)
        x = augmentation(x)
    if channels == 1:
        x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    x = BackbonePreprocessing(mode, name="preprocessing")(x)
    try:
        base = spec.build(
            size, weights=None if weights is None else str(weights), **backbone_kwargs
        )
    except Exception as error:
        if weights is None:
            raise
        if str(weights) == "imagenet":
            raise ValueError(
                f"Could not load ImageNet weights for {spec.name} ({error}). Offline, import them "
                "first: `keras-transfer weights fetch` (MobileNetV2, from torchvision's "
                "checkpoint), or pass weights=None or a weights file."
            ) from error
        raise ValueError(
            f"`weights` file {str(weights)!r} does not fit {spec.name} with "
            f"{backbone_kwargs or 'default arguments'}: {error}. Pass the weights file saved from "
            "the same architecture and width, or weights=None."
        ) from error
    _inference_mode_only(base)
    x = base(x, training=False)
    if pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name=POOLING_NAME)(x)
    elif pooling == "max":
        x = keras.layers.GlobalMaxPooling2D(name=POOLING_NAME)(x)
    else:
        x = keras.layers.Flatten(name=POOLING_NAME)(x)
    return inputs, x, spec


def check_num_classes(num_classes: int, multi_label: bool) -> None:
    """Validates a classifier's `num_classes` (a softmax needs two or more)."""
    check_int("num_classes", num_classes, minimum=1)
    if num_classes < 2 and not multi_label:
        raise ValueError(
            "`num_classes` must be at least 2 for a softmax classifier (one class always gets "
            f"probability 1). Received: num_classes={num_classes!r}. For a binary problem use "
            "num_classes=2, or num_classes=1 with multi_label=True (one sigmoid output)."
        )


def check_input_arguments(channels: int, pooling: str | None) -> None:
    """Validates the input's `channels` and the backbone's `pooling`."""
    if channels not in (1, 3):
        raise ValueError(
            "`channels` must be 1 (greyscale, replicated to RGB inside the model) or 3 (RGB); "
            f"ImageNet backbones take 3-channel images. Received: channels={channels!r}. "
            "Convert other images to greyscale or RGB first."
        )
    if pooling not in POOLING:
        raise ValueError(
            f"Unknown `pooling` type. Pooling should be one of {POOLING}. "
            f"Received: pooling={pooling!r}"
        )


def check_dropout(dropout: float) -> None:
    """Validates the head's `dropout` rate."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")


def _inference_mode_only(backbone: keras.Model) -> None:
    """Makes the backbone compute its inference-mode function even when `fit` says training."""
    freeze_batchnorm(backbone)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0


def _head(x, units: int, activation: str, hidden_units: Sequence[int], dropout: float):
    """Hidden layers, then `Dense(name="logits")` -> `Activation(name="predictions")`."""
    check_dropout(dropout)
    for i, width in enumerate(hidden_units):
        x = keras.layers.Dense(width, activation="relu", name=f"head_dense_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"head_dropout_{i}")(x)
    if dropout and not hidden_units:
        x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    # float32 logits and outputs even under a mixed-precision policy: softmax/sigmoid in float16
    # saturates, and losses on the logits (distillation, calibration) need the precision too.
    x = keras.layers.Dense(units, name=LOGITS_NAME, dtype="float32")(x)
    return keras.layers.Activation(activation, name=OUTPUT_NAME, dtype="float32")(x)


def build_classifier(
    backbone: str | Backbone,
    num_classes: int,
    *,
    image_size: int | tuple[int, int] | None = None,
    weights: str | os.PathLike | None = "imagenet",
    pooling: str = "avg",
    dropout: float = 0.2,
    hidden_units: Sequence[int] = (),
    multi_label: bool = False,
    augmentation: str | keras.layers.Layer | Sequence[keras.layers.Layer] | None = None,
    channels: int = 3,
    name: str | None = None,
    dtype: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds an image classifier on a pretrained backbone, preprocessing included.

    Args:
        backbone: Registry name (see `kt.list_backbones()`), e.g. `"mobilenet_v2"`.
        num_classes: Number of classes; at least 2 for single-label (softmax) heads. For a binary
            problem with one output use `multi_label=True, num_classes=1`.
        image_size: Side or (height, width) of the model's input; defaults to the backbone's
            ImageNet size. At least the backbone's minimum.
        weights: `"imagenet"`, `None` (random init) or the path of a weights file of the same
            backbone.
        pooling: `"avg"`, `"max"` or `"flatten"` over the backbone's feature map.
        dropout: Dropout rate before each Dense layer of the head.
        hidden_units: Widths of optional ReLU Dense layers between pooling and the output.
        multi_label: Sigmoid outputs (independent labels) instead of a softmax.
        augmentation: `"default"`, a layer, or a list of layers (e.g. `keras.layers.RandomFlip`);
            Keras runs them only in training.
        channels: 3 for RGB input, 1 for greyscale (replicated to RGB inside the model).
        name: Model name; defaults to `"<backbone>_classifier"`.
        dtype: Keras dtype policy to build under, e.g. `"mixed_float16"` or `"mixed_bfloat16"`
            for mixed precision (the output layer stays float32); None uses the global policy.
        **backbone_kwargs: Passed to the `keras.applications` constructor (e.g. `alpha=0.35`).

    Returns:
        A Functional `keras.Model` taking float32 pixels in [0, 255] of shape
        `(batch, height, width, channels)` (input name `"images"`) and returning class
        probabilities (output layer `"predictions"`, float32, a softmax or sigmoid `Activation`
        fed by the `"logits"` `Dense`; see `kt.head_of`, `kt.logits_model`). The backbone is the
        nested model named after its registry entry.

    Raises:
        ValueError: for an unknown backbone, a size below the minimum, a bad `num_classes`,
            `pooling`, `channels` or `weights`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> model.output_shape
    (None, 3)
    """
    check_num_classes(num_classes, multi_label)
    with dtype_policy(dtype):
        inputs, x, spec = _backbone_features(
            backbone,
            image_size=image_size,
            weights=weights,
            channels=channels,
            augmentation=augmentation,
            pooling=pooling,
            backbone_kwargs=backbone_kwargs,
        )
        activation = "sigmoid" if multi_label else "softmax"
        outputs = _head(x, num_classes, activation, hidden_units, dropout)
        return keras.Model(inputs, outputs, name=name or f"{spec.name}_classifier")


def build_regressor(
    backbone: str | Backbone,
    outputs: int = 1,
    *,
    image_size: int | tuple[int, int] | None = None,
    weights: str | os.PathLike | None = "imagenet",
    pooling: str = "avg",
    dropout: float = 0.2,
    hidden_units: Sequence[int] = (),
    augmentation: str | keras.layers.Layer | Sequence[keras.layers.Layer] | None = None,
    channels: int = 3,
    name: str | None = None,
    dtype: str | None = None,
    **backbone_kwargs,
) -> keras.Model:
    """Builds an image regressor (linear outputs) on a pretrained backbone.

    Args:
        backbone: Registry name, e.g. `"efficientnet_b0"`.
        outputs: Number of regression targets.
        image_size: See `build_classifier`.
        weights: See `build_classifier`.
        pooling: See `build_classifier`.
        dropout: See `build_classifier`.
        hidden_units: See `build_classifier`.
        augmentation: See `build_classifier`.
        channels: See `build_classifier`.
        name: Model name; defaults to `"<backbone>_regressor"`.
        dtype: See `build_classifier`.
        **backbone_kwargs: Passed to the `keras.applications` constructor.

    Returns:
        A Functional `keras.Model` with linear float32 outputs of shape `(batch, outputs)`
        (`Dense(name="logits")` -> linear `Activation(name="predictions")`).

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_regressor("mobilenet_v2", image_size=32, weights=None, alpha=0.35)
    >>> model.output_shape
    (None, 1)
    """
    check_int("outputs", outputs, minimum=1)
    with dtype_policy(dtype):
        inputs, x, spec = _backbone_features(
            backbone,
            image_size=image_size,
            weights=weights,
            channels=channels,
            augmentation=augmentation,
            pooling=pooling,
            backbone_kwargs=backbone_kwargs,
        )
        return keras.Model(
            inputs,
            _head(x, outputs, "linear", hidden_units, dropout),
            name=name or f"{spec.name}_regressor",
        )


def small_cnn_augmentation() -> list[keras.layers.Layer]:
    """The small CNN's augmentation: shifts of up to 10% and horizontal flips."""
    return [keras.layers.RandomTranslation(0.1, 0.1), keras.layers.RandomFlip("horizontal")]


def build_small_cnn(
    num_classes: int,
    *,
    image_size: int | tuple[int, int],
    channels: int = 1,
    widths: Sequence[int] = (32, 64, 128),
    dropout: float = 0.3,
    augmentation: str | keras.layers.Layer | Sequence[keras.layers.Layer] | None = "default",
    name: str = "small_cnn",
) -> keras.Model:
    """Builds a small CNN to train from scratch: the fair baseline for a pretrained backbone.

    Conv 3x3 -> BatchNormalization -> ReLU per width, 2x2 max pooling between stages, global
    average pooling, dropout, then the head of the model contract. Unlike the backbone builders
    nothing here is pretrained or frozen: BatchNorm trains (batch statistics in training, moving
    averages at inference), which is what lets a network from random initialisation learn. It is
    column (d) of `benchmarks/transfer_vs_scratch.py` (docs/benchmarks.md: 0.638 / 0.658 / 0.759
    on Fashion-MNIST at 10 / 20 / 50 images per class, 28 px, Adam 1e-3 for about 600 updates),
    and what `keras-transfer train --compare-scratch` trains.

    Args:
        num_classes: Number of classes (a softmax over at least 2).
        image_size: Side or (height, width) of the input, e.g. 28 for Fashion-MNIST's own size.
        channels: 1 for greyscale, 3 for RGB.
        widths: Filters of each conv stage; a 2x2 max pooling follows every stage but the last.
        dropout: Dropout rate before the head.
        augmentation: `"default"` (translation by up to 10% and horizontal flips), None, a layer
            or a list of layers; Keras runs them only in training.
        name: Model name.

    Returns:
        A Functional `keras.Model` taking float32 pixels in [0, 255] (input `"images"`), with
        `"augmentation"` -> rescaling to [0, 1] -> conv stages -> `"pooling"` -> dropout ->
        `Dense(name="logits")` (float32) -> softmax `Activation(name="predictions")`; so
        `kt.head_of` reads it as multi-class and `kt.evaluate` and `kt.export_for_serving` take
        it. It has no nested backbone: train it with `compile` and `fit`.

    Raises:
        ValueError: for a bad `num_classes`, `image_size`, `channels`, `widths` or `dropout`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_small_cnn(10, image_size=28)
    >>> model.output_shape, kt.head_of(model).kind
    ((None, 10), 'multiclass')
    """
    check_int("num_classes", num_classes, minimum=2, hint="A softmax needs two classes or more.")
    size = image_hw(image_size)
    if channels not in (1, 3):
        raise ValueError(
            f"`channels` must be 1 (greyscale) or 3 (RGB). Received: channels={channels!r}"
        )
    widths = tuple(widths) if isinstance(widths, Sequence) else widths
    if not isinstance(widths, tuple) or not widths or not all(is_int(w) and w > 0 for w in widths):
        raise ValueError(
            "`widths` must be a non-empty sequence of positive ints, one per conv stage. "
            f"Received: widths={widths!r}. E.g. widths=(32, 64, 128)."
        )
    smallest = 2 ** (len(widths) - 1)
    if min(size) < smallest:
        raise ValueError(
            f"`image_size` {image_size!r} is too small for {len(widths)} stages: each pooling "
            f"halves the side, so it must be at least {smallest} px. Use fewer `widths` or "
            "larger images."
        )
    if augmentation == "default":
        augmentation = small_cnn_augmentation()
    inputs = keras.Input(shape=(*size, channels), name=INPUT_NAME, dtype="float32")
    x = inputs
    if augmentation:
        if isinstance(augmentation, keras.layers.Layer):
            augmentation = [augmentation]
        x = keras.Sequential(list(augmentation), name=AUGMENTATION_NAME)(x)
    x = keras.layers.Rescaling(1 / 255.0, name="rescaling")(x)
    for i, width in enumerate(widths):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv_{i}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn_{i}")(x)
        x = keras.layers.ReLU(name=f"relu_{i}")(x)
        if i < len(widths) - 1:
            x = keras.layers.MaxPooling2D(name=f"max_pool_{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name=POOLING_NAME)(x)
    return keras.Model(inputs, _head(x, num_classes, "softmax", (), dropout), name=name)
