"""Weight averaging: uniform and greedy model soups, and WiSE-FT interpolation.

Models fine-tuned from the same starting point tend to lie in one basin of the loss, so averaging
their weights gives a model at least as good as most of them at no inference cost (Wortsman et
al., "Model soups", ICML 2022). `uniform_soup` averages them all; `greedy_soup` sorts them by a
held-out score and adds each one only if the averaged soup then scores strictly better;
`interpolate` is WiSE-FT (Wortsman et al., CVPR 2022), θ = (1 − α)·θ₀ + α·θ₁ between a
zero-shot / pretrained model and its fine-tuned version.

Each function returns a new plain model: a `keras.models.clone_model` copy of the first model
with the averaged weights, so it saves, reloads and exports like the models that went in. Only
floating-point weights are averaged (kernels, biases, BatchNorm statistics); integer weights come
from the first model and random-seed state is the copy's own. Models of another architecture are
refused, naming the first layer where they differ.

Example:
>>> import keras_transfer as kt
>>> models = [kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
...           for _ in range(2)]
>>> soup = kt.soups.uniform_soup(models)
>>> soup.output_shape
(None, 3)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from keras_transfer import _validate

__all__ = ["GreedySoup", "greedy_soup", "interpolate", "uniform_soup"]


# --- architecture checks ----------------------------------------------------------------------


def _layers(model: keras.layers.Layer, prefix: str = ""):
    """`(path, layer)` for every layer, nested models flattened (`"mobilenet_v2/Conv1"`)."""
    for layer in getattr(model, "layers", ()):
        path = f"{prefix}{layer.name}"
        yield path, layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer, prefix=f"{path}/")


def _signature(layer: keras.layers.Layer) -> tuple:
    """Class and weight shapes; a nested model's weights are compared layer by layer."""
    weights = () if isinstance(layer, keras.Model) else layer.weights
    return type(layer).__name__, tuple(
        (tuple(w.shape), keras.backend.standardize_dtype(w.dtype)) for w in weights
    )


def _describe(path: str, layer: keras.layers.Layer) -> str:
    kind, weights = _signature(layer)
    shapes = ", ".join(f"{shape}" for shape, _ in weights) or "no weights of its own"
    return f"{path!r} ({kind}; {shapes})"


def check_same_architecture(models: Sequence[keras.Model], name: str = "models") -> None:
    """Raises ValueError naming the first layer where a model differs from the first one."""
    reference = list(_layers(models[0]))
    for i, model in enumerate(models[1:], start=1):
        layers = list(_layers(model))
        for position in range(max(len(reference), len(layers))):
            a = reference[position] if position < len(reference) else None
            b = layers[position] if position < len(layers) else None
            if a is not None and b is not None and _signature(a[1]) == _signature(b[1]):
                continue
            first = _describe(*a) if a else "nothing (it has no more layers)"
            other = _describe(*b) if b else "nothing (it has no more layers)"
            raise ValueError(
                f"`{name}[{i}]` ({model.name!r}) is not the architecture of `{name}[0]` "
                f"({models[0].name!r}): layer {position} is {first} in `{name}[0]` but "
                f"{other} in `{name}[{i}]`. Weights can only be averaged between models of one "
                "architecture: fine-tune copies of the same model (same backbone, size, head)."
            )
        if len(model.weights) != len(models[0].weights):  # weights that no layer lists
            raise ValueError(
                f"`{name}[{i}]` ({model.name!r}) has {len(model.weights)} weights but "
                f"`{name}[0]` has {len(models[0].weights)}; give models of one architecture."
            )


def _check_models(models, name: str = "models") -> list[keras.Model]:
    if isinstance(models, keras.Model) or not isinstance(models, Sequence):
        raise TypeError(
            f"`{name}` must be a list of keras.Model (two or more fine-tuned copies of one "
            f"model). Received: {type(models).__name__}"
        )
    models = list(models)
    for i, model in enumerate(models):
        if not isinstance(model, keras.Model):
            raise TypeError(
                f"`{name}[{i}]` must be a keras.Model. Received: {type(model).__name__}"
            )
    if len(models) < 2:
        raise ValueError(
            f"A soup needs at least 2 models; `{name}` has {len(models)}. Pass several "
            "fine-tuned runs of one model (e.g. different seeds or learning rates); a soup of "
            "one model is that model."
        )
    check_same_architecture(models, name)
    return models


# --- averaging --------------------------------------------------------------------------------


def _averaged(value: np.ndarray) -> bool:
    return np.issubdtype(value.dtype, np.floating)


def _values(model: keras.Model) -> list[np.ndarray]:
    return [np.asarray(w) for w in model.get_weights()]


def _mix(values: Sequence[list[np.ndarray]], coefficients: Sequence[float]) -> list[np.ndarray]:
    """Σ cᵢ·θᵢ per float weight (in float64, cast back); other weights from the first model."""
    mixed = []
    for parts in zip(*values, strict=True):
        first = parts[0]
        if not _averaged(first):
            mixed.append(first)
            continue
        total = sum(c * p.astype(np.float64) for c, p in zip(coefficients, parts, strict=True))
        mixed.append(total.astype(first.dtype))
    return mixed


def _new_model(template: keras.Model, values: list[np.ndarray]) -> keras.Model:
    """A clone of `template` (under its strategy) holding `values`."""
    with template.distribute_strategy.scope():
        try:
            model = keras.models.clone_model(template)
        except Exception as error:  # subclassed models, layers that cannot be cloned
            raise ValueError(
                f"Model {template.name!r} cannot be copied with keras.models.clone_model "
                f"({error}); soups need Functional or Sequential models (kt.build_classifier "
                "builds one)."
            ) from None
    model.set_weights(values)
    class_names = getattr(template, "class_names", None)
    if class_names is not None:
        model.class_names = class_names
    return model


def uniform_soup(models: Sequence[keras.Model]) -> keras.Model:
    """The uniform soup: every floating-point weight averaged over `models`.

    Args:
        models: Two or more models of one architecture (e.g. fine-tuned runs of one model).

    Returns:
        A new Functional model (a clone of `models[0]`) with the averaged weights; uncompiled.

    Raises:
        TypeError: when `models` is not a list of `keras.Model`.
        ValueError: for fewer than 2 models, or models of different architectures (the first
            differing layer is named).

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> a = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> b = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> soup = kt.soups.uniform_soup([a, b])
    >>> w = soup.get_layer("logits").kernel.numpy()
    >>> ka, kb = a.get_layer("logits").kernel.numpy(), b.get_layer("logits").kernel.numpy()
    >>> bool(np.allclose(w, (ka + kb) / 2))
    True
    """
    models = _check_models(models)
    n = len(models)
    return _new_model(models[0], _mix([_values(m) for m in models], [1 / n] * n))


def interpolate(model_a: keras.Model, model_b: keras.Model, alpha: float) -> keras.Model:
    """WiSE-FT: the weights (1 − alpha)·θ_a + alpha·θ_b, as a new model.

    `alpha=0` gives `model_a`'s weights, `alpha=1` `model_b`'s; Wortsman et al. sweep alpha
    between a zero-shot (or pretrained) model and its fine-tuned version.

    Args:
        model_a: θ₀, e.g. the model before fine-tuning.
        model_b: θ₁, e.g. the fine-tuned model; the same architecture.
        alpha: Mixing weight in [0, 1].

    Returns:
        A new Functional model (a clone of `model_a`) with the interpolated weights.

    Raises:
        TypeError: when a model is not a `keras.Model`.
        ValueError: for `alpha` outside [0, 1], or models of different architectures.

    Example:
    >>> import keras_transfer as kt
    >>> a = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> b = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> halfway = kt.soups.interpolate(a, b, 0.5)
    """
    if not _validate.is_number(alpha) or not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise ValueError(
            "`alpha` must be a number in [0, 1]: 0 gives model_a's weights, 1 model_b's. "
            f"Received: alpha={alpha!r}. Sweep e.g. [0, 0.25, 0.5, 0.75, 1]."
        )
    for name, model in (("model_a", model_a), ("model_b", model_b)):
        if not isinstance(model, keras.Model):
            raise TypeError(f"`{name}` must be a keras.Model. Received: {type(model).__name__}")
    check_same_architecture([model_a, model_b], "[model_a, model_b]")
    alpha = float(alpha)
    values = _mix([_values(model_a), _values(model_b)], [1 - alpha, alpha])
    return _new_model(model_a, values)


# --- greedy soup ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GreedySoup:
    """What `greedy_soup(..., return_info=True)` decided.

    Attributes:
        ingredients: Indices into `models` of the models in the soup, in the order added.
        scores: The held-out score of each model alone, by index into `models`.
        order: Indices of `models`, best score first: the order they were tried in.
        soup_score: The held-out score of the final soup.
    """

    ingredients: tuple[int, ...]
    scores: tuple[float, ...]
    order: tuple[int, ...]
    soup_score: float


def _labelled_batches(validation_data):
    if isinstance(validation_data, tf.data.Dataset):
        spec = validation_data.element_spec
        if not (isinstance(spec, tuple) and len(spec) >= 2):
            raise ValueError(
                "`validation_data` must give (images, labels) batches: the soup is scored on "
                f"held-out labels. Received elements of spec {spec!r}."
            )
        return validation_data
    if isinstance(validation_data, tuple | list) and len(validation_data) == 2:
        x, y = (np.asarray(v) for v in validation_data)
        if len(x) != len(y) or not len(x):
            raise ValueError(
                "`validation_data` must be (images, labels) of one non-zero length. Received "
                f"{len(x)} images and {len(y)} labels."
            )
        return (x, y)
    raise TypeError(
        "`validation_data` must be an (images, labels) tuple of arrays or a tf.data.Dataset of "
        f"(images, labels) batches. Received: {type(validation_data).__name__}"
    )


def _accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_pred = y_pred.reshape(len(y_pred), -1)
    y_true = y_true.reshape(len(y_true), -1) if y_true.ndim > 1 else y_true
    if y_pred.shape[1] == 1:  # one sigmoid output
        return float(np.mean((y_pred[:, 0] > 0.5) == (y_true.reshape(-1) > 0.5)))
    if y_true.ndim == 2 and y_true.shape[1] == y_pred.shape[1]:
        if np.all((y_true == 0) | (y_true == 1)) and not np.all(y_true.sum(1) == 1):
            return float(np.mean((y_pred > 0.5) == (y_true > 0.5)))  # multi-label
        y_true = y_true.argmax(1)
    return float(np.mean(y_pred.argmax(1) == y_true.reshape(-1).astype(int)))


def _metric_fn(metric) -> Callable[[np.ndarray, np.ndarray], float]:
    if metric == "accuracy":
        return _accuracy
    if isinstance(metric, str | keras.metrics.Metric):
        template = keras.metrics.get(metric)

        def keras_metric(y_true, y_pred):
            m = (
                template.__class__.from_config(template.get_config())
                if isinstance(template, keras.metrics.Metric)
                else keras.metrics.MeanMetricWrapper(template)
            )
            m.update_state(y_true, y_pred)
            return float(m.result())

        return keras_metric
    if callable(metric):
        return lambda y_true, y_pred: float(metric(y_true, y_pred))
    raise TypeError(
        '`metric` must be "accuracy", a Keras metric name or instance, or a function '
        f"(y_true, y_pred) -> float where higher is better. Received: {metric!r}"
    )


def _predict(model: keras.Model, data, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, tuple):
        return data[1], np.asarray(model.predict(data[0], batch_size=batch_size, verbose=0))
    labels, outputs = [], []
    for batch in data:
        labels.append(np.asarray(batch[1]))
        outputs.append(np.asarray(model.predict_on_batch(batch[0])))
    return np.concatenate(labels), np.concatenate(outputs)


def greedy_soup(
    models: Sequence[keras.Model],
    validation_data,
    *,
    metric: str | keras.metrics.Metric | Callable = "accuracy",
    batch_size: int = 32,
    return_info: bool = False,
) -> keras.Model | tuple[keras.Model, GreedySoup]:
    """Wortsman et al.'s greedy soup: add a model only if the soup then scores strictly better.

    The models are sorted by their score on `validation_data` (best first, ties in the given
    order); the soup starts as the best one, and each next model is kept only if the uniform
    average of the soup with it scores strictly higher than the soup without it.

    Args:
        models: Two or more models of one architecture.
        validation_data: Held-out `(images, labels)` arrays or a `tf.data.Dataset` of
            `(images, labels)` batches (iterated once per candidate, so give it a fixed order).
            Use data the models were not trained or selected on, and report on another set.
        metric: Higher is better: `"accuracy"` (argmax for softmax outputs, 0.5 threshold for
            sigmoid ones), a Keras metric name or instance, or `fn(y_true, y_pred) -> float`.
        batch_size: Images per forward pass for array data.
        return_info: Also return a `GreedySoup` (ingredients, each model's score, soup score).

    Returns:
        A new Functional model (a clone of the best model) with the soup's weights; with
        `return_info`, `(model, GreedySoup)`.

    Raises:
        TypeError: for models that are not `keras.Model`s, or a bad `metric` or data type.
        ValueError: for fewer than 2 models, different architectures, or unlabelled data.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> models = [kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None,
    ...                               alpha=0.35) for _ in range(3)]
    >>> x = np.random.uniform(0, 255, (12, 32, 32, 3)).astype("float32")
    >>> soup, info = kt.soups.greedy_soup(models, (x, np.arange(12) % 3), return_info=True)
    >>> info.ingredients[0] == info.order[0]
    True
    """
    models = _check_models(models)
    data = _labelled_batches(validation_data)
    score_of = _metric_fn(metric)
    batch_size = _validate.check_int("batch_size", batch_size, minimum=1)
    _validate.check_bool("return_info", return_info)

    def score(model):
        y_true, y_pred = _predict(model, data, batch_size)
        return score_of(y_true, y_pred)

    scores = [score(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    values = [_values(m) for m in models]
    best = order[0]
    ingredients, soup_score = [best], scores[best]
    # One clone scores every candidate soup, instead of a clone per candidate.
    probe = _new_model(models[best], values[best])
    for i in order[1:]:
        candidate = ingredients + [i]
        k = len(candidate)
        probe.set_weights(_mix([values[j] for j in candidate], [1 / k] * k))
        candidate_score = score(probe)
        if candidate_score > soup_score:
            ingredients, soup_score = candidate, candidate_score
    k = len(ingredients)
    soup = _new_model(models[best], _mix([values[j] for j in ingredients], [1 / k] * k))
    if not return_info:
        return soup
    return soup, GreedySoup(tuple(ingredients), tuple(scores), tuple(order), soup_score)
