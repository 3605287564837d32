"""The learning-rate finder: a short sweep of exponentially growing rates, then a suggestion.

Smith (2017, "Cyclical Learning Rates for Training Neural Networks") and fastai's `lr_find`: train
for `num_iterations` steps while the rate grows from `start_lr` to `end_lr` as
`start_lr * (end_lr / start_lr) ** (i / num_iterations)` at step `i`, record the training loss
smoothed by a debiased exponential moving average (β = 0.98), stop once the smoothed loss exceeds
4x its minimum, and read a rate off the curve (without its first tenth and last five points):

- `valley` (the default): the middle of the longest descending stretch of the curve;
- `steep`: where the loss falls fastest per unit of log rate;
- `minimum`: a tenth of the rate at the lowest loss.

The sweep is a plain `model.fit` with a callback that sets the rate before each batch and stops
the fit (`model.stop_training`) on divergence. It trains what a `kt.Phase` trains (the head by
default), on cached activations when the data allows it (`kt.caching`: the backbone then runs
once per image, so a head sweep costs about one forward pass over at most `num_iterations`
batches), and afterwards puts back every variable of the model (weights, BatchNorm statistics,
random-seed states), every layer's and variable's trainable flag, and leaves the model's own
compiled state and optimizer untouched: it trains a separate model object over the same layers.

Example:
>>> import numpy as np, keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
>>> x = np.random.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
>>> data = kt.data.from_arrays(x, np.arange(16) % 2, batch_size=8)
>>> result = kt.find_learning_rate(model, data, num_iterations=20)
>>> bool(1e-7 <= result.suggestion <= 10)
True
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import _compat, caching, datacheck, freezing, heads, phases

logger = logging.getLogger(__name__)

SUGGESTIONS = ("valley", "steep", "minimum")
SMOOTHING_BETA = 0.98
DIVERGENCE_FACTOR = 4.0
SKIP_END = 5


# --- the curve ---------------------------------------------------------------------------------


def exponential_rates(start_lr: float, end_lr: float, num_iterations: int) -> np.ndarray:
    """The sweep's rates: `start_lr * (end_lr / start_lr) ** (i / num_iterations)`, i < n."""
    steps = np.arange(num_iterations, dtype=np.float64) / num_iterations
    return start_lr * (end_lr / start_lr) ** steps


def smooth(losses: Sequence[float], beta: float = SMOOTHING_BETA) -> np.ndarray:
    """Debiased exponential moving average: `m_i = β m_{i-1} + (1 - β) x_i`, `m_i / (1 - β^(i+1))`.

    Example:
    >>> smooth([1.0, 3.0]).round(4).tolist()
    [1.0, 2.0101]
    """
    out, average = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        average = beta * average + (1.0 - beta) * float(loss)
        out[i] = average / (1.0 - beta ** (i + 1))
    return out


def valley(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, int]:
    """fastai's `valley`: the middle of the longest valley of the curve.

    The valley is the longest strictly decreasing subsequence of `losses` (O(n²), as in fastai);
    the suggestion sits a third plus a sixth of its length past its start.

    Returns:
        `(rate, index)`: the suggested rate and its index in `lrs`.
    """
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    # max_start may be -1 (a valley from the first point); fastai would then index from the end.
    index = min(max(max_start + int(sections) + int(sections / 2), 0), n - 1)
    return float(lrs[index]), index


def steep(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, int]:
    """fastai's `steep`: the rate where the loss falls fastest per unit of log rate."""
    slopes = np.diff(losses) / np.diff(np.log(lrs))
    index = int(np.argmin(slopes))
    return float(lrs[index]), index


def minimum(lrs: np.ndarray, losses: np.ndarray) -> tuple[float, int]:
    """fastai's `minimum`: a tenth of the rate at the lowest loss (the index is the minimum's)."""
    index = int(np.argmin(losses))
    return float(lrs[index]) / 10.0, index


_SUGGESTERS = {"valley": valley, "steep": steep, "minimum": minimum}


def suggestion_window(num_recorded: int, num_iterations: int) -> slice:
    """Where suggestions look, as fastai's `lr_find`: without the first `num_iterations // 10`
    points and the last five; the whole curve when that would leave fewer than two points."""
    window = slice(num_iterations // 10, max(num_recorded - SKIP_END, 0))
    if window.stop - window.start < 2:
        return slice(0, num_recorded)
    return window


# --- the result --------------------------------------------------------------------------------


@dataclass
class LRFinderResult:
    """What a learning-rate sweep found.

    Attributes:
        suggestion: The suggested learning rate (by `method`).
        method: `"valley"`, `"steep"` or `"minimum"`.
        lrs: The rate of every step that ran, in order.
        losses: The smoothed training loss after each step (debiased EMA, β = 0.98).
        raw_losses: The training loss of each step's batch, before smoothing.
        suggestions: `{method: rate}` for all three methods, on the same curve.
        points: `{method: (rate on the curve, smoothed loss there)}`, for plotting; for
            `"minimum"` the point is the minimum itself, ten times the suggested rate.
        window: The slice of `lrs` the suggestions were read from.
        num_iterations: Steps the sweep was allowed.
        stopped: `"completed"`, `"diverged"` (smoothed loss over 4x its minimum) or
            `"non-finite"` (a NaN or infinite loss).
        cached: Where the activations were cached (`"pooling"` for the head, or a backbone layer
            name), or False when the sweep ran on the full model.
    """

    suggestion: float
    method: str
    lrs: np.ndarray
    losses: np.ndarray
    raw_losses: np.ndarray
    suggestions: dict[str, float]
    points: dict[str, tuple[float, float]]
    window: slice
    num_iterations: int
    stopped: str
    cached: str | bool = False
    phase: phases.Phase | None = field(default=None, repr=False)

    def plot(self, skip_end: int = SKIP_END, path=None):
        """The smoothed loss against the rate (log scale), the three suggestions marked.

        Drawn by `kt.plots.plot_lr_finder` (the chosen method first).

        Args:
            skip_end: Points left off the end of the curve (its divergence), as fastai does.
            path: If set, the figure is also saved there.

        Returns:
            The matplotlib `Figure`.
        """
        from keras_transfer import plots

        end = max(len(self.lrs) - skip_end, 2) if skip_end else len(self.lrs)
        marked = {self.method: self.suggestion}
        marked.update((k, v) for k, v in self.suggestions.items() if k != self.method)
        return plots.plot_lr_finder(
            self.lrs[:end],
            self.losses[:end],
            suggestion=marked,
            title=f"LR finder: {self.method} suggests {self.suggestion:.1e}",
            path=path,
        )

    def __str__(self) -> str:
        others = ", ".join(
            f"{name} {rate:.2e}" for name, rate in self.suggestions.items() if name != self.method
        )
        return (
            f"Suggested learning rate ({self.method}): {self.suggestion:.2e}  "
            f"[{others}; {len(self.lrs)} steps, {self.stopped}]"
        )


# --- the sweep ---------------------------------------------------------------------------------


class LRSweep(keras.callbacks.Callback):
    """Sets the rate before each batch, records each batch's loss, stops on divergence.

    The loss Keras reports at a batch's end is the epoch's running mean, so the model's metrics
    are reset before each batch: the logged loss is then that batch's own.
    """

    def __init__(self, rates: np.ndarray, beta: float = SMOOTHING_BETA):
        super().__init__()
        self.rates = np.asarray(rates, dtype=np.float64)
        self.beta = beta
        self.lrs: list[float] = []
        self.raw_losses: list[float] = []
        self.losses: list[float] = []
        self.stopped = "completed"
        self._average = 0.0
        self._best = math.inf

    def on_train_batch_begin(self, batch, logs=None):
        step = len(self.lrs)
        self.model.optimizer.learning_rate = float(self.rates[step])
        for metric in self.model.metrics:
            metric.reset_state()

    def on_train_batch_end(self, batch, logs=None):
        step = len(self.lrs)
        loss = float(np.asarray((logs or {})["loss"]))
        self.lrs.append(float(self.rates[step]))
        self.raw_losses.append(loss)
        self._average = self.beta * self._average + (1.0 - self.beta) * loss
        smoothed = self._average / (1.0 - self.beta ** (step + 1))
        self.losses.append(smoothed)
        if not math.isfinite(smoothed):
            self.stopped, self.model.stop_training = "non-finite", True
            return
        self._best = min(self._best, smoothed)
        if smoothed > DIVERGENCE_FACTOR * self._best:
            self.stopped, self.model.stop_training = "diverged", True
        elif step + 1 >= len(self.rates):
            self.model.stop_training = True


def _check_rate(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a positive number. Received: {name}={value!r}")
    if value <= 0:
        raise ValueError(f"`{name}` must be > 0. Received: {name}={value!r}. E.g. {name}=1e-7.")
    return float(value)


def _check_arguments(model, phase, start_lr, end_lr, num_iterations, suggestion):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "`model` must be a keras.Model (e.g. from kt.build_classifier). "
            f"Received: model={type(model).__name__}"
        )
    if not model.built:
        raise ValueError(f"`model` {model.name!r} is not built; build it (or call it) first.")
    if phase == "head":
        phase = phases.Phase("head", epochs=1)
    elif not isinstance(phase, phases.Phase):
        raise TypeError(
            "`phase` must be 'head' or a kt.Phase (what trains during the sweep). Received: "
            f"phase={phase!r}. E.g. kt.Phase('top', epochs=1, trainable=2)."
        )
    start_lr, end_lr = _check_rate("start_lr", start_lr), _check_rate("end_lr", end_lr)
    if end_lr <= start_lr:
        raise ValueError(
            f"`end_lr` must be larger than `start_lr`. Received: start_lr={start_lr!r}, "
            f"end_lr={end_lr!r}. The defaults sweep 1e-7 to 10."
        )
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int):
        raise TypeError(f"`num_iterations` must be an int. Received: {num_iterations!r}")
    if num_iterations < 10:
        raise ValueError(
            "`num_iterations` must be >= 10: suggestions skip the first tenth and the last "
            f"{SKIP_END} points of the curve. Received: num_iterations={num_iterations!r}"
        )
    if suggestion not in SUGGESTIONS:
        raise ValueError(
            f"`suggestion` must be one of {SUGGESTIONS}. Received: suggestion={suggestion!r}"
        )
    return phase, start_lr, end_lr


@dataclass
class _Snapshot:
    """Every variable's value and every layer's and variable's trainable flag."""

    variables: list
    values: list[np.ndarray]
    layer_flags: list[tuple[keras.layers.Layer, bool]]
    variable_flags: list[tuple[object, bool]]

    @classmethod
    def take(cls, model: keras.Model) -> _Snapshot:
        variables = list(model.variables)
        # Pre-order (a layer before its sublayers), so restoring parent flags first is exact.
        layers = model._flatten_layers(include_self=True, recursive=True)
        return cls(
            variables,
            [np.array(v.numpy(), copy=True) for v in variables],
            [(layer, layer.trainable) for layer in layers],
            [(v, v.trainable) for v in variables],
        )

    def restore(self) -> None:
        for layer, flag in self.layer_flags:
            if layer.trainable != flag:
                layer.trainable = flag
        for variable, flag in self.variable_flags:
            if variable.trainable != flag:
                variable.trainable = flag
        for variable, value in zip(self.variables, self.values, strict=True):
            variable.assign(value)


def _set_trainable(model: keras.Model, phase: phases.Phase) -> None:
    kwargs = phases.unfreeze_kwargs(phase.trainable)
    if kwargs is not None:
        freezing.unfreeze(model, train_batchnorm=phase.train_batchnorm, **kwargs)
        return
    try:
        freezing.freeze_backbone(model)
    except ValueError:  # no nested backbone: a model of the user's own trains as it stands
        logger.info("Model %r has no backbone to freeze; the sweep trains it as is.", model.name)


def _source(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """A copy whose shuffles keep their own random state, so the sweep leaves the caller's data
    in the state it found it (later fits see the orders they would have seen); else itself."""
    if not caching.shuffles(dataset):
        return dataset
    copy = caching.detached_copy(dataset)
    return dataset if copy is None else copy


def _cache_blocker(wrapper, cut, dataset, num_iterations) -> str | None:
    reason = caching.cache_blocker(
        wrapper, cut_index=cut, augment_views=None, callbacks=[], train_data=dataset
    )
    if reason is not None:
        return reason
    batches = int(dataset.cardinality())
    if batches < 0:
        return "the number of batches is unknown"
    if batches > num_iterations:
        # Each batch is then seen once: caching would cost the same forward passes again.
        return f"the data has more batches ({batches}) than the sweep has steps"
    return None


def find_learning_rate(
    model: keras.Model,
    data,
    *,
    phase: str | phases.Phase = "head",
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iterations: int = 100,
    suggestion: str = "valley",
    loss=None,
    batch_size: int = 32,
    cache: bool = True,
    jit_compile: bool | str = "auto",
) -> LRFinderResult:
    """Sweeps the learning rate exponentially over a short training run and suggests one.

    Trains what `phase` trains for up to `num_iterations` steps (the data repeats as needed),
    the rate at step `i` being `start_lr * (end_lr / start_lr) ** (i / num_iterations)`, and
    stops once the smoothed loss exceeds 4x its minimum. Then every variable of `model`, every
    trainable flag, and the model's compiled state and optimizer are as they were: the sweep
    compiles and fits a separate model object over the same layers, with a fresh optimizer.

    Args:
        model: A model from `kt.build_classifier` / `kt.build_regressor`, or any built Keras
            model (with the default phase, a model without a backbone trains as it stands).
        data: A `tf.data.Dataset` of `(images, labels)` batches (see `kt.data`), or an `(x, y)`
            tuple of arrays (shuffled, batches of `batch_size`).
        phase: `"head"` (the backbone frozen), or a `kt.Phase` whose `trainable`, `optimizer`,
            `train_batchnorm` and `regularizer` the sweep uses (its learning rate, epochs,
            warm-up, schedule and callbacks are not used).
        start_lr: First rate of the sweep.
        end_lr: The rate the sweep grows towards (reached at step `num_iterations`).
        num_iterations: Most steps of the sweep; at least 10.
        suggestion: `"valley"`, `"steep"` or `"minimum"` (see the module); all three are in
            `result.suggestions`.
        loss: Loss; by default the head's (`kt.heads.default_loss_and_metrics`).
        batch_size: Batch size per replica when `data` comes as arrays.
        cache: Sweep on cached activations of the frozen part when the data allows it (a
            finite dataset of at most `num_iterations` batches, no augmentation layer).
        jit_compile: Passed to `compile`.

    Returns:
        An `LRFinderResult`: `.suggestion`, `.lrs`, `.losses`, `.plot()`.

    Raises:
        TypeError: for a `model` that is not a Keras model, a bad `phase` or `num_iterations`.
        ValueError: for rates that are not positive or not increasing, fewer than 10 iterations,
            an unknown `suggestion`, data that does not fit the head (all before the sweep), or
            a sweep that gave fewer than two finite losses (lower `start_lr`).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> x = np.random.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    >>> data = kt.data.from_arrays(x, np.arange(16) % 2, batch_size=8)
    >>> result = kt.find_learning_rate(model, data, num_iterations=20)
    >>> len(result.lrs) <= 20
    True
    """
    phase, start_lr, end_lr = _check_arguments(
        model, phase, start_lr, end_lr, num_iterations, suggestion
    )
    strategy = model.distribute_strategy
    dataset = phases._as_dataset(data, batch_size * strategy.num_replicas_in_sync, shuffle=True)
    head = None
    if loss is None:
        head = heads.head_of(model)
        loss = heads.default_loss_and_metrics(model, dataset.element_spec[1])[0]
    else:
        try:
            head = heads.head_of(model)
        except ValueError:
            head = None
    if head is not None:
        datacheck.check_spec(head, dataset.element_spec, "data")
    unfreeze = phases.unfreeze_kwargs(phase.trainable)
    cut = None if unfreeze is None else freezing.plan_unfreeze(model, **unfreeze)

    rates = exponential_rates(start_lr, end_lr, num_iterations)
    sweep = LRSweep(rates)
    snapshot = _Snapshot.take(model)
    cached_phase, attached = None, False
    with strategy.scope():
        # Same layers and variables, another Model object: the caller's compiled state and
        # optimizer are never touched (freezing it here recompiles nothing: it is uncompiled).
        wrapper = keras.Model(model.input, model.output, name=f"{model.name}_lr_finder")
    try:
        _set_trainable(wrapper, phase)
        source = _source(dataset)
        reason = _cache_blocker(wrapper, cut, source, num_iterations) if cache else "cache=False"
        if reason is None:
            cached_phase = caching.prepare(
                wrapper, source, None, cut_indices=[cut], strategy=strategy
            )[0]
            fit_model, train = cached_phase.model, cached_phase.train_data
            if caching.shuffles(dataset):  # the copy hides its shuffles from prepare
                examples = cached_phase.caches[0].num_examples
                batch = cached_phase.caches[0].batch_size
                train = train.unbatch().shuffle(examples, seed=0).batch(batch)
        else:
            logger.info("The LR sweep runs on the full model: %s.", reason)
            fit_model = wrapper
            train = source if head is None else datacheck.validating(head, source, "data")
        with strategy.scope():
            if phase.regularizer is not None:
                phase.regularizer.attach(wrapper)
                attached = True
            fit_model.compile(
                optimizer=phases.make_optimizer(
                    phase.optimizer, start_lr, model, phase.layer_lr_decay
                ),
                loss=loss,
                jit_compile=jit_compile,
            )
        train = train.repeat()
        with strategy.scope(), _compat.multi_worker_fit(fit_model, strategy, train):
            try:
                fit_model.fit(
                    train,
                    steps_per_epoch=num_iterations,
                    epochs=1,
                    callbacks=[sweep],
                    shuffle=False,
                    verbose=0,
                )
            except tf.errors.InvalidArgumentError as error:
                if head is None or datacheck.MARKER not in str(error):
                    raise
                raise datacheck.explain(head, {"data": source}, error) from None
    finally:
        if attached:
            phase.regularizer.detach(wrapper)
        if cached_phase is not None:
            cached_phase.close()
        snapshot.restore()
    return _result(sweep, num_iterations, suggestion, phase, cached_phase, start_lr)


def _result(sweep, num_iterations, method, phase, cached_phase, start_lr) -> LRFinderResult:
    lrs = np.asarray(sweep.lrs)
    losses = np.asarray(sweep.losses)
    raw = np.asarray(sweep.raw_losses)
    finite = np.isfinite(losses)
    usable = len(losses) if finite.all() else int(np.argmin(finite))
    if usable < 2:
        raise ValueError(
            f"The LR sweep gave {usable} finite loss(es) before diverging at "
            f"lr={lrs[-1] if len(lrs) else start_lr:.2e}: too few to suggest a rate. Lower "
            f"`start_lr` (received start_lr={start_lr:.2e})."
        )
    window = suggestion_window(usable, num_iterations)
    in_lrs, in_losses = lrs[window], losses[window]
    suggestions, points = {}, {}
    for name, suggest in _SUGGESTERS.items():
        rate, index = suggest(in_lrs, in_losses)
        suggestions[name] = rate
        points[name] = (float(in_lrs[index]), float(in_losses[index]))
    return LRFinderResult(
        suggestion=suggestions[method],
        method=method,
        lrs=lrs,
        losses=losses,
        raw_losses=raw,
        suggestions=suggestions,
        points=points,
        window=window,
        num_iterations=num_iterations,
        stopped=sweep.stopped,
        cached=cached_phase.cut if cached_phase is not None else False,
        phase=phase,
    )
