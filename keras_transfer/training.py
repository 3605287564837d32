"""Two-phase fine-tuning: train the head, then the top of the backbone, as plain `model.fit` calls.

`fine_tune` is the two-phase recipe over `kt.fit_phases`: a head phase on the frozen backbone, then
the top of the backbone at a lower, warmed-up, cosine-decayed learning rate. Everything that
creates variables runs in the model's `tf.distribute` strategy scope.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from keras_transfer import caching, heads
from keras_transfer.phases import (  # noqa: F401 - the names training exported before phases
    AUTO,
    MIXED_PRECISION,
    CacheOptions,
    CheckpointOptions,
    Phase,
    _epochs,
    _positive_number,
    check_mixed_precision,
    fit_phases,
    learning_rate_schedule,
    resolve_strategy,
    steps_per_epoch,
    unfreeze_kwargs,
)


def _rate(name: str, value):
    return value if value == AUTO else _positive_number(name, value)


def head_kind(model: keras.Model) -> str:
    """Returns `"softmax"`, `"sigmoid"` or `"linear"`: the activation of the output layer."""
    return heads.head_of(model).activation


def default_loss_and_metrics(model: keras.Model, label_spec: tf.TensorSpec | None = None):
    """Loss and metrics that follow the head (see `kt.heads.default_loss_and_metrics`)."""
    return heads.default_loss_and_metrics(model, label_spec)


def finetune_schedule(
    learning_rate: float, total_steps: int | None, warmup_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to `learning_rate`, then cosine decay to 0 over the remaining steps.

    Falls back to a constant rate when the number of steps is unknown.
    """
    return learning_rate_schedule(learning_rate, total_steps, warmup_steps, "cosine")


def fine_tune(
    model: keras.Model,
    train_data,
    validation_data=None,
    *,
    head_epochs: int = 30,
    finetune_epochs: int = 30,
    unfreeze: int | float | str | Mapping = 0.25,
    head_learning_rate: float | str = 1e-3,
    finetune_learning_rate: float | str = 1e-4,
    warmup_epochs: float = 1.0,
    optimizer: str | keras.optimizers.Optimizer = "adam",
    regularizer=None,
    loss=None,
    metrics=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    class_weight: Mapping[int, float] | None = None,
    train_batchnorm: bool = False,
    layer_lr_decay: float | None = None,
    batch_size: int = 32,
    strategy: tf.distribute.Strategy | None = None,
    verbose: str | int = "auto",
    cache: bool | str = "auto",
    cache_budget_bytes: int | None = caching.DEFAULT_CACHE_BUDGET_BYTES,
    cache_dir: str | None = None,
    augment_views: int | None = None,
    mixed_precision: str | None = None,
    jit_compile: bool | str = "auto",
    checkpoint_dir: str | None = None,
    checkpoint_every: int = 100,
    checkpoint_seed: int = 0,
) -> keras.callbacks.History:
    """Fine-tunes `model` in two phases: the head on a frozen backbone, then the backbone's top.

    Phase 1 freezes the backbone and fits the head at `head_learning_rate`. Phase 2 unfreezes the
    top of the backbone (BatchNorm stays frozen), recompiles with a warm-up then cosine decay to
    zero from `finetune_learning_rate`, and fits again with epochs numbered after phase 1.

    Args:
        model: A model from `kt.build_classifier` / `kt.build_regressor`.
        train_data: A `tf.data.Dataset` of `(images, labels)` batches (see `kt.data`), or an
            `(x, y)` tuple of arrays (reshuffled every epoch).
        validation_data: Same forms as `train_data`, or None.
        head_epochs: Epochs of phase 1 (0 skips it). The default fits the head to convergence
            even on a few hundred images, so phase 1 alone matches a linear probe and phase 2
            starts from a good head instead of wrecking features with large early gradients.
        finetune_epochs: Epochs of phase 2 (0 skips it).
        unfreeze: What trains in phase 2: an int (top blocks), a float (fraction of layers), a
            layer name, `"all"`, or a dict of `kt.unfreeze` arguments. The default, the top
            quarter of the weighted layers, is MobileNetV2's last resolution stage (blocks 13-16
            and Conv_1) and works for backbones with few blocks too; see docs/benchmarks.md.
        head_learning_rate: Learning rate of phase 1, or `"auto"` (`kt.find_learning_rate`'s
            suggestion, found when the phase begins).
        finetune_learning_rate: Peak learning rate of phase 2, or `"auto"`.
        warmup_epochs: Epochs of linear warm-up at the start of phase 2.
        optimizer: Name of a Keras optimizer (`"adam"`, `"adamw"`, `"sgd"`, ...) or an
            optimizer instance (cloned from its config for each phase).
        regularizer: A penalty attached in both phases and removed afterwards (e.g.
            `kt.regularizers.L2SP()`; see `kt.Phase`).
        loss: Loss; by default follows the head (sparse/categorical cross-entropy for softmax,
            binary cross-entropy for sigmoid, mean squared error for linear).
        metrics: Metrics; by default follow the head (accuracy, AUC, MAE).
        callbacks: Keras callbacks, used in both phases.
        class_weight: Optional `{class_id: weight}` for imbalanced data.
        train_batchnorm: Train BatchNorm layers in phase 2 (see `kt.unfreeze`).
        layer_lr_decay: None, or a factor in (0, 1]: in phase 2 each backbone block below the
            top one trains at `layer_lr_decay**k` times the rate, k counted from the top at
            `kt.unfreeze_points` (discriminative learning rates; see `kt.Phase`).
        batch_size: Batch size per replica when data comes as arrays (the global batch is
            `batch_size * strategy.num_replicas_in_sync`); datasets are used as batched.
        strategy: A `tf.distribute.Strategy`; defaults to the one the model was built under.
        verbose: Passed to `fit`.
        cache: Train on cached activations of the frozen part (`kt.caching`): `"auto"` does
            so whenever a phase allows it and logs why when it does not, True insists (raises
            when it cannot), False always runs the full model. A cached phase sees the same
            batches in the same order as a plain one, reshuffling sources included, and ends
            with the same weights to float precision; a pipeline with random ops of its own
            (augmentation in tf.data) trains plainly.
        cache_budget_bytes: Bytes of cached activations kept in memory; the rest spills to
            `tf.data` files in `cache_dir`.
        cache_dir: Folder for caches beyond the budget; a temporary folder when None. Files are
            deleted when `fine_tune` returns.
        augment_views: With an augmentation layer before the backbone, cache this many
            augmented views per training image (one drawn per image and epoch); None runs the
            phases plainly instead.
        mixed_precision: None (train as built), or the policy the model must have been built
            with, `"mixed_float16"` (loss scaling added) or `"mixed_bfloat16"`; see the
            builders' `dtype=`.
        jit_compile: XLA-compile the training steps (and the caching pass when True).
        checkpoint_dir: Folder for a resumable run (`kt.checkpointing`): a checkpoint every
            `checkpoint_every` optimizer steps and at each epoch end; calling again with the
            same folder resumes at the next batch of the phase and epoch it stopped in. Each
            epoch's order is then `train_data` shuffled by `(checkpoint_seed, epoch)`, and
            caching is off.
        checkpoint_every: Optimizer steps between checkpoints.
        checkpoint_seed: Seed of the per-epoch data order when checkpointing.

    Returns:
        A `keras.callbacks.History` whose `history` holds both phases' logs end to end, with
        `epoch` numbered across phases and `phases` mapping `"head"`/`"finetune"` to their
        `(first_epoch, end_epoch)` (None for a skipped phase). `cached` tells which path ran:
        `{"head": True, "finetune": "block_15_add"}` (the cut the activations were taken at;
        False for a plain phase, None for a skipped one).

    Raises:
        ValueError: for zero epochs in both phases, a learning rate <= 0, a strategy mismatch, or
            a bad `unfreeze` (see `kt.unfreeze`), before any training starts.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    >>> history = kt.fine_tune(model, (x, np.arange(8) % 2), head_epochs=1, finetune_epochs=1,
    ...                        batch_size=4, verbose=0)
    >>> history.phases
    {'head': (0, 1), 'finetune': (1, 2)}
    """
    head_epochs = _epochs("head_epochs", head_epochs)
    finetune_epochs = _epochs("finetune_epochs", finetune_epochs)
    if head_epochs + finetune_epochs == 0:
        raise ValueError(
            "Nothing to train: head_epochs=0 and finetune_epochs=0. Set at least one of them, "
            "e.g. head_epochs=5, finetune_epochs=5."
        )
    phases = [
        Phase(
            "head",
            head_epochs,
            learning_rate=_rate("head_learning_rate", head_learning_rate),
            optimizer=optimizer,
            regularizer=regularizer,
        ),
        Phase(
            "finetune",
            finetune_epochs,
            trainable=unfreeze,
            learning_rate=_rate("finetune_learning_rate", finetune_learning_rate),
            optimizer=optimizer,
            warmup_epochs=warmup_epochs,
            schedule="cosine",
            train_batchnorm=train_batchnorm,
            regularizer=regularizer,
            layer_lr_decay=layer_lr_decay,
        ),
    ]
    unfreeze_kwargs(unfreeze)
    history = fit_phases(
        model,
        phases,
        train_data,
        validation_data,
        loss=loss,
        metrics=metrics,
        callbacks=callbacks,
        class_weight=class_weight,
        batch_size=batch_size,
        strategy=strategy,
        cache=CacheOptions(cache, cache_budget_bytes, cache_dir, augment_views),
        checkpoint=None
        if checkpoint_dir is None
        else CheckpointOptions(checkpoint_dir, checkpoint_every, checkpoint_seed),
        mixed_precision=mixed_precision,
        jit_compile=jit_compile,
        verbose=verbose,
    )
    # The two-phase recipe's own vocabulary: the head phase cached is True (at "pooling").
    if history.cached["head"]:
        history.cached["head"] = True
    return history
