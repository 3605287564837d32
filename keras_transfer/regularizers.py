"""Penalties that keep fine-tuned weights near where they started: L2-SP and plain L2.

L2-SP (Li, Grandvalet & Davoine, ICML 2018) pulls the backbone's trainable weights toward their
values at the start of the phase, α/2·‖w_S − w⁰_S‖², and gives the new head plain weight decay,
αβ/2·‖w_head‖². `L2` is the usual baseline, α/2·‖w‖² over every trainable weight.

Both are used through `kt.Phase(..., regularizer=...)` or `kt.fine_tune(..., regularizer=...)`,
which call `attach(model)` when a phase begins (after its layers are unfrozen, under the
strategy's scope, before compiling) and `detach(model)` when it ends. The penalty lives on the
variables, not on the model: `attach` sets each trainable variable's `regularizer` attribute,
which Keras reads in every model that holds the variable (`Layer.losses`), so it applies equally
when a phase trains on a cached phase model sharing the layers (`kt.caching`) and under a
`tf.distribute` strategy (Keras scales such losses per replica). The starting weights are kept
as non-trainable variables owned by the regularizer, not by any layer, so layer configs, the
saved `.keras` file and exported models carry no trace of the penalty; `detach` puts every
variable's previous regularizer back.

Example:
>>> import numpy as np, keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
>>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
>>> history = kt.fine_tune(model, (x, np.arange(8) % 2), head_epochs=1, finetune_epochs=1,
...                        regularizer=kt.regularizers.L2SP(alpha=0.1, beta=0.01),
...                        batch_size=4, verbose=0)
>>> model.losses
[]
"""

from __future__ import annotations

import difflib
import math

import keras
import numpy as np

__all__ = ["L2", "L2SP", "get"]


def _coefficient(name: str, value, typical: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value!r}. {typical}"
        )
    if value < 0:
        raise ValueError(
            f"`{name}` must be >= 0 (it scales a squared distance; 0 turns the term off). "
            f"Received: {name}={value!r}. {typical}"
        )
    return float(value)


class _Penalty:
    """A variable's regularizer: `coefficient/2 · ‖x − anchor‖²` plus the one it had before."""

    def __init__(self, coefficient: float, anchor=None, previous=None):
        self.coefficient = coefficient
        self.anchor = anchor
        self.previous = previous

    def __call__(self, x):
        value = keras.ops.cast(keras.ops.convert_to_tensor(x), "float32")
        if self.anchor is not None:
            value = value - keras.ops.cast(keras.ops.convert_to_tensor(self.anchor), "float32")
        total = 0.5 * self.coefficient * keras.ops.sum(keras.ops.square(value))
        if self.previous is not None:
            total = total + keras.ops.cast(self.previous(x), "float32")
        return total


def _source_models(model: keras.Model) -> list[keras.Model]:
    """The pretrained part: every nested non-Sequential model (one backbone, or several)."""
    nested = [
        layer
        for layer in model.layers
        if isinstance(layer, keras.Model) and not isinstance(layer, keras.Sequential)
    ]
    if not nested:
        raise ValueError(
            f"L2-SP needs a model with a nested pretrained backbone; model {model.name!r} has "
            "none (its layers: "
            f"{[layer.name for layer in model.layers]}). Build it with kt.build_classifier / "
            "kt.build_regressor, or use kt.regularizers.L2 for plain weight decay."
        )
    return nested


class _WeightPenalty:
    """Attaches per-variable penalties for one phase and takes them off again."""

    def __init__(self):
        self._model = None
        self._records: list[tuple] = []

    def _plan(self, model: keras.Model) -> list[tuple]:
        """`(variable, coefficient, anchored)` for each trainable variable to penalise."""
        raise NotImplementedError

    def attach(self, model: keras.Model) -> None:
        """Adds the penalty to `model`'s trainable variables, anchored at their current values.

        Called by `kt.fit_phases` when a phase begins, after its layers are unfrozen and under
        the strategy's scope (the anchors are created under `model.distribute_strategy` either
        way). A variable's existing regularizer is kept and added to.

        Args:
            model: The model about to train.

        Raises:
            TypeError: when `model` is not a `keras.Model`.
            ValueError: when the penalty is already attached (detach it first), or the model
                has no backbone (L2-SP).
        """
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`model` must be a keras.Model. Received: model={type(model).__name__}"
            )
        if self._model is not None:
            raise ValueError(
                f"{self!r} is already attached to model {self._model.name!r}; call "
                "detach(model) first, or use one regularizer object per model."
            )
        plan = self._plan(model)
        records = []
        with model.distribute_strategy.scope():
            for variable, coefficient, anchored in plan:
                anchor = None
                if anchored:
                    anchor = keras.Variable(
                        np.array(variable.numpy()),
                        trainable=False,
                        dtype=variable.dtype,
                        name=f"{variable.name}_start",
                    )
                records.append((variable, variable.regularizer, anchor, coefficient))
        # Nothing changes on the model until every anchor exists.
        for variable, previous, anchor, coefficient in records:
            variable.regularizer = _Penalty(coefficient, anchor, previous)
        self._model, self._records = model, records
        _drop_traced_functions(model)

    def detach(self, model: keras.Model) -> None:
        """Removes the penalty: each variable gets back the regularizer it had before `attach`.

        A no-op when nothing is attached. Traced train/test functions are dropped, so a later
        `fit` or `evaluate` on the same compiled model runs without the penalty.

        Raises:
            ValueError: when the penalty is attached to another model.
        """
        if self._model is None:
            return
        if model is not self._model:
            raise ValueError(
                f"{self!r} is attached to model {self._model.name!r}, not to "
                f"{getattr(model, 'name', model)!r}; detach it from the model it was attached to."
            )
        for variable, previous, _, _ in self._records:
            variable.regularizer = previous
        self._model, self._records = None, []
        _drop_traced_functions(model)

    @property
    def attached(self) -> bool:
        """Whether the penalty is attached to a model now."""
        return self._model is not None


def _drop_traced_functions(model: keras.Model) -> None:
    """Traced steps read the regularizers at trace time; make the next fit/evaluate re-trace."""
    for name in ("train_function", "test_function"):
        if getattr(model, name, None) is not None:
            setattr(model, name, None)


def _dedupe(variables) -> list:
    return list({id(v): v for v in variables}.values())


class L2SP(_WeightPenalty):
    """L2-SP: the backbone stays near its starting point, the head gets weight decay.

    Ω = α/2·‖w_S − w⁰_S‖² + αβ/2·‖w_head‖², where w_S are the backbone's trainable weights
    (every nested backbone model of the classifier), w⁰_S their values when the phase begins,
    and w_head every other trainable weight (the layers after pooling). Frozen weights add
    nothing. Li et al. (2018) write the head term β′/2·‖w_head‖²; here β is relative to α
    (β′ = αβ), so one `alpha` sweeps both terms.

    Args:
        alpha: Strength of the pull toward the starting weights, >= 0 (0 turns it off).
        beta: Weight decay of the head, relative to `alpha`, >= 0.

    Raises:
        ValueError: for a negative or non-finite `alpha` or `beta`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> _ = kt.unfreeze(model, blocks=1)
    >>> penalty = kt.regularizers.L2SP(alpha=0.1, beta=0.01)
    >>> penalty.attach(model)
    >>> len(model.losses)  # one per trainable weight: Conv_1's kernel, the logits' kernel, bias
    3
    >>> penalty.detach(model)
    >>> model.losses
    []
    """

    def __init__(self, alpha: float = 0.01, beta: float = 0.01):
        super().__init__()
        self.alpha = _coefficient(
            "alpha", alpha, "Typical values: 0.001 to 0.1 (Li et al. 2018 use 0.1)."
        )
        self.beta = _coefficient(
            "beta", beta, "Typical values: 0.01 to 1 (the head's decay is alpha * beta)."
        )

    def _plan(self, model):
        source = _dedupe(w for m in _source_models(model) for w in m.trainable_weights)
        ids = {id(v) for v in source}
        head = [v for v in _dedupe(model.trainable_weights) if id(v) not in ids]
        return [(v, self.alpha, True) for v in source] + [
            (v, self.alpha * self.beta, False) for v in head
        ]

    def __repr__(self) -> str:
        return f"L2SP(alpha={self.alpha!r}, beta={self.beta!r})"


class L2(_WeightPenalty):
    """Plain L2 weight decay, α/2·‖w‖² over every trainable weight: L2-SP's baseline.

    Args:
        alpha: Strength, >= 0 (0 turns it off).

    Raises:
        ValueError: for a negative or non-finite `alpha`.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> model = kt.freeze_backbone(model)
    >>> penalty = kt.regularizers.L2(alpha=0.01)
    >>> penalty.attach(model)
    >>> len(model.losses)  # the backbone is frozen: the logits' kernel and bias
    2
    >>> penalty.detach(model)
    """

    def __init__(self, alpha: float = 0.01):
        super().__init__()
        self.alpha = _coefficient("alpha", alpha, "Typical values: 1e-4 to 1e-2.")

    def _plan(self, model):
        return [(v, self.alpha, False) for v in _dedupe(model.trainable_weights)]

    def __repr__(self) -> str:
        return f"L2(alpha={self.alpha!r})"


_BY_NAME = {"l2": L2, "l2sp": L2SP, "l2_sp": L2SP, "l2-sp": L2SP}


def get(identifier) -> L2 | L2SP | object | None:
    """A regularizer from its name (`"l2"`, `"l2sp"`, with default strengths), or as given.

    Args:
        identifier: None, `"l2"`, `"l2sp"` (also `"l2_sp"`, `"l2-sp"`), or an object with
            `attach(model)` and `detach(model)` methods (returned unchanged).

    Returns:
        None, a new `L2()` / `L2SP()`, or `identifier`.

    Raises:
        ValueError: for an unknown name (close matches suggested).
        TypeError: for anything else.

    Example:
    >>> import keras_transfer as kt
    >>> kt.regularizers.get("l2")
    L2(alpha=0.01)
    """
    if identifier is None:
        return None
    if isinstance(identifier, str):
        key = identifier.strip().lower()
        if key in _BY_NAME:
            return _BY_NAME[key]()
        close = difflib.get_close_matches(key, list(_BY_NAME), n=2)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(
            f"Unknown regularizer {identifier!r}.{hint} Expected 'l2', 'l2sp' or an object with "
            "attach(model)/detach(model), e.g. kt.regularizers.L2SP(alpha=0.1, beta=0.01)."
        )
    if callable(getattr(identifier, "attach", None)) and callable(
        getattr(identifier, "detach", None)
    ):
        return identifier
    raise TypeError(
        "`regularizer` must be None, 'l2', 'l2sp' or an object with attach(model) and "
        f"detach(model) (e.g. kt.regularizers.L2SP()). Received: {identifier!r}"
    )
