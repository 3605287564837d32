"""Deep CORAL (Sun & Saenko, ECCV 2016 workshops): match the features' second-order statistics.

ℓ_CORAL = ‖C_S − C_T‖²_F / (4 d²), with C the covariance of a batch's d-dimensional features
over its samples (unbiased, divided by n − 1), added to the task loss with weight `trade_off`.
Wide features (a flattened conv map, d in the thousands) never form the d × d covariances: with
X_S, X_T the centred batches, ‖C_S − C_T‖²_F = ‖X_S X_Sᵀ‖²_F / (n_S − 1)² + ‖X_T X_Tᵀ‖²_F /
(n_T − 1)² − 2 ‖X_S X_Tᵀ‖²_F / ((n_S − 1)(n_T − 1)), batch-by-batch Gram matrices, O(n² d) work
instead of O(n d²).
"""

from __future__ import annotations

import keras

from keras_transfer.adaptation.base import DomainAdaptation


def covariance(features):
    """Covariance of `(n, d)` features over the samples: centred, divided by n - 1."""
    features = keras.ops.cast(features, "float32")
    n = keras.ops.cast(keras.ops.shape(features)[0], "float32")
    centred = features - keras.ops.mean(features, axis=0, keepdims=True)
    return keras.ops.matmul(keras.ops.transpose(centred), centred) / (n - 1.0)


# Above this width the loss goes through the batch Gram matrices (same value, far less work).
_GRAM_ABOVE = 512


def _centred(features):
    features = keras.ops.cast(features, "float32")
    return features - keras.ops.mean(features, axis=0, keepdims=True)


def _gram_distance(source, target):
    """‖C_S − C_T‖²_F from the n × n Gram matrices of the centred batches (no d × d matrix)."""
    xs, xt = _centred(source), _centred(target)
    ns = keras.ops.cast(keras.ops.shape(xs)[0], "float32") - 1.0
    nt = keras.ops.cast(keras.ops.shape(xt)[0], "float32") - 1.0

    def squared_norm(a, b):
        return keras.ops.sum(keras.ops.square(keras.ops.matmul(a, keras.ops.transpose(b))))

    return (
        squared_norm(xs, xs) / (ns * ns)
        + squared_norm(xt, xt) / (nt * nt)
        - 2.0 * squared_norm(xs, xt) / (ns * nt)
    )


def coral_loss(source, target):
    """‖C_S − C_T‖²_F / (4 d²) between two `(n, d)` feature batches (n >= 2 each).

    For d above 512 it is computed through the batches' Gram matrices, the same value up to
    float32 rounding, without forming the two d × d covariances.

    Example:
    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(50, 3)).astype("float32")
    >>> float(coral_loss(x, x + 5.0)) < 1e-10  # a shift leaves the covariance unchanged
    True
    """
    source, target = keras.ops.convert_to_tensor(source), keras.ops.convert_to_tensor(target)
    d = source.shape[-1]
    if d > _GRAM_ABOVE:
        return keras.ops.maximum(_gram_distance(source, target), 0.0) / (4.0 * d * d)
    difference = covariance(source) - covariance(target)
    return keras.ops.sum(keras.ops.square(difference)) / (4.0 * d * d)


@keras.saving.register_keras_serializable(package="keras_transfer")
class DeepCORAL(DomainAdaptation):
    """Trains `classifier` on the source while aligning the covariances of the two domains.

    Each replica aligns the features of its own share of the batch. Logs: `loss`, `task_loss`,
    `accuracy` (source), `coral_loss` (unweighted).

    Args:
        classifier: A Functional classifier with a softmax head; trained in place.
        features_layer: The layer whose output is aligned; None for a kt classifier's
            `"pooling"` layer.
        trade_off: Weight of the CORAL loss, >= 0.
        **kwargs: `keras.Model` arguments (`name`).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> coral = kt.adaptation.DeepCORAL(model, trade_off=1.0)
    >>> coral.compile(optimizer="adam")
    >>> data = kt.adaptation.pair_domains(
    ...     (np.zeros((8, 32, 32, 3)), np.arange(8) % 2), np.ones((8, 32, 32, 3)), batch_size=4)
    >>> sorted(coral.fit(data, epochs=1, verbose=0).history)
    ['accuracy', 'coral_loss', 'loss', 'task_loss']
    """

    def __init__(
        self,
        classifier: keras.Model,
        features_layer: str | None = None,
        *,
        trade_off: float = 1.0,
        **kwargs,
    ):
        super().__init__(classifier, features_layer, trade_off=trade_off, **kwargs)
        self.coral_tracker = keras.metrics.Mean(name="coral_loss")

    @property
    def adaptation_metrics(self):
        return [self.coral_tracker]

    def adaptation_loss(self, features, num_source):
        loss = coral_loss(features[:num_source], features[num_source:])
        self.coral_tracker.update_state(loss)
        return self.trade_off * loss
