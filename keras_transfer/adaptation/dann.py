"""DANN (Ganin et al., JMLR 2016): a domain classifier behind a gradient-reversal layer.

The domain classifier learns to tell source features from target ones; the reversal layer hands
the feature extractor the negated gradient of that loss, times λ, so the same optimizer step
makes the features harder to tell apart. One optimizer and one tape: the reversal is a layer.
λ follows Ganin et al.'s schedule λ_p = 2 / (1 + exp(-10 p)) - 1 as training progress p goes
from 0 to 1 (`ReversalSchedule`), and the learning rate may follow their annealing
μ_p = μ0 / (1 + 10 p)^0.75 (`AnnealedLearningRate`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras

from keras_transfer._validate import is_int, is_number
from keras_transfer.adaptation.base import DomainAdaptation


def _check_scale(scale) -> float:
    if not is_number(scale) or not math.isfinite(scale) or scale < 0:
        raise ValueError(
            "`scale` (λ, the factor on the reversed gradient) must be a finite number >= 0. "
            f"Received: scale={scale!r}"
        )
    return float(scale)


@keras.saving.register_keras_serializable(package="keras_transfer")
class GradientReversal(keras.layers.Layer):
    """The identity going forward; going backward, the gradient times -λ.

    λ starts at `scale` and lives in a non-trainable variable (`current_scale`) that a schedule
    (`ReversalSchedule`) may change between steps without retracing.

    Args:
        scale: λ, the factor on the reversed gradient; >= 0. Under `ReversalSchedule` it is
            the value λ reaches at the end of training.
        **kwargs: Standard layer arguments (`name`).

    Example:
    >>> import numpy as np, tensorflow as tf
    >>> layer = GradientReversal(scale=0.5)
    >>> x = tf.Variable(np.ones((1, 2), "float32"))
    >>> with tf.GradientTape() as tape:
    ...     y = layer(x)
    >>> tape.gradient(y, x).numpy().tolist()
    [[-0.5, -0.5]]
    """

    def __init__(self, scale: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale = _check_scale(scale)
        self.current_scale = self.add_weight(
            shape=(),
            initializer=keras.initializers.Constant(self.scale),
            trainable=False,
            dtype="float32",
            name="current_scale",
        )

    def call(self, inputs):
        scale = keras.ops.cast(self.current_scale, inputs.dtype)
        stopped = keras.ops.stop_gradient(inputs)
        # Forward: stopped + (-λ) * 0 is `inputs` exactly. Backward: only the second term has
        # a gradient, the upstream one times -λ.
        return stopped + (-scale) * (inputs - stopped)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


def reversal_scale(progress: float, gamma: float = 10.0) -> float:
    """Ganin et al.'s λ_p = 2 / (1 + exp(-γ p)) - 1 at training progress `progress` in [0, 1].

    Example:
    >>> reversal_scale(0.0), round(reversal_scale(1.0), 5)
    (0.0, 0.99991)
    """
    return 2.0 / (1.0 + math.exp(-gamma * float(progress))) - 1.0


def annealed_learning_rate(
    progress: float, initial: float, alpha: float = 10.0, beta: float = 0.75
) -> float:
    """Ganin et al.'s μ_p = μ0 / (1 + α p)^β at training progress `progress` in [0, 1].

    Example:
    >>> annealed_learning_rate(0.0, 0.01), round(annealed_learning_rate(1.0, 0.01), 6)
    (0.01, 0.001656)
    """
    return float(initial) / (1.0 + alpha * float(progress)) ** beta


def _reversal_layers(model: keras.Model) -> list[GradientReversal]:
    found, stack = [], [model]
    while stack:
        layer = stack.pop()
        if isinstance(layer, GradientReversal):
            found.append(layer)
        stack.extend(getattr(layer, "layers", []) or [])
    return found


class _ProgressCallback(keras.callbacks.Callback):
    """Training progress p = (steps done) / (steps in the whole fit), from `fit`'s params."""

    def __init__(self, total_steps: int | None = None):
        super().__init__()
        if total_steps is not None and (not is_int(total_steps) or total_steps < 1):
            raise ValueError(
                f"`total_steps` must be None (read from fit) or a positive int. Received: "
                f"total_steps={total_steps!r}"
            )
        self.total_steps = total_steps
        self._steps = None
        self._epoch = 0

    def on_train_begin(self, logs=None):
        steps = (self.params or {}).get("steps")
        epochs = (self.params or {}).get("epochs")
        self._steps = steps
        self._total = self.total_steps or (steps * epochs if steps and epochs else None)
        if not self._total:
            raise ValueError(
                f"{type(self).__name__} needs the number of training steps, and fit does not "
                "know it (the data's length is unknown). Pass total_steps= (steps per epoch "
                "times epochs), or give fit data of known length."
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def progress(self, batch: int) -> float:
        done = self._epoch * (self._steps or 0) + batch
        return min(done / self._total, 1.0)


class ReversalSchedule(_ProgressCallback):
    """Sets every `GradientReversal` layer's λ to `scale` × (2 / (1 + exp(-γ p)) - 1) each batch.

    p is the fraction of the fit's steps done before the batch: λ is 0 on the first step and
    approaches the layer's `scale` by the end, which keeps the domain classifier's noisy early
    gradients away from the features (Ganin et al., JMLR 2016, §5.2.2).

    Args:
        gamma: γ, how fast λ rises (10 in the paper).
        total_steps: Steps of the whole fit; None reads them from `fit` (epochs × steps).

    Example:
    >>> callback = ReversalSchedule()  # then model.fit(..., callbacks=[callback])
    """

    def __init__(self, gamma: float = 10.0, total_steps: int | None = None):
        super().__init__(total_steps)
        if not is_number(gamma) or not math.isfinite(gamma) or gamma <= 0:
            raise ValueError(f"`gamma` must be a positive number. Received: gamma={gamma!r}")
        self.gamma = float(gamma)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._layers = _reversal_layers(self.model)
        if not self._layers:
            raise ValueError(
                f"ReversalSchedule found no GradientReversal layer in {self.model.name!r}; use "
                "it with kt.adaptation.DANN (kt.adapt adds it for method='dann')."
            )

    def on_train_batch_begin(self, batch, logs=None):
        factor = reversal_scale(self.progress(batch), self.gamma)
        for layer in self._layers:
            layer.current_scale.assign(layer.scale * factor)


class AnnealedLearningRate(_ProgressCallback):
    """Sets the learning rate to μ0 / (1 + α p)^β before each batch (Ganin et al., §5.2.2).

    μ0 is the optimizer's learning rate when training starts (a float, not a schedule).

    Args:
        alpha: α (10 in the paper).
        beta: β (0.75 in the paper).
        total_steps: Steps of the whole fit; None reads them from `fit`.

    Example:
    >>> callback = AnnealedLearningRate()  # kt.adapt(..., callbacks=[callback])
    """

    def __init__(self, alpha: float = 10.0, beta: float = 0.75, total_steps: int | None = None):
        super().__init__(total_steps)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not is_number(value) or not math.isfinite(value) or value < 0:
                raise ValueError(f"`{name}` must be a number >= 0. Received: {name}={value!r}")
        self.alpha, self.beta = float(alpha), float(beta)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        rate = self.model.optimizer.learning_rate
        # A float learning rate is a variable; a schedule's current value is a plain tensor.
        if not hasattr(rate, "assign"):
            raise ValueError(
                "AnnealedLearningRate sets the learning rate itself; compile with a float "
                "learning rate, not a schedule. Received: a learning-rate schedule on "
                f"{type(self.model.optimizer).__name__}."
            )
        self.initial = float(keras.ops.convert_to_numpy(rate))

    def on_train_batch_begin(self, batch, logs=None):
        rate = annealed_learning_rate(self.progress(batch), self.initial, self.alpha, self.beta)
        self.model.optimizer.learning_rate.assign(rate)


def _check_units(domain_units) -> tuple[int, ...]:
    try:
        units = tuple(domain_units)
    except TypeError:
        units = None
    if not units or not all(is_int(u) and u > 0 for u in units):
        raise ValueError(
            "`domain_units` must be a non-empty sequence of positive ints: the widths of the "
            f"domain classifier's hidden layers. Received: domain_units={domain_units!r}. E.g. "
            "(1024, 1024) as in Ganin et al., or (100,) for small digit models."
        )
    return tuple(int(u) for u in units)


@keras.saving.register_keras_serializable(package="keras_transfer")
class DANN(DomainAdaptation):
    """Domain-adversarial training of `classifier` (Ganin et al., JMLR 2016).

    The domain classifier, features -> `GradientReversal` -> ReLU `Dense` layers -> one logit,
    learns source (0) against target (1) with weight 1; the features get its gradient reversed
    and scaled by λ, which reaches `trade_off` under `ReversalSchedule` (constant `trade_off`
    without it). Logs: `loss`, `task_loss`, `accuracy` (source), `domain_loss`,
    `domain_accuracy`.

    Args:
        classifier: A Functional classifier with a softmax head; trained in place.
        features_layer: The layer whose output is made domain-invariant; None for a kt
            classifier's `"pooling"` layer.
        trade_off: λ's final value, >= 0.
        domain_units: Widths of the domain classifier's hidden layers.
        domain_dropout: Dropout rate after each hidden layer of the domain classifier.
        **kwargs: `keras.Model` arguments (`name`).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> dann = kt.adaptation.DANN(model, domain_units=(16,))
    >>> data = kt.adaptation.pair_domains(
    ...     (np.zeros((8, 32, 32, 3)), np.arange(8) % 2), np.ones((8, 32, 32, 3)), batch_size=4)
    >>> dann.compile(optimizer="adam")
    >>> history = dann.fit(data, epochs=1, callbacks=[kt.adaptation.ReversalSchedule()],
    ...                    verbose=0)
    >>> sorted(history.history)
    ['accuracy', 'domain_accuracy', 'domain_loss', 'loss', 'task_loss']
    """

    def __init__(
        self,
        classifier: keras.Model,
        features_layer: str | None = None,
        *,
        trade_off: float = 1.0,
        domain_units: Sequence[int] = (1024, 1024),
        domain_dropout: float = 0.0,
        **kwargs,
    ):
        units = _check_units(domain_units)
        if not is_number(domain_dropout) or not 0.0 <= domain_dropout < 1.0:
            raise ValueError(
                f"`domain_dropout` must be in [0, 1). Received: domain_dropout={domain_dropout!r}"
            )
        super().__init__(classifier, features_layer, trade_off=trade_off, **kwargs)
        self.domain_units = units
        self.domain_dropout = float(domain_dropout)
        layers = [
            keras.Input((self.feature_dim,), name="features"),
            GradientReversal(self.trade_off, name="gradient_reversal"),
        ]
        for i, width in enumerate(units):
            layers.append(
                keras.layers.Dense(
                    width, activation="relu", name=f"domain_dense_{i}", dtype="float32"
                )
            )
            if self.domain_dropout:
                layers.append(keras.layers.Dropout(self.domain_dropout, name=f"domain_dropout_{i}"))
        layers.append(keras.layers.Dense(1, name="domain_logit", dtype="float32"))
        self.domain_classifier = keras.Sequential(layers, name="domain_classifier")
        self.gradient_reversal = self.domain_classifier.get_layer("gradient_reversal")
        self.domain_loss_tracker = keras.metrics.Mean(name="domain_loss")
        self.domain_accuracy_tracker = keras.metrics.Mean(name="domain_accuracy")

    @property
    def adaptation_metrics(self):
        return [self.domain_loss_tracker, self.domain_accuracy_tracker]

    def adaptation_loss(self, features, num_source):
        logits = self.domain_classifier(features, training=True)[:, 0]
        total = keras.ops.shape(features)[0]
        domains = keras.ops.cast(keras.ops.arange(total) >= num_source, "float32")
        loss = keras.ops.mean(
            keras.losses.binary_crossentropy(domains[:, None], logits[:, None], from_logits=True)
        )
        hits = keras.ops.cast(keras.ops.equal(logits > 0, domains > 0.5), "float32")
        self.domain_loss_tracker.update_state(loss)
        self.domain_accuracy_tracker.update_state(hits)
        return loss

    def get_config(self):
        return {
            **super().get_config(),
            "domain_units": list(self.domain_units),
            "domain_dropout": self.domain_dropout,
        }
