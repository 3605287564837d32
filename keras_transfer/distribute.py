"""`tf.distribute` strategies by name, for the CLI (`--strategy`) and scripts.

Build the model inside `with strategy.scope():` and pass the same strategy to `kt.fine_tune`;
global batch sizes scale with `strategy.num_replicas_in_sync`.

Running on several machines: start the same command on every machine with `TF_CONFIG` naming the
cluster and this machine's task, e.g. on worker 0 of two

    TF_CONFIG='{"cluster": {"worker": ["host0:12345", "host1:12345"]},
                "task": {"type": "worker", "index": 0}}' \
        keras-transfer train ... --strategy multi_worker

and `"index": 1` on the other. Every worker must see the same data; worker 0 (the chief) writes the
model.

Keras 3 (checked up to 3.15) cannot `Model.fit` under `"multi_worker"` on its own
(keras-team/keras#20585); `kt.fine_tune` applies a workaround, `keras_transfer._compat`, so call
`fine_tune` rather than `model.fit` there.
"""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(
    name: str | None = "default", *, tpu: str | None = None
) -> tf.distribute.Strategy:
    """Creates a `tf.distribute.Strategy` from its name.

    Args:
        name: `"default"` (or None: the current strategy, one device), `"mirrored"` (all local
            GPUs, or the CPU), `"multi_worker"` (several machines, cluster read from the
            `TF_CONFIG` environment variable) or `"tpu"`.
        tpu: TPU address or name for `"tpu"`; None lets the resolver find the local TPU.

    Returns:
        The strategy; build the model under its `scope()`.

    Raises:
        ValueError: for an unknown name, or `"multi_worker"` without a valid `TF_CONFIG`.

    Example:
    >>> import keras_transfer as kt
    >>> strategy = kt.make_strategy("mirrored")  # doctest: +SKIP
    >>> with strategy.scope():  # doctest: +SKIP
    ...     model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    """
    if name is None or name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name == "multi_worker":
        _check_tf_config()
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    raise ValueError(
        f"Unknown `strategy` {name!r}. Expected one of {STRATEGIES}. Received: strategy={name!r}"
    )


def _check_tf_config() -> None:
    raw = os.environ.get("TF_CONFIG")
    example = (
        'TF_CONFIG=\'{"cluster": {"worker": ["host0:12345", "host1:12345"]}, '
        '"task": {"type": "worker", "index": 0}}\''
    )
    if not raw:
        raise ValueError(
            "strategy='multi_worker' needs the TF_CONFIG environment variable naming the cluster "
            f"and this worker's task, e.g. {example}. Received: TF_CONFIG unset."
        )
    try:
        config = json.loads(raw)
        workers = config["cluster"]["worker"]
        task = config["task"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(
            f"TF_CONFIG is not valid for strategy='multi_worker' ({error}). Expected e.g. "
            f"{example}. Received: TF_CONFIG={raw!r}"
        ) from error
    if not workers or "index" not in task:
        raise ValueError(
            f"TF_CONFIG must list the workers and this task's index, e.g. {example}. "
            f"Received: TF_CONFIG={raw!r}"
        )


def worker_id(strategy: tf.distribute.Strategy | None = None) -> int:
    """This process's index among the workers of `strategy` (0 on a single machine)."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    task_id = getattr(resolver, "task_id", None)
    return int(task_id or 0)


def is_chief(strategy: tf.distribute.Strategy | None = None) -> bool:
    """Whether this process writes models and logs (worker 0, or the only process)."""
    return worker_id(strategy) == 0
