"""Two-phase fine-tuning as plain `model.fit` calls: train the head, then the top of the backbone.

`fine_tune` is a short orchestrator: freeze, compile, fit; unfreeze, recompile at a lower,
warmed-up, cosine-decayed learning rate, fit again with epochs numbered after phase 1. Everything
that creates variables runs in the model's `tf.distribute` strategy scope.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from keras_transfer import freezing
from keras_transfer.builders import OUTPUT_NAME

logger = logging.getLogger(__name__)


def head_kind(model: keras.Model) -> str:
    """Returns `"softmax"`, `"sigmoid"` or `"linear"`: the activation of the output layer."""
    try:
        layer = model.get_layer(OUTPUT_NAME)
    except ValueError:
        layer = model.layers[-1]
    activation = getattr(layer, "activation", None)
    name = getattr(activation, "__name__", str(activation))
    return name if name in ("softmax", "sigmoid") else "linear"


def default_loss_and_metrics(model: keras.Model, label_spec: tf.TensorSpec | None = None):
    """Loss and metrics that follow the head: softmax, sigmoid (multi-label) or linear."""
    kind = head_kind(model)
    if kind == "softmax":
        one_hot = (
            label_spec is not None
            and label_spec.shape.rank
            and label_spec.shape[-1] == (model.output_shape[-1])
        )
        if one_hot and label_spec.shape.rank >= 2:
            return "categorical_crossentropy", ["categorical_accuracy"]
        return "sparse_categorical_crossentropy", ["sparse_categorical_accuracy"]
    if kind == "sigmoid":
        return "binary_crossentropy", [
            keras.metrics.BinaryAccuracy(name="binary_accuracy"),
            keras.metrics.AUC(multi_label=True, name="auc"),
        ]
    return "mean_squared_error", [keras.metrics.MeanAbsoluteError(name="mae")]


def _check_learning_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}. "
            f"Typical values: 1e-3 for the head, 1e-4 to 1e-5 for fine-tuning."
        )
    if value <= 0:
        raise ValueError(
            f"`{name}` must be > 0. Received: {name}={value!r}. "
            "Typical values: 1e-3 for the head, 1e-4 to 1e-5 for fine-tuning."
        )
    return float(value)


def _check_epochs(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"`{name}` must be an int >= 0. Received: {name}={value!r}")
    return value


def _unfreeze_kwargs(spec) -> dict:
    """Maps `unfreeze=` (int blocks, float fraction, str layer name or dict) onto `kt.unfreeze`."""
    if isinstance(spec, Mapping):
        return dict(spec)
    if isinstance(spec, bool):
        raise TypeError(f"`unfreeze` must be an int, float, str or dict. Received: {spec!r}")
    if isinstance(spec, int):
        return {"blocks": spec}
    if isinstance(spec, float):
        return {"fraction": spec}
    if isinstance(spec, str):
        return {"fraction": 1.0} if spec == "all" else {"from_layer": spec}
    raise TypeError(
        "`unfreeze` must be an int (top blocks), a float (fraction), a layer name, 'all' or a "
        f"dict of kt.unfreeze arguments. Received: unfreeze={spec!r}"
    )


def _as_dataset(data, batch_size: int):
    if isinstance(data, tf.data.Dataset) or data is None:
        return data
    if isinstance(data, tuple) and len(data) == 2:
        from keras_transfer.data import from_arrays

        return from_arrays(data[0], data[1], batch_size=batch_size, shuffle=False)
    raise TypeError(
        "Data must be a tf.data.Dataset of (images, labels) batches (see kt.data) or an "
        f"(x, y) tuple of arrays. Received: {type(data).__name__}"
    )


def steps_per_epoch(dataset: tf.data.Dataset) -> int | None:
    """Number of batches in `dataset`, or None when tf.data cannot tell without iterating."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality > 0 else None


def finetune_schedule(
    learning_rate: float, total_steps: int | None, warmup_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to 0 over the remaining steps.

    Falls back to a constant rate when the number of steps is unknown.
    """
    if not total_steps:
        return learning_rate
    warmup_steps = min(warmup_steps, total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def _merge_histories(model, histories: Sequence[tuple[str, keras.callbacks.History]]):
    merged = keras.callbacks.History()
    merged.set_model(model)
    merged.history, merged.epoch, merged.phases = {}, [], {}
    keys = list(dict.fromkeys(k for _, h in histories for k in h.history))
    for phase, history in histories:
        n = len(history.epoch)
        merged.phases[phase] = (history.epoch[0], history.epoch[-1] + 1) if n else None
        merged.epoch.extend(history.epoch)
        for key in keys:
            merged.history.setdefault(key, []).extend(history.history.get(key, [math.nan] * n))
        merged.params = history.params
    return merged


def resolve_strategy(model: keras.Model, strategy: tf.distribute.Strategy | None):
    """The strategy to train `model` under; refuses one the model's variables don't belong to."""
    built_in = model.distribute_strategy
    if strategy is None:
        return built_in
    if strategy is not built_in:
        raise ValueError(
            f"`model` was built under {type(built_in).__name__} but strategy="
            f"{type(strategy).__name__} was passed: its variables are not distributed by that "
            "strategy. Build the model inside `with strategy.scope():` and pass the same strategy."
        )
    return strategy


def fine_tune(
    model: keras.Model,
    train_data,
    validation_data=None,
    *,
    head_epochs: int = 5,
    finetune_epochs: int = 5,
    unfreeze: int | float | str | Mapping = 2,
    head_learning_rate: float = 1e-3,
    finetune_learning_rate: float = 1e-4,
    warmup_epochs: float = 1.0,
    optimizer: str = "adam",
    loss=None,
    metrics=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    class_weight: Mapping[int, float] | None = None,
    train_batchnorm: bool = False,
    batch_size: int = 32,
    strategy: tf.distribute.Strategy | None = None,
    verbose: str | int = "auto",
) -> keras.callbacks.History:
    """Fine-tunes `model` in two phases: the head on a frozen backbone, then the backbone's top.

    Phase 1 freezes the backbone and fits the head at `head_learning_rate`. Phase 2 unfreezes the
    top of the backbone (BatchNorm stays frozen), recompiles with a warm-up then cosine decay to
    zero from `finetune_learning_rate`, and fits again with epochs numbered after phase 1.

    Args:
        model: A model from `kt.build_classifier` / `kt.build_regressor`.
        train_data: A `tf.data.Dataset` of `(images, labels)` batches (see `kt.data`), or an
            `(x, y)` tuple of arrays.
        validation_data: Same forms as `train_data`, or None.
        head_epochs: Epochs of phase 1 (0 skips it).
        finetune_epochs: Epochs of phase 2 (0 skips it).
        unfreeze: What trains in phase 2: an int (top blocks), a float (fraction of layers), a
            layer name, `"all"`, or a dict of `kt.unfreeze` arguments.
        head_learning_rate: Learning rate of phase 1.
        finetune_learning_rate: Peak learning rate of phase 2.
        warmup_epochs: Epochs of linear warm-up at the start of phase 2.
        optimizer: Name of a Keras optimizer (`"adam"`, `"adamw"`, `"sgd"`, ...).
        loss: Loss; by default follows the head (sparse/categorical cross-entropy for softmax,
            binary cross-entropy for sigmoid, mean squared error for linear).
        metrics: Metrics; by default follow the head (accuracy, AUC, MAE).
        callbacks: Keras callbacks, used in both phases.
        class_weight: Optional `{class_id: weight}` for imbalanced data.
        train_batchnorm: Train BatchNorm gamma/beta in phase 2 (statistics stay fixed).
        batch_size: Batch size when data comes as arrays.
        strategy: A `tf.distribute.Strategy`; defaults to the one the model was built under.
        verbose: Passed to `fit`.

    Returns:
        A `keras.callbacks.History` whose `history` holds both phases' logs end to end, with
        `epoch` numbered across phases and `phases` mapping `"head"`/`"finetune"` to their
        `(first_epoch, end_epoch)` (None for a skipped phase).

    Raises:
        ValueError: for zero epochs in both phases, a learning rate <= 0, a strategy mismatch, or
            a bad `unfreeze` (see `kt.unfreeze`), before any training starts.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    >>> history = kt.fine_tune(model, (x, np.arange(8) % 2), head_epochs=1, finetune_epochs=1,
    ...                        verbose=0)
    >>> history.phases
    {'head': (0, 1), 'finetune': (1, 2)}
    """
    head_epochs = _check_epochs("head_epochs", head_epochs)
    finetune_epochs = _check_epochs("finetune_epochs", finetune_epochs)
    if head_epochs + finetune_epochs == 0:
        raise ValueError(
            "Nothing to train: head_epochs=0 and finetune_epochs=0. Set at least one of them, "
            "e.g. head_epochs=5, finetune_epochs=5."
        )
    head_learning_rate = _check_learning_rate("head_learning_rate", head_learning_rate)
    finetune_learning_rate = _check_learning_rate("finetune_learning_rate", finetune_learning_rate)
    unfreeze_kwargs = _unfreeze_kwargs(unfreeze)
    strategy = resolve_strategy(model, strategy)
    train_data = _as_dataset(train_data, batch_size)
    validation_data = _as_dataset(validation_data, batch_size)
    if loss is None:
        loss, default_metrics = default_loss_and_metrics(model, train_data.element_spec[1])
        metrics = default_metrics if metrics is None else metrics
    # Validate the unfreeze request on the model before any epoch runs; phase 2 redoes it.
    if finetune_epochs:
        freezing.plan_unfreeze(model, **unfreeze_kwargs)

    fit_kwargs = dict(
        validation_data=validation_data,
        callbacks=list(callbacks or []),
        class_weight=class_weight,
        verbose=verbose,
    )
    histories = []
    if head_epochs:
        freezing.freeze_backbone(model)
        with strategy.scope():
            model.compile(
                optimizer=keras.optimizers.get(
                    {"class_name": optimizer, "config": {"learning_rate": head_learning_rate}}
                ),
                loss=loss,
                metrics=_fresh(metrics),
            )
        logger.info("Phase 1/2: training the head for %d epochs.", head_epochs)
        histories.append(("head", model.fit(train_data, epochs=head_epochs, **fit_kwargs)))
    if finetune_epochs:
        freezing.unfreeze(model, train_batchnorm=train_batchnorm, **unfreeze_kwargs)
        steps = steps_per_epoch(train_data)
        schedule = finetune_schedule(
            finetune_learning_rate,
            steps * finetune_epochs if steps else None,
            int(round(warmup_epochs * steps)) if steps else 0,
        )
        with strategy.scope():
            model.compile(
                optimizer=keras.optimizers.get(
                    {"class_name": optimizer, "config": {"learning_rate": schedule}}
                ),
                loss=loss,
                metrics=_fresh(metrics),
            )
        logger.info("Phase 2/2: fine-tuning %s for %d epochs.", unfreeze_kwargs, finetune_epochs)
        histories.append(
            (
                "finetune",
                model.fit(
                    train_data,
                    initial_epoch=head_epochs,
                    epochs=head_epochs + finetune_epochs,
                    **fit_kwargs,
                ),
            )
        )
    merged = _merge_histories(model, histories)
    merged.phases.setdefault("head", None)
    merged.phases.setdefault("finetune", None)
    return merged


def _fresh(metrics):
    """Metric objects carry state: give each compile its own copies."""
    if metrics is None:
        return None
    return [
        m.__class__.from_config(m.get_config()) if isinstance(m, keras.metrics.Metric) else m
        for m in metrics
    ]
