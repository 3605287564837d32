"""MMD adaptation (Long et al., ICML 2015, DAN): shrink a multi-kernel MMD² between the domains.

MMD² is the unbiased estimate over one batch pair with the kernel k = (1/K) Σ_k k_σk, the mean of
K Gaussian kernels exp(−‖a − b‖² / (2 σ_k²)) (DAN's convex combination with equal weights),
σ_k = m_k × the median pairwise distance of the batch's features (held fixed in the gradient),
m_k = 2^k for k in −3..1 by default. Added to the task loss with weight `trade_off`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from keras_transfer._validate import is_number
from keras_transfer.adaptation.base import DomainAdaptation

MULTIPLIERS = (0.125, 0.25, 0.5, 1.0, 2.0)


def _median_distance(squared):
    """Median of the off-diagonal pairwise distances (the diagonal's n zeros sort first)."""
    n = keras.ops.shape(squared)[0]
    ordered = keras.ops.sort(keras.ops.reshape(squared, (-1,)))
    middle = n + (n * n - n) // 2
    return keras.ops.sqrt(ordered[keras.ops.minimum(middle, n * n - 1)])


def mmd_loss(source, target, multipliers: Sequence[float] = MULTIPLIERS):
    """Unbiased multi-kernel Gaussian MMD² between `(m, d)` and `(n, d)` features (m, n >= 2).

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> a, b = rng.normal(size=(2, 200, 4)).astype("float32")
    >>> abs(float(mmd_loss(a, b))) < 0.02, float(mmd_loss(a, b + 3.0)) > 0.3
    (True, True)
    """
    source = keras.ops.cast(keras.ops.convert_to_tensor(source), "float32")
    target = keras.ops.cast(keras.ops.convert_to_tensor(target), "float32")
    m, n = keras.ops.shape(source)[0], keras.ops.shape(target)[0]
    joint = keras.ops.concatenate([source, target], axis=0)
    norms = keras.ops.sum(keras.ops.square(joint), axis=1)
    squared = (
        norms[:, None] + norms[None, :] - 2.0 * keras.ops.matmul(joint, keras.ops.transpose(joint))
    )
    total = m + n
    off_diagonal = 1.0 - keras.ops.eye(total, dtype="float32")
    squared = keras.ops.maximum(squared, 0.0) * off_diagonal
    sigma = keras.ops.stop_gradient(_median_distance(squared))
    sigma2 = keras.ops.maximum(keras.ops.square(sigma), 1e-12)
    kernel = keras.ops.mean(
        keras.ops.stack(
            [keras.ops.exp(-squared / (2.0 * (factor * factor) * sigma2)) for factor in multipliers]
        ),
        axis=0,
    )
    kernel = kernel * off_diagonal  # the unbiased estimate leaves out k(x_i, x_i)
    m_f, n_f = keras.ops.cast(m, "float32"), keras.ops.cast(n, "float32")
    ss = keras.ops.sum(kernel[:m, :m]) / (m_f * (m_f - 1.0))
    tt = keras.ops.sum(kernel[m:, m:]) / (n_f * (n_f - 1.0))
    st = keras.ops.sum(kernel[:m, m:]) / (m_f * n_f)
    return ss + tt - 2.0 * st


def _check_multipliers(multipliers) -> tuple[float, ...]:
    try:
        values = tuple(multipliers)
    except TypeError:
        values = None
    if not values or not all(is_number(v) and math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            "`kernel_multipliers` must be a non-empty sequence of positive numbers: each "
            "Gaussian kernel's bandwidth as a multiple of the median pairwise distance. "
            f"Received: kernel_multipliers={multipliers!r}. E.g. {MULTIPLIERS}."
        )
    return tuple(float(v) for v in values)


@keras.saving.register_keras_serializable(package="keras_transfer")
class MMD(DomainAdaptation):
    """Trains `classifier` on the source while shrinking the features' MMD² to the target.

    Each replica compares the features of its own share of the batch. Logs: `loss`,
    `task_loss`, `accuracy` (source), `mmd_loss` (unweighted).

    Args:
        classifier: A Functional classifier with a softmax head; trained in place.
        features_layer: The layer whose output is aligned; None for a kt classifier's
            `"pooling"` layer.
        trade_off: Weight of the MMD² loss, >= 0.
        kernel_multipliers: Bandwidths of the Gaussian kernels, as multiples of the batch's
            median pairwise feature distance.
        **kwargs: `keras.Model` arguments (`name`).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> mmd = kt.adaptation.MMD(model)
    >>> mmd.compile(optimizer="adam")
    >>> data = kt.adaptation.pair_domains(
    ...     (np.zeros((8, 32, 32, 3)), np.arange(8) % 2), np.ones((8, 32, 32, 3)), batch_size=4)
    >>> sorted(mmd.fit(data, epochs=1, verbose=0).history)
    ['accuracy', 'loss', 'mmd_loss', 'task_loss']
    """

    def __init__(
        self,
        classifier: keras.Model,
        features_layer: str | None = None,
        *,
        trade_off: float = 1.0,
        kernel_multipliers: Sequence[float] = MULTIPLIERS,
        **kwargs,
    ):
        multipliers = _check_multipliers(kernel_multipliers)
        super().__init__(classifier, features_layer, trade_off=trade_off, **kwargs)
        self.kernel_multipliers = multipliers
        self.mmd_tracker = keras.metrics.Mean(name="mmd_loss")

    @property
    def adaptation_metrics(self):
        return [self.mmd_tracker]

    def adaptation_loss(self, features, num_source):
        loss = mmd_loss(features[:num_source], features[num_source:], self.kernel_multipliers)
        self.mmd_tracker.update_state(loss)
        return self.trade_off * loss

    def get_config(self):
        return {**super().get_config(), "kernel_multipliers": list(self.kernel_multipliers)}
