"""Compatibility shims for Keras versions with known bugs, each applied only where it is needed.

`multi_worker_fit`: Keras 3 `Model.fit` under `tf.distribute.MultiWorkerMirroredStrategy`
(keras-team/keras#20585, tensorflow/tensorflow#72388). Two bugs in
`keras/src/backend/tensorflow/trainer.py` stop it before the first step (checked up to 3.15):

1. `TensorFlowTrainer._maybe_symbolic_build` takes the first batch of the distributed dataset (a
   `(PerReplica, PerReplica)` tuple) and passes the whole tuple to
   `strategy.reduce("MEAN", batch, axis=None)`. `CollectiveAllReduceExtended._reduce_to` hands it
   to the cross-device ops, which only accept one `DistributedValues` or tensor, and fail with
   "Attempt to convert a value (PerReplica...) to a Tensor" (`cross_device_ops.py`,
   `_make_tensor_into_per_replica`). It only needs the batch's shapes and dtypes for
   `_symbolic_build`, and skips itself when the model was not created under a strategy.
2. `reduce_per_replica(..., reduction="auto")` turns "auto" into "mean" and, in multi-worker
   mode, calls `strategy.reduce("MEAN", v, axis=0)` on each logged value: the loss and metric
   results are scalars, which have no axis 0, so tracing the train function fails.

The shim builds the model's remaining state (compiled loss and metrics, optimizer) itself, in the
strategy's scope, from one local batch, exactly as `_symbolic_build` would, and hides the model's
strategy for the duration of `fit` so `_maybe_symbolic_build` has nothing to do (`fit` runs inside
`strategy.scope()`, where `Model.distribute_strategy` still resolves to the same strategy). For 2,
the public `Model.distribute_reduction_method` cannot help: Keras 3.15 never reads it
(`_make_function` always passes "auto"). Instead the train and test steps return each logged value
with a leading axis of 1, so the cross-worker `reduce("MEAN", v, axis=0)` averages the workers'
values and drops that axis again. The values are identical on every worker anyway (metric
variables are `aggregation="sum"` mirrored variables, whose updates are all-reduced), so the
logs are exactly the global loss and metrics. Everything is restored when `fit` returns.
"""

from __future__ import annotations

import contextlib

import keras
import tensorflow as tf

_KERAS_VERSION = tuple(int(part) for part in keras.__version__.split(".")[:2])
# Keras versions `multi_worker_fit` was checked against; on a newer one, rerun
# tests/test_distribute.py::test_multi_worker_two_processes, then drop the shim or raise the bound.
MULTI_WORKER_SHIM_VERSIONS = ((3, 0), (3, 15))


def needs_multi_worker_shim(model: keras.Model, strategy: tf.distribute.Strategy | None) -> bool:
    """Whether `fit` under `strategy` needs `multi_worker_fit`'s workaround."""
    return (
        MULTI_WORKER_SHIM_VERSIONS[0] <= _KERAS_VERSION <= MULTI_WORKER_SHIM_VERSIONS[1]
        and keras.backend.backend() == "tensorflow"
        and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
        # The private hooks the shim relies on; without them, leave `fit` to Keras.
        and hasattr(model, "_symbolic_build")
        and hasattr(model, "_distribute_strategy")
    )


@contextlib.contextmanager
def multi_worker_fit(model: keras.Model, strategy: tf.distribute.Strategy | None, train_data):
    """Context for `model.fit(train_data, ...)` under MultiWorkerMirroredStrategy (see above).

    Enter it inside `strategy.scope()`, after `model.compile`. A no-op for other strategies.
    """
    if not needs_multi_worker_shim(model, strategy):
        yield
        return
    with strategy.scope():
        # One local (not distributed) batch: only its shapes and dtypes are used.
        batch = next(iter(train_data.take(1)))
        model._symbolic_build(data_batch=batch)
    saved_strategy = model._distribute_strategy
    model._distribute_strategy = None
    for name in ("train_step", "test_step"):
        setattr(model, name, _with_leading_axis(getattr(model, name)))
    try:
        yield
    finally:
        model._distribute_strategy = saved_strategy
        for name in ("train_step", "test_step"):
            # Drops the instance attribute, exposing the class's step again.
            delattr(model, name)


def _with_leading_axis(step):
    def wrapped(data):
        return tf.nest.map_structure(
            lambda value: tf.expand_dims(tf.convert_to_tensor(value), 0), step(data)
        )

    return wrapped
