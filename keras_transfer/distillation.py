"""Model-level transfer: distil a teacher into a student, learn a new task without forgetting.

Knowledge distillation (Hinton, Vinyals & Dean, 2015) trains a student on the teacher's softened
outputs: with logits z_s, z_t, labels y, temperature T and weight α,

    L = α · CE(y, softmax(z_s)) + (1 − α) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T)).

The T² keeps the soft term's gradients at the scale of the hard term's (they shrink as 1/T²).
`distillation_loss` is that formula as a pure function; `Distiller` is a `keras.Model` whose
`train_step` applies it, so `fit`, callbacks and `tf.distribute` work as usual; `distill` does it
in one call. The teacher runs in inference mode, outside the gradient tape, and its weights are
neither trained nor handed to the optimizer, so it comes out bit-identical (its `trainable` flags
are left alone). Evaluation measures the student alone; the teacher only runs in training.

Learning without forgetting (Li & Hoiem, 2016) adds a new head to an old model and trains the
shared backbone on the new task while keeping the old head's outputs on the new images close to
what the old model gave before training:

    L = CE(y_new, softmax(z_new)) + λ_old · CE(softmax(z_old⁰ / T), softmax(z_old / T)),

where z_old⁰ are the old model's logits recorded before training (T = 2, λ_old = 1 in the paper)
and softmax(z / T) is the paper's "raise to 1/T and renormalise". `LearningWithoutForgetting`
trains a copy of the old model, so the model passed in stays as it was, and exposes
`new_task_model` and `old_task_model`: plain Functional models (sharing the trained backbone) to
save, evaluate and export like any model from `kt.build_classifier`.

Keras 3.15 ships `keras.distillation.Distiller`; it is not used here because it distils the
models' final outputs (probabilities for a model from `kt.build_classifier`, not logits), ignores
`sample_weight`, runs the teacher during `evaluate`, and sets `teacher.trainable = False` on the
caller's model.

Example:
>>> import numpy as np, keras_transfer as kt
>>> teacher = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
>>> student = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
>>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
>>> history = kt.distill(teacher, student, (x, np.arange(8) % 3), epochs=1, verbose=0)
>>> sorted(history.history)
['accuracy', 'distillation_loss', 'loss', 'student_loss']
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from keras_transfer import _validate, heads

__all__ = ["Distiller", "LearningWithoutForgetting", "distill", "distillation_loss"]


# --- argument checks --------------------------------------------------------------------------


def check_temperature(value, name: str = "temperature") -> float:
    """`value` as a float > 0, or a ValueError naming `name` and typical values."""
    if not _validate.is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{name}` must be a finite number > 0 (the logits are divided by it). "
            f"Received: {name}={value!r}. Typical values: 2 to 10 (Hinton et al. use 2 to 20; "
            "1 leaves the softmax unchanged)."
        )
    return float(value)


def check_alpha(value, name: str = "alpha") -> float:
    """`value` as a float in [0, 1], or a ValueError naming `name`."""
    if not _validate.is_number(value) or not math.isfinite(value) or not 0 <= value <= 1:
        raise ValueError(
            f"`{name}` must be a number in [0, 1]: the weight of the labels' cross-entropy, "
            f"(1 - {name}) going to the teacher's soft targets. Received: {name}={value!r}. "
            f"Use {name}=0 to distil from unlabelled images, 0.1 for the usual mix."
        )
    return float(value)


def _check_nonnegative(name: str, value, hint: str) -> float:
    if not _validate.is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={value!r}. {hint}"
        )
    return float(value)


def classifier_head(model, role: str) -> heads.HeadSpec:
    """The softmax head of `model` (logits readable), or an error naming `role` and the fix."""
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`{role}` must be a keras.Model (e.g. from kt.build_classifier). "
            f"Received: {role}={type(model).__name__}"
        )
    try:
        spec = heads.head_of(model)
    except ValueError as error:
        raise ValueError(
            f"`{role}` ({model.name!r}) has no logits that keras_transfer can read, and "
            f"distillation needs logits, not probabilities. {error}"
        ) from None
    if spec.kind != "multiclass":
        raise ValueError(
            f"`{role}` ({model.name!r}) has a {spec.kind} head ({spec.activation} outputs); "
            "distillation here needs a single-label (softmax) classifier. Build it with "
            "kt.build_classifier(..., multi_label=False)."
        )
    return spec


def _check_inputs_match(teacher: keras.Model, student: keras.Model) -> None:
    t_shape, s_shape = tuple(teacher.input_shape), tuple(student.input_shape)
    if len(t_shape) != len(s_shape) or any(
        a is not None and b is not None and a != b
        for a, b in zip(t_shape[1:], s_shape[1:], strict=False)
    ):
        raise ValueError(
            f"`teacher` takes inputs of shape {t_shape} but `student` takes {s_shape}: both see "
            "the same images in each batch. Build the student at the teacher's size, e.g. "
            f"kt.build_classifier(..., image_size={t_shape[1:3]}, channels={t_shape[-1]})."
        )


# --- the loss ---------------------------------------------------------------------------------


def _cross_entropy(y_true, logits):
    """Per-example cross-entropy on logits; class ids `(batch,)`/`(batch, 1)` or one-hot rows."""
    y_true = ops.convert_to_tensor(y_true)
    num_classes = logits.shape[-1]
    if len(y_true.shape) == len(logits.shape) and y_true.shape[-1] == num_classes != 1:
        return ops.categorical_crossentropy(
            ops.cast(y_true, logits.dtype), logits, from_logits=True
        )
    if len(y_true.shape) == len(logits.shape):
        y_true = ops.squeeze(y_true, axis=-1)
    return ops.sparse_categorical_crossentropy(ops.cast(y_true, "int32"), logits, from_logits=True)


def _soft_kl(teacher_logits, student_logits, temperature: float):
    """Per-example KL(softmax(z_t / T) ‖ softmax(z_s / T)), computed on log-probabilities."""
    log_p = ops.log_softmax(teacher_logits / temperature, axis=-1)
    log_q = ops.log_softmax(student_logits / temperature, axis=-1)
    return ops.sum(ops.exp(log_p) * (log_p - log_q), axis=-1)


def _mean(values, sample_weight=None):
    """Keras' `sum_over_batch_size`: Σ wᵢ·lᵢ / batch size (a plain mean without weights)."""
    if sample_weight is not None:
        weights = ops.reshape(ops.cast(sample_weight, values.dtype), ops.shape(values))
        values = values * weights
    return ops.mean(values)


def _check_logits(student_logits, teacher_logits):
    s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if s[-1] is not None and t[-1] is not None and s[-1] != t[-1]:
        raise ValueError(
            f"`student_logits` has {s[-1]} classes but `teacher_logits` has {t[-1]}; the soft "
            "targets compare class by class. Give both models the same classes, in the same order."
        )


def distillation_loss(
    y_true,
    student_logits,
    teacher_logits,
    *,
    temperature: float = 4.0,
    alpha: float = 0.1,
    sample_weight=None,
):
    """Hinton et al.'s distillation loss on logits, averaged over the batch.

    `alpha · CE(y, softmax(z_s)) + (1 − alpha) · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))`.

    Args:
        y_true: Class ids `(batch,)` (or `(batch, 1)`), or one-hot / soft labels
            `(batch, classes)`; may be None when `alpha` is 0.
        student_logits: The student's logits, `(batch, classes)`.
        teacher_logits: The teacher's logits, `(batch, classes)`.
        temperature: T > 0; both softmaxes are taken at z / T.
        alpha: Weight of the labels' cross-entropy, in [0, 1].
        sample_weight: Optional per-example weights `(batch,)`; the weighted sum is divided by
            the batch size, as Keras losses do.

    Returns:
        A scalar float tensor.

    Raises:
        ValueError: for `temperature` <= 0, `alpha` outside [0, 1], logits with different
            numbers of classes, or no labels with `alpha` > 0.

    Example:
    >>> import numpy as np
    >>> from keras_transfer.distillation import distillation_loss
    >>> z = np.array([[2.0, 0.0, -1.0]], "float32")
    >>> float(distillation_loss([0], z, z, temperature=4.0, alpha=0.0))  # same logits: KL = 0
    0.0
    """
    temperature, alpha = check_temperature(temperature), check_alpha(alpha)
    student_logits = ops.cast(ops.convert_to_tensor(student_logits), "float32")
    teacher_logits = ops.cast(ops.convert_to_tensor(teacher_logits), "float32")
    _check_logits(student_logits, teacher_logits)
    if y_true is None and alpha > 0:
        raise ValueError(
            f"`y_true` is None but alpha={alpha!r} weights the labels' cross-entropy. Pass the "
            "labels, or alpha=0 to distil from the teacher alone."
        )
    soft = _mean(_soft_kl(teacher_logits, student_logits, temperature), sample_weight)
    total = (1.0 - alpha) * temperature**2 * soft
    if alpha > 0:
        total = total + alpha * _mean(_cross_entropy(y_true, student_logits), sample_weight)
    return total


# --- shared machinery of the two training models ----------------------------------------------


def _scaled(optimizer, loss):
    """A replica's loss as the optimizer differentiates it; compute it inside the tape.

    Divided by the number of replicas, so that the summed gradients are those of the global
    mean, then scaled by the optimizer (loss scaling under mixed precision).
    """
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return optimizer.scale_loss(loss / replicas if replicas > 1 else loss)


def _regularization(model: keras.Model):
    """Ω: the penalties of `model`'s variables and layers (`model.losses`), summed; or 0."""
    losses = [ops.sum(ops.cast(loss, "float32")) for loss in model.losses]
    return ops.sum(ops.stack(losses)) if losses else ops.zeros((), "float32")


class _TrainsPart(keras.Model):
    """A training wrapper whose optimizer sees only `self._trained` (a Functional model).

    The wrapper also holds models it must not train (a teacher, the old model that records the
    targets). Keras builds the optimizer over `trainable_variables`, so those report only the
    trained part's; the other models' weights count as non-trainable here, whatever their
    layers' `trainable` flags say.
    """

    _trained: keras.Model
    _tracker_names: tuple[str, ...] = ()

    @property
    def trainable_variables(self):
        return self._trained.trainable_variables

    @property
    def trainable_weights(self):
        return self._trained.trainable_weights

    @property
    def non_trainable_variables(self):
        ids = {id(v) for v in self.trainable_variables}
        return [v for v in self.variables if id(v) not in ids]

    @property
    def non_trainable_weights(self):
        ids = {id(v) for v in self.trainable_weights}
        return [v for v in self.weights if id(v) not in ids]

    def compile(self, optimizer="adam", metrics=None, **kwargs):
        """Like `keras.Model.compile`, without `loss`: the loss is this model's own.

        Args:
            optimizer: An optimizer name or instance.
            metrics: Metrics of the predictions against the labels (e.g. `["accuracy"]`).
            **kwargs: Other `keras.Model.compile` arguments (`jit_compile`, ...).

        Raises:
            TypeError: when `loss` or `loss_weights` is given.
        """
        for key in ("loss", "loss_weights"):
            if kwargs.get(key) is not None:
                raise TypeError(
                    f"{type(self).__name__}.compile() takes no `{key}`: the loss is fixed by the "
                    f"model (see its docstring). Received: {key}={kwargs[key]!r}"
                )
            kwargs.pop(key, None)
        with self.distribute_strategy.scope():
            super().compile(optimizer=optimizer, metrics=metrics, **kwargs)

    @staticmethod
    def _step(optimizer, tape, scaled, variables):
        """One optimizer step on `variables` for `scaled`, recorded on `tape` (see `_scaled`)."""
        gradients = tape.gradient(scaled, variables)
        optimizer.apply_gradients(zip(gradients, variables, strict=True))

    def compile_from_config(self, config):
        # Keras skips this for an overridden `compile`; ours takes the same arguments.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if self.optimizer is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def _logs(self, x, y, predictions, sample_weight, trackers):
        """The compiled metrics of `predictions` (when there are labels) and `trackers`."""
        logs = {}
        if y is not None:
            # Updates the compiled metrics; the result also holds every tracker of ours.
            logs.update(super().compute_metrics(x, y, predictions, sample_weight=sample_weight))
        logs = {k: v for k, v in logs.items() if k not in self._tracker_names}
        logs.update({t.name: t.result() for t in trackers})
        return logs

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        # Unlabelled batches (alpha=0) have no labels to compare the predictions with.
        if y is None:
            return {}
        return super().compute_metrics(x, y, y_pred, sample_weight=sample_weight)


def _batch_size(x):
    first = next(t for t in tf.nest.flatten(x) if t is not None)
    return tf.shape(first)[0]


def _heads_model(model: keras.Model, spec: heads.HeadSpec, name: str) -> keras.Model:
    """`model`'s inputs -> `[logits, predictions]`, over the same layers."""
    logits = heads.logits_model(model).output
    return keras.Model(model.input, [logits, model.get_layer(spec.output_layer).output], name=name)


# --- distillation -----------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package="keras_transfer")
class Distiller(_TrainsPart):
    """A `keras.Model` that trains `student` on labels and on `teacher`'s soft targets.

    Each training step runs the teacher in inference mode outside the gradient tape, the student
    in training mode, and minimises `distillation_loss` on their logits plus the student's own
    regularization losses. Only the student's trainable weights are updated; the teacher's are
    never handed to the optimizer. Batches may be `(images, labels)`, `(images, labels,
    sample_weight)`, or images alone when `alpha` is 0.

    Logs: `loss` (the total), `distillation_loss` (T²·KL, the soft term before weighting),
    `student_loss` (the labels' cross-entropy, when batches have labels) and the compiled metrics
    of the student's predictions. `evaluate` and validation run the student alone: `loss` and
    `student_loss` are then its cross-entropy on the labels. Calling or `predict` gives the
    student's predictions. Train through the Distiller, then save or export `.student`, a plain
    Functional model.

    Args:
        teacher: A trained classifier with a softmax head (e.g. from `kt.build_classifier`, or
            `kt.runs.load_run(...).model`).
        student: The classifier to train: the same classes, in the same order, and the same
            input shape. Its `trainable` flags decide what trains.
        temperature: T > 0 of the soft targets.
        alpha: Weight of the labels' cross-entropy, in [0, 1]; 0 distils from images alone.
        name: Name of the wrapper model.

    Raises:
        TypeError: when `teacher` or `student` is not a `keras.Model`.
        ValueError: for `temperature` <= 0, `alpha` outside [0, 1], a model whose logits cannot
            be read or that is not a softmax classifier, different class counts or input shapes.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> teacher = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> student = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> distiller = kt.distillation.Distiller(teacher, student, temperature=4.0, alpha=0.1)
    >>> distiller.compile(optimizer="adam", metrics=["accuracy"])
    >>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    >>> history = distiller.fit(x, np.arange(8) % 3, epochs=1, verbose=0)
    >>> distiller.student is student
    True
    """

    def __init__(
        self,
        teacher: keras.Model,
        student: keras.Model,
        *,
        temperature: float = 4.0,
        alpha: float = 0.1,
        name: str = "distiller",
        **kwargs,
    ):
        temperature, alpha = check_temperature(temperature), check_alpha(alpha)
        teacher_head = classifier_head(teacher, "teacher")
        student_head = classifier_head(student, "student")
        if teacher_head.num_outputs != student_head.num_outputs:
            raise ValueError(
                f"`teacher` ({teacher.name!r}) predicts {teacher_head.num_outputs} classes but "
                f"`student` ({student.name!r}) predicts {student_head.num_outputs}; the soft "
                "targets compare class by class. Build the student with "
                f"num_classes={teacher_head.num_outputs}, in the teacher's class order."
            )
        _check_inputs_match(teacher, student)
        # Models created under a strategy remember it: the wrapper and its metrics join the
        # student's, so that fit distributes the student's variables.
        with student.distribute_strategy.scope():
            super().__init__(name=name, **kwargs)
            self.teacher = teacher
            self.student = student
            self.temperature = temperature
            self.alpha = alpha
            self._teacher_logits = heads.logits_model(teacher)
            self._trained = _heads_model(student, student_head, f"{student.name}_heads")
            self._activation = keras.activations.get(student_head.activation)
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.student_loss_tracker = keras.metrics.Mean(name="student_loss")
            self.distillation_loss_tracker = keras.metrics.Mean(name="distillation_loss")
        self._tracker_names = ("loss", "student_loss", "distillation_loss")
        self.built = True

    def call(self, inputs, training=None):
        return self.student(inputs, training=training)

    def _student_loss(self, y, logits, sample_weight):
        return _mean(_cross_entropy(y, logits), sample_weight)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None and self.alpha > 0:
            raise ValueError(
                f"The batches have no labels but alpha={self.alpha!r} weights the labels' "
                "cross-entropy. Give (images, labels) batches, or build the Distiller with "
                "alpha=0 to distil from unlabelled images."
            )
        teacher_logits = ops.stop_gradient(
            ops.cast(self._teacher_logits(x, training=False), "float32")
        )
        with tf.GradientTape() as tape:
            logits, predictions = self._trained(x, training=True)
            logits = ops.cast(logits, "float32")
            soft = self.temperature**2 * _mean(
                _soft_kl(teacher_logits, logits, self.temperature), sample_weight
            )
            loss = (1.0 - self.alpha) * soft
            student_loss = None
            if y is not None:
                student_loss = self._student_loss(y, logits, sample_weight)
                if self.alpha > 0:
                    loss = loss + self.alpha * student_loss
            loss = loss + _regularization(self._trained)
            scaled = _scaled(self.optimizer, loss)
        self._step(self.optimizer, tape, scaled, self.trainable_variables)
        batch = _batch_size(x)
        self.loss_tracker.update_state(loss, sample_weight=batch)
        self.distillation_loss_tracker.update_state(soft, sample_weight=batch)
        trackers = [self.loss_tracker, self.distillation_loss_tracker]
        if student_loss is not None:
            self.student_loss_tracker.update_state(student_loss, sample_weight=batch)
            trackers.append(self.student_loss_tracker)
        return self._logs(x, y, predictions, sample_weight, trackers)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError(
                "Evaluating a Distiller measures the student on labels: give (images, labels) "
                "batches (the teacher does not run in evaluation)."
            )
        logits, predictions = self._trained(x, training=False)
        student_loss = self._student_loss(y, ops.cast(logits, "float32"), sample_weight)
        loss = student_loss + _regularization(self._trained)
        batch = _batch_size(x)
        self.loss_tracker.update_state(loss, sample_weight=batch)
        self.student_loss_tracker.update_state(student_loss, sample_weight=batch)
        return self._logs(
            x, y, predictions, sample_weight, [self.loss_tracker, self.student_loss_tracker]
        )

    def get_config(self):
        return {
            "name": self.name,
            "teacher": keras.saving.serialize_keras_object(self.teacher),
            "student": keras.saving.serialize_keras_object(self.student),
            "temperature": self.temperature,
            "alpha": self.alpha,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("teacher", "student"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def distill(
    teacher: keras.Model,
    student: keras.Model,
    data,
    *,
    epochs: int,
    validation_data=None,
    temperature: float = 4.0,
    alpha: float = 0.1,
    optimizer: str | keras.optimizers.Optimizer = "adam",
    learning_rate: float = 1e-3,
    batch_size: int = 32,
    metrics: Sequence | None | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] | None = None,
    jit_compile: bool | str = "auto",
    verbose: str | int = "auto",
) -> keras.callbacks.History:
    """Distils `teacher` into `student` in one call: `Distiller`, compile, fit.

    The student is trained in place (as far as its `trainable` flags allow); the teacher is not
    changed.

    Args:
        teacher: A trained softmax classifier (e.g. `kt.runs.load_run(folder).model`).
        student: A classifier with the same classes and input shape.
        data: A `tf.data.Dataset` of `(images, labels)` batches (or of images alone when `alpha`
            is 0), an `(images, labels)` tuple of arrays, or an array of images (`alpha=0`).
        epochs: Epochs to train, >= 1.
        validation_data: Labelled data in the same forms, to evaluate the student on.
        temperature: T > 0 of the soft targets.
        alpha: Weight of the labels' cross-entropy, in [0, 1].
        optimizer: An optimizer name (`"adam"`, `"sgd"`, ...) or an instance (cloned, with
            `learning_rate`).
        learning_rate: Learning rate, > 0.
        batch_size: Examples per batch (global) when `data` is arrays.
        metrics: Metrics of the student; `"auto"` is accuracy when the data has labels.
        callbacks: Keras callbacks.
        jit_compile: XLA-compile the training step (`"auto"`: Keras decides).
        verbose: Passed to `fit`.

    Returns:
        The `keras.callbacks.History` of the `Distiller`'s `fit` (its `model` is the Distiller,
        `history.student` the student).

    Raises:
        TypeError, ValueError: for the `Distiller` errors, `epochs` < 1, a learning rate <= 0,
            unlabelled data with `alpha` > 0, or data of the wrong form, before any training.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> teacher = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> student = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    >>> history = kt.distill(teacher, student, x, epochs=1, alpha=0.0, verbose=0)  # no labels
    >>> sorted(history.history)
    ['distillation_loss', 'loss']
    """
    from keras_transfer import phases

    epochs = _validate.check_int("epochs", epochs, minimum=1)
    batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    learning_rate = phases._positive_number("learning_rate", learning_rate)
    x, y, sample_weight, labelled = _split_data(data, "data")
    if not labelled and check_alpha(alpha) > 0:
        raise ValueError(
            f"`data` has no labels but alpha={alpha!r} weights the labels' cross-entropy. Pass "
            "(images, labels), or alpha=0 to distil from unlabelled images."
        )
    if validation_data is not None and not _split_data(validation_data, "validation_data")[3]:
        raise ValueError(
            "`validation_data` must have labels (the student is evaluated on them): an "
            "(images, labels) tuple or a dataset of (images, labels) batches."
        )
    distiller = Distiller(teacher, student, temperature=temperature, alpha=alpha)
    if metrics == "auto":
        metrics = ["accuracy"] if labelled else None
    strategy = student.distribute_strategy
    with strategy.scope():
        distiller.compile(
            optimizer=phases.make_optimizer(optimizer, learning_rate, student),
            metrics=metrics,
            jit_compile=jit_compile,
        )
        # A dataset comes shuffled (or not) by its source; arrays are reshuffled every epoch.
        dataset = isinstance(x, tf.data.Dataset)
        fit_kwargs = {"shuffle": False} if dataset else {"batch_size": batch_size}
        history = distiller.fit(
            x,
            y,
            sample_weight=sample_weight,
            epochs=epochs,
            validation_data=validation_data,
            callbacks=list(callbacks or []),
            verbose=verbose,
            **fit_kwargs,
        )
    history.student = student
    return history


def _split_data(data, name: str) -> tuple:
    """`(x, y, sample_weight, labelled)` for `fit`, from a dataset, a tuple or an image array."""
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        return data, None, None, isinstance(spec, tuple) and len(spec) >= 2
    if isinstance(data, tuple | list) and len(data) in (2, 3):
        x, y, *rest = data
        return x, y, (rest[0] if rest else None), y is not None
    if isinstance(data, np.ndarray | tf.Tensor):
        return data, None, None, False
    raise TypeError(
        f"`{name}` must be a tf.data.Dataset of (images, labels) batches, an (images, labels) "
        f"tuple of arrays, or an array of images (alpha=0). Received: {type(data).__name__}"
    )


# --- learning without forgetting --------------------------------------------------------------


class LearningWithoutForgetting(_TrainsPart):
    """Li & Hoiem's learning without forgetting: a new head, the old task's outputs kept.

    Builds a copy of `old_model` (its weights included; the model passed in is never changed)
    with a second, new head over the shared backbone, a `Dense(new_num_classes)` fed by the same
    features as the old head's logits. Training minimises, per batch,
    `CE(y_new, softmax(z_new)) + lambda_old · CE(softmax(z_old⁰ / T), softmax(z_old / T))` plus
    the copy's regularization losses, where z_old⁰ are `old_model`'s logits on the same images,
    recorded before training (`record`), and z_old the copy's old head now.

    `fit(x, y, warmup_epochs=..., epochs=...)` records the old model's outputs on array inputs
    once, trains the new head alone for `warmup_epochs` (the backbone and the old head fixed, as
    in the paper), then everything trainable for `epochs` more, each stage with its own fresh
    copy of the compiled optimizer, and returns one `History` (`history.phases` gives each
    stage's epochs). A `tf.data.Dataset` of `(images, labels)` batches is accepted too; the old
    model's outputs are then computed batch by batch as it streams (the same values: the old
    model is fixed and runs in inference mode). Logs: `loss`, `new_loss`, `old_loss` and the
    compiled metrics of the new head. `evaluate` and validation measure the new task alone.

    Attributes:
        new_task_model: Functional model, images -> the new task's probabilities (output layer
            `"predictions"`, logits layer `"new_logits"`): save and export it.
        old_task_model: Functional model, images -> the old task's probabilities, over the same
            trained backbone (the copy of `old_model`).
        old_model: The model passed in, unchanged; it produces the recorded targets.

    Args:
        old_model: A trained softmax classifier (e.g. from `kt.build_classifier`).
        new_num_classes: Classes of the new task, >= 2.
        temperature: T > 0 of the old task's soft targets (the paper uses 2).
        lambda_old: Weight of the old task's term, >= 0 (the paper uses 1; 0 is plain
            fine-tuning of a new head).
        name: Name of the wrapper model.

    Raises:
        TypeError: when `old_model` is not a `keras.Model`.
        ValueError: for a model whose logits cannot be read or that is not a softmax
            classifier, `new_num_classes` < 2, `temperature` <= 0 or `lambda_old` < 0.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> old = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> lwf = kt.distillation.LearningWithoutForgetting(old, 2)
    >>> lwf.compile(optimizer="adam", metrics=["accuracy"])
    >>> x = np.random.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    >>> history = lwf.fit(x, np.arange(8) % 2, warmup_epochs=1, epochs=1, verbose=0)
    >>> history.phases, lwf.new_task_model.output_shape, lwf.old_task_model.output_shape
    ({'warmup': (0, 1), 'joint': (1, 2)}, (None, 2), (None, 3))
    """

    def __init__(
        self,
        old_model: keras.Model,
        new_num_classes: int,
        *,
        temperature: float = 2.0,
        lambda_old: float = 1.0,
        name: str = "learning_without_forgetting",
        **kwargs,
    ):
        spec = classifier_head(old_model, "old_model")
        new_num_classes = _validate.check_int(
            "new_num_classes",
            new_num_classes,
            minimum=2,
            hint="A softmax head needs at least 2 classes.",
        )
        temperature = check_temperature(temperature)
        lambda_old = _check_nonnegative(
            "lambda_old", lambda_old, "Li & Hoiem use 1; 0 turns the old task's term off."
        )
        strategy = old_model.distribute_strategy
        with strategy.scope():
            super().__init__(name=name, **kwargs)
            self.old_model = old_model
            self.temperature = temperature
            self.lambda_old = lambda_old
            self._recorder = heads.logits_model(old_model)
            try:
                copy = keras.models.clone_model(old_model)
            except Exception as error:  # a subclassed model, a layer that cannot be cloned
                raise ValueError(
                    f"`old_model` ({old_model.name!r}) cannot be copied with "
                    f"keras.models.clone_model ({error}); build it as a Functional model "
                    "(kt.build_classifier does)."
                ) from None
            copy.set_weights(old_model.get_weights())
            features = copy.get_layer(spec.logits_layer or spec.output_layer).input
            self._new_head = keras.layers.Dense(new_num_classes, dtype="float32", name="new_logits")
            new_logits = self._new_head(features)
            predictions = keras.layers.Activation(
                "softmax", dtype="float32", name=heads.OUTPUT_NAME
            )(new_logits)
            self.old_task_model = copy
            self.new_task_model = keras.Model(
                copy.input, predictions, name=f"{old_model.name}_new_task"
            )
            old_logits = heads.logits_model(copy).output
            self._trained = keras.Model(
                copy.input, [old_logits, new_logits, predictions], name=f"{name}_network"
            )
            self.loss_tracker = keras.metrics.Mean(name="loss")
            self.new_loss_tracker = keras.metrics.Mean(name="new_loss")
            self.old_loss_tracker = keras.metrics.Mean(name="old_loss")
        self._tracker_names = ("loss", "new_loss", "old_loss")
        self._warming_up = False
        self._warmup_optimizer = None
        self.built = True

    def call(self, inputs, training=None):
        return self.new_task_model(inputs, training=training)

    def record(self, x, *, batch_size: int = 32) -> np.ndarray:
        """The old model's logits on images `x`, in inference mode: the old task's targets.

        Args:
            x: Images, an array `(N, height, width, channels)`.
            batch_size: Images per forward pass.

        Returns:
            A float32 array `(N, old classes)`.
        """
        batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
        return np.asarray(self._recorder.predict(x, batch_size=batch_size, verbose=0), "float32")

    def _old_term(self, recorded, old_logits, sample_weight):
        targets = ops.softmax(recorded / self.temperature, axis=-1)
        log_q = ops.log_softmax(old_logits / self.temperature, axis=-1)
        return _mean(-ops.sum(targets * log_q, axis=-1), sample_weight)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if y is None:
            raise ValueError(
                "LearningWithoutForgetting trains on (images, new-task labels) batches; these "
                "have no labels."
            )
        if isinstance(y, tuple | list):  # (labels, recorded old logits), from `fit`
            y, recorded = y
        else:  # a dataset: the old model's outputs on this batch, as it streams
            recorded = self._recorder(x, training=False)
        recorded = ops.stop_gradient(ops.cast(recorded, "float32"))
        variables = (
            self._new_head.trainable_variables if self._warming_up else self.trainable_variables
        )
        optimizer = self._warmup_optimizer if self._warming_up else self.optimizer
        with tf.GradientTape() as tape:
            old_logits, new_logits, predictions = self._trained(x, training=True)
            new_loss = _mean(_cross_entropy(y, ops.cast(new_logits, "float32")), sample_weight)
            old_loss = self._old_term(recorded, ops.cast(old_logits, "float32"), sample_weight)
            loss = new_loss + self.lambda_old * old_loss + _regularization(self._trained)
            scaled = _scaled(optimizer, loss)
        self._step(optimizer, tape, scaled, variables)
        batch = _batch_size(x)
        trackers = [self.loss_tracker, self.new_loss_tracker, self.old_loss_tracker]
        for tracker, value in zip(trackers, (loss, new_loss, old_loss), strict=True):
            tracker.update_state(value, sample_weight=batch)
        return self._logs(x, y, predictions, sample_weight, trackers)

    def test_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(y, tuple | list):
            y = y[0]
        if y is None:
            raise ValueError("Evaluating LearningWithoutForgetting needs new-task labels.")
        _, new_logits, predictions = self._trained(x, training=False)
        new_loss = _mean(_cross_entropy(y, ops.cast(new_logits, "float32")), sample_weight)
        loss = new_loss + _regularization(self._trained)
        batch = _batch_size(x)
        self.loss_tracker.update_state(loss, sample_weight=batch)
        self.new_loss_tracker.update_state(new_loss, sample_weight=batch)
        return self._logs(
            x, y, predictions, sample_weight, [self.loss_tracker, self.new_loss_tracker]
        )

    def fit(self, x=None, y=None, *, warmup_epochs: int = 0, epochs: int = 1, **kwargs):
        """Records the old outputs, warms up the new head, then trains; one merged `History`.

        Args:
            x: New-task images (an array), or a `tf.data.Dataset` of `(images, labels)`
                batches (then `y` is None).
            y: New-task labels for array `x`: class ids `(N,)` or one-hot rows.
            warmup_epochs: Epochs training only the new head first, >= 0.
            epochs: Epochs training everything trainable afterwards, >= 0.
            **kwargs: Other `keras.Model.fit` arguments (`batch_size`, `validation_data`,
                `callbacks`, `sample_weight`, `verbose`, ...); not `initial_epoch`.

        Returns:
            A `keras.callbacks.History` over both stages; `history.phases` maps `"warmup"` and
            `"joint"` to their `(first_epoch, end_epoch)` (None for a stage of 0 epochs).

        Raises:
            ValueError: for negative epochs, both stages empty, or `fit` before `compile`.
        """
        from keras_transfer import phases

        warmup_epochs = phases._epochs("warmup_epochs", warmup_epochs)
        epochs = phases._epochs("epochs", epochs)
        if not warmup_epochs + epochs:
            raise ValueError(
                "Nothing to train: warmup_epochs=0 and epochs=0. Give epochs >= 1 (and "
                "optionally warmup_epochs >= 1 to train the new head alone first)."
            )
        if kwargs.pop("initial_epoch", 0):
            raise ValueError("`initial_epoch` is not supported: the stages number the epochs.")
        if self.optimizer is None:
            raise ValueError("Call compile(optimizer=...) before fit.")
        if not isinstance(x, tf.data.Dataset) and y is not None:
            recorded = self.record(x, batch_size=kwargs.get("batch_size") or 32)
            y = (y, recorded)
        strategy = self.distribute_strategy
        histories = []
        with strategy.scope():
            if warmup_epochs:
                # The main optimizer owns slots for every variable; the warm-up uses a copy.
                if not self.optimizer.built:
                    self.optimizer.build(self.trainable_variables)
                self._warmup_optimizer = self.optimizer.__class__.from_config(
                    self.optimizer.get_config()
                )
                self._warmup_optimizer.build(self._new_head.trainable_variables)
                self._warming_up, self.train_function = True, None
                try:
                    histories.append(("warmup", super().fit(x, y, epochs=warmup_epochs, **kwargs)))
                finally:
                    self._warming_up, self.train_function = False, None
            if epochs:
                total = warmup_epochs + epochs
                history = super().fit(x, y, initial_epoch=warmup_epochs, epochs=total, **kwargs)
                histories.append(("joint", history))
        merged = phases.merge_histories(self, histories)
        merged.phases = {name: merged.phases.get(name) for name in ("warmup", "joint")}
        return merged
