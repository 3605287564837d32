"""Training in phases as data: a list of `Phase`s run as consecutive `model.fit` calls.

A `Phase` says what trains (the head only, or the top of the backbone by blocks, fraction or layer
name), for how many epochs, at what learning rate and with which optimizer. `fit_phases` runs any
number of them: it sets the trainable layers (BatchNorm stays frozen), recompiles under the
model's `tf.distribute` strategy, numbers epochs across phases, and returns one merged `History`.
Each phase whose frozen part can be cached trains on cached activations (`kt.caching`), and a run
with a checkpoint folder resumes at the batch it was killed in (`kt.checkpointing`), for any
number of phases. `on_phase_begin(model, phase)` is the hook for what must happen when a phase
starts (a regularizer toward the starting weights, per-layer learning rates).

Example:
>>> import numpy as np, keras_transfer as kt
>>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
>>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
>>> history = kt.fit_phases(model, [kt.Phase("head", epochs=1),
...                                 kt.Phase("top", epochs=1, trainable=2, learning_rate=1e-4)],
...                         (x, np.arange(8) % 2), batch_size=4, verbose=0)
>>> history.phases
{'head': (0, 1), 'top': (1, 2)}
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from keras_transfer import _compat, caching, checkpointing, datacheck, freezing, heads
from keras_transfer._validate import check_int, is_number

logger = logging.getLogger(__name__)

SCHEDULES = ("constant", "cosine")
AUTO = "auto"  # a phase's learning rate found by `kt.find_learning_rate` when it begins
HEAD_ONLY = None


def _positive_number(name: str, value) -> float:
    if not is_number(value) or not math.isfinite(value):
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}. "
            "Typical values: 1e-3 for the head, 1e-4 to 1e-5 for fine-tuning."
        )
    if value <= 0:
        raise ValueError(
            f"`{name}` must be > 0. Received: {name}={value!r}. "
            "Typical values: 1e-3 for the head, 1e-4 to 1e-5 for fine-tuning."
        )
    return float(value)


def _epochs(name: str, value) -> int:
    return check_int(name, value, minimum=0)


_UNFREEZE_ARGUMENTS = {"blocks", "fraction", "from_layer", "backbone", "backbones"}


def unfreeze_kwargs(spec) -> dict | None:
    """Maps a `trainable` spec onto `kt.unfreeze` arguments; None means the head only.

    An int is a number of top blocks, a float a fraction of the weighted layers, a string a layer
    name (the first one that trains) or `"all"`, a mapping the `kt.unfreeze` arguments themselves.
    A mapping keyed by backbone names (a fusion model's, `kt.build_fusion_classifier`) gives each
    its own spec, e.g. `{"mobilenet_v2": 2}`; the backbones it leaves out stay frozen.
    """
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        if not spec or set(spec) & _UNFREEZE_ARGUMENTS:
            return dict(spec)
        each = {str(name): unfreeze_kwargs(part) for name, part in spec.items()}
        if any(part and "backbones" in part for part in each.values()):
            raise TypeError(f"A backbone's `trainable` cannot itself be per backbone: {spec!r}")
        return {"backbones": each} if any(v is not None for v in each.values()) else None
    if isinstance(spec, bool):
        raise TypeError(f"`unfreeze` must be an int, float, str or dict. Received: {spec!r}")
    if isinstance(spec, int):
        return {"blocks": spec}
    if isinstance(spec, float):
        return {"fraction": spec}
    if isinstance(spec, str):
        return {"fraction": 1.0} if spec == "all" else {"from_layer": spec}
    raise TypeError(
        "`unfreeze` must be an int (top blocks), a float (fraction), a layer name, 'all' or a "
        f"dict of kt.unfreeze arguments. Received: unfreeze={spec!r}"
    )


@dataclass(frozen=True)
class Phase:
    """One phase of training: what trains, for how long, and how fast.

    Args:
        name: Unique name of the phase (keys of `history.phases`, checkpoint state, logs).
        epochs: Epochs of the phase; 0 skips it.
        trainable: What of the backbone trains: None (the head only, backbone frozen), an int
            (top blocks, at `kt.unfreeze_points`), a float (fraction of the weighted layers), a
            layer name (it and every later layer train), `"all"`, or a dict of `kt.unfreeze`
            arguments. The head always trains.
        learning_rate: A positive float, `"auto"` (the LR finder's suggestion for this phase,
            `kt.find_learning_rate`, run when the phase begins: about one forward pass when
            its frozen part can be cached), or a `keras.optimizers.schedules.LearningRateSchedule`
            (then `warmup_epochs` must be 0 and `schedule` is ignored).
        optimizer: A Keras optimizer name (`"adam"`, `"adamw"`, `"sgd"`, ...) or an optimizer
            instance; an instance is cloned from its config for the phase, so its other
            settings carry over and no state leaks between phases.
        warmup_epochs: Epochs of linear warm-up from 0 at the start of the phase.
        schedule: After warm-up, `"constant"` or `"cosine"` (decay to 0 by the phase's end).
        callbacks: Keras callbacks for this phase only (added to `fit_phases`' callbacks).
        train_batchnorm: Also train the BatchNorm layers of the trainable part.
        regularizer: `"l2"`, `"l2sp"` or an object with `attach(model)` and `detach(model)`
            (e.g. `kt.regularizers.L2SP(alpha=0.1)`), attached when the phase begins and
            detached when it ends, so the saved model carries no trace of it.
        layer_lr_decay: None (one rate for all), or a factor in (0, 1]: discriminative
            learning rates, each block of the backbone below the top one (at
            `kt.unfreeze_points`) training at `layer_lr_decay**k` times the phase's rate, k
            counted from the top; the head and the top block train at the full rate. Works
            with any optimizer (`kt.optimizers.DiscriminativeOptimizer` scales each
            variable's rate, not its gradient).

    Raises:
        ValueError: for an empty name, negative epochs, a learning rate <= 0, an unknown
            schedule, warm-up with a schedule object, or a `layer_lr_decay` outside (0, 1].
    """

    name: str
    epochs: int
    trainable: int | float | str | Mapping | None = HEAD_ONLY
    learning_rate: float | str | keras.optimizers.schedules.LearningRateSchedule = 1e-3
    optimizer: str | keras.optimizers.Optimizer = "adam"
    warmup_epochs: float = 0.0
    schedule: str = "constant"
    callbacks: tuple = field(default_factory=tuple)
    train_batchnorm: bool = False
    regularizer: object | None = None
    layer_lr_decay: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(
                f"`name` must be a non-empty str. Received: name={self.name!r}. E.g. "
                "Phase('head', epochs=5)."
            )
        _epochs(f"{self.name}.epochs", self.epochs)
        unfreeze_kwargs(self.trainable)  # type check now; the model checks the value later
        if self.learning_rate == AUTO:
            pass
        elif not isinstance(self.learning_rate, keras.optimizers.schedules.LearningRateSchedule):
            _positive_number(f"{self.name}.learning_rate", self.learning_rate)
        elif self.warmup_epochs:
            raise ValueError(
                f"Phase {self.name!r}: `warmup_epochs` works with a float learning rate; a "
                f"LearningRateSchedule brings its own. Received: warmup_epochs="
                f"{self.warmup_epochs!r} with a {type(self.learning_rate).__name__}."
            )
        if not isinstance(self.optimizer, str | keras.optimizers.Optimizer):
            raise TypeError(
                f"Phase {self.name!r}: `optimizer` must be a Keras optimizer name or instance. "
                f"Received: optimizer={self.optimizer!r}"
            )
        warmup = self.warmup_epochs
        if not is_number(warmup) or not warmup >= 0:
            raise ValueError(
                f"Phase {self.name!r}: `warmup_epochs` must be a number >= 0. Received: "
                f"warmup_epochs={warmup!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"Phase {self.name!r}: `schedule` must be one of {SCHEDULES}. Received: "
                f"schedule={self.schedule!r}"
            )
        object.__setattr__(self, "callbacks", tuple(self.callbacks or ()))
        if self.layer_lr_decay is not None:
            from keras_transfer.optimizers import check_decay

            check_decay(self.layer_lr_decay, f"{self.name}.layer_lr_decay")
        if isinstance(self.regularizer, str):
            from keras_transfer import regularizers

            object.__setattr__(self, "regularizer", regularizers.get(self.regularizer))
        if self.regularizer is not None and not (
            callable(getattr(self.regularizer, "attach", None))
            and callable(getattr(self.regularizer, "detach", None))
        ):
            raise TypeError(
                f"Phase {self.name!r}: `regularizer` must have attach(model) and detach(model) "
                f"methods (e.g. kt.regularizers.L2SP()). Received: {self.regularizer!r}"
            )


@dataclass(frozen=True)
class CacheOptions:
    """How `fit_phases` trains on cached activations of the frozen part (`kt.caching`).

    Args:
        mode: `"auto"` caches every phase that allows it and logs why a phase runs plainly;
            True insists (raises when a phase cannot); False always runs the full model.
        budget_bytes: Bytes of cached activations kept in memory; the rest spills to files.
        directory: Folder for caches beyond the budget; a temporary folder when None. Files are
            deleted when training returns.
        augment_views: With an augmentation layer before the backbone, cache this many augmented
            views per training image (one drawn per image and epoch); None trains such phases
            plainly.
    """

    mode: bool | str = "auto"
    budget_bytes: int | None = caching.DEFAULT_CACHE_BUDGET_BYTES
    directory: str | os.PathLike | None = None
    augment_views: int | None = None

    def __post_init__(self):
        caching.check_cache_arguments(self.mode, self.augment_views, self.budget_bytes)

    @classmethod
    def coerce(cls, value) -> CacheOptions:
        if isinstance(value, CacheOptions):
            return value
        if isinstance(value, bool | str):
            return cls(mode=value)
        raise TypeError(
            f"`cache` must be 'auto', True, False or a kt.CacheOptions. Received: cache={value!r}"
        )


@dataclass(frozen=True)
class CheckpointOptions:
    """A resumable run (`kt.checkpointing`): where, how often, and the data-order seed.

    Args:
        directory: Folder for the checkpoint; calling again with the same folder resumes at
            the next batch of the phase and epoch the run stopped in.
        every: Optimizer steps between checkpoints (one is also written at each epoch end).
        seed: Seed of the per-epoch data order (each epoch is the training data shuffled by
            `(seed, epoch)`, so a resumed run sees the same batches). Caching is off.
    """

    directory: str | os.PathLike
    every: int = 100
    seed: int = 0

    def __post_init__(self):
        checkpointing.check_arguments(self.directory, self.every, self.seed)

    @classmethod
    def coerce(cls, value) -> CheckpointOptions | None:
        if value is None or isinstance(value, CheckpointOptions):
            return value
        if isinstance(value, str | os.PathLike):
            return cls(value)
        raise TypeError(
            "`checkpoint` must be None, a folder path or a kt.CheckpointOptions. Received: "
            f"checkpoint={value!r}"
        )


def _as_dataset(data, batch_size: int, shuffle: bool = False):
    if isinstance(data, tf.data.Dataset) or data is None:
        return data
    if isinstance(data, tuple) and len(data) == 2:
        from keras_transfer.data import from_arrays

        return from_arrays(data[0], data[1], batch_size=batch_size, shuffle=shuffle)
    raise TypeError(
        "Data must be a tf.data.Dataset of (images, labels) batches (see kt.data) or an "
        f"(x, y) tuple of arrays. Received: {type(data).__name__}"
    )


def steps_per_epoch(dataset: tf.data.Dataset) -> int | None:
    """Number of batches in `dataset`, or None when tf.data cannot tell without iterating."""
    cardinality = int(dataset.cardinality())
    return cardinality if cardinality > 0 else None


def learning_rate_schedule(
    learning_rate: float,
    total_steps: int | None,
    warmup_steps: int,
    schedule: str = "cosine",
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Linear warm-up from 0 to `learning_rate`, then constant or cosine decay to 0.

    Falls back to a constant rate when the number of steps is unknown.
    """
    if not total_steps or (schedule == "constant" and not warmup_steps):
        return learning_rate
    warmup_steps = min(warmup_steps, total_steps - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup_steps else learning_rate,
        decay_steps=max(total_steps - warmup_steps, 1),
        alpha=1.0 if schedule == "constant" else 0.0,
        warmup_target=learning_rate if warmup_steps else None,
        warmup_steps=warmup_steps,
    )


def merge_histories(model, histories: Sequence[tuple[str, keras.callbacks.History]]):
    """One `History` over consecutive fits: logs end to end, `phases` -> epoch ranges."""
    merged = keras.callbacks.History()
    merged.set_model(model)
    merged.history, merged.epoch, merged.phases = {}, [], {}
    keys = list(dict.fromkeys(k for _, h in histories for k in h.history))
    for phase, history in histories:
        n = len(history.epoch)
        if phase is not None:
            merged.phases[phase] = (history.epoch[0], history.epoch[-1] + 1) if n else None
        for key in keys:
            values = merged.history.setdefault(key, [math.nan] * len(merged.epoch))
            values.extend(history.history.get(key, [math.nan] * n))
        merged.epoch.extend(history.epoch)
        merged.params = getattr(history, "params", None)
    return merged


def resolve_strategy(model: keras.Model, strategy: tf.distribute.Strategy | None):
    """The strategy to train `model` under; refuses one the model's variables don't belong to."""
    built_in = model.distribute_strategy
    if strategy is None:
        return built_in
    if strategy is not built_in:
        raise ValueError(
            f"`model` was built under {type(built_in).__name__} but strategy="
            f"{type(strategy).__name__} was passed: its variables are not distributed by that "
            "strategy. Build the model inside `with strategy.scope():` and pass the same strategy."
        )
    return strategy


MIXED_PRECISION = ("mixed_float16", "mixed_bfloat16", "float32")


def check_mixed_precision(model: keras.Model, mixed_precision: str | None) -> None:
    """Refuses a mixed-precision request the model was not built for.

    A Keras dtype policy applies when layers are created, so it cannot be switched on later.
    """
    if mixed_precision is None:
        return
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"`mixed_precision` must be None or one of {MIXED_PRECISION}. "
            f"Received: mixed_precision={mixed_precision!r}"
        )
    built = freezing.find_backbones(model)[0].dtype_policy.name
    if built != mixed_precision:
        raise ValueError(
            f"mixed_precision={mixed_precision!r} was requested but model {model.name!r} was "
            f"built with the {built!r} dtype policy; a policy takes effect when layers are "
            f"created. Build it with kt.build_classifier(..., dtype={mixed_precision!r}) (or "
            "kt.build_regressor), then call fine_tune again."
        )


def make_optimizer(
    spec: str | keras.optimizers.Optimizer,
    learning_rate,
    model: keras.Model,
    layer_lr_decay: float | None = None,
):
    """A fresh optimizer for one phase: by name, or cloned from an instance's config; with
    `layer_lr_decay`, wrapped to train each lower block of the backbone more slowly."""
    if isinstance(spec, str):
        optimizer = keras.optimizers.get(
            {"class_name": spec, "config": {"learning_rate": learning_rate}}
        )
    else:
        config = dict(spec.get_config(), learning_rate=learning_rate)
        optimizer = spec.__class__.from_config(config)
    if layer_lr_decay is not None:
        from keras_transfer import optimizers

        optimizer = optimizers.DiscriminativeOptimizer(
            optimizer, optimizers.block_lr_multipliers(model, layer_lr_decay)
        )
    # Phase models carry the float32 policy, so Keras would not add loss scaling on its own.
    if model.dtype_policy.name == "mixed_float16" and not isinstance(
        optimizer, keras.optimizers.LossScaleOptimizer
    ):
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def _fresh(metrics):
    """Metric objects carry state: give each compile its own copies."""
    if metrics is None:
        return None
    return [
        m.__class__.from_config(m.get_config()) if isinstance(m, keras.metrics.Metric) else m
        for m in metrics
    ]


def _phase_learning_rate(phase: Phase, steps: int | None, found: float | None = None):
    if isinstance(phase.learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return phase.learning_rate
    return learning_rate_schedule(
        float(found if phase.learning_rate == AUTO else phase.learning_rate),
        steps * phase.epochs if steps else None,
        int(round(phase.warmup_epochs * steps)) if steps else 0,
        phase.schedule,
    )


def _set_trainable(model: keras.Model, phase: Phase) -> None:
    kwargs = unfreeze_kwargs(phase.trainable)
    if kwargs is None:
        freezing.freeze_backbone(model)
    else:
        freezing.unfreeze(model, train_batchnorm=phase.train_batchnorm, **kwargs)


def _fit_one(
    model,
    cached,
    train_data,
    validation_data,
    *,
    optimizer,
    strategy,
    compile_kwargs,
    fit_kwargs,
    checkpoint,
):
    """Compiles and fits one phase, on the full model or on its cached phase model."""
    kwargs = dict(compile_kwargs)
    metrics = kwargs.pop("metrics")
    fit_model = cached.model if cached else model
    with strategy.scope():
        # The full model is compiled either way, so it is ready for evaluate/predict afterwards.
        for target in dict.fromkeys((model, fit_model)):
            target.compile(optimizer=optimizer(), metrics=_fresh(metrics), **kwargs)
    if cached:
        train_data, validation_data = cached.train_data, cached.validation_data
    # fit inside the scope too: optimizers create their slot variables on the first step.
    # multi_worker_fit works around Keras' MultiWorkerMirroredStrategy bugs (see _compat).
    with strategy.scope(), _compat.multi_worker_fit(fit_model, strategy, train_data):
        if checkpoint[0] is not None:
            return checkpoint[0].fit(
                fit_model, checkpoint[1], train_data, validation_data, fit_kwargs
            )
        _build_before_fit(fit_model, train_data)
        return fit_model.fit(train_data, validation_data=validation_data, **fit_kwargs)


def _build_before_fit(model: keras.Model, train_data: tf.data.Dataset) -> None:
    """Builds the compiled loss, metrics and optimizer variables from the data's spec.

    Keras does this itself only for models created under a `tf.distribute` strategy; otherwise
    the first trace of the train step creates them, and a `tf.function` that creates variables
    while it is traced is traced a second time: the costliest fixed cost of a short phase (about
    the time of one trace of the whole trainable part). Same build, from shapes alone.
    """
    if getattr(model, "_distribute_strategy", False) is None and hasattr(model, "_symbolic_build"):
        try:
            model._symbolic_build(data_batch=train_data.element_spec)
        except (RuntimeError, TypeError, ValueError) as error:  # fit builds it, and says why not
            logger.debug("Building %r before fit failed (%s); fit builds it.", model.name, error)


def _cut(cut_index: int | None) -> float:
    """Depth of a phase's frozen part: the head-only phase freezes everything (infinite)."""
    return math.inf if cut_index is None else cut_index


def _cached_phases(
    model,
    phases,
    cuts,
    train_data,
    validation_data,
    *,
    options,
    callbacks,
    jit_compile,
    strategy,
) -> dict[int, caching.CachedPhase]:
    """Decides which phases train on cached activations and fills all caches in one pass.

    A phase's cache holds activations computed before any training, so it is valid only while
    nothing below its cut has trained: every earlier phase must freeze at least as much.
    """
    if options.mode is False:
        return {}
    wanted: dict[int, int | None] = {}
    for i, phase in enumerate(phases):
        if not phase.epochs:
            continue
        reason = caching.cache_blocker(
            model,
            cut_index=cuts[i],
            augment_views=options.augment_views,
            callbacks=[*callbacks, *phase.callbacks],
            train_data=train_data,
        )
        earlier = [j for j in range(i) if phases[j].epochs and _cut(cuts[j]) < _cut(cuts[i])]
        if reason is None and earlier:
            reason = (
                f"phase {phases[earlier[0]].name!r} trains layers below its cut first, so "
                "activations cached before training would be stale"
            )
        if reason is None:
            wanted[i] = cuts[i]
        elif options.mode is True:
            raise ValueError(
                f"cache=True but phase {phase.name!r} cannot train on cached activations: "
                f"{reason}. Use cache='auto' to run such phases plainly."
            )
        else:
            logger.warning("Phase %r runs plainly, without caching: %s.", phase.name, reason)
    if not wanted:
        return {}
    augment = options.augment_views if caching.augmentation_layer(model) is not None else None
    if augment:
        logger.warning(
            "Caching %d augmented views per training image; each epoch draws one per image.",
            augment,
        )
    distinct = list(dict.fromkeys(wanted.values()))
    try:
        prepared = caching.prepare(
            model,
            train_data,
            validation_data,
            cut_indices=distinct,
            augment_views=augment,
            budget_bytes=options.budget_bytes,
            cache_dir=options.directory,
            jit_compile=jit_compile,
            strategy=strategy,
        )
    except caching.RandomPipelineError as error:
        if options.mode is True:
            raise ValueError(
                f"cache=True but the training data cannot be cached: {error}."
            ) from None
        logger.warning("Training runs plainly, without caching: %s.", error)
        return {}
    by_cut = dict(zip(distinct, prepared, strict=True))
    return {i: by_cut[cut] for i, cut in wanted.items()}


def _readable_head(model: keras.Model, loss) -> heads.HeadSpec | None:
    """The model's head; None for a model of the user's own whose head is unknown but whose
    loss is given (then nothing is checked against the head)."""
    try:
        return heads.head_of(model)
    except ValueError:
        if loss is None:
            raise
        logger.info("The head of %r is unknown: its data is not checked.", model.name)
        return None


def _distinct(items) -> list:
    """`items` without repeats, by identity (phases may share one cache)."""
    return list({id(item): item for item in items}.values())


def _check_phases(phases) -> list[Phase]:
    if isinstance(phases, Phase):
        phases = [phases]
    phases = list(phases) if isinstance(phases, Sequence) else None
    if not phases or not all(isinstance(p, Phase) for p in phases):
        raise TypeError(
            "`phases` must be a non-empty list of kt.Phase. Received: "
            f"{phases!r}. E.g. [kt.Phase('head', 5), kt.Phase('top', 5, trainable=2, "
            "learning_rate=1e-4)]."
        )
    names = [p.name for p in phases]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"Phase names must be unique. Received duplicates: {duplicates}")
    if not any(p.epochs for p in phases):
        raise ValueError(
            f"Nothing to train: every phase has 0 epochs ({names}). Give at least one phase "
            "epochs >= 1."
        )
    return phases


@dataclass
class _Run:
    """What every phase of one `fit_phases` call shares, and how one phase runs."""

    model: keras.Model
    strategy: tf.distribute.Strategy
    checkpointer: checkpointing.Checkpointer | None
    compile_kwargs: dict
    fit_kwargs: dict
    callbacks: list
    on_phase_begin: Callable | None
    steps: int | None
    sweep_data: tf.data.Dataset | None = None  # what `learning_rate="auto"` sweeps over
    found_rates: dict = field(default_factory=dict)

    def phase(self, phase: Phase, first_epoch: int, cached, train_data, validation_data):
        """Unfreezes, hooks, attaches the regularizer, compiles and fits `phase`."""
        model = self.model
        _set_trainable(model, phase)
        if self.checkpointer is not None:
            self.checkpointer.phase_begins(model, phase.name)
        if self.on_phase_begin is not None:
            with self.strategy.scope():
                self.on_phase_begin(model, phase)
        found = None
        if phase.learning_rate == AUTO:  # before the regularizer: the sweep attaches its own
            from keras_transfer.lr_finder import find_learning_rate

            result = find_learning_rate(
                model, self.sweep_data, phase=phase, loss=self.compile_kwargs["loss"]
            )
            found = self.found_rates[phase.name] = float(result.suggestion)
            logger.info("Phase %r: learning rate %.3g from the LR finder.", phase.name, found)
        rate = _phase_learning_rate(phase, self.steps, found)
        if phase.regularizer is not None:
            with self.strategy.scope():
                phase.regularizer.attach(model)
        try:
            return _fit_one(
                model,
                cached,
                train_data,
                validation_data,
                optimizer=lambda: make_optimizer(
                    phase.optimizer, rate, model, phase.layer_lr_decay
                ),
                strategy=self.strategy,
                compile_kwargs=self.compile_kwargs,
                # Data reaches fit as tf.data, shuffled (or not) by its source.
                fit_kwargs=dict(
                    self.fit_kwargs,
                    callbacks=[*self.callbacks, *phase.callbacks],
                    initial_epoch=first_epoch,
                    epochs=first_epoch + phase.epochs,
                ),
                checkpoint=(self.checkpointer, phase.name),
            )
        finally:
            if phase.regularizer is not None:
                phase.regularizer.detach(model)


def fit_phases(
    model: keras.Model,
    phases: Sequence[Phase],
    train_data,
    validation_data=None,
    *,
    loss=None,
    metrics=None,
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    class_weight: Mapping[int, float] | None = None,
    batch_size: int = 32,
    strategy: tf.distribute.Strategy | None = None,
    cache: CacheOptions | bool | str = "auto",
    checkpoint: CheckpointOptions | str | os.PathLike | None = None,
    on_phase_begin: Callable[[keras.Model, Phase], None] | None = None,
    mixed_precision: str | None = None,
    jit_compile: bool | str = "auto",
    check_data: bool = True,
    verbose: str | int = "auto",
) -> keras.callbacks.History:
    """Trains `model` through `phases`, one `model.fit` each, epochs numbered across them.

    Before each phase its `trainable` part is unfrozen (the rest of the backbone frozen,
    BatchNorm frozen unless `train_batchnorm`), `on_phase_begin(model, phase)` runs, the phase's
    regularizer is attached, and the model is recompiled under the strategy's scope with a fresh
    optimizer at the phase's learning rate.

    Args:
        model: A model from `kt.build_classifier` / `kt.build_regressor`.
        phases: `kt.Phase`s, run in order; names must be unique.
        train_data: A `tf.data.Dataset` of `(images, labels)` batches (see `kt.data`), or an
            `(x, y)` tuple of arrays (reshuffled every epoch).
        validation_data: Same forms as `train_data`, or None.
        loss: Loss; by default follows the head (`kt.head_of`): sparse or categorical
            cross-entropy, binary cross-entropy, or mean squared error.
        metrics: Metrics; by default follow the head (accuracy, AUC, MAE).
        callbacks: Keras callbacks used in every phase (each phase may add its own).
        class_weight: Optional `{class_id: weight}` for imbalanced data.
        batch_size: Batch size per replica when data comes as arrays.
        strategy: A `tf.distribute.Strategy`; defaults to the one the model was built under.
        cache: `"auto"`, True, False or a `kt.CacheOptions`: train phases on cached activations
            of their frozen part. A cached phase sees the same batches in the same order as a
            plain one and ends with the same weights to float precision.
        checkpoint: None, a folder, or a `kt.CheckpointOptions`: checkpoint within epochs and
            resume a killed run at the next batch (caching is then off).
        on_phase_begin: Called as `on_phase_begin(model, phase)` after the phase's layers are
            unfrozen and before it is compiled, under the strategy's scope.
        mixed_precision: None, or the policy the model must have been built with.
        jit_compile: XLA-compile the training steps (and the caching pass when True).
        check_data: Check labels and pixels against the head (`kt.datacheck`): a cached run
            in its caching pass, before any training; a plain run batch by batch as the data is
            read, stopping at the first bad batch with the weights restored to their start.
        verbose: Passed to `fit`.

    Returns:
        A `keras.callbacks.History` with every phase's logs end to end; `phases` maps each
        phase name to its `(first_epoch, end_epoch)` (None for a phase of 0 epochs), `cached`
        maps it to the cut its activations were cached at (`"pooling"` or a backbone layer
        name; False when it ran plainly, None when skipped), `cache_info` gives the caches'
        sizes and places, and `learning_rates` the rate each `"auto"` phase found.

    Raises:
        ValueError: for bad phases, a strategy mismatch, a bad `trainable` or labels whose
            shape cannot fit the head, before any training starts; for labels or pixels that do
            not fit the head (out of range, negative, non-finite), with the weights unchanged.
    """
    phases = _check_phases(phases)
    cache_options = CacheOptions.coerce(cache)
    checkpoint = CheckpointOptions.coerce(checkpoint)
    checkpointer = None
    if checkpoint is not None:
        checkpointer = checkpointing.Checkpointer(
            checkpoint.directory,
            every=checkpoint.every,
            seed=checkpoint.seed,
            phases=[p.name for p in phases],
        )
        cache_options = CacheOptions(
            checkpointer.cache_setting(cache_options.mode),
            cache_options.budget_bytes,
            cache_options.directory,
            cache_options.augment_views,
        )
    check_mixed_precision(model, mixed_precision)
    strategy = resolve_strategy(model, strategy)
    global_batch_size = batch_size * strategy.num_replicas_in_sync
    # Arrays are reshuffled every epoch, as `model.fit(x, y)` does; with checkpointing on, the
    # checkpointing module shuffles by (seed, epoch) itself and needs a fixed source order.
    train_data = _as_dataset(train_data, global_batch_size, shuffle=checkpointer is None)
    validation_data = _as_dataset(validation_data, global_batch_size)
    head = _readable_head(model, loss)
    if check_data and head is not None:
        datacheck.check_spec(head, train_data.element_spec, "train_data")
        if validation_data is not None:
            datacheck.check_spec(head, validation_data.element_spec, "validation_data")
    if loss is None:
        loss, default_metrics = heads.default_loss_and_metrics(model, train_data.element_spec[1])
        metrics = default_metrics if metrics is None else metrics
    # Validate every phase's unfreeze request on the model before any epoch runs.
    cuts = [
        None
        if not p.epochs or unfreeze_kwargs(p.trainable) is None
        else freezing.plan_unfreeze(model, **unfreeze_kwargs(p.trainable))
        for p in phases
    ]
    for p in phases:
        if p.epochs and p.layer_lr_decay is not None:
            from keras_transfer.optimizers import block_lr_multipliers

            block_lr_multipliers(model, p.layer_lr_decay)  # an unknown backbone fails now
    callbacks = list(callbacks or [])
    freezing.freeze_backbone(model)
    cached = _cached_phases(
        model,
        phases,
        cuts,
        train_data,
        validation_data,
        options=cache_options,
        callbacks=callbacks,
        jit_compile=jit_compile is True,
        strategy=strategy,
    )
    histories = []
    # A cached run checked its data while caching; plain runs check each batch as it is read and
    # roll the weights back if one is refused (kt.datacheck).
    sources = {"train_data": train_data, "validation_data": validation_data}
    validate = check_data and head is not None and not any(c.checked for c in cached.values())
    if validate:
        start_weights = model.get_weights()
        train_data = datacheck.validating(head, train_data, "train_data")
        if validation_data is not None:
            validation_data = datacheck.validating(head, validation_data, "validation_data")
    run = _Run(
        model,
        strategy,
        checkpointer,
        compile_kwargs=dict(loss=loss, metrics=metrics, jit_compile=jit_compile),
        fit_kwargs=dict(class_weight=class_weight, verbose=verbose, shuffle=False),
        callbacks=callbacks,
        on_phase_begin=on_phase_begin,
        steps=steps_per_epoch(train_data),
        sweep_data=sources["train_data"],
    )
    try:
        epoch = 0
        for i, phase in enumerate(phases):
            first, epoch = epoch, epoch + phase.epochs
            if phase.epochs and not (checkpointer and checkpointer.skips(model, phase.name)):
                logger.info(
                    "Phase %d/%d %r: %d epochs, trainable=%r.",
                    i + 1,
                    len(phases),
                    phase.name,
                    phase.epochs,
                    phase.trainable,
                )
                history = run.phase(phase, first, cached.get(i), train_data, validation_data)
                histories.append((phase.name, history))
    except tf.errors.InvalidArgumentError as error:
        if not validate or datacheck.MARKER not in str(error):
            raise
        model.set_weights(start_weights)
        raise datacheck.explain(head, sources, error) from None
    finally:
        for phase_cache in _distinct(cached.values()):
            phase_cache.close()
    merged = merge_histories(model, histories)
    merged.phases = {p.name: merged.phases.get(p.name) for p in phases}
    merged.cached = {
        p.name: (cached[i].cut if i in cached else False) if p.epochs else None
        for i, p in enumerate(phases)
    }
    merged.cache_info = caching.describe(_distinct(cached.values()))
    merged.learning_rates = dict(run.found_rates)  # the rates "auto" phases found
    return merged
