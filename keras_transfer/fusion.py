"""Fusion: several pretrained backbones side by side under one head, as a plain Functional model.

The graph reads: raw pixels in [0, 255] (one `"images"` input) -> optional augmentation -> for
each backbone, its own resizing (when its size differs from the input's), its own preprocessing
(`"<backbone>_preprocessing"`), the backbone called with `training=False` (BatchNorm frozen, as
in `kt.build_classifier`) and its pooling (`"<backbone>_pooling"`) -> the pooled features
concatenated in a layer named `"pooling"` -> the standard head (`Dense(name="logits")` ->
`Activation(name="predictions")`). Because `"pooling"` is the concatenation, the head-only phase
caches the fused features (`kt.caching`), `kt.features.extract(model)` returns them, and
`kt.head_of`, `kt.logits_model`, `.keras` saving and `kt.export_for_serving` work as on one
backbone. The backbones are nested models named after their registry entries (a repeated one
gets `_2`, `_3`, ...); address them by that name: `kt.unfreeze(model, blocks=2,
backbone="mobilenet_v2")`, `kt.Phase(..., trainable={"mobilenet_v2": 2})`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import keras

from keras_transfer._validate import image_hw
from keras_transfer.backbones import Backbone, get_backbone
from keras_transfer.builders import (
    _check_weights,
    _head,
    _image_size,
    _inference_mode_only,
    check_dropout,
    check_input_arguments,
    check_num_classes,
    default_augmentation,
    dtype_policy,
)
from keras_transfer.freezing import duplicate_name
from keras_transfer.heads import AUGMENTATION_NAME, INPUT_NAME, POOLING_NAME
from keras_transfer.layers import BackbonePreprocessing

# Set once for the whole model or by the builder itself, never per backbone.
_RESERVED = ("include_top", "input_shape", "input_tensor", "pooling", "classes", "channels")


def _entries(backbones) -> list[tuple[Backbone, dict]]:
    """`backbones` as `(registry entry, options)` pairs, validated."""
    if isinstance(backbones, str | Backbone) or not isinstance(backbones, Sequence):
        raise TypeError(
            "`backbones` must be a list of registry names (or `(name, options)` pairs), e.g. "
            f"['mobilenet_v2', 'densenet121']. Received: backbones={backbones!r}"
        )
    if len(backbones) < 2:
        raise ValueError(
            "`backbones` must name at least two backbones to fuse. Received: "
            f"backbones={list(backbones)!r}. For one backbone use kt.build_classifier."
        )
    entries = []
    for i, item in enumerate(backbones):
        options: Mapping = {}
        if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], Mapping):
            item, options = item
        try:
            spec = get_backbone(item)
        except (TypeError, ValueError) as error:
            raise type(error)(f"`backbones[{i}]`: {error}") from None
        for key in options:
            if key in _RESERVED:
                raise ValueError(
                    f"`backbones[{i}]` ({spec.name}): option `{key}` is set once for the fusion "
                    f"model (one image input, one head), not per backbone. Received: "
                    f"{key}={options[key]!r}. Use build_fusion_classifier's `channels`, "
                    "`pooling` and `num_classes`; per backbone give `image_size`, `weights` "
                    "or constructor arguments such as `alpha`."
                )
        entries.append((spec, dict(options)))
    return entries


def build_fusion_classifier(
    backbones: Sequence[str | Backbone | tuple[str, Mapping]],
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
) -> keras.Model:
    """Builds one classifier over several pretrained backbones, their pooled features fused.

    Each backbone gets the image resized to its own size (if it differs), its own preprocessing
    and its own pooling; the pooled features are concatenated (layer `"pooling"`) under one head.

    Args:
        backbones: At least two registry names (see `kt.list_backbones()`), or
            `(name, options)` pairs whose options dict may give that backbone's `image_size`
            (its input is resized to it inside the model), `weights` (overriding the
            model-wide `weights`) and `keras.applications` constructor arguments (e.g.
            `{"alpha": 0.35}`). A name may repeat (e.g. one backbone at two sizes): the nested
            models are then named `"<name>"`, `"<name>_2"`, ...
        num_classes: Number of classes; at least 2 for single-label (softmax) heads.
        image_size: Side or (height, width) of the model's input; defaults to the first
            backbone's ImageNet size. Each backbone runs at its own `image_size` option or at
            this size, at least its minimum (so 28 px Fashion-MNIST can go in as it is when
            every backbone resizes, e.g. `("mobilenet_v2", {"image_size": 96})`).
        weights: `"imagenet"`, `None` (random init) or the path of a weights file; applies to
            every backbone without a `weights` option.
        pooling: `"avg"`, `"max"` or `"flatten"`, applied to each backbone's feature map.
        dropout: Dropout rate before each Dense layer of the head.
        hidden_units: Widths of optional ReLU Dense layers between the fused features and the
            output.
        multi_label: Sigmoid outputs (independent labels) instead of a softmax.
        augmentation: `"default"`, a layer or a list of layers, shared by all backbones; Keras
            runs them only in training.
        channels: 3 for RGB input, 1 for greyscale (replicated to RGB once, for every backbone).
        name: Model name; defaults to `"<backbone>_..._fusion"`.
        dtype: Keras dtype policy to build under (e.g. `"mixed_float16"`); None uses the global
            policy.

    Returns:
        A Functional `keras.Model` taking float32 pixels in [0, 255] of shape
        `(batch, height, width, channels)` (input `"images"`) and returning class probabilities
        (`"predictions"`, fed by the float32 `"logits"` Dense; see `kt.head_of`). Its backbones
        are the nested models listed by `kt.find_backbones(model)`.

    Raises:
        TypeError: for `backbones` that is not a list, or a backbone that is not a name.
        ValueError: for fewer than two backbones, an unknown backbone (with suggestions), a
            per-backbone option that is set once for the model (`channels`, `pooling`, ...), a
            size below a backbone's minimum, a bad `num_classes`, `pooling`, `channels`,
            `dropout` or `weights`; all before any backbone is built.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_fusion_classifier(
    ...     [("mobilenet_v2", {"alpha": 0.35}), "mobilenet_v3_small"], 3,
    ...     image_size=32, weights=None)
    >>> model.output_shape, model.get_layer("pooling").output.shape
    ((None, 3), (None, 1856))
    """
    entries = _entries(backbones)
    check_num_classes(num_classes, multi_label)
    check_input_arguments(channels, pooling)
    check_dropout(dropout)
    # The input may be below a backbone's minimum when that backbone resizes to its own size.
    size = _image_size(entries[0][0], None) if image_size is None else image_hw(image_size)

    # Validate every branch (sizes, weights files, modes) before building any backbone.
    branches, seen = [], {}
    for spec, options in entries:
        kwargs = dict(options)
        branch_size = _image_size(spec, kwargs.pop("image_size", size))
        branch_weights = kwargs.pop("weights", weights)
        mode = _check_weights(spec, branch_weights, channels, branch_size, kwargs)
        seen[spec.name] = seen.get(spec.name, 0) + 1
        branch_name = duplicate_name(spec.name, seen[spec.name])
        branches.append((spec, branch_name, branch_size, branch_weights, mode, kwargs))

    with dtype_policy(dtype):
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
        pooled = []
        for spec, branch_name, branch_size, branch_weights, mode, kwargs in branches:
            h = x
            if branch_size != size:
                h = keras.layers.Resizing(*branch_size, name=f"{branch_name}_resize")(h)
            h = BackbonePreprocessing(mode, name=f"{branch_name}_preprocessing")(h)
            try:
                base = spec.build(
                    branch_size,
                    weights=None if branch_weights is None else str(branch_weights),
                    **kwargs,
                )
            except Exception as error:
                if branch_weights is None:
                    raise
                raise ValueError(
                    f"Could not build {spec.name} with weights={str(branch_weights)!r} and "
                    f"{kwargs or 'default arguments'}: {error}. Import ImageNet weights first "
                    "(`keras-transfer weights fetch`), pass the weights file of the same "
                    "architecture and width, or weights=None."
                ) from error
            base.name = branch_name
            _inference_mode_only(base)
            h = base(h, training=False)
            pool = {
                "avg": keras.layers.GlobalAveragePooling2D,
                "max": keras.layers.GlobalMaxPooling2D,
                "flatten": keras.layers.Flatten,
            }[pooling]
            pooled.append(pool(name=f"{branch_name}_pooling")(h))
        features = keras.layers.Concatenate(name=POOLING_NAME)(pooled)
        activation = "sigmoid" if multi_label else "softmax"
        outputs = _head(features, num_classes, activation, hidden_units, dropout)
        default_name = "_".join(branch[1] for branch in branches) + "_fusion"
        return keras.Model(inputs, outputs, name=name or default_name)
