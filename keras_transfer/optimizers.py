"""Discriminative (per-layer) learning rates: lower blocks of the backbone train more slowly.

`DiscriminativeOptimizer` wraps any Keras optimizer and multiplies the learning rate it uses for
each variable by a factor (fastai's discriminative rates, timm's layer decay). It scales the rate
of the update, not the gradient: Adam, RMSprop and friends normalise gradients, so a scaled
gradient would change nothing. Decoupled weight decay (AdamW's `weight_decay`) follows the scaled
rate too, as it does with PyTorch parameter groups. It is one optimizer object for
`model.compile`, with one iteration count and one learning rate (schedules, `ReduceLROnPlateau`
and the LR finder see the phase rate), works under `tf.distribute` strategies, and its
`variables` are the inner optimizer's in a fixed order, so checkpoints restore into it.

`block_lr_multipliers(model, decay)` gives the factors by block: the top block of the backbone
(above `kt.unfreeze_points(backbone)[0]`) and the head at 1, the next block down at `decay`, the
one below at `decay**2`, and so on. `kt.Phase(..., layer_lr_decay=0.5)` uses both.

Example:
>>> import keras, keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
>>> factors = kt.optimizers.block_lr_multipliers(model, 0.5)
>>> factors["block_16_project/kernel"], factors["block_15_project/kernel"]
(0.5, 0.25)
>>> optimizer = kt.optimizers.DiscriminativeOptimizer(keras.optimizers.Adam(1e-3), factors)
>>> model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras
from keras import ops

from keras_transfer import backbones, freezing
from keras_transfer._validate import is_number


def check_decay(value, name: str = "layer_lr_decay") -> float:
    """`value` as a float in (0, 1]; ValueError naming `name` otherwise."""
    if not is_number(value) or not math.isfinite(value) or not 0 < value <= 1:
        raise ValueError(
            f"`{name}` must be a number in (0, 1]: each block below the top trains at "
            f"decay**k times the phase's rate. Received: {name}={value!r}. Typical values: "
            "0.5 to 0.9; None turns per-layer rates off."
        )
    return float(value)


def block_lr_multipliers(model: keras.Model, decay: float) -> dict[str, float]:
    """Learning-rate factors by block of `model`'s backbone, keyed by variable path.

    Blocks are the spans between the registry's unfreeze points (`kt.unfreeze_points`), counted
    from the top: block 0 (above the first point) and the head train at the full rate, block k
    at `decay**k`, the stem below the last point at `decay**len(points)`. Variables at the full
    rate are left out (a missing path means 1).

    Args:
        model: A model from `kt.build_classifier` / `kt.build_regressor` whose backbone is in the
            registry.
        decay: Factor in (0, 1] between one block and the next one down.

    Returns:
        `{variable.path: factor}` for every trainable backbone variable whose factor is below 1.

    Raises:
        ValueError: for a decay outside (0, 1], a backbone outside the registry (its blocks are
            unknown), or variable paths shared by the backbone and another part of the model.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> kt.optimizers.block_lr_multipliers(model, 0.5)["Conv1/kernel"] == 0.5**17
    True
    """
    decay = check_decay(decay)
    backbone = freezing.find_backbone(model)
    if backbone.name not in backbones.REGISTRY:
        raise ValueError(
            f"`layer_lr_decay` needs the backbone's blocks, but backbone {backbone.name!r} is not "
            f"in the registry (kt.list_backbones()). Received: layer_lr_decay={decay!r}. Build "
            "the model with kt.build_classifier, or give kt.optimizers.DiscriminativeOptimizer "
            "your own {variable.path: factor} mapping."
        )
    index = {op.name: i for i, op in enumerate(backbone.operations)}
    bounds = [index[name] for name in backbones.unfreeze_points(backbone)]  # descending
    factors: dict[str, float] = {}
    for i, op in enumerate(backbone.operations):
        k = sum(1 for bound in bounds if i <= bound)  # the ends at or above op: its block
        if k and decay < 1:
            for variable in op.weights:
                if variable.trainable:  # not BatchNorm's moving statistics
                    factors[variable.path] = decay**k
    scaled = {id(v) for op in backbone.operations for v in op.weights if v.path in factors}
    shared = sorted({v.path for v in model.weights if v.path in factors and id(v) not in scaled})
    if shared:
        raise ValueError(
            f"Variable paths {shared[:3]} name both a backbone variable and another variable of "
            f"model {model.name!r}, so their learning rates cannot be told apart. Rename the "
            "layers outside the backbone."
        )
    return factors


def _check_multipliers(multipliers) -> dict[str, float]:
    if multipliers is None:
        return {}
    if not isinstance(multipliers, Mapping):
        raise TypeError(
            "`multipliers` must be a mapping {variable.path: factor}, e.g. from "
            f"kt.optimizers.block_lr_multipliers(model, 0.5). Received: {multipliers!r}"
        )
    checked = {}
    for path, factor in multipliers.items():
        if not isinstance(path, str) or not is_number(factor) or not 0 < factor < math.inf:
            raise ValueError(
                "`multipliers` must map variable paths (str) to positive finite factors. "
                f"Received: {path!r}: {factor!r}"
            )
        checked[path] = float(factor)
    return checked


# The weight decay of `keras.optimizers.Optimizer` itself; subclasses with their own (Muon)
# keep it, at the phase's rate.
_STANDARD_WEIGHT_DECAY = keras.optimizers.Optimizer._apply_weight_decay


@keras.saving.register_keras_serializable(package="keras_transfer")
class DiscriminativeOptimizer(keras.optimizers.Optimizer):
    """Any Keras optimizer with a learning-rate factor per variable.

    Each variable is updated by the inner optimizer's own rule at `learning_rate * factor`,
    where the factor is `multipliers[variable.path]` (1 when absent). Clipping, gradient
    accumulation, EMA and loss scaling stay the inner optimizer's; decoupled weight decay uses
    the scaled rate. `learning_rate` and `iterations` are the inner optimizer's, so schedules
    and learning-rate callbacks work unchanged. For mixed precision wrap it in turn:
    `keras.optimizers.LossScaleOptimizer(DiscriminativeOptimizer(...))`.

    Args:
        inner_optimizer: A `keras.optimizers.Optimizer` instance (not a `LossScaleOptimizer`,
            a `MultiOptimizer` or another `DiscriminativeOptimizer`); it is modified to apply
            the factors, so give it to one wrapper only.
        multipliers: `{variable.path: factor}`, factors > 0 (e.g. from
            `block_lr_multipliers`).
        name: Name of the optimizer.

    Raises:
        TypeError: for an inner optimizer that is not a plain Keras optimizer, or multipliers
            that are not a mapping.
        ValueError: for a factor that is not a positive finite number.

    Example:
    >>> import keras, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> optimizer = kt.optimizers.DiscriminativeOptimizer(
    ...     keras.optimizers.SGD(0.1), {"logits/kernel": 0.5})
    >>> model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy")
    """

    def __init__(self, inner_optimizer, multipliers=None, name=None, **kwargs):
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer) or isinstance(
            inner_optimizer,
            keras.optimizers.LossScaleOptimizer
            | keras.optimizers.MultiOptimizer
            | DiscriminativeOptimizer,
        ):
            raise TypeError(
                "`inner_optimizer` must be a Keras optimizer instance such as "
                "keras.optimizers.Adam(1e-3), not a LossScaleOptimizer, MultiOptimizer or "
                "DiscriminativeOptimizer (wrap a LossScaleOptimizer around this one instead). "
                f"Received: inner_optimizer={inner_optimizer!r}"
            )
        if kwargs:
            raise TypeError(
                "DiscriminativeOptimizer takes no optimizer settings of its own; set them on "
                f"`inner_optimizer`. Received: {sorted(kwargs)}"
            )
        multipliers = _check_multipliers(multipliers)
        super().__init__(learning_rate=0.0, name=name)
        self.inner_optimizer = inner_optimizer
        self._multipliers = multipliers
        self._factors = ()
        # The factors act where the inner optimizer computes each variable's update: its
        # update_step (and its weight decay, which reads the rate), overridden on the instance
        # so every Keras optimizer keeps its own update rule, clipping and distribution logic.
        standard_update = inner_optimizer.update_step
        scaled_decay = type(inner_optimizer)._apply_weight_decay is _STANDARD_WEIGHT_DECAY

        def update_step(gradient, variable, learning_rate):
            factor = self._factors[inner_optimizer._get_variable_index(variable)]
            if factor != 1.0:
                learning_rate = ops.multiply(learning_rate, factor)
            if (
                scaled_decay
                and inner_optimizer.weight_decay is not None
                and inner_optimizer._use_weight_decay(variable)
            ):
                rate = ops.cast(learning_rate, variable.dtype)
                decay = ops.cast(inner_optimizer.weight_decay, variable.dtype)
                inner_optimizer.assign_sub(variable, ops.multiply(variable, decay * rate))
            return standard_update(gradient, variable, learning_rate)

        inner_optimizer.update_step = update_step
        if scaled_decay:
            # Applied per variable in update_step instead, at the variable's rate.
            inner_optimizer._apply_weight_decay = lambda variables: None

    @property
    def multipliers(self) -> dict[str, float]:
        """`{variable.path: factor}`; variables not listed train at the full rate."""
        return dict(self._multipliers)

    def build(self, var_list):
        if self.built:
            return
        self.inner_optimizer.build(var_list)
        # Aligned with the inner optimizer's variable indices (its build order is var_list's).
        self._factors = tuple(self._multipliers.get(v.path, 1.0) for v in var_list)
        super().build(var_list)

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "When passing `grads` without `variables`, the optimizer must already be "
                    "built: call `optimizer.build(trainable_variables)` first."
                )
            self.build(list(trainable_variables))
        self.inner_optimizer.apply(grads, trainable_variables)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def set_weights(self, weights):
        own = len(self._variables)
        super().set_weights(weights[:own])
        self.inner_optimizer.set_weights(weights[own:])

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    def get_config(self):
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "multipliers": dict(self._multipliers),
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = dict(config.pop("inner_optimizer"))
        # A clone at another rate (kt.Phase clones optimizers from their config) sets the
        # inner optimizer's rate.
        if "learning_rate" in config:
            rate = config.pop("learning_rate")
            if isinstance(rate, keras.optimizers.schedules.LearningRateSchedule):
                rate = keras.optimizers.schedules.serialize(rate)
            inner["config"] = dict(inner["config"], learning_rate=rate)
        inner = keras.saving.deserialize_keras_object(inner, custom_objects=custom_objects)
        return cls(inner, **config)
