"""The model contract: the layer names every module relies on, and the head a model ends in.

A model built by `kt.build_classifier` or `kt.build_regressor` reads, from input to output:
`"images"` (input) -> `"augmentation"` (optional) -> preprocessing -> backbone -> `"pooling"` ->
head -> `"logits"` (a float32 `Dense`) -> `"predictions"` (a float32 `Activation`: softmax,
sigmoid or linear). `head_of` is the one place that reads the head, so training (loss and metric
defaults), export (signatures) and evaluation agree on what a model predicts. `logits_model`
gives the pre-activation outputs that distillation, calibration and domain-adaptation losses need.

Models saved before the `"logits"` layer existed end in a `Dense` named `"predictions"` with the
activation fused in; `head_of` and `logits_model` read those too ("legacy" heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import keras

INPUT_NAME = "images"
AUGMENTATION_NAME = "augmentation"
POOLING_NAME = "pooling"
LOGITS_NAME = "logits"
OUTPUT_NAME = "predictions"

KINDS = ("multiclass", "multilabel", "regression")
_KIND_OF_ACTIVATION = {"softmax": "multiclass", "sigmoid": "multilabel", "linear": "regression"}
ACTIVATION_OF_KIND = {kind: activation for activation, kind in _KIND_OF_ACTIVATION.items()}


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a model's head predicts, read from its layers by `head_of`.

    Attributes:
        kind: `"multiclass"` (softmax), `"multilabel"` (independent sigmoids) or `"regression"`
            (linear outputs).
        num_outputs: Width of the output: classes, labels or regression targets.
        logits_layer: Name of the layer whose output is the logits (`"logits"` for models built
            by this library), or None for a legacy head whose activation is fused into the
            output `Dense`.
        output_layer: Name of the layer whose output is the model's predictions (`"predictions"`).
        class_names: One name per output when known, else None.
    """

    kind: str
    num_outputs: int
    logits_layer: str | None
    output_layer: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={self.kind!r}")

    @property
    def activation(self) -> str:
        """`"softmax"`, `"sigmoid"` or `"linear"`: what turns the logits into predictions."""
        return ACTIVATION_OF_KIND[self.kind]

    @property
    def is_legacy(self) -> bool:
        """True for a model saved before the `"logits"` layer existed (fused activation)."""
        return self.logits_layer is None


def _activation_name(layer: keras.layers.Layer) -> str:
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    activation = keras.activations.serialize(getattr(layer, "activation", None))
    if isinstance(activation, dict):
        activation = activation.get("config", {}).get("name", activation.get("class_name"))
    return str(activation)


def _producer(model: keras.Model, layer: keras.layers.Layer) -> keras.layers.Layer | None:
    """The layer of `model` whose output feeds `layer`, or None when it cannot be told."""
    try:
        tensor = layer.input
    except (AttributeError, ValueError):
        return None
    for candidate in model.layers:
        try:
            if candidate.output is tensor:
                return candidate
        except (AttributeError, ValueError):
            continue
    return None


def _no_head_error(model: keras.Model) -> ValueError:
    return ValueError(
        f"Model {model.name!r} has no head that keras_transfer can read: it needs a layer named "
        f"{OUTPUT_NAME!r}, either an `Activation` (softmax, sigmoid or linear) fed by the logits "
        f"layer (models from kt.build_classifier / kt.build_regressor end in `Dense(name="
        f"{LOGITS_NAME!r})` -> `Activation(name={OUTPUT_NAME!r})`), or a `Dense` with the "
        "activation fused in (models saved by older versions). Build the model with "
        "kt.build_classifier or kt.build_regressor, or name its output layer "
        f"{OUTPUT_NAME!r}; for training, passing `loss=` and `metrics=` explicitly also works."
    )


def head_of(model: keras.Model, class_names: Sequence[str] | None = None) -> HeadSpec:
    """Reads the head of `model`: what it predicts and which layers hold the logits and outputs.

    Two layouts are understood: the current one, a layer named `"predictions"` that is an
    `Activation` (or `Softmax`) layer fed by the logits layer (`Dense(name="logits")` in models
    from `kt.build_classifier` / `kt.build_regressor`); and the legacy one, a `Dense` named
    `"predictions"` with a fused softmax, sigmoid or linear activation.

    Args:
        model: A `keras.Model`.
        class_names: One name per output. Defaults to the model's `class_names` attribute when
            it has one (runs loaded from disk carry it), else None.

    Returns:
        A `HeadSpec`.

    Raises:
        TypeError: When `model` is not a `keras.Model`.
        ValueError: When the model has no `"predictions"` layer, its activation is not softmax,
            sigmoid or linear, or `class_names` does not give one name per output.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> head = kt.head_of(model)
    >>> head.kind, head.num_outputs, head.logits_layer, head.output_layer
    ('multiclass', 3, 'logits', 'predictions')
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a keras.Model (e.g. from kt.build_classifier). "
            f"Received: model={type(model).__name__}"
        )
    try:
        output = model.get_layer(OUTPUT_NAME)
    except ValueError:
        raise _no_head_error(model) from None
    activation = _activation_name(output)
    if activation not in _KIND_OF_ACTIVATION:
        raise ValueError(
            f"Model {model.name!r}: the {OUTPUT_NAME!r} layer has activation {activation!r}; "
            f"expected one of {sorted(_KIND_OF_ACTIVATION)}. Rebuild the head with one of "
            "those, or pass `loss=`/`metrics=` (training) or `head=` (export) explicitly."
        )
    if isinstance(output, keras.layers.Dense):
        logits_layer, num_outputs = None, int(output.units)
    elif isinstance(output, keras.layers.Activation | keras.layers.Softmax):
        producer = _producer(model, output)
        if producer is None:
            raise ValueError(
                f"Model {model.name!r}: cannot find the layer that feeds its {OUTPUT_NAME!r} "
                f"activation, so there is no logits layer. Build the head as `Dense(name="
                f"{LOGITS_NAME!r})` -> `Activation(name={OUTPUT_NAME!r})` in one Functional model."
            )
        logits_layer, num_outputs = producer.name, int(output.output.shape[-1])
    else:
        raise _no_head_error(model)
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    if class_names is not None:
        if isinstance(class_names, str) or len(class_names) != num_outputs:
            raise ValueError(
                f"`class_names` must give one name per output of model {model.name!r} "
                f"({num_outputs}). Received: class_names={class_names!r}"
            )
        class_names = tuple(str(name) for name in class_names)
    return HeadSpec(
        kind=_KIND_OF_ACTIVATION[activation],
        num_outputs=num_outputs,
        logits_layer=logits_layer,
        output_layer=output.name,
        class_names=class_names,
    )


class _FusedLogits(keras.layers.Layer):
    """`x @ kernel + bias` of a legacy fused `Dense`, reading that layer's own variables."""

    def __init__(self, dense: keras.layers.Dense, **kwargs):
        super().__init__(dtype=dense.dtype_policy, **kwargs)
        self.dense = dense

    def call(self, inputs):
        logits = keras.ops.matmul(inputs, self.dense.kernel)
        if self.dense.use_bias:
            logits = logits + self.dense.bias
        return logits

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.dense.units)


def logits_model(model: keras.Model) -> keras.Model:
    """A Functional model over the same layers and weights as `model` that outputs the logits.

    Applying the head's activation (`head_of(model).activation`) to its output gives `model`'s
    predictions. The layers are shared, not copied: training one trains the other. Like `model`,
    it runs its augmentation only in training and the backbone in inference mode.

    For a legacy model (a `Dense` named `"predictions"` with the activation fused in), the last
    layer of the returned model is `_FusedLogits`, which computes `x @ kernel + bias` with that
    `Dense` layer's own variables, so the weights are still shared. That layer is not registered
    for serialization: use such a logits model in memory and save the original model.

    Args:
        model: A `keras.Model` with a head `head_of` can read.

    Returns:
        A `keras.Model` with the inputs of `model`, output `(batch, num_outputs)` float32 logits,
        named `"<model name>_logits"`.

    Raises:
        TypeError: When `model` is not a `keras.Model`.
        ValueError: When `head_of(model)` cannot read its head.

    Example:
    >>> import keras, numpy as np
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> x = np.zeros((1, 32, 32, 3), "float32")
    >>> logits = kt.logits_model(model)(x)
    >>> bool(np.allclose(keras.ops.softmax(logits), model(x), atol=1e-6))
    True
    """
    spec = head_of(model)
    output = model.get_layer(spec.output_layer)
    if spec.logits_layer is not None:
        logits = model.get_layer(spec.logits_layer).output
    else:
        logits = _FusedLogits(output, name=LOGITS_NAME)(output.input)
    # `model.input` keeps the structure the model was built with (a tensor, not a 1-list).
    return keras.Model(model.input, logits, name=f"{model.name}_logits")


def default_loss_and_metrics(model: keras.Model, label_spec: Any = None) -> tuple[str, list]:
    """The loss and metrics that fit the head of `model`, computed on its `"predictions"` output.

    Multiclass (softmax): sparse categorical cross-entropy and accuracy for integer labels,
    categorical ones when `label_spec` says the labels are one-hot (`(..., num_outputs)`).
    Multi-label (sigmoid): binary cross-entropy, `binary_accuracy` and a multi-label `auc`.
    Regression (linear): mean squared error and `mae`.

    Args:
        model: A `keras.Model` with a head `head_of` can read.
        label_spec: The labels' `tf.TensorSpec` (e.g. `dataset.element_spec[1]`), or None for
            integer class labels.

    Returns:
        `(loss, metrics)` to pass to `model.compile`; metric objects are new on every call.

    Raises:
        ValueError: When `head_of(model)` cannot read its head (pass `loss=` explicitly then).

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> kt.heads.default_loss_and_metrics(model)
    ('sparse_categorical_crossentropy', ['sparse_categorical_accuracy'])
    """
    spec = head_of(model)
    if spec.kind == "multiclass":
        shape = getattr(label_spec, "shape", None)
        rank = getattr(shape, "rank", None) if shape is not None else None
        if rank is not None and rank >= 2 and shape[-1] == spec.num_outputs:
            return "categorical_crossentropy", ["categorical_accuracy"]
        return "sparse_categorical_crossentropy", ["sparse_categorical_accuracy"]
    if spec.kind == "multilabel":
        return "binary_crossentropy", [
            keras.metrics.BinaryAccuracy(name="binary_accuracy"),
            keras.metrics.AUC(multi_label=True, name="auc"),
        ]
    return "mean_squared_error", [keras.metrics.MeanAbsoluteError(name="mae")]
