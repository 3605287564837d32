"""The joint objective: train on a large related labelled set and a few target labels at once.

`fit_joint` minimises, per step, `L = L_source + λ·L_target + Ω(θ)` on one source batch and one
target batch: the common case of a large labelled source set in the target's label space (or a
related one, with `target_head=True`) plus a few labelled target examples. Ω is the penalty of a
`regularizer` (e.g. `kt.regularizers.L2SP`, attached for the run and removed afterwards) and any
other regularization losses of the model. The per-batch maths is a `train_step`, so `fit`,
callbacks and `tf.distribute` work as usual, and each term is logged.

With `target_head=False` (the default) both sets train the one model. With `target_head=True`
the target gets its own softmax head over the shared backbone: a `Dense` fed by the same
features as the model's logits, so the two tasks may have different label sets.

Example:
>>> import numpy as np, keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
>>> xs = np.random.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
>>> xt = np.random.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
>>> history = kt.fit_joint(model, (xs, np.arange(16) % 3), (xt, np.arange(4) % 3),
...                        lambda_=2.0, epochs=1, batch_size=8, verbose=0)
>>> sorted(history.history)  # doctest: +NORMALIZE_WHITESPACE
['loss', 'regularization_loss', 'source_loss', 'source_sparse_categorical_accuracy',
 'target_loss', 'target_sparse_categorical_accuracy']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import keras
import tensorflow as tf
from keras import ops

from keras_transfer import _validate, heads

__all__ = ["JointModel", "fit_joint"]


def _per_sample(loss) -> Callable:
    """A per-example loss function `(y_true, y_pred) -> (batch,)` from a name, Loss or function."""
    if isinstance(loss, keras.losses.Loss):
        return loss.call
    fn = keras.losses.get(loss)
    if isinstance(fn, keras.losses.Loss):
        return fn.call
    if not callable(fn):
        raise TypeError(f"`loss` must be a Keras loss name, Loss or function. Received: {loss!r}")
    return fn


def _mean(values, sample_weight=None):
    """Keras' `sum_over_batch_size`: Σ wᵢ·lᵢ / batch size (a plain mean without weights)."""
    values = ops.cast(values, "float32")
    if sample_weight is not None:
        values = values * ops.reshape(ops.cast(sample_weight, "float32"), ops.shape(values))
    return ops.mean(values)


def _fresh_metric(metric, prefix: str) -> keras.metrics.Metric:
    metric = keras.metrics.get(metric) if isinstance(metric, str) else metric
    config = dict(metric.get_config(), name=f"{prefix}_{metric.name}")
    return metric.__class__.from_config(config)


class JointModel(keras.Model):
    """Trains `source_model` and `target_model` (sharing layers) on paired batches.

    Each element of the training data is `(source_batch, target_batch)`, each `(images,
    labels)` or `(images, labels, sample_weight)`. A step minimises `source_loss + lambda_ ·
    target_loss + Ω`, Ω being `network.losses` (the regularization of every variable once), and
    updates `network`'s trainable weights. Evaluation data is target data: `evaluate` and
    validation measure `target_model` alone (`loss` is then its target loss).

    `fit_joint` builds and runs it; use it directly to control `fit` yourself.

    Args:
        network: A Functional model holding every layer of both models (the one to regularize).
        source_model: Images -> source predictions.
        target_model: Images -> target predictions (may be `source_model` itself).
        lambda_: λ >= 0, the weight of the target loss.
        source_loss: Loss of the source predictions: a Keras loss name, `Loss` or function.
        target_loss: Loss of the target predictions.
        source_metrics: Metrics of the source predictions (logged as `source_<name>`).
        target_metrics: Metrics of the target predictions (logged as `target_<name>`).
    """

    def __init__(
        self,
        network: keras.Model,
        source_model: keras.Model,
        target_model: keras.Model,
        *,
        lambda_: float = 1.0,
        source_loss="sparse_categorical_crossentropy",
        target_loss="sparse_categorical_crossentropy",
        source_metrics: Sequence = (),
        target_metrics: Sequence = (),
        name: str = "joint",
        **kwargs,
    ):
        lambda_ = _check_lambda(lambda_)
        with network.distribute_strategy.scope():
            super().__init__(name=name, **kwargs)
            self.network = network
            self.source_model = source_model
            self.target_model = target_model
            self.lambda_ = lambda_
            self._source_loss = _per_sample(source_loss)
            self._target_loss = _per_sample(target_loss)
            self.source_metrics = [_fresh_metric(m, "source") for m in source_metrics]
            self.target_metrics = [_fresh_metric(m, "target") for m in target_metrics]
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.source_loss_tracker = keras.metrics.Mean(name="source_loss")
            self.target_loss_tracker = keras.metrics.Mean(name="target_loss")
            self.regularization_tracker = keras.metrics.Mean(name="regularization_loss")
        self.built = True

    def call(self, inputs, training=None):
        return self.target_model(inputs, training=training)

    def _regularization(self):
        losses = [ops.sum(ops.cast(loss, "float32")) for loss in self.network.losses]
        return ops.sum(ops.stack(losses)) if losses else ops.zeros((), "float32")

    def train_step(self, data):
        source, target = data
        xs, ys, ws = keras.utils.unpack_x_y_sample_weight(source)
        xt, yt, wt = keras.utils.unpack_x_y_sample_weight(target)
        with tf.GradientTape() as tape:
            source_predictions = self.source_model(xs, training=True)
            target_predictions = self.target_model(xt, training=True)
            source_loss = _mean(self._source_loss(ys, source_predictions), ws)
            target_loss = _mean(self._target_loss(yt, target_predictions), wt)
            regularization = self._regularization()
            loss = source_loss + self.lambda_ * target_loss + regularization
            # Each replica's share, so that the summed gradients are those of the global mean.
            scaled = loss / self.distribute_strategy.num_replicas_in_sync
            scaled = self.optimizer.scale_loss(scaled)
        variables = self.trainable_variables
        gradients = tape.gradient(scaled, variables)
        self.optimizer.apply_gradients(zip(gradients, variables, strict=True))
        batch = tf.shape(xs)[0]
        for tracker, value in (
            (self.loss_tracker, loss),
            (self.source_loss_tracker, source_loss),
            (self.target_loss_tracker, target_loss),
            (self.regularization_tracker, regularization),
        ):
            tracker.update_state(value, sample_weight=batch)
        for metric in self.source_metrics:
            metric.update_state(ys, source_predictions, sample_weight=ws)
        for metric in self.target_metrics:
            metric.update_state(yt, target_predictions, sample_weight=wt)
        trackers = [
            self.loss_tracker,
            self.source_loss_tracker,
            self.target_loss_tracker,
            self.regularization_tracker,
            *self.source_metrics,
            *self.target_metrics,
        ]
        return {m.name: m.result() for m in trackers}

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        predictions = self.target_model(x, training=False)
        target_loss = _mean(self._target_loss(y, predictions), sample_weight)
        batch = tf.shape(x)[0]
        self.loss_tracker.update_state(target_loss, sample_weight=batch)
        self.target_loss_tracker.update_state(target_loss, sample_weight=batch)
        for metric in self.target_metrics:
            metric.update_state(y, predictions, sample_weight=sample_weight)
        trackers = [self.loss_tracker, self.target_loss_tracker, *self.target_metrics]
        return {m.name: m.result() for m in trackers}


def _check_lambda(value) -> float:
    if not _validate.is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(
            "`lambda_` must be a finite number >= 0: the weight of the target loss next to the "
            f"source loss. Received: lambda_={value!r}. Typical values: 0.1 to 10 (1 weighs a "
            "target batch like a source batch)."
        )
    return float(value)


def _dataset(data, name: str, batch_size: int, *, shuffle: bool, seed: int) -> tf.data.Dataset:
    if isinstance(data, tf.data.Dataset):
        return data
    if isinstance(data, tuple | list) and len(data) in (2, 3):
        from keras_transfer.data import from_arrays

        weights = data[2] if len(data) == 3 else None
        # A few target labels may be fewer than a batch: each step then takes all of them.
        batch_size = max(1, min(batch_size, len(data[0])))
        return from_arrays(
            data[0], data[1], batch_size=batch_size, shuffle=shuffle, seed=seed,
            sample_weight=weights,
        )  # fmt: skip
    raise TypeError(
        f"`{name}` must be a tf.data.Dataset of (images, labels) batches or an (images, labels) "
        f"tuple of arrays. Received: {type(data).__name__}"
    )


def _target_head(model: keras.Model, spec: heads.HeadSpec, num_classes: int):
    """`(network, target_model)`: a new softmax head on the features under `model`'s logits."""
    features = model.get_layer(spec.logits_layer or spec.output_layer).input
    logits = keras.layers.Dense(num_classes, dtype="float32", name="target_logits")(features)
    predictions = keras.layers.Activation("softmax", dtype="float32", name=heads.OUTPUT_NAME)(
        logits
    )
    target_model = keras.Model(model.input, predictions, name=f"{model.name}_target")
    network = keras.Model(model.input, [model.output, logits], name=f"{model.name}_joint")
    return network, target_model


def fit_joint(
    model: keras.Model,
    source,
    target,
    *,
    lambda_: float = 1.0,
    regularizer=None,
    epochs: int,
    batch_size: int = 32,
    target_head: bool = False,
    target_num_classes: int | None = None,
    validation_data=None,
    optimizer: str | keras.optimizers.Optimizer = "adam",
    learning_rate: float = 1e-3,
    loss=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    check_data: bool = True,
    seed: int = 0,
    jit_compile: bool | str = "auto",
    verbose: str | int = "auto",
) -> keras.callbacks.History:
    """Trains `model` on source and target batches together: `L_s + λ·L_t + Ω`.

    Every step takes one source batch and one target batch. An epoch is one pass over `source`;
    `target` is cycled (it is usually the smaller set). What trains is what is trainable in
    `model` now (see `kt.unfreeze`, `kt.freeze_backbone`), plus the new target head.

    Args:
        model: A classifier (e.g. from `kt.build_classifier`), trained in place.
        source: Labelled source data: an `(images, labels)` (or `(images, labels, weights)`)
            tuple of arrays, or a `tf.data.Dataset` of such batches.
        target: Labelled target data, same forms. Its labels are in the model's label space,
            or, with `target_head=True`, in `range(target_num_classes)`.
        lambda_: λ >= 0, the weight of the target loss.
        regularizer: Ω: None, `"l2"`, `"l2sp"` or an object with `attach(model)`/`detach(model)`
            such as `kt.regularizers.L2SP(alpha=0.1)`; attached to every layer of both heads
            before training and detached afterwards, even on error.
        epochs: Passes over `source`, >= 1.
        batch_size: Examples per batch of each set (global) when data comes as arrays; a set
            smaller than that (a few target labels) gives all its examples at every step.
        target_head: Give the target its own softmax head over the shared backbone.
        target_num_classes: Classes of the target head (required with `target_head=True`).
        validation_data: Labelled target data to evaluate the target model on.
        optimizer: An optimizer name or instance (cloned, with `learning_rate`).
        learning_rate: Learning rate, > 0.
        loss: Loss of the model's predictions; by default from its head (`kt.head_of`). The
            target head's loss is sparse categorical cross-entropy (categorical for one-hot).
        callbacks: Keras callbacks.
        check_data: Check labels and pixels of both sets against their heads first.
        seed: Seed of the shuffling of array data.
        jit_compile: XLA-compile the training step (`"auto"`: Keras decides).
        verbose: Passed to `fit`.

    Returns:
        The `keras.callbacks.History`, logging `loss` (the total), `source_loss`, `target_loss`,
        `regularization_loss` (Ω) and each head's metrics (`source_...`, `target_...`);
        `history.source_model` is `model` and `history.target_model` the model of the target
        task (`model` itself without `target_head`; else a Functional model sharing `model`'s
        backbone, output layer `"predictions"`, to save and export).

    Raises:
        TypeError: for a model that is not a `keras.Model` or data of the wrong type.
        ValueError: for `lambda_` < 0, `epochs` < 1, a bad `batch_size`, `learning_rate` or
            regularizer, `target_num_classes` missing (or given without `target_head`), or
            labels that do not fit their head, before any training.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> xs = np.random.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    >>> xt = np.random.uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    >>> history = kt.fit_joint(model, (xs, np.arange(16) % 3), (xt, np.arange(4) % 2),
    ...                        target_head=True, target_num_classes=2, epochs=1, verbose=0)
    >>> history.target_model.output_shape
    (None, 2)
    """
    from keras_transfer import datacheck, phases, regularizers

    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a keras.Model (e.g. from kt.build_classifier). "
            f"Received: model={type(model).__name__}"
        )
    lambda_ = _check_lambda(lambda_)
    epochs = _validate.check_int("epochs", epochs, minimum=1)
    batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    target_head = _validate.check_bool("target_head", target_head)
    learning_rate = phases._positive_number("learning_rate", learning_rate)
    seed = _validate.check_int("seed", seed)
    if target_head:
        target_num_classes = _validate.check_int(
            "target_num_classes",
            target_num_classes,
            minimum=2,
            hint="With target_head=True, give the number of target classes (a softmax head).",
        )
    elif target_num_classes is not None:
        raise ValueError(
            f"`target_num_classes` ({target_num_classes!r}) only applies with target_head=True; "
            "without it the target trains the model's own head. Pass target_head=True or drop it."
        )
    regularizer = regularizers.get(regularizer)
    if getattr(regularizer, "attached", False):
        raise ValueError(
            f"`regularizer` {regularizer!r} is already attached to a model; detach it first or "
            "pass a new one."
        )
    strategy = model.distribute_strategy
    global_batch = batch_size * strategy.num_replicas_in_sync
    source = _dataset(source, "source", global_batch, shuffle=True, seed=seed)
    target = _dataset(target, "target", global_batch, shuffle=True, seed=seed + 1)
    if validation_data is not None:
        validation_data = _dataset(
            validation_data, "validation_data", global_batch, shuffle=False, seed=seed
        )

    try:
        spec = heads.head_of(model)
    except ValueError:
        if loss is None:
            raise
        spec = None  # the caller's loss; no label checks against a head
    source_metrics, target_metrics, target_loss = [], [], loss
    if loss is None:
        loss, source_metrics = heads.default_loss_and_metrics(model, source.element_spec[1])
        target_loss, target_metrics = heads.default_loss_and_metrics(model, target.element_spec[1])
    with strategy.scope():
        if target_head:
            network, target_model = _target_head(model, spec or heads.head_of(model),
                                                 target_num_classes)  # fmt: skip
        else:
            network, target_model = model, model
    target_spec = spec
    if target_head:
        target_spec = heads.head_of(target_model)
        target_loss, target_metrics = heads.default_loss_and_metrics(
            target_model, target.element_spec[1]
        )
    if check_data:
        for head, ds, name in (
            (spec, source, "source"),
            (target_spec, target, "target"),
            (target_spec, validation_data, "validation_data"),
        ):
            if head is not None and ds is not None:
                datacheck.check_dataset(head, ds, name)

    train = tf.data.Dataset.zip((source, target.repeat()))
    joint = JointModel(
        network,
        model,
        target_model,
        lambda_=lambda_,
        source_loss=loss,
        target_loss=target_loss,
        source_metrics=source_metrics,
        target_metrics=target_metrics,
    )
    with strategy.scope():
        joint.compile(
            optimizer=phases.make_optimizer(optimizer, learning_rate, model),
            jit_compile=jit_compile,
        )
        if regularizer is not None:
            regularizer.attach(network)
        try:
            history = joint.fit(
                train,
                epochs=epochs,
                shuffle=False,  # each source shuffles (or not) itself
                validation_data=validation_data,
                callbacks=list(callbacks or []),
                verbose=verbose,
            )
        finally:
            if regularizer is not None:
                regularizer.detach(network)
    history.source_model = model
    history.target_model = target_model
    return history
