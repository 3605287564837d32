"""`kt.adapt`: check everything, wrap the classifier in a method, fit on paired batches."""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Sequence

import keras
import tensorflow as tf

from keras_transfer import phases
from keras_transfer._validate import check_int, is_number
from keras_transfer.adaptation import data as domain_data
from keras_transfer.adaptation.base import check_trade_off
from keras_transfer.adaptation.coral import DeepCORAL
from keras_transfer.adaptation.dann import DANN, ReversalSchedule
from keras_transfer.adaptation.mmd import MMD

METHODS = {"dann": DANN, "coral": DeepCORAL, "mmd": MMD}


def method_class(method: str) -> type:
    """The model class of `method` (`"dann"`, `"coral"` or `"mmd"`), or a ValueError."""
    key = method.lower() if isinstance(method, str) else method
    if key not in METHODS:
        close = difflib.get_close_matches(str(method).lower(), list(METHODS), n=2, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown adaptation `method` {method!r}.{hint} Expected one of {list(METHODS)}: "
            "'dann' (domain-adversarial), 'coral' (Deep CORAL) or 'mmd' (multi-kernel MMD). "
            f"Received: method={method!r}"
        )
    return METHODS[key]


def _check_options(cls: type, options: dict) -> None:
    accepted = [
        name
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.kind == p.KEYWORD_ONLY and name != "trade_off"
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"Unknown option(s) {unknown} for method {cls.__name__}; it takes {accepted}. "
            f"Received: {', '.join(f'{k}={options[k]!r}' for k in unknown)}"
        )


def _check_learning_rate(learning_rate):
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return learning_rate
    if not is_number(learning_rate) or not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(
            "`learning_rate` must be a positive number or a keras LearningRateSchedule. "
            f"Received: learning_rate={learning_rate!r}. E.g. learning_rate=1e-3."
        )
    return float(learning_rate)


def adapt(
    classifier: keras.Model,
    source,
    target,
    *,
    method: str = "dann",
    features_layer: str | None = None,
    epochs: int = 10,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    trade_off: float = 1.0,
    validation_data=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    strategy: tf.distribute.Strategy | None = None,
    verbose: str | int = "auto",
    optimizer: str | keras.optimizers.Optimizer = "adam",
    seed: int | None = 0,
    **options,
) -> keras.callbacks.History:
    """Adapts `classifier` from a labelled source domain to an unlabelled target domain.

    Wraps the classifier in `kt.adaptation.DANN`, `DeepCORAL` or `MMD` and fits it on batches
    that pair `batch_size` source images with `batch_size` target images; an epoch is one pass
    over the larger domain while the smaller repeats. The task loss is cross-entropy on the
    classifier's logits; the method adds its loss on the features at `features_layer`. The
    classifier is trained in place and gains nothing: afterwards it holds the adapted weights
    and saves, reloads and exports (`kt.export_for_serving`) as before. For DANN a
    `ReversalSchedule` is added unless `callbacks` has one. Everything is checked before the
    first step; on an error the weights are unchanged.

    Args:
        classifier: A Functional classifier with a softmax head, e.g. from
            `kt.build_classifier`, or a user's own model (name its `features_layer`).
        source: `(x, y)` arrays or a `tf.data.Dataset` of `(images, labels)` (batched or not);
            labels are class ids or one-hot rows.
        target: Target images: an array or a dataset; labels, if present, are ignored (with a
            warning).
        method: `"dann"`, `"coral"` or `"mmd"`.
        features_layer: The layer whose output is aligned; None for a kt classifier's
            `"pooling"` layer.
        epochs: Passes over the larger domain.
        batch_size: Images of each domain per step and replica.
        learning_rate: Learning rate (or a `keras.optimizers.schedules` schedule).
        trade_off: Weight of the adaptation loss (CORAL, MMD), or λ's final value (DANN); >= 0.
        validation_data: Labelled data to score on each epoch (e.g. a held-out labelled target
            split): `(x, y)` arrays or a dataset. Logged as `val_loss`, `val_accuracy`.
        callbacks: Keras callbacks, e.g. `kt.adaptation.AnnealedLearningRate()`.
        strategy: A `tf.distribute.Strategy`; defaults to the one the classifier was built
            under (build it inside `strategy.scope()`).
        verbose: Passed to `fit`.
        optimizer: Optimizer name or instance (cloned at `learning_rate`).
        seed: Shuffling seed for array data; None for unseeded.
        **options: The method's own arguments: `domain_units`, `domain_dropout` (DANN),
            `kernel_multipliers` (MMD).

    Returns:
        The `keras.callbacks.History`; `history.model` is the adaptation model (with the DANN
        domain classifier).

    Raises:
        ValueError: For an unknown method (naming close ones), a `features_layer` not in the
            model (listing candidates), a classifier without a softmax head, domains of
            different image sizes or channel counts, an empty target, a domain smaller than one
            batch, `trade_off` < 0 or NaN, or source labels outside the head's range.
        TypeError: For data of the wrong type or unknown `options`.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> x, y = np.zeros((8, 32, 32, 3)), np.arange(8) % 2
    >>> history = kt.adapt(model, (x, y), np.ones((8, 32, 32, 3)), method="coral",
    ...                    epochs=1, batch_size=4, verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'coral_loss', 'loss', 'task_loss']
    """
    cls = method_class(method)
    _check_options(cls, options)
    epochs = check_int("epochs", epochs, minimum=1)
    batch_size = check_int(
        "batch_size",
        batch_size,
        minimum=2,
        hint="Each step needs at least 2 images of each domain (covariances, MMD).",
    )
    learning_rate = _check_learning_rate(learning_rate)
    trade_off = check_trade_off(trade_off)
    if seed is not None:
        seed = check_int("seed", seed, minimum=0)
    strategy = phases.resolve_strategy(classifier, strategy)
    with strategy.scope():
        # Reads the head and features layer and checks the method's options; the classifier's
        # weights are untouched until `fit`.
        model = cls(
            classifier,
            features_layer,
            trade_off=trade_off,
            name=f"{classifier.name}_{cls.__name__.lower()}",
            **options,
        )
    head = model.head
    global_batch = batch_size * strategy.num_replicas_in_sync
    src = domain_data.source_domain(source, head, batch_size=global_batch)
    tgt = domain_data.target_domain(target, batch_size=global_batch)
    image_shape = tuple(model.network.inputs[0].shape[1:])
    replicas = strategy.num_replicas_in_sync
    domain_data.check_compatible(src, tgt, batch_size, image_shape, replicas)
    validation = domain_data.validation_dataset(validation_data, head, global_batch)
    train = domain_data.paired(src, tgt, global_batch, seed)
    callbacks = list(callbacks or [])
    if cls is DANN and not any(isinstance(c, ReversalSchedule) for c in callbacks):
        callbacks.insert(0, ReversalSchedule())
    with strategy.scope():
        model.compile(optimizer=phases.make_optimizer(optimizer, learning_rate, classifier))
        # fit inside the scope too: the optimizer creates its slots on the first step.
        return model.fit(
            train,
            validation_data=validation,
            epochs=epochs,
            callbacks=callbacks,
            verbose=verbose,
            shuffle=False,  # the paired batches are shuffled (arrays) or kept (datasets) already
        )
