"""Evaluation of a model on labelled data: an `EvaluationReport` computed with scikit-learn.

`evaluate` runs the model once over the data and picks the metrics from its head (`kt.head_of`):

- multi-class (softmax): accuracy, top-k accuracy, per-class precision / recall / F1 / support,
  macro and weighted averages, the confusion matrix and its most-confused pairs, log loss,
  expected calibration error (15 equal-width bins) with the reliability-diagram data, and the
  misclassified examples (index, true class, predicted class, confidence);
- multi-label (sigmoid): subset accuracy, Hamming loss, per-label precision / recall / F1 /
  average precision, macro / micro / weighted averages, mean average precision, log loss and
  calibration of the per-label probabilities;
- regression (linear): MAE, MSE, RMSE and R², per target, and the largest errors.

Every number comes from `sklearn.metrics` on the same predictions (macro averages include every
class of the model, also one absent from the labels), except the calibration error, which
scikit-learn does not provide: `reliability` bins it as `sklearn.calibration.calibration_curve`
does and keeps the empty bins. Plots of a report live in `kt.plots`.

Example:
>>> import numpy as np
>>> from keras_transfer import evaluation
>>> report = evaluation.metrics_from_probabilities(
...     np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]), top_k=(1,)
... )
>>> round(report["accuracy"], 3), report["confusion_matrix"]
(0.667, [[1, 0], [1, 1]])
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn import metrics as skm

KINDS = ("multiclass", "multilabel", "regression")
NUM_CALIBRATION_BINS = 15
KEEP_IMAGES = 1000  # misclassified images are kept when the data has at most this many examples
_MOST_CONFUSED = 10
_LARGEST_ERRORS = 10
_TEXT_MATRIX_MAX_CLASSES = 20  # the text report leaves bigger matrices to plots


class EvaluationReport(dict):
    """What `evaluate` measured: a dict of JSON-ready metrics, plus the raw arrays as attributes.

    It is the dict it serialises to (`report["accuracy"]`, `report["per_class"]`,
    `json.dumps(report)`), with the same keys readable as attributes (`report.accuracy`).
    `to_dict()` / `to_json()` give what the CLI writes to `metrics.json` (non-finite numbers
    are stored as None, so the JSON is strict); `print(report)` shows a text table and, in a
    notebook, the report displays as a compact HTML table.

    Attributes:
        kind: `"multiclass"`, `"multilabel"` or `"regression"`.
        predictions: The model's outputs, shape `(N, num_outputs)` (probabilities for
            classifiers).
        labels: The labels as used: class ids `(N,)`, multi-label indicators `(N, L)` or
            regression targets `(N, T)`.
        misclassified_images: For a multi-class report on small data (see `evaluate`'s
            `keep_images`), the images of `report["misclassified"]`, in that order; else None.

    Example:
    >>> import numpy as np
    >>> report = metrics_from_probabilities(np.eye(3), [0, 1, 2], ["a", "b", "c"], top_k=(1,))
    >>> report.kind, report.accuracy, report["per_class"][0]["f1"]
    ('multiclass', 1.0, 1.0)
    """

    def __init__(
        self,
        metrics: Mapping[str, Any],
        *,
        predictions: np.ndarray | None = None,
        labels: np.ndarray | None = None,
        misclassified_images: np.ndarray | None = None,
    ):
        kind = metrics.get("kind")
        if kind not in KINDS:
            raise ValueError(f"`metrics['kind']` must be one of {KINDS}. Received: {kind!r}")
        super().__init__(_json_ready(dict(metrics)))
        self.predictions = predictions
        self.labels = labels
        self.misclassified_images = misclassified_images

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("_") and name in self:
            return self[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def kind(self) -> str:
        """`"multiclass"`, `"multilabel"` or `"regression"`."""
        return self["kind"]

    def to_dict(self) -> dict[str, Any]:
        """A deep copy of the metrics as plain JSON types (what `metrics.json` holds)."""
        return json.loads(json.dumps(self))

    def to_json(self, indent: int | None = 1) -> str:
        """The metrics as a JSON string (strict JSON: NaN and infinities are written as null)."""
        return json.dumps(self, indent=indent, ensure_ascii=False, allow_nan=False)

    def __str__(self) -> str:
        return format_report(self)

    def __repr__(self) -> str:
        headline = _HEADLINE[self.kind]
        value = self.get(headline)
        shown = "None" if value is None else f"{value:.3f}"
        return (
            f"EvaluationReport(kind={self.kind!r}, num_examples={self['num_examples']}, "
            f"{headline}={shown})"
        )

    def _repr_html_(self) -> str:
        return _html_report(self)


_HEADLINE = {"multiclass": "accuracy", "multilabel": "mean_average_precision", "regression": "mae"}


def _json_ready(value: Any) -> Any:
    """Plain Python types; NaN and infinities as None, so the JSON is strict."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


# --- checks -----------------------------------------------------------------------------------


def _check_top_k(top_k, num_classes: int) -> tuple[int, ...]:
    if isinstance(top_k, int) and not isinstance(top_k, bool):
        top_k = (top_k,)
    try:
        ks = tuple(top_k)
    except TypeError:
        raise TypeError(
            f"`top_k` must be an int or a sequence of ints. Received: top_k={top_k!r}"
        ) from None
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(
                f"`top_k` values must be ints >= 1. Received: top_k={top_k!r}. E.g. top_k=(1, 5)."
            )
    # k above the number of classes is meaningless (always 1.0): drop it rather than fail.
    return tuple(sorted({int(k) for k in ks if k <= num_classes})) or (1,)


def _names(names: Sequence[str] | None, count: int, what: str) -> list[str]:
    if names is None:
        return [str(i) for i in range(count)]
    if isinstance(names, str):
        raise TypeError(
            f"`{what}` must be a sequence of names, one per output. Received: {what}={names!r}"
        )
    names = [str(c) for c in names]
    if len(names) != count:
        raise ValueError(
            f"`{what}` has {len(names)} names but the model has {count} outputs. "
            f"Received: {what}={names[:10]!r}"
        )
    return names


def _scores(values, name: str) -> np.ndarray:
    scores = np.asarray(values)
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if scores.ndim != 2:
        raise ValueError(f"`{name}` must have shape (N, num_outputs). Received: {scores.shape}")
    if not len(scores):
        raise ValueError(f"`{name}` is empty: nothing to evaluate.")
    return scores


def _is_probabilities(scores: np.ndarray) -> bool:
    """Rows of probabilities (softmax output), not logits or other scores."""
    return bool(
        scores.shape[1] > 1
        and np.all(scores >= 0)
        and np.all(scores <= 1)
        and np.allclose(scores.sum(axis=1), 1.0, atol=1e-3)
    )


def _class_ids(labels, n: int, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == num_classes and num_classes > 1:
        labels = labels.argmax(axis=1)  # one-hot
    labels = labels.reshape(-1)
    if len(labels) != n:
        raise ValueError(
            f"Got {n} predictions but {len(labels)} labels; pass one label per example."
        )
    if labels.size and not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError(
            f"Multi-class labels must be integer class ids (or one-hot rows). Received e.g. "
            f"{labels[:5].tolist()}"
        )
    labels = labels.astype(np.int64)
    outside = labels[(labels < 0) | (labels >= num_classes)]
    if outside.size:
        raise ValueError(
            f"`labels` holds class ids outside [0, {num_classes - 1}]: e.g. "
            f"{outside[:5].tolist()}. Check the labels match the model's classes."
        )
    return labels


# --- calibration ------------------------------------------------------------------------------


def reliability(probability, outcome, num_bins: int = NUM_CALIBRATION_BINS) -> dict[str, Any]:
    """Reliability-diagram data and expected calibration error over equal-width bins.

    Bin `i` holds the probabilities in `(i / num_bins, (i + 1) / num_bins]` (0 falls in the
    first), as in `sklearn.calibration.calibration_curve(strategy="uniform")`, whose non-empty
    bins give the same `confidence` and `accuracy`; empty bins are kept here (as None) so the
    diagram keeps its axis. ECE is `sum_i count_i / N * |accuracy_i - confidence_i|`.

    Args:
        probability: Predicted probabilities, shape `(N,)`: the top-class probability for a
            multi-class model, each label's probability (flattened) for a multi-label one.
        outcome: Whether each prediction came true, shape `(N,)` of 0/1: top class correct, or
            the label present.
        num_bins: Number of equal-width bins on [0, 1].

    Returns:
        `{"ece", "num_bins", "bin_edges", "confidence", "accuracy", "count"}`: `confidence` and
        `accuracy` are each bin's mean probability and mean outcome (None for an empty bin).

    Example:
    >>> r = reliability([0.9, 0.9, 0.4, 0.4], [1, 0, 1, 1], num_bins=2)
    >>> r["count"], r["accuracy"], round(r["ece"], 3)  # 0.5 * |1 - 0.4| + 0.5 * |0.5 - 0.9|
    ([2, 2], [1.0, 0.5], 0.5)
    """
    probability = np.asarray(probability, dtype=np.float64).reshape(-1)
    outcome = np.asarray(outcome, dtype=np.float64).reshape(-1)
    if probability.shape != outcome.shape:
        raise ValueError(
            f"`probability` and `outcome` must have the same length. Received: "
            f"{probability.size} and {outcome.size}."
        )
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"`num_bins` must be an int >= 1. Received: num_bins={num_bins!r}")
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    ids = np.searchsorted(edges[1:-1], probability)  # the binning of calibration_curve
    count = np.bincount(ids, minlength=num_bins)
    sum_probability = np.bincount(ids, weights=probability, minlength=num_bins)
    sum_outcome = np.bincount(ids, weights=outcome, minlength=num_bins)
    filled = count > 0
    confidence = np.where(filled, sum_probability / np.maximum(count, 1), np.nan)
    accuracy = np.where(filled, sum_outcome / np.maximum(count, 1), np.nan)
    gaps = np.abs(accuracy - confidence)[filled]
    ece = float(np.sum(count[filled] / max(len(probability), 1) * gaps))
    return {
        "ece": ece,
        "num_bins": num_bins,
        "bin_edges": edges.tolist(),
        "confidence": [float(c) if f else None for c, f in zip(confidence, filled, strict=True)],
        "accuracy": [float(a) if f else None for a, f in zip(accuracy, filled, strict=True)],
        "count": count.tolist(),
    }


# --- the three kinds of report ----------------------------------------------------------------


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows are true classes, columns predictions.

    Args:
        y_true: Integer class ids, shape `(N,)`.
        y_pred: Integer predicted class ids, shape `(N,)`.
        num_classes: Number of classes (the matrix is `num_classes x num_classes`).

    Returns:
        An int64 array of shape `(num_classes, num_classes)` (`sklearn.metrics.confusion_matrix`
        over `labels=range(num_classes)`).

    Example:
    >>> confusion_matrix([0, 1, 1], [0, 0, 1], 2).tolist()
    [[1, 0], [1, 1]]
    """
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(
            f"`y_true` and `y_pred` must have the same length. Received: {len(y_true)} and "
            f"{len(y_pred)}."
        )
    for name, values in (("y_true", y_true), ("y_pred", y_pred)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"`{name}` holds class ids outside [0, {num_classes - 1}]: e.g. "
                f"{values[(values < 0) | (values >= num_classes)][:5].tolist()}. Check the labels "
                "match the model's classes."
            )
    if not y_true.size:
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    labels = np.arange(num_classes)
    return skm.confusion_matrix(y_true, y_pred, labels=labels).astype(np.int64)


def metrics_from_probabilities(
    probabilities,
    labels,
    class_names: Sequence[str] | None = None,
    top_k: int | Sequence[int] = (1, 5),
    *,
    images: np.ndarray | None = None,
) -> EvaluationReport:
    """The multi-class report from predicted probabilities and true labels.

    Args:
        probabilities: Array `(N, num_classes)` of softmax probabilities. Other scores (e.g.
            logits) give the ranking metrics only: `log_loss`, `ece` and `reliability` are None
            unless each row is a probability distribution.
        labels: Integer class ids `(N,)`, or one-hot labels `(N, num_classes)`.
        class_names: Names of the classes, in output order; defaults to `"0"`, `"1"`, ...
        top_k: The k of the top-k accuracies to report; values above the number of classes are
            left out (k = 1 is `accuracy`).
        images: Optionally the `N` inputs, to keep the misclassified ones in the report.

    Returns:
        An `EvaluationReport` with keys `kind`, `num_examples`, `class_names`, `accuracy`,
        `top_k_accuracy` (`{"top_5": ...}`), `macro_*` and `weighted_*` precision / recall / F1,
        `log_loss`, `ece`, `per_class` (dicts of `name`, `precision`, `recall`, `f1`,
        `support`), `confusion_matrix` (rows true, columns predicted), `most_confused` (the
        largest off-diagonal cells: `true`, `predicted`, `count`), `reliability` (see
        `reliability`) and `misclassified` (`index`, `true`, `predicted`, `confidence`: the
        predicted class's probability; most confident first).

    Raises:
        ValueError: for mismatched shapes, labels outside the classes, or wrong `class_names`.
    """
    probs = _scores(probabilities, "probabilities")
    n, num_classes = probs.shape
    y = _class_ids(labels, n, num_classes)
    names = _names(class_names, num_classes, "class_names")
    ks = _check_top_k(top_k, num_classes)
    classes = np.arange(num_classes)

    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(y, predicted, num_classes)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, predicted, labels=classes, average=None, zero_division=0
    )
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y, predicted, labels=classes, average=average, zero_division=0
        )
        averages.update({f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f})
    # Binary problems: scikit-learn takes the positive class's score.
    ranked = probs[:, 1] if num_classes == 2 else probs
    top = {
        f"top_{k}": skm.top_k_accuracy_score(y, ranked, k=k, labels=classes) for k in ks if k > 1
    }
    probabilistic = _is_probabilities(probs)
    confidence = probs.max(axis=1)
    calibration = reliability(confidence, predicted == y) if probabilistic else None

    off_diagonal = [
        (int(matrix[i, j]), i, j) for i in classes for j in classes if i != j and matrix[i, j]
    ]
    off_diagonal.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    wrong = np.flatnonzero(predicted != y)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")]
    metrics = {
        "kind": "multiclass",
        "num_examples": n,
        "class_names": names,
        "accuracy": skm.accuracy_score(y, predicted),
        "top_k_accuracy": top,
        **averages,
        "log_loss": skm.log_loss(y, probs, labels=classes) if probabilistic else None,
        "ece": calibration["ece"] if calibration else None,
        "per_class": [
            {
                "name": names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in classes
        ],
        "confusion_matrix": matrix.tolist(),
        "most_confused": [
            {"true": names[i], "predicted": names[j], "count": count}
            for count, i, j in off_diagonal[:_MOST_CONFUSED]
        ],
        "reliability": calibration,
        "misclassified": [
            {
                "index": int(i),
                "true": names[y[i]],
                "predicted": names[predicted[i]],
                "confidence": float(confidence[i]),
            }
            for i in wrong
        ],
    }
    kept = None
    if images is not None:
        images = np.asarray(images)
        if len(images) != n:
            raise ValueError(f"`images` has {len(images)} examples but there are {n} predictions.")
        kept = images[wrong]
    return EvaluationReport(metrics, predictions=probs, labels=y, misclassified_images=kept)


def multilabel_metrics(
    probabilities,
    labels,
    class_names: Sequence[str] | None = None,
    *,
    threshold: float = 0.5,
) -> EvaluationReport:
    """The multi-label report from per-label probabilities and 0/1 label indicators.

    Args:
        probabilities: Array `(N, num_labels)` of sigmoid probabilities.
        labels: 0/1 indicators of the same shape.
        class_names: Names of the labels, in output order; defaults to `"0"`, `"1"`, ...
        threshold: A label is predicted when its probability is at least this.

    Returns:
        An `EvaluationReport` with keys `kind`, `num_examples`, `class_names`,
        `subset_accuracy` (every label right), `hamming_loss`, `mean_average_precision` (macro
        over labels), `macro_*`, `micro_*` and `weighted_*` precision / recall / F1, `log_loss`
        (mean binary cross-entropy), `ece` and `reliability` (over every label's probability),
        and `per_label` (dicts of `name`, `precision`, `recall`, `f1`, `average_precision`,
        `support`).

    Raises:
        ValueError: for mismatched shapes, labels that are not 0/1, or wrong `class_names`.
    """
    probs = _scores(probabilities, "probabilities")
    n, num_labels = probs.shape
    y = np.asarray(labels)
    if y.ndim == 1 and num_labels == 1:
        y = y[:, None]
    if y.shape != probs.shape:
        raise ValueError(
            f"Multi-label `labels` must have the predictions' shape {probs.shape} (one 0/1 "
            f"indicator per label). Received: shape {y.shape}"
        )
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("Multi-label `labels` must be 0/1 indicators. Received other values.")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(f"`threshold` must be in (0, 1). Received: threshold={threshold!r}")
    y = y.astype(np.int64)
    names = _names(class_names, num_labels, "class_names")
    predicted = (probs >= threshold).astype(np.int64)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, predicted, average=None, zero_division=0
    )
    average_precision = skm.average_precision_score(y, probs, average=None)
    averages = {}
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            y, predicted, average=average, zero_division=0
        )
        averages.update({f"{average}_precision": p, f"{average}_recall": r, f"{average}_f1": f})
    calibration = reliability(probs.reshape(-1), y.reshape(-1))
    metrics = {
        "kind": "multilabel",
        "num_examples": n,
        "class_names": names,
        "threshold": float(threshold),
        "subset_accuracy": skm.accuracy_score(y, predicted),
        "hamming_loss": skm.hamming_loss(y, predicted),
        "mean_average_precision": skm.average_precision_score(y, probs, average="macro"),
        **averages,
        "log_loss": skm.log_loss(y.reshape(-1), probs.reshape(-1), labels=[0, 1]),
        "ece": calibration["ece"],
        "per_label": [
            {
                "name": names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "average_precision": float(average_precision[i]),
                "support": int(support[i]),
            }
            for i in range(num_labels)
        ],
        "reliability": calibration,
    }
    return EvaluationReport(metrics, predictions=probs, labels=y)


def regression_metrics(
    predictions, targets, target_names: Sequence[str] | None = None
) -> EvaluationReport:
    """The regression report from predictions and targets.

    Args:
        predictions: Array `(N,)` or `(N, num_targets)`.
        targets: Array of the same shape.
        target_names: Names of the targets, in output order; defaults to `"0"`, `"1"`, ...

    Returns:
        An `EvaluationReport` with keys `kind`, `num_examples`, `class_names` (the target
        names), `mae`, `mse`, `rmse`, `r2` (averaged uniformly over targets, as scikit-learn
        does), `per_target` (dicts of `name`, `mae`, `rmse`, `r2`) and `largest_errors`
        (`index`, `true`, `predicted`, `error`: the mean absolute error over targets; largest
        first). R² is None with fewer than two examples.

    Raises:
        ValueError: for mismatched shapes or wrong `target_names`.
    """
    pred = _scores(predictions, "predictions")
    n, num_targets = pred.shape
    y = np.asarray(targets, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape != pred.shape:
        raise ValueError(
            f"Regression `targets` must have the predictions' shape {pred.shape}. "
            f"Received: shape {y.shape}"
        )
    names = _names(target_names, num_targets, "target_names")
    pred = pred.astype(np.float64)
    raw = "raw_values"
    mae = skm.mean_absolute_error(y, pred, multioutput=raw)
    rmse = skm.root_mean_squared_error(y, pred, multioutput=raw)
    r2 = skm.r2_score(y, pred, multioutput=raw) if n > 1 else np.full(num_targets, np.nan)
    error = np.abs(y - pred).mean(axis=1)
    largest = np.argsort(-error, kind="stable")[:_LARGEST_ERRORS]

    def row(values):
        return float(values[0]) if num_targets == 1 else [float(v) for v in values]

    metrics = {
        "kind": "regression",
        "num_examples": n,
        "class_names": names,
        "mae": skm.mean_absolute_error(y, pred),
        "mse": skm.mean_squared_error(y, pred),
        "rmse": skm.root_mean_squared_error(y, pred),
        "r2": skm.r2_score(y, pred) if n > 1 else None,
        "per_target": [
            {"name": names[i], "mae": mae[i], "rmse": rmse[i], "r2": r2[i]}
            for i in range(num_targets)
        ],
        "largest_errors": [
            {"index": int(i), "true": row(y[i]), "predicted": row(pred[i]), "error": error[i]}
            for i in largest
        ],
    }
    return EvaluationReport(metrics, predictions=pred, labels=y)


def report_from_predictions(
    kind: str,
    predictions,
    labels,
    *,
    class_names: Sequence[str] | None = None,
    top_k: int | Sequence[int] = (1, 5),
    threshold: float = 0.5,
    images: np.ndarray | None = None,
) -> EvaluationReport:
    """The report of `kind` from predictions already made (e.g. saved `model.predict` output).

    Args:
        kind: `"multiclass"`, `"multilabel"` or `"regression"` (see `kt.head_of`).
        predictions: The model's outputs, `(N, num_outputs)`.
        labels: Class ids or one-hot rows, 0/1 indicators, or regression targets.
        class_names: One name per output.
        top_k: Multi-class: the k of the top-k accuracies.
        threshold: Multi-label: the probability from which a label is predicted.
        images: Multi-class: the inputs, to keep the misclassified ones.

    Returns:
        An `EvaluationReport` (see `metrics_from_probabilities`, `multilabel_metrics`,
        `regression_metrics`).

    Raises:
        ValueError: for an unknown `kind` and the checks of those functions.
    """
    if kind == "multiclass":
        return metrics_from_probabilities(predictions, labels, class_names, top_k, images=images)
    if kind == "multilabel":
        return multilabel_metrics(predictions, labels, class_names, threshold=threshold)
    if kind == "regression":
        return regression_metrics(predictions, labels, class_names)
    raise ValueError(f"`kind` must be one of {KINDS}. Received: kind={kind!r}")


# --- running a model --------------------------------------------------------------------------


def _batches(data, batch_size: int = 256):
    """`(x, y)` numpy batches of `data`: a `tf.data.Dataset`, an iterable of batches, or arrays."""
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "__len__"):
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if len(x) != len(y):
            raise ValueError(
                f"`data` holds {len(x)} inputs but {len(y)} labels; pass one label per input."
            )
        for start in range(0, len(x), batch_size):
            yield x[start : start + batch_size], y[start : start + batch_size]
        return
    if not hasattr(data, "__iter__"):
        raise TypeError(
            "`data` must be a tf.data.Dataset of (images, labels) batches (see kt.data) or an "
            f"(x, y) tuple of arrays. Received: {type(data).__name__}"
        )
    for batch in data:
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise TypeError(
                "`data` must yield (images, labels) batches, e.g. from kt.data.from_folder. "
                f"Received an element of type {type(batch).__name__}."
            )
        yield np.asarray(batch[0]), np.asarray(batch[1])


def predict_dataset(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over `dataset` once; returns `(predictions, labels)` as numpy arrays.

    Args:
        model: A Keras model.
        dataset: A `tf.data.Dataset` of `(images, labels)` batches, or an `(x, y)` tuple of arrays.

    Raises:
        ValueError: When `dataset` is empty.
    """
    predictions, labels, _ = _predict(model, dataset, keep_images=0)
    return predictions, labels


def _predict(model, data, keep_images: int):
    predictions, labels, images, seen = [], [], [], 0
    for x, y in _batches(data):
        predictions.append(np.asarray(model.predict_on_batch(x)))
        labels.append(y)
        seen += len(x)
        if images is not None and seen <= keep_images:
            images.append(x)
        else:
            images = None  # more data than keep_images: keep none
    if not predictions:
        raise ValueError("`data` is empty: nothing to evaluate.")
    kept = np.concatenate(images) if images else None
    return np.concatenate(predictions), np.concatenate(labels), kept


def _head(model, kind: str | None):
    """`(kind, HeadSpec)` from `kind=` or `kt.head_of`; `(None, error)` when neither tells."""
    from keras_transfer import heads

    if kind is not None:
        if kind not in KINDS:
            raise ValueError(f"`kind` must be one of {KINDS} or None. Received: kind={kind!r}")
        return kind, None
    try:
        head = heads.head_of(model)
    except ValueError as error:
        return None, error
    return head.kind, head


def evaluate(
    model,
    data,
    *,
    class_names: Sequence[str] | None = None,
    top_k: int | Sequence[int] = (1, 5),
    kind: str | None = None,
    threshold: float = 0.5,
    keep_images: int = KEEP_IMAGES,
) -> EvaluationReport:
    """Evaluates a model on labelled data: the metrics that fit its head, in a report.

    What the model predicts comes from `kt.head_of(model)`: softmax -> the multi-class report,
    sigmoid -> multi-label, linear -> regression. A model without the `"predictions"` layer that
    `head_of` reads is taken as multi-class when its outputs are rows of probabilities; pass
    `kind=` otherwise.

    Args:
        model: A Keras model (e.g. from `kt.build_classifier`, or `kt.runs.load_run(...).model`).
        data: A `tf.data.Dataset` of `(images, labels)` batches (see `kt.data`), or an `(x, y)`
            tuple of arrays.
        class_names: Names of the outputs in order; defaults to `data.class_names` when the
            dataset has them, then to the model's `class_names` (set by `kt.runs.load_run`),
            else `"0"`, `"1"`, ...
        top_k: Multi-class: the k of the top-k accuracies (default top-1 and top-5; k above
            the number of classes is left out).
        kind: Override the head's kind: `"multiclass"`, `"multilabel"` or `"regression"`.
        threshold: Multi-label: the probability from which a label is predicted.
        keep_images: Multi-class: the images of the misclassified examples are kept in
            `report.misclassified_images` (for `kt.plots.plot_misclassified`) when the data has
            at most this many examples (default 1000); 0 keeps none.

    Returns:
        An `EvaluationReport` (see `metrics_from_probabilities`, `multilabel_metrics` and
        `regression_metrics` for its keys).

    Raises:
        ValueError: for an empty dataset, labels that do not fit the outputs, `class_names` of
            the wrong length, or a head that cannot be read without `kind=`.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> x = np.random.uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    >>> report = kt.evaluate(model, (x, np.arange(6) % 3), top_k=(1, 2))
    >>> report.kind, sorted(report["top_k_accuracy"])
    ('multiclass', ['top_2'])
    """
    if isinstance(keep_images, bool) or not isinstance(keep_images, int) or keep_images < 0:
        raise ValueError(
            f"`keep_images` must be an int >= 0. Received: keep_images={keep_images!r}"
        )
    if class_names is None:
        class_names = getattr(data, "class_names", None)
    kind, head = _head(model, kind)
    if kind not in (None, "multiclass"):
        keep_images = 0
    predictions, labels, images = _predict(model, data, keep_images)
    if kind is None:
        # A model outside the contract (no "predictions" layer head_of can read): softmax
        # rows still say what it predicts; anything else is ambiguous.
        if not _is_probabilities(_scores(predictions, "predictions")):
            raise ValueError(
                f"{head} Or pass `kind=` ('multiclass', 'multilabel' or 'regression') to "
                "kt.evaluate."
            )
        kind, head = "multiclass", None
    if class_names is None and head is not None:
        class_names = head.class_names
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    return report_from_predictions(
        kind,
        predictions,
        labels,
        class_names=class_names,
        top_k=top_k,
        threshold=threshold,
        images=images,
    )


# --- text and HTML ----------------------------------------------------------------------------


def _number(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
    line = [f"{header[0]:<{widths[0]}}"] + [
        f"{h:>{w}}" for h, w in zip(header[1:], widths[1:], strict=True)
    ]
    lines = ["  ".join(line)]
    for row in rows:
        cells = [f"{row[0]:<{widths[0]}}"] + [
            f"{c:>{w}}" for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells))
    return lines


def format_report(report: Mapping[str, Any], digits: int = 3) -> str:
    """Formats a report (or its dict) as text: summary lines, a per-class table, the matrix.

    Args:
        report: An `EvaluationReport`, or its `to_dict()` (dicts without `kind` are read as
            multi-class, as `evaluate` returned them before reports existed).
        digits: Decimals shown.

    Returns:
        The text; multi-class reports end with the confusion matrix (up to 20 classes; bigger
        ones are for `kt.plots.plot_confusion_matrix`).

    Example:
    >>> import numpy as np
    >>> m = metrics_from_probabilities(np.eye(2), [0, 1], ["cat", "dog"], top_k=(1,))
    >>> print(format_report(m).splitlines()[0])
    accuracy 1.000 on 2 examples
    """
    kind = report.get("kind", "multiclass")
    n = report["num_examples"]
    f = _number
    if kind == "regression":
        lines = [
            f"MAE {f(report['mae'], digits)}  RMSE {f(report['rmse'], digits)}  "
            f"R² {f(report['r2'], digits)} on {n} examples",
            "",
        ]
        rows = [
            [r["name"], f(r["mae"], digits), f(r["rmse"], digits), f(r["r2"], digits)]
            for r in report["per_target"]
        ]
        lines += _table(["target", "MAE", "RMSE", "R²"], rows)
        return "\n".join(lines)
    if kind == "multilabel":
        lines = [
            f"mAP {f(report['mean_average_precision'], digits)}  subset accuracy "
            f"{f(report['subset_accuracy'], digits)}  Hamming loss "
            f"{f(report['hamming_loss'], digits)} on {n} examples",
        ]
        for average in ("macro", "micro"):
            lines.append(
                f"{average} precision {f(report[f'{average}_precision'], digits)}  recall "
                f"{f(report[f'{average}_recall'], digits)}  f1 {f(report[f'{average}_f1'], digits)}"
            )
        lines.append(f"log loss {f(report['log_loss'], digits)}  ECE {f(report['ece'], digits)}")
        lines.append("")
        rows = [
            [
                r["name"],
                f(r["precision"], digits),
                f(r["recall"], digits),
                f(r["f1"], digits),
                f(r["average_precision"], digits),
                str(r["support"]),
            ]
            for r in report["per_label"]
        ]
        lines += _table(["label", "precision", "recall", "f1", "AP", "support"], rows)
        return "\n".join(lines)

    lines = [f"accuracy {f(report['accuracy'], digits)} on {n} examples"]
    for name, value in report.get("top_k_accuracy", {}).items():
        lines.append(f"{name.replace('_', '-')} accuracy {f(value, digits)}")
    for average in ("macro", "weighted"):
        if f"{average}_precision" in report:
            lines.append(
                f"{average} precision {f(report[f'{average}_precision'], digits)}  recall "
                f"{f(report[f'{average}_recall'], digits)}  f1 {f(report[f'{average}_f1'], digits)}"
            )
    if report.get("log_loss") is not None:
        lines.append(
            f"log loss {f(report['log_loss'], digits)}  ECE {f(report.get('ece'), digits)} "
            f"({NUM_CALIBRATION_BINS} bins)"
        )
    lines.append("")
    rows = [
        [
            r["name"],
            f(r["precision"], digits),
            f(r["recall"], digits),
            f(r["f1"], digits),
            str(r["support"]),
        ]
        for r in report["per_class"]
    ]
    lines += _table(["class", "precision", "recall", "f1", "support"], rows)
    confused = report.get("most_confused") or []
    if confused:
        lines += ["", "most confused (true -> predicted: count)"]
        lines += [f"  {c['true']} -> {c['predicted']}: {c['count']}" for c in confused]
    matrix = np.asarray(report["confusion_matrix"])
    names = report["class_names"]
    if len(names) <= _TEXT_MATRIX_MAX_CLASSES:
        width = max(len(str(name)) for name in [*names, "class"])
        cell = max(3, len(str(matrix.max())) if matrix.size else 1)
        lines.append("")
        lines.append("confusion matrix (rows: true class, columns: predicted, in the order above)")
        for name, row in zip(names, matrix, strict=True):
            lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def _html_report(report: EvaluationReport, digits: int = 3) -> str:
    def cell(value) -> str:
        if isinstance(value, float) or value is None:
            return f"<td>{_number(value, digits)}</td>"
        return f"<td>{html.escape(str(value))}</td>"

    def table(header, rows) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    kind = report.kind
    if kind == "multiclass":
        summary = [
            ("accuracy", report["accuracy"]),
            *((k.replace("_", "-"), v) for k, v in report["top_k_accuracy"].items()),
            ("macro F1", report["macro_f1"]),
            ("weighted F1", report["weighted_f1"]),
            ("log loss", report["log_loss"]),
            ("ECE", report["ece"]),
        ]
        per = report["per_class"]
        columns = ["precision", "recall", "f1", "support"]
    elif kind == "multilabel":
        summary = [
            ("mAP", report["mean_average_precision"]),
            ("subset accuracy", report["subset_accuracy"]),
            ("Hamming loss", report["hamming_loss"]),
            ("macro F1", report["macro_f1"]),
            ("micro F1", report["micro_f1"]),
            ("ECE", report["ece"]),
        ]
        per = report["per_label"]
        columns = ["precision", "recall", "f1", "average_precision", "support"]
    else:
        summary = [(k.upper(), report[k]) for k in ("mae", "rmse")] + [("R²", report["r2"])]
        per = report["per_target"]
        columns = ["mae", "rmse", "r2"]
    title = f"<b>{kind} evaluation on {report['num_examples']} examples</b>"
    first = table([name for name, _ in summary], [[value for _, value in summary]])
    second = table(["name", *columns], [[r["name"], *(r[c] for c in columns)] for r in per])
    return f"<div>{title}{first}{second}</div>"


# --- plots (kept here for existing callers; kt.plots has them all) ----------------------------


def plot_confusion_matrix(
    metrics_or_matrix,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool | str = False,
    title: str = "Confusion matrix",
    path: str | None = None,
):
    """Draws a confusion matrix as a heat map; see `kt.plots.plot_confusion_matrix`.

    Returns:
        The matplotlib `Figure`.
    """
    from keras_transfer import plots

    return plots.plot_confusion_matrix(
        metrics_or_matrix, class_names, normalize=normalize, title=title, path=path
    )


def plot_history(history, *, path: str | None = None):
    """Plots training curves with the phases marked; see `kt.plots.plot_training_curves`.

    Returns:
        The matplotlib `Figure`.
    """
    from keras_transfer import plots

    return plots.plot_training_curves(history, path=path)
