"""Checkpoints within epochs, and resuming a killed `fine_tune` exactly where it stopped.

Keras' `BackupAndRestore` restarts an interrupted epoch from batch 0, so the batches it had already
applied are applied twice. Here a checkpoint records the phase, the epoch and how many batches of
it were applied, next to the model's variables (weights, BatchNorm statistics, random-seed states)
and the optimizer's (iteration count, slots). On resume the interrupted epoch continues at the
next batch.

That needs a data order that does not depend on the process: with checkpointing on, epoch `e`'s
batches are `train_data` re-shuffled example by example with seed `(seed, e)`, so a resumed run
sees the same batches as an uninterrupted one and skips the ones already applied. `train_data`
must therefore iterate in the same order each time (no `reshuffle_each_iteration` shuffle of its
own; `kt.data.from_arrays(..., shuffle=False)`, or `(x, y)` arrays); a warning says so otherwise.
The shuffle buffer holds at most `SHUFFLE_BUFFER` examples, and each phase counts the examples
once (one pass over `train_data`) to know the epoch length.

Each checkpoint is one `.npz` file written under a temporary name, flushed to disk and renamed
over the previous one (`os.replace`), so a kill at any moment leaves the old or the new checkpoint,
never half of one. Metric values of an interrupted epoch cover only the batches run after resuming.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from keras_transfer._validate import check_int

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.npz"
PHASE_START_FILE = "phase_start.npz"  # the model's variables when the current phase began
PHASES = ("head", "finetune")  # `kt.fine_tune`'s phases; `fit_phases` passes its own
SHUFFLE_BUFFER = 4096
FORMAT_VERSION = 1


def check_arguments(checkpoint_dir, every, seed) -> None:
    """Raises `ValueError`/`TypeError` for bad checkpoint arguments, before anything is written."""
    if checkpoint_dir is None:
        return
    if not isinstance(checkpoint_dir, str | os.PathLike) or not str(checkpoint_dir):
        raise TypeError(
            "`checkpoint_dir` must be a folder path (str or PathLike) or None. "
            f"Received: checkpoint_dir={checkpoint_dir!r}"
        )
    if Path(checkpoint_dir).exists() and not Path(checkpoint_dir).is_dir():
        raise ValueError(
            f"`checkpoint_dir` {str(checkpoint_dir)!r} exists and is not a folder. Pass a folder "
            "path (it is created if missing)."
        )
    check_int(
        "checkpoint_every",
        every,
        minimum=1,
        hint="It counts optimizer steps between checkpoints, e.g. checkpoint_every=100",
    )
    check_int("checkpoint_seed", seed, minimum=0)


def write_checkpoint(
    directory: str | os.PathLike, state: dict, model, optimizer, name: str = CHECKPOINT_FILE
) -> Path:
    """Writes `state` and the variables of `model` and `optimizer` atomically; returns the file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {"state": np.array(json.dumps(state))}
    for i, variable in enumerate(model.variables):
        arrays[f"model_{i}"] = np.asarray(keras.ops.convert_to_numpy(variable))
    for i, variable in enumerate(optimizer.variables if optimizer is not None else ()):
        arrays[f"optimizer_{i}"] = np.asarray(keras.ops.convert_to_numpy(variable))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        target = directory / name
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_checkpoint(directory: str | os.PathLike, name: str = CHECKPOINT_FILE):
    """Returns `(state, model_arrays, optimizer_arrays)` in `directory`, or None."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        state = json.loads(str(data["state"]))
        model_arrays = [data[f"model_{i}"] for i in range(state["model_variables"])]
        optimizer_arrays = [data[f"optimizer_{i}"] for i in range(state["optimizer_variables"])]
    return state, model_arrays, optimizer_arrays


def _assign(variables, arrays, what: str, path: Path) -> None:
    variables = list(variables)
    shapes = [tuple(v.shape) for v in variables]
    saved = [tuple(a.shape) for a in arrays]
    if shapes != saved:
        raise ValueError(
            f"The checkpoint in {str(path)!r} holds {len(saved)} {what} variables that do not "
            f"match this run's {len(shapes)} (first shapes {saved[:3]} vs {shapes[:3]}): it was "
            "written for another model or settings. Resume with the same model and arguments, or "
            "pass an empty `checkpoint_dir` to start over."
        )
    for variable, array in zip(variables, arrays, strict=True):
        variable.assign(array)


class _CheckpointCallback(keras.callbacks.Callback):
    """Writes a checkpoint every `every` optimizer steps and at the end of each epoch."""

    def __init__(self, checkpointer: Checkpointer, phase: str, batches: int):
        super().__init__()
        self.checkpointer = checkpointer
        self.phase = phase
        self.batches = batches
        self.offset = 0
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if int(np.asarray(self.model.optimizer.iterations)) % self.checkpointer.every == 0:
            self.checkpointer.save(self.model, self.phase, self.epoch, self.offset + batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.offset = 0
        self.checkpointer.save(self.model, self.phase, epoch + 1, 0)


class Checkpointer:
    """Checkpoints and resumes the phases of one `fit_phases` / `fine_tune` run in `directory`.

    Args:
        directory: Folder holding `checkpoint.npz`; created if missing.
        every: Optimizer steps between checkpoints (one is also written at each epoch end).
        seed: Seed of the per-epoch data order.
        phases: The run's phase names, in order.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        every: int = 100,
        seed: int = 0,
        phases: Sequence[str] = PHASES,
    ):
        check_arguments(directory, every, seed)
        self.directory = Path(directory)
        self.every = every
        self.seed = seed
        self.phases = tuple(phases)
        self.layout = None
        # A kill during a write leaves only its temporary file; the checkpoint itself is whole.
        for name in (CHECKPOINT_FILE, PHASE_START_FILE):
            for stale in self.directory.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        found = read_checkpoint(self.directory)
        self.state, self._model_arrays, self._optimizer_arrays = found or (None, [], [])
        if self.state is not None and self.state["phase"] not in self.phases:
            raise ValueError(
                f"The checkpoint in {str(self.directory)!r} was written in phase "
                f"{self.state['phase']!r}, which this run's phases {list(self.phases)} do not "
                "have. Resume with the same phases, or pass an empty checkpoint folder to start "
                "over."
            )
        if self.state is not None:
            logger.info(
                "Resuming from %s: phase %r, epoch %d, %d batches applied.",
                self.directory / CHECKPOINT_FILE,
                self.state["phase"],
                self.state["epoch"],
                self.state["batch"],
            )

    def cache_setting(self, cache):
        """Caching is off while checkpointing: cached phase models train other variables."""
        if cache is True:
            raise ValueError(
                "cache=True cannot be combined with checkpoint_dir: a resumable run trains the "
                "full model so its checkpoints hold the model's own variables. Use cache=False "
                "(or 'auto', which then runs plainly)."
            )
        if cache == "auto":
            logger.warning("checkpoint_dir is set: training runs plainly, without caching.")
        return False

    def save(self, model, phase: str, epoch: int, batch: int, done: bool = False) -> None:
        optimizer = getattr(model, "optimizer", None)
        state = {
            "format": FORMAT_VERSION,
            "phase": phase,
            "epoch": int(epoch),
            "batch": int(batch),
            "done": bool(done),
            "seed": self.seed,
            "data": self.layout,
            "iterations": int(np.asarray(optimizer.iterations)) if optimizer is not None else 0,
            "model_variables": len(model.variables),
            "optimizer_variables": len(optimizer.variables) if optimizer is not None else 0,
        }
        write_checkpoint(self.directory, state, model, optimizer)

    def phase_begins(self, model, phase: str) -> None:
        """Called when `phase` begins, before its hooks (`on_phase_begin`, a regularizer).

        A fresh phase records the model's variables as the phase's start. A run resuming inside
        `phase` puts that start back first, so the hooks see the weights the phase began with
        (L2-SP anchors there, not at the resumed weights); `fit` then restores the rest.
        """
        resuming = self.state is not None and self.state["phase"] == phase
        if resuming and not self.state["done"]:
            found = read_checkpoint(self.directory, PHASE_START_FILE)
            if found is not None and found[0].get("phase") == phase:
                _assign(model.variables, found[1], "model", self.directory / PHASE_START_FILE)
            return
        if not resuming:
            state = {
                "format": FORMAT_VERSION,
                "phase": phase,
                "model_variables": len(model.variables),
                "optimizer_variables": 0,
            }
            write_checkpoint(self.directory, state, model, None, PHASE_START_FILE)

    def _check_same_data(self, examples: int, batch_size: int) -> None:
        saved = (self.state.get("data"), self.state.get("seed"))
        if saved != ([examples, batch_size], self.seed):
            raise ValueError(
                f"The checkpoint in {str(self.directory)!r} was written for [examples, batch size] "
                f"{saved[0]} and checkpoint_seed={saved[1]}; this run has {[examples, batch_size]} "
                f"and checkpoint_seed={self.seed}, so its batches would not line up. Resume with "
                "the same data and arguments, or pass an empty `checkpoint_dir` to start over."
            )

    def skips(self, model, phase: str) -> bool:
        """Whether `phase` finished in the checkpointed run (then its weights are loaded)."""
        if self.state is None:
            return False
        done = self.phases.index(self.state["phase"]) > self.phases.index(phase) or (
            self.state["phase"] == phase and self.state["done"]
        )
        if done:
            self._restore(model, optimizer=False)
        return done

    def _restore(self, model, optimizer: bool) -> None:
        path = self.directory / CHECKPOINT_FILE
        _assign(model.variables, self._model_arrays, "model", path)
        if optimizer:
            with model.distribute_strategy.scope():
                if not model.optimizer.built:
                    model.optimizer.build(model.trainable_variables)
            _assign(model.optimizer.variables, self._optimizer_arrays, "optimizer", path)

    def _measure(self, train_data: tf.data.Dataset) -> tuple[int, int, int]:
        """(examples, batch size, batches per epoch) of `train_data`."""
        first = next(iter(train_data.take(1)))
        batch_size = int(tf.shape(tf.nest.flatten(first)[0])[0])
        examples = int(train_data.unbatch().reduce(np.int64(0), lambda count, _: count + 1))
        return examples, batch_size, -(-examples // batch_size)

    def epoch_dataset(self, train_data, epoch, examples: int, batch_size: int):
        """Epoch `epoch`'s batches: `train_data` re-shuffled with seed `(seed, epoch)`."""
        seed = int(epoch) + int(self.seed) * 1_000_003
        buffer = max(1, min(examples, SHUFFLE_BUFFER))
        shuffled = train_data.unbatch().shuffle(buffer, seed=seed, reshuffle_each_iteration=False)
        batches = -(-examples // batch_size)
        # A known length: Keras then stops on the count, without an extra end-of-data step
        # (which would also advance the optimizer's iteration count).
        return shuffled.batch(batch_size).apply(tf.data.experimental.assert_cardinality(batches))

    def fit(self, model, phase: str, train_data, validation_data, fit_kwargs: dict):
        """`model.fit` for `phase`, resumed from the checkpoint and checkpointing as it goes."""
        kwargs = dict(fit_kwargs)
        first_epoch, end = kwargs.pop("initial_epoch", 0), kwargs.pop("epochs")
        user_callbacks = list(kwargs.pop("callbacks", None) or [])
        epoch, batch = first_epoch, 0
        _warn_if_reshuffling(train_data)
        examples, batch_size, batches = self._measure(train_data)
        self.layout = [examples, batch_size]
        if self.state is not None and self.state["phase"] == phase:
            self._check_same_data(examples, batch_size)  # before anything is restored
            self._restore(model, optimizer=True)
            if self.state["done"]:
                return _empty_history(model)
            epoch, batch = self.state["epoch"], self.state["batch"]
        elif self.state is not None and (
            self.phases.index(self.state["phase"]) < self.phases.index(phase)
        ):
            self._restore(model, optimizer=False)
        if batch >= batches:
            epoch, batch = epoch + 1, 0
        callback = _CheckpointCallback(self, phase, batches)
        callbacks = [*user_callbacks, callback]
        histories = []
        if batch and epoch < end:
            # The interrupted epoch: its first `batch` batches were applied before the kill.
            callback.offset = batch
            data = self.epoch_dataset(train_data, epoch, examples, batch_size).skip(batch)
            histories.append(
                model.fit(
                    data,
                    validation_data=validation_data,
                    steps_per_epoch=batches - batch,
                    initial_epoch=epoch,
                    epochs=epoch + 1,
                    callbacks=callbacks,
                    **kwargs,
                )
            )
            epoch += 1
        if epoch < end:
            stream = self.epoch_dataset(train_data, epoch, examples, batch_size)
            for later in range(epoch + 1, end):
                stream = stream.concatenate(
                    self.epoch_dataset(train_data, later, examples, batch_size)
                )
            # With steps_per_epoch Keras keeps one iterator across epochs, so the stream's
            # epochs line up with Keras'.
            histories.append(
                model.fit(
                    stream,
                    validation_data=validation_data,
                    steps_per_epoch=batches,
                    initial_epoch=epoch,
                    epochs=end,
                    callbacks=callbacks,
                    **kwargs,
                )
            )
        self.save(model, phase, end, 0, done=True)
        self.state = None
        return _concat_histories(model, histories)


def _empty_history(model) -> keras.callbacks.History:
    history = keras.callbacks.History()
    history.set_model(model)
    history.history, history.epoch = {}, []
    return history


def _concat_histories(model, histories) -> keras.callbacks.History:
    from keras_transfer.phases import merge_histories

    return merge_histories(model, [(None, h) for h in histories])


def _reshuffles(dataset: tf.data.Dataset) -> bool:
    """Whether a `shuffle(..., reshuffle_each_iteration=True)` feeds `dataset`.

    Walks the pipeline's Python objects rather than serializing it: a serialized pipeline
    embeds its arrays as graph constants, a copy of the user's data.
    """
    pending = [dataset]
    while pending:
        ds = pending.pop()
        if getattr(ds, "_reshuffle_each_iteration", False) is True:
            return True
        try:
            pending.extend(ds._inputs())
        except (AttributeError, TypeError):
            continue
    return False


def _warn_if_reshuffling(dataset: tf.data.Dataset) -> None:
    if _reshuffles(dataset):
        logger.warning(
            "train_data reshuffles on each iteration, so a resumed run may not see the same "
            "batches as an uninterrupted one. With checkpoint_dir, build it without its own "
            "shuffling (e.g. kt.data.from_arrays(..., shuffle=False)): fine_tune shuffles each "
            "epoch with checkpoint_seed itself."
        )
