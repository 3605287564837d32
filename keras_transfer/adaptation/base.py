"""The shared shape of every adaptation method: a classifier split at its features layer.

`split_classifier` reads a Functional classifier once: where its features are (a kt classifier's
`"pooling"` layer, or the layer a user names) and where its logits are (`kt.head_of`, or a softmax
output layer of a user's own model). `DomainAdaptation` is the `keras.Model` the methods subclass:
one forward pass over the source and target batch together gives the features of both and the
source logits; `train_step` adds the method's loss (`adaptation_loss`) to the task cross-entropy
on the logits and takes one optimizer step. The wrapper owns nothing of the classifier: it builds
a second Functional view over the same layers, so the classifier holds the adapted weights
afterwards and saves, reloads and exports exactly as before.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import heads
from keras_transfer._validate import is_number


@dataclasses.dataclass(frozen=True)
class Split:
    """A classifier read for adaptation (see `split_classifier`).

    Attributes:
        network: A Functional model over the classifier's own layers, from its images to
            `[features, logits]`.
        head: The classifier's head (always `"multiclass"`).
        features_layer: Name of the layer whose output is the features.
        feature_dim: Width of the features once flattened.
        image_shape: The classifier's input shape without the batch, `(H, W, C)`; None where a
            dimension is open.
    """

    network: keras.Model
    head: heads.HeadSpec
    features_layer: str
    feature_dim: int
    image_shape: tuple


def check_trade_off(trade_off: Any) -> float:
    """`trade_off` as a float, refusing negatives, NaN, infinities and non-numbers."""
    if not is_number(trade_off) or not math.isfinite(trade_off) or trade_off < 0:
        raise ValueError(
            "`trade_off` must be a finite number >= 0: the weight of the adaptation loss "
            f"(0 trains on the source alone). Received: trade_off={trade_off!r}. "
            "E.g. trade_off=1.0 (the default) or 0.1."
        )
    return float(trade_off)


def _output_layer(model: keras.Model) -> keras.layers.Layer | None:
    tensor = model.outputs[0]
    for layer in reversed(model.layers):
        try:
            if layer.output is tensor:
                return layer
        except (AttributeError, ValueError):
            continue
    return None


def _no_head(model: keras.Model, why: str) -> ValueError:
    return ValueError(
        f"`classifier` {model.name!r} has no softmax head to adapt: {why}. Domain adaptation "
        "trains a single-label classifier on its logits: end the model in "
        f"`Dense(num_classes, name={heads.LOGITS_NAME!r})` -> `Activation('softmax', name="
        f"{heads.OUTPUT_NAME!r})` (as kt.build_classifier does), or in a `Dense(num_classes, "
        "activation='softmax')`."
    )


def _read_head(model: keras.Model) -> tuple[Any, heads.HeadSpec]:
    """`(logits tensor in the model's graph, HeadSpec)`; refuses heads without softmax logits."""
    try:
        head = heads.head_of(model)
    except ValueError:
        head = None
    if head is not None:
        if head.kind != "multiclass":
            raise _no_head(
                model, f"its {head.output_layer!r} layer is a {head.activation} ({head.kind}) head"
            )
        return heads.logits_model(model).outputs[0], head
    # A user's own model: its output layer is the head when it is a softmax.
    output = _output_layer(model)
    if output is None:
        raise _no_head(model, "its output does not come from one layer")
    activation = heads._activation_name(output)
    width = output.output.shape[-1]
    if activation != "softmax" or len(output.output.shape) != 2 or not width or width < 2:
        kind = type(output).__name__
        raise _no_head(
            model,
            f"its output layer {output.name!r} is a {kind} with activation {activation!r} and "
            f"output shape {tuple(output.output.shape)}, not a softmax over >= 2 classes",
        )
    if isinstance(output, keras.layers.Dense):
        # The activation is fused into the Dense: recompute x @ kernel + bias with its weights.
        logits = heads._FusedLogits(output, name=f"{output.name}_logits")(output.input)
        logits_layer = None
    elif isinstance(output, keras.layers.Activation | keras.layers.Softmax):
        logits = output.input
        producer = heads._producer(model, output)
        logits_layer = producer.name if producer is not None else None
    else:
        raise _no_head(model, f"its output layer {output.name!r} is a {type(output).__name__}")
    spec = heads.HeadSpec("multiclass", int(width), logits_layer, output.name)
    return logits, spec


def feature_candidates(model: keras.Model) -> list[str]:
    """Names `features_layer` may take: every layer of `model` except its inputs."""
    return [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def _features_tensor(model: keras.Model, features_layer: str | None):
    name = heads.POOLING_NAME if features_layer is None else features_layer
    candidates = feature_candidates(model)
    if not isinstance(name, str) or name not in candidates:
        close = difflib.get_close_matches(str(name), candidates, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        default = (
            f" features_layer=None means the {heads.POOLING_NAME!r} layer of a model built by "
            "kt.build_classifier; name your own model's features layer instead."
            if features_layer is None
            else ""
        )
        raise ValueError(
            f"`features_layer` {name!r} is not a layer of model {model.name!r}.{hint}{default} "
            f"Layers that can give the features: {candidates}. Received: "
            f"features_layer={features_layer!r}"
        )
    return name, model.get_layer(name).output


def split_classifier(classifier: keras.Model, features_layer: str | None = None) -> Split:
    """Reads `classifier` for adaptation: its features at `features_layer` and its logits.

    Creates no variables and changes nothing in `classifier`.

    Args:
        classifier: A Functional `keras.Model` with one image input and a softmax head (see
            `kt.head_of`; a user's model ending in a softmax `Dense` or `Activation` works too).
        features_layer: The layer whose output is aligned across domains; None means the
            `"pooling"` layer of a model from `kt.build_classifier`.

    Returns:
        A `Split`.

    Raises:
        TypeError: When `classifier` is not a Functional `keras.Model` with one input and output.
        ValueError: For a head without softmax logits, an unknown `features_layer` (listing the
            candidates), features of an open width, or features nothing trainable feeds.
    """
    if not isinstance(classifier, keras.Model):
        raise TypeError(
            "`classifier` must be a Functional keras.Model (e.g. from kt.build_classifier). "
            f"Received: classifier={type(classifier).__name__}"
        )
    try:
        inputs, outputs = classifier.inputs, classifier.outputs
    except (AttributeError, ValueError):
        inputs = outputs = None
    if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
        raise TypeError(
            f"`classifier` {classifier.name!r} must be a Functional model with one image input "
            "and one output (build it with keras.Model(inputs, outputs) or kt.build_classifier); "
            "subclassed and multi-input models cannot be split at a features layer. Received: "
            f"{type(classifier).__name__} with inputs={inputs!r}"
        )
    logits, head = _read_head(classifier)
    name, features = _features_tensor(classifier, features_layer)
    dims = features.shape[1:]
    if not dims or any(d is None for d in dims):
        raise ValueError(
            f"`features_layer` {name!r} of {classifier.name!r} gives features of shape "
            f"{tuple(features.shape)}; their width must be fixed. Pick a layer after pooling "
            f"or flattening (e.g. {heads.POOLING_NAME!r}). Received: features_layer={name!r}"
        )
    network = keras.Model(inputs[0], [features, logits], name=f"{classifier.name}_adaptation")
    upstream = keras.Model(inputs[0], features)
    if not upstream.trainable_weights:
        raise ValueError(
            f"Nothing trainable feeds `features_layer` {name!r} of {classifier.name!r}: the "
            "adaptation loss could not change the features. Unfreeze part of the backbone "
            "first, e.g. kt.unfreeze(classifier, blocks=2), or set `trainable=True` on the "
            f"layers before {name!r}. Received: features_layer={features_layer!r}"
        )
    return Split(
        network=network,
        head=head,
        features_layer=name,
        feature_dim=int(np.prod(dims)),
        image_shape=tuple(inputs[0].shape[1:]),
    )


def _flat(features):
    features = keras.ops.cast(features, "float32")
    return keras.ops.reshape(features, (keras.ops.shape(features)[0], -1))


def task_loss_and_hits(labels, logits):
    """Per-example cross-entropy on the logits and 0/1 hits, for class ids or one-hot rows."""
    num_classes = logits.shape[-1]
    rank = len(labels.shape)
    if rank == 1 or (rank == 2 and labels.shape[-1] == 1 and num_classes != 1):
        ids = keras.ops.cast(keras.ops.reshape(labels, (-1,)), "int32")
        loss = keras.losses.sparse_categorical_crossentropy(ids, logits, from_logits=True)
    else:
        ids = keras.ops.cast(keras.ops.argmax(labels, axis=-1), "int32")
        labels = keras.ops.cast(labels, logits.dtype)
        loss = keras.losses.categorical_crossentropy(labels, logits, from_logits=True)
    hits = keras.ops.equal(keras.ops.cast(keras.ops.argmax(logits, axis=-1), "int32"), ids)
    return loss, keras.ops.cast(hits, "float32")


class DomainAdaptation(keras.Model):
    """Base of the adaptation models: a classifier, split at a features layer, and one loss more.

    Subclasses implement `adaptation_loss(features, num_source)` (the term added to the task
    loss, already weighted) and list their trackers in `adaptation_metrics`. The data is
    `((source_images, source_labels), target_images)` batches, as `kt.adaptation.pair_domains`
    makes them; validation data is `(images, labels)`. Calling the model runs the classifier.

    Args:
        classifier: A Functional classifier (see `split_classifier`); its layers are trained in
            place.
        features_layer: The layer whose output is aligned; None for a kt classifier's
            `"pooling"` layer.
        trade_off: Weight of the adaptation loss, >= 0.
        **kwargs: `keras.Model` arguments (`name`).
    """

    def __init__(
        self,
        classifier: keras.Model,
        features_layer: str | None = None,
        *,
        trade_off: float = 1.0,
        **kwargs,
    ):
        trade_off = check_trade_off(trade_off)
        split = split_classifier(classifier, features_layer)
        super().__init__(**kwargs)
        self.classifier = classifier
        self.features_layer = split.features_layer
        self.trade_off = trade_off
        self.head = split.head
        self.feature_dim = split.feature_dim
        self.network = split.network
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.task_loss_tracker = keras.metrics.Mean(name="task_loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        # Every part exists once constructed (subclasses build theirs in __init__ too).
        self.built = True

    # -- what a method adds -------------------------------------------------------------------
    @property
    def adaptation_metrics(self) -> list[keras.metrics.Metric]:
        return []

    def adaptation_loss(self, features, num_source):
        """The method's term of the loss on the features of a source+target batch (weighted)."""
        raise NotImplementedError

    # -- Keras hooks --------------------------------------------------------------------------
    @property
    def metrics(self):
        return [self.loss_tracker, self.task_loss_tracker, self.accuracy_tracker] + list(
            self.adaptation_metrics
        )

    def compile(self, optimizer="adam", loss=None, metrics=None, **kwargs):
        """Compiles with `optimizer`; the losses and metrics are the method's own.

        Raises:
            ValueError: When `loss` or `metrics` is given: the task loss is cross-entropy on
                the classifier's logits, the adaptation loss the method's.
        """
        if loss is not None or metrics is not None:
            raise ValueError(
                f"{type(self).__name__}.compile takes only the optimizer (and Keras' runtime "
                "options): the task loss is cross-entropy on the classifier's logits and the "
                "adaptation loss is the method's; `trade_off` weighs them. Received: "
                f"loss={loss!r}, metrics={metrics!r}"
            )
        kwargs.pop("loss_weights", None)
        kwargs.pop("weighted_metrics", None)
        super().compile(optimizer=optimizer, **kwargs)

    def compile_from_config(self, config):
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def call(self, inputs, training=None):
        return self.classifier(inputs, training=training)

    def _replicas(self):
        return self.distribute_strategy.num_replicas_in_sync

    def train_step(self, data):
        (source, labels), target = data
        dtype = self.network.inputs[0].dtype
        source = keras.ops.cast(source, dtype)
        target = keras.ops.cast(target, dtype)
        num_source = keras.ops.shape(source)[0]
        images = keras.ops.concatenate([source, target], axis=0)
        with tf.GradientTape() as tape:
            # One pass over both domains: BatchNorm in training mode sees them together.
            features, logits = self.network(images, training=True)
            features = _flat(features)
            task, hits = task_loss_and_hits(labels, logits[:num_source])
            task = keras.ops.mean(task)
            adaptation = self.adaptation_loss(features, num_source)
            total = task + adaptation
            if self.losses:
                total = total + keras.ops.sum([keras.ops.sum(loss) for loss in self.losses])
            # Gradients are summed over replicas: each contributes its share of the mean.
            scaled = self.optimizer.scale_loss(total / self._replicas())
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        self.loss_tracker.update_state(total)
        self.task_loss_tracker.update_state(task)
        self.accuracy_tracker.update_state(hits)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        images, labels, _ = keras.utils.unpack_x_y_sample_weight(data)
        images = keras.ops.cast(images, self.network.inputs[0].dtype)
        _, logits = self.network(images, training=False)
        task, hits = task_loss_and_hits(labels, logits)
        self.loss_tracker.update_state(task)  # per example: a partial last batch weighs less
        self.accuracy_tracker.update_state(hits)
        return {"loss": self.loss_tracker.result(), "accuracy": self.accuracy_tracker.result()}

    # -- serialization ------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "classifier": keras.saving.serialize_keras_object(self.classifier),
                "features_layer": self.features_layer,
                "trade_off": self.trade_off,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        classifier = keras.saving.deserialize_keras_object(config.pop("classifier"))
        config.pop("dtype", None)
        return cls(classifier, **config)
