"""Evaluation of a classifier: accuracy, top-k, per-class precision/recall/F1, confusion matrix.

Everything is computed with numpy from the model's predicted probabilities, so the numbers are
the same whatever the data source, and the report and plots need no scikit-learn. Plots use
matplotlib's Agg backend (no display needed) and return the `Figure`.

Example:
>>> import numpy as np
>>> from keras_transfer import evaluation
>>> m = evaluation.metrics_from_probabilities(
...     np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), np.array([0, 1, 1]), top_k=(1,)
... )
>>> round(m["accuracy"], 3), m["confusion_matrix"]
(0.667, [[1, 0], [1, 1]])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


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


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Counts of (true class, predicted class) pairs: rows are true classes, columns predictions.

    Args:
        y_true: Integer class ids, shape `(N,)`.
        y_pred: Integer predicted class ids, shape `(N,)`.
        num_classes: Number of classes (the matrix is `num_classes x num_classes`).

    Returns:
        An int64 array of shape `(num_classes, num_classes)`.

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
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    # 0/0 is reported as 0.0, as scikit-learn does with zero_division=0.
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def metrics_from_probabilities(
    probabilities,
    labels,
    class_names: Sequence[str] | None = None,
    top_k: int | Sequence[int] = (1, 5),
) -> dict:
    """Computes the evaluation metrics from predicted probabilities and true labels.

    Args:
        probabilities: Array `(N, num_classes)` of scores (probabilities or logits).
        labels: Integer class ids `(N,)`, or one-hot labels `(N, num_classes)`.
        class_names: Names of the classes, in output order; defaults to `"0"`, `"1"`, ...
        top_k: The k of the top-k accuracies to report; values above the number of classes are
            left out.

    Returns:
        A JSON-serialisable dict: `num_examples`, `accuracy`, `top_k_accuracy` (`{"top_5": ...}`),
        `macro_precision`, `macro_recall`, `macro_f1`, `per_class` (a list of dicts with `name`,
        `precision`, `recall`, `f1`, `support`), `class_names` and `confusion_matrix` (nested
        lists, rows true, columns predicted).

    Raises:
        ValueError: for mismatched shapes, labels outside the classes, or wrong `class_names`.
    """
    probs = np.asarray(probabilities, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(
            f"`probabilities` must have shape (N, num_classes). Received: shape {probs.shape}"
        )
    n, num_classes = probs.shape
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == num_classes:
        labels = labels.argmax(axis=1)
    labels = labels.reshape(-1).astype(np.int64)
    if len(labels) != n:
        raise ValueError(
            f"Got {n} predictions but {len(labels)} labels; pass one label per example."
        )
    if class_names is None:
        class_names = [str(i) for i in range(num_classes)]
    class_names = [str(c) for c in class_names]
    if len(class_names) != num_classes:
        raise ValueError(
            f"`class_names` has {len(class_names)} names but the model has {num_classes} "
            f"outputs. Received: class_names={class_names[:10]!r}"
        )
    ks = _check_top_k(top_k, num_classes)

    predicted = probs.argmax(axis=1)
    matrix = confusion_matrix(labels, predicted, num_classes)
    true_positive = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1).astype(np.float64)
    predicted_count = matrix.sum(axis=0).astype(np.float64)
    precision = _safe_div(true_positive, predicted_count)
    recall = _safe_div(true_positive, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)

    # Rank of the true class: how many classes scored strictly higher (ties favour the truth).
    true_scores = probs[np.arange(n), labels] if n else np.zeros(0)
    rank = (probs > true_scores[:, None]).sum(axis=1) if n else np.zeros(0)
    top = {f"top_{k}": float(np.mean(rank < k)) if n else math.nan for k in ks if k > 1}

    present = support > 0  # macro averages over classes that occur in the labels
    return {
        "num_examples": int(n),
        "accuracy": float(np.mean(predicted == labels)) if n else math.nan,
        "top_k_accuracy": top,
        "macro_precision": float(precision[present].mean()) if present.any() else math.nan,
        "macro_recall": float(recall[present].mean()) if present.any() else math.nan,
        "macro_f1": float(f1[present].mean()) if present.any() else math.nan,
        "per_class": [
            {
                "name": class_names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in range(num_classes)
        ],
        "class_names": class_names,
        "confusion_matrix": matrix.tolist(),
    }


def predict_dataset(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """Runs `model` over `dataset` once; returns `(probabilities, labels)` as numpy arrays.

    Args:
        model: A Keras classifier.
        dataset: A `tf.data.Dataset` of `(images, labels)` batches, or an `(x, y)` tuple of arrays.
    """
    if isinstance(dataset, tuple) and len(dataset) == 2:
        x, y = dataset
        return np.asarray(model.predict(np.asarray(x), verbose=0)), np.asarray(y)
    probabilities, labels = [], []
    for batch in dataset:
        if not isinstance(batch, tuple | list) or len(batch) < 2:
            raise TypeError(
                "`dataset` must yield (images, labels) batches, e.g. from kt.data.from_folder. "
                f"Received an element of type {type(batch).__name__}."
            )
        x, y = batch[0], batch[1]
        probabilities.append(np.asarray(model(x, training=False)))
        labels.append(np.asarray(y))
    if not probabilities:
        raise ValueError("`dataset` is empty: nothing to evaluate.")
    return np.concatenate(probabilities), np.concatenate(labels)


def evaluate(model, dataset, class_names: Sequence[str] | None = None, top_k=(1, 5)) -> dict:
    """Evaluates a classifier on labelled data.

    Args:
        model: A Keras classifier with softmax outputs (e.g. from `kt.build_classifier`).
        dataset: A `tf.data.Dataset` of `(images, labels)` batches (see `kt.data`), or an
            `(x, y)` tuple of arrays.
        class_names: Names of the classes in output order; defaults to `dataset.class_names`
            when the dataset has them, else `"0"`, `"1"`, ...
        top_k: The k of the top-k accuracies to report (default top-1 and top-5).

    Returns:
        The dict of `metrics_from_probabilities`: accuracy, top-k accuracy, macro and per-class
        precision/recall/F1 and the confusion matrix.

    Raises:
        ValueError: for an empty dataset, labels outside the model's classes or `class_names` of
            the wrong length.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> from keras_transfer.evaluation import evaluate
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> x = np.random.uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    >>> metrics = evaluate(model, (x, np.arange(6) % 3), top_k=(1, 2))
    >>> sorted(metrics["top_k_accuracy"])
    ['top_2']
    """
    if class_names is None:
        class_names = getattr(dataset, "class_names", None)
    probabilities, labels = predict_dataset(model, dataset)
    return metrics_from_probabilities(probabilities, labels, class_names, top_k)


def format_report(metrics: dict, digits: int = 3) -> str:
    """Formats `evaluate`'s dict as a text report: summary lines, a per-class table, the matrix.

    Example:
    >>> import numpy as np
    >>> m = metrics_from_probabilities(np.eye(2), [0, 1], ["cat", "dog"], top_k=(1,))
    >>> print(format_report(m).splitlines()[0])
    accuracy 1.000 on 2 examples
    """
    f = f"{{:.{digits}f}}"
    lines = [f"accuracy {f.format(metrics['accuracy'])} on {metrics['num_examples']} examples"]
    for name, value in metrics.get("top_k_accuracy", {}).items():
        lines.append(f"{name.replace('_', '-')} accuracy {f.format(value)}")
    lines.append(
        f"macro precision {f.format(metrics['macro_precision'])}  "
        f"recall {f.format(metrics['macro_recall'])}  f1 {f.format(metrics['macro_f1'])}"
    )
    rows = metrics["per_class"]
    width = max([len("class")] + [len(r["name"]) for r in rows])
    lines.append("")
    lines.append(f"{'class':<{width}}  precision  recall     f1  support")
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {f.format(r['precision']):>9}  {f.format(r['recall']):>6}  "
            f"{f.format(r['f1']):>5}  {r['support']:>7}"
        )
    matrix = np.asarray(metrics["confusion_matrix"])
    cell = max(3, len(str(matrix.max())) if matrix.size else 1)
    lines.append("")
    lines.append("confusion matrix (rows: true class, columns: predicted, in the order above)")
    for name, row in zip(metrics["class_names"], matrix, strict=True):
        lines.append(f"{name:<{width}}  " + " ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI; figures are saved, not shown
    import matplotlib.pyplot as plt

    return plt


def plot_confusion_matrix(
    metrics_or_matrix,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = False,
    title: str = "Confusion matrix",
    path: str | None = None,
):
    """Draws a confusion matrix as a heat map with counts (or row shares) in the cells.

    Args:
        metrics_or_matrix: `evaluate`'s dict, or a square matrix (rows true, columns predicted).
        class_names: Axis labels; default: the dict's `class_names`, else `0`, `1`, ...
        normalize: Show each row as shares of its true class instead of counts.
        title: Figure title.
        path: If set, the figure is also saved there (PNG, PDF, ... by extension).

    Returns:
        The matplotlib `Figure`.
    """
    if isinstance(metrics_or_matrix, dict):
        matrix = np.asarray(metrics_or_matrix["confusion_matrix"], dtype=np.float64)
        class_names = class_names or metrics_or_matrix.get("class_names")
    else:
        matrix = np.asarray(metrics_or_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"The confusion matrix must be square. Received: shape {matrix.shape}")
    k = matrix.shape[0]
    names = [str(c) for c in (class_names or range(k))]
    if normalize:
        matrix = _safe_div(matrix, matrix.sum(axis=1, keepdims=True))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set(
        xticks=range(k),
        yticks=range(k),
        xticklabels=names,
        yticklabels=names,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    ax.tick_params(axis="x", labelrotation=45)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(k):
        for j in range(k):
            text = f"{matrix[i, j]:.2f}" if normalize else f"{int(matrix[i, j])}"
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
    fig.tight_layout()
    if path:
        fig.savefig(path)
    return fig


def plot_history(history, *, path: str | None = None):
    """Plots training curves: one panel per metric, training and validation, phases marked.

    Args:
        history: A `keras.callbacks.History` (e.g. from `kt.fine_tune`) or its `history` dict.
        path: If set, the figure is also saved there.

    Returns:
        The matplotlib `Figure`.
    """
    logs = getattr(history, "history", history)
    if not isinstance(logs, dict) or not logs:
        raise ValueError(
            "`history` must be a keras History or a dict of per-epoch lists, e.g. "
            f"{{'loss': [...]}}. Received: {type(history).__name__}"
        )
    names = [k for k in logs if not k.startswith("val_") and k != "learning_rate"]
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    phases = getattr(history, "phases", None) or {}
    for ax, name in zip(axes[0], names, strict=True):
        epochs = range(1, len(logs[name]) + 1)
        ax.plot(epochs, logs[name], marker="o", label="train")
        if f"val_{name}" in logs:
            ax.plot(epochs, logs[f"val_{name}"], marker="o", label="validation")
        finetune = phases.get("finetune")
        if finetune and phases.get("head"):
            ax.axvline(finetune[0] + 0.5, color="grey", linestyle="--", label="fine-tuning starts")
        ax.set(title=name, xlabel="epoch")
        ax.legend()
    fig.tight_layout()
    if path:
        fig.savefig(path)
    return fig
