"""The plots people look at after training: curves, confusion, mistakes, augmentation, calibration.

Every function returns a matplotlib `Figure` (and saves it when given `path=`). Figures are built
with `matplotlib.figure.Figure` rather than `pyplot`, so they need no display and no backend
switch: saving renders with Agg on a server or in CI, and in a notebook the returned figure
displays inline. Nothing here registers figures with `pyplot`, so none are left open.

- `plot_training_curves`: loss and metrics over all phases, each phase shaded and named.
- `plot_confusion_matrix`: counts and row-normalised shares, with class names.
- `plot_misclassified`: the misclassified images with true / predicted class and confidence.
- `plot_augmented_batch`: a batch of input after the model's `"augmentation"` layer.
- `plot_reliability_diagram`: accuracy against confidence per bin, with the ECE.
- `plot_lr_finder`: loss against learning rate, the suggestion marked.
- `save_report_plots`: the PNGs of an `EvaluationReport` (what `keras-transfer evaluate --plots`
  writes).

Example:
>>> import numpy as np
>>> from keras_transfer import evaluation, plots
>>> report = evaluation.metrics_from_probabilities(np.eye(3)[[0, 1, 2, 1]], [0, 1, 2, 2])
>>> fig = plots.plot_confusion_matrix(report)
>>> [ax.get_title() for ax in fig.axes[:2]]  # then their colour bars
['Confusion matrix (counts)', 'Confusion matrix (row-normalised)']
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter
from matplotlib.transforms import blended_transform_factory

_PHASE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")
_NAME_CHARS = 24  # longer class names are shortened on axes


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def _finish(fig: Figure, path: str | os.PathLike | None) -> Figure:
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


def _short(name: Any, limit: int = _NAME_CHARS) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


# --- training curves --------------------------------------------------------------------------


def _history_parts(history) -> tuple[dict, list[int] | None, dict]:
    """`(logs, epochs, phases)` of a History, a `kt.runs.Run`, `history.json`'s dict or logs."""
    if isinstance(history, Mapping) and isinstance(history.get("history"), Mapping):
        return dict(history["history"]), history.get("epoch"), dict(history.get("phases") or {})
    logs = getattr(history, "history", history)
    if not isinstance(logs, Mapping) or not logs:
        raise ValueError(
            "`history` must be a keras History (e.g. from kt.fine_tune), a kt.runs.Run, "
            "history.json's content or a dict of per-epoch lists such as {'loss': [...]}. "
            f"Received: {type(history).__name__} {str(history)[:80]}"
        )
    epochs = getattr(history, "epoch", None)
    return dict(logs), epochs, dict(getattr(history, "phases", None) or {})


def _phase_spans(phases: Mapping) -> list[tuple[str, int, int]]:
    spans = []
    for name, value in phases.items():
        if value is None:
            continue  # a phase that did not run
        if isinstance(value, range):
            value = (value.start, value.stop)
        start, end = (int(v) for v in value)
        if end > start:
            spans.append((str(name), start, end))
    return sorted(spans, key=lambda span: span[1])


def plot_training_curves(
    history,
    *,
    metrics: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """Training and validation curves over all phases, each phase shaded and named.

    One panel per metric (the learning rate, when logged, on a log scale). Epochs are numbered
    from 1 across phases; a dashed line marks where each phase begins and its name is written
    above the panel, over its epochs.

    Args:
        history: The `keras.callbacks.History` from `kt.fine_tune` / `kt.fit_phases` (its
            `phases` map each phase name to `(first_epoch, end_epoch)`), a `kt.runs.Run`, the
            content of a run's `history.json`, or a plain dict of per-epoch lists.
        metrics: The metrics to draw (e.g. `["loss"]`); default: every one logged.
        path: If set, the figure is also saved there (PNG, PDF, ... by extension).

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: for an empty history or a metric it does not hold.

    Example:
    >>> history = {"history": {"loss": [1.0, 0.6, 0.5, 0.3]}, "phases": {"head": [0, 2],
    ...            "finetune": [2, 4]}}
    >>> fig = plot_training_curves(history)
    >>> [t.get_text() for t in fig.axes[0].child_axes[0].get_xticklabels()]  # above the panel
    ['head', 'finetune']
    """
    logs, epochs, phases = _history_parts(history)
    names = [k for k in logs if not k.startswith("val_") and k not in ("learning_rate", "lr")]
    names += [k[4:] for k in logs if k.startswith("val_") and k[4:] not in logs]
    if metrics is not None:
        missing = [m for m in metrics if m not in names and m != "learning_rate"]
        if missing or not metrics:
            raise ValueError(
                f"`metrics` must name logged metrics: {sorted(names)}. Received: {metrics!r}"
            )
        names = [m for m in metrics if m != "learning_rate"]
    rate = "learning_rate" if "learning_rate" in logs else "lr" if "lr" in logs else None
    if metrics is not None and "learning_rate" not in metrics:
        rate = None
    panels = names + ([rate] if rate else [])
    length = max(len(v) for v in logs.values())
    if epochs is not None and len(epochs) == length:
        x = np.asarray(epochs, dtype=np.float64) + 1
    else:
        x = np.arange(1, length + 1, dtype=np.float64)
    spans = _phase_spans(phases)

    columns = min(3, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = _figure(4.6 * columns, 3.6 * rows)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    marker = "o" if length <= 40 else None
    for ax, name in zip(axes, panels, strict=False):
        for label, key in (("train", name), ("validation", f"val_{name}")):
            values = logs.get(key)
            if values is not None:
                values = np.asarray(values, dtype=np.float64)
                ax.plot(x[: len(values)], values, marker=marker, markersize=3, label=label)
        if name == rate:
            values = np.asarray(logs[rate], dtype=np.float64)
            if np.all(values > 0):
                ax.set_yscale("log")
            ax.set_title("learning rate (per epoch)")
        else:
            ax.set_title(name.replace("_", " "))
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        _mark_phases(ax, spans)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    return _finish(fig, path)


def _mark_phases(ax, spans: list[tuple[str, int, int]]) -> None:
    if not spans:
        return
    centres, labels = [], []
    for i, (name, start, end) in enumerate(spans):
        colour = _PHASE_COLOURS[i % len(_PHASE_COLOURS)]
        ax.axvspan(start + 0.5, end + 0.5, color=colour, alpha=0.07, lw=0)
        if i:
            ax.axvline(start + 0.5, color="0.3", linestyle="--", linewidth=1)
        centres.append((start + end) / 2 + 0.5)
        labels.append(name)
    ax.set_xlim(spans[0][1] + 0.5 - 0.02 * spans[-1][2], spans[-1][2] + 0.5 + 0.02 * spans[-1][2])
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, labels, fontsize=9, color="0.2")
    top.tick_params(length=0)


# --- confusion matrix -------------------------------------------------------------------------


def _matrix_and_names(report_or_matrix, class_names):
    if isinstance(report_or_matrix, Mapping):
        if "confusion_matrix" not in report_or_matrix:
            raise ValueError(
                "The report has no confusion matrix (it is not a multi-class report). Pass a "
                "multi-class EvaluationReport or a square matrix."
            )
        matrix = np.asarray(report_or_matrix["confusion_matrix"], dtype=np.float64)
        class_names = class_names or report_or_matrix.get("class_names")
    else:
        matrix = np.asarray(report_or_matrix, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or not matrix.size:
        raise ValueError(f"The confusion matrix must be square. Received: shape {matrix.shape}")
    k = matrix.shape[0]
    names = [str(c) for c in (class_names or range(k))]
    if len(names) != k:
        raise ValueError(
            f"`class_names` has {len(names)} names for a {k}x{k} matrix. Received: "
            f"class_names={names[:10]!r}"
        )
    return matrix, names


def _matrix_style(k: int) -> tuple[float, float, float | None]:
    """(cell inches, tick font size, cell-text font size or None) for k classes."""
    if k <= 10:
        return 0.55, 10.0, 9.0
    if k <= 20:
        return 0.42, 9.0, 7.0
    if k <= 40:
        return 0.32, 7.5, 6.0
    return max(0.12, 12.0 / k), max(4.0, 280.0 / k), None


def plot_confusion_matrix(
    report_or_matrix,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool | str = "both",
    title: str = "Confusion matrix",
    path: str | os.PathLike | None = None,
) -> Figure:
    """The confusion matrix as a heat map with class names: counts and/or row-normalised shares.

    Rows are true classes, columns predictions; a row-normalised cell is the share of that true
    class predicted as the column's class (its diagonal is the per-class recall). Cells carry
    their values up to 40 classes (above 20, zeros are left blank and shares shown in whole
    percents); tick labels shrink with the number of classes and names longer than 24
    characters are shortened.

    Args:
        report_or_matrix: A multi-class `EvaluationReport` (or its dict), or a square matrix.
        class_names: Axis labels; default: the report's `class_names`, else `0`, `1`, ...
        normalize: `"both"` (default: counts and row-normalised side by side), False (counts)
            or True (row-normalised).
        title: Title of the panels (suffixed with "(counts)" / "(row-normalised)").
        path: If set, the figure is also saved there.

    Returns:
        The matplotlib `Figure`: a heat-map axes and its colour bar per panel.

    Raises:
        ValueError: for a report without a confusion matrix, a non-square matrix, wrong
            `class_names` or an unknown `normalize`.
    """
    if normalize not in (True, False, "both"):
        raise ValueError(
            f"`normalize` must be True, False or 'both'. Received: normalize={normalize!r}"
        )
    counts, names = _matrix_and_names(report_or_matrix, class_names)
    k = len(names)
    shares = np.divide(
        counts,
        counts.sum(axis=1, keepdims=True),
        out=np.zeros_like(counts),
        where=counts.sum(axis=1, keepdims=True) > 0,
    )
    panels = {"both": [False, True], True: [True], False: [False]}[normalize]
    cell, tick_size, text_size = _matrix_style(k)
    labels = [_short(n) for n in names]
    margin = max(len(n) for n in labels) * tick_size * 0.62 / 72 + 0.6
    width = k * cell + margin + 1.3
    height = k * cell + margin + 0.9
    fig = _figure(width * len(panels), height)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, shared in zip(axes, panels, strict=True):
        values = shares if shared else counts
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if shared else None)
        bar = fig.colorbar(image, ax=ax, shrink=0.8, pad=0.02)
        bar.ax.tick_params(labelsize=8)
        ax.set_xticks(range(k), labels, fontsize=tick_size)
        ax.set_yticks(range(k), labels, fontsize=tick_size)
        if k <= 10 and max(len(n) for n in labels) <= 6:
            ax.tick_params(axis="x", labelrotation=0)
        else:
            ax.tick_params(axis="x", labelrotation=90)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        # Past 20 classes, shares are whole percents so that they fit their cells.
        percent = shared and k > 20
        suffix = "row-normalised, %" if percent else "row-normalised" if shared else "counts"
        ax.set_title(f"{title} ({suffix})")
        if percent:
            bar.ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
        elif not shared:
            bar.ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if text_size is None:
            continue
        threshold = values.max() / 2 if values.max() > 0 else 1
        for i in range(k):
            for j in range(k):
                if k > 20 and counts[i, j] == 0:
                    continue
                if percent:
                    text = f"{100 * values[i, j]:.0f}"
                else:
                    text = f"{values[i, j]:.2f}" if shared else f"{int(values[i, j])}"
                colour = "white" if values[i, j] > threshold else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=text_size)
    return _finish(fig, path)


# --- images -----------------------------------------------------------------------------------


def _displayable(image: np.ndarray) -> tuple[np.ndarray, str | None]:
    """An image as imshow wants it: floats in [0, 1] (pixels in [0, 255] are scaled), grey 2-D."""
    image = np.asarray(image)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.dtype != np.uint8:
        image = image.astype(np.float64)
        if image.size and image.max() > 1.5:
            image = image / 255.0
        image = np.clip(image, 0.0, 1.0)
    return image, ("gray" if image.ndim == 2 else None)


def _image_grid(images, titles, columns: int, suptitle: str, *, title_colour="black") -> Figure:
    n = len(images)
    columns = max(1, min(columns, n))
    rows = math.ceil(n / columns)
    # Wide enough for the title too when there are few images (about 0.08 in per character).
    fig = _figure(max(2.1 * columns, 0.08 * len(suptitle)), 2.35 * rows + 0.4)
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, image, title in zip(axes, images, titles, strict=False):
        pixels, cmap = _displayable(image)
        ax.imshow(pixels, cmap=cmap, vmin=0, vmax=1 if pixels.dtype != np.uint8 else 255)
        ax.set_title(title, fontsize=8, color=title_colour)
        ax.set_axis_off()
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(suptitle, fontsize=10)
    return fig


def _message(text: str, path) -> Figure:
    fig = _figure(5, 1.5)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=11)
    return _finish(fig, path)


def plot_misclassified(
    report,
    images: np.ndarray | None = None,
    *,
    max_images: int = 25,
    columns: int = 5,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A grid of misclassified images, most confident mistakes first, with true / predicted.

    Each image is titled with its true class, its predicted class and the predicted class's
    probability, and its index in the evaluated data.

    Args:
        report: A multi-class `EvaluationReport`.
        images: The evaluated inputs, in the order evaluated (`N` images), when the report does
            not hold the misclassified images itself (`evaluate` keeps them for data of at most
            `keep_images` examples).
        max_images: Show at most this many.
        columns: Images per row.
        path: If set, the figure is also saved there.

    Returns:
        The matplotlib `Figure` (a one-line message when nothing was misclassified).

    Raises:
        ValueError: for a report without misclassified examples' data, or without images when
            `images` is not given.
    """
    if not isinstance(report, Mapping) or "misclassified" not in report:
        raise ValueError(
            "`report` must be a multi-class EvaluationReport (from kt.evaluate). Received: "
            f"{type(report).__name__}"
        )
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"`max_images` must be an int >= 1. Received: max_images={max_images!r}")
    wrong = list(report["misclassified"])
    if not wrong:
        return _message("No misclassified examples.", path)
    shown = wrong[:max_images]
    if images is not None:
        images = np.asarray(images)
        pictures = [images[entry["index"]] for entry in shown]
    else:
        kept = getattr(report, "misclassified_images", None)
        if kept is None:
            raise ValueError(
                "The report holds no images: kt.evaluate keeps them for data of at most "
                "`keep_images` examples. Pass `images=` (the evaluated inputs, in order) or "
                "evaluate with a larger `keep_images=`."
            )
        pictures = list(kept[: len(shown)])
    titles = [
        f"#{e['index']} true: {_short(e['true'], 16)}\n"
        f"pred: {_short(e['predicted'], 16)} ({e['confidence']:.2f})"
        for e in shown
    ]
    suptitle = (
        f"Misclassified: {len(shown)} of {len(wrong)} shown, most confident first "
        f"(of {report['num_examples']} examples)"
    )
    fig = _image_grid(pictures, titles, columns, suptitle, title_colour="#b2182b")
    return _finish(fig, path)


def _first_batch(data):
    """`(images, labels or None)` of the first batch of an array, `(x, y)` or a dataset."""
    if isinstance(data, np.ndarray):
        return data, None
    if isinstance(data, tuple) and len(data) == 2 and hasattr(data[0], "shape"):
        return np.asarray(data[0]), np.asarray(data[1])
    if hasattr(data, "shape"):  # a tensor
        return np.asarray(data), None
    if hasattr(data, "__iter__"):
        for batch in data:
            if isinstance(batch, tuple | list):
                return np.asarray(batch[0]), (np.asarray(batch[1]) if len(batch) > 1 else None)
            return np.asarray(batch), None
        raise ValueError("`data` is empty: no batch to show.")
    raise TypeError(
        "`data` must be an array of images, an (x, y) tuple or a tf.data.Dataset of batches. "
        f"Received: {type(data).__name__}"
    )


def plot_augmented_batch(
    model,
    data,
    *,
    num_images: int = 16,
    columns: int = 4,
    class_names: Sequence[str] | None = None,
    path: str | os.PathLike | None = None,
) -> Figure:
    """A batch of input after the model's `"augmentation"` layer, run in training mode.

    This is what the backbone sees during training (before the model's own preprocessing).
    A model without an augmentation layer shows the input unchanged, and says so in the title.

    Args:
        model: A model from `kt.build_classifier` (built with `augmentation=`), or any model.
        data: An array of images `(N, H, W, C)`, an `(x, y)` tuple, or a `tf.data.Dataset` of
            `(images, labels)` batches (its first batch is used).
        num_images: Show at most this many.
        columns: Images per row.
        class_names: Names for integer (or one-hot) labels in the titles; default: the data's
            `class_names`, then the model's.
        path: If set, the figure is also saved there.

    Returns:
        The matplotlib `Figure`.

    Raises:
        TypeError, ValueError: for data that holds no images.
    """
    from keras_transfer.heads import AUGMENTATION_NAME

    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"`num_images` must be an int >= 1. Received: num_images={num_images!r}")
    images, labels = _first_batch(data)
    if images.ndim not in (3, 4):
        raise ValueError(
            f"`data` must hold images of shape (N, H, W, C). Received: shape {images.shape}"
        )
    images = images[:num_images]
    try:
        layer = model.get_layer(AUGMENTATION_NAME)
    except ValueError:
        layer = None
    if layer is not None:
        shown = np.asarray(layer(images.astype("float32"), training=True))
        suptitle = f"{len(shown)} inputs after the {AUGMENTATION_NAME!r} layer (training mode)"
    else:
        shown = images
        suptitle = f"No {AUGMENTATION_NAME!r} layer in the model: {len(shown)} inputs as given"
    names = class_names or getattr(data, "class_names", None) or getattr(model, "class_names", None)
    titles = [""] * len(shown)
    if labels is not None:
        labels = labels[: len(shown)]
        if labels.ndim == 2 and labels.shape[1] > 1:
            labels = labels.argmax(axis=1)
        labels = labels.reshape(len(shown), -1)[:, 0]
        titles = [
            _short(names[int(y)], 20) if names is not None and 0 <= int(y) < len(names) else str(y)
            for y in labels
        ]
    return _finish(_image_grid(shown, titles, columns, suptitle), path)


# --- calibration and learning rate ------------------------------------------------------------


def plot_reliability_diagram(report, *, path: str | os.PathLike | None = None) -> Figure:
    """The reliability diagram: accuracy against confidence per bin, and the examples per bin.

    A calibrated model's bars follow the diagonal; the red hatched part of each bar is its gap
    between confidence and accuracy, and the title gives the expected calibration error.

    Args:
        report: An `EvaluationReport` (multi-class: top-class probability against accuracy;
            multi-label: each label's probability against the fraction of positives), or its
            `report["reliability"]` dict (see `kt.evaluation.reliability`).
        path: If set, the figure is also saved there.

    Returns:
        The matplotlib `Figure`: the diagram above, the bin counts below.

    Raises:
        ValueError: for a report without calibration data (regression, or scores that are not
            probabilities).
    """
    data = report.get("reliability") if isinstance(report, Mapping) else None
    if data is None and isinstance(report, Mapping) and "bin_edges" in report:
        data = report
    if data is None:
        raise ValueError(
            "`report` holds no calibration data: pass a classification EvaluationReport whose "
            "predictions are probabilities (kt.evaluate on a softmax or sigmoid model), or its "
            "`reliability` dict."
        )
    multilabel = isinstance(report, Mapping) and report.get("kind") == "multilabel"
    edges = np.asarray(data["bin_edges"], dtype=np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    widths = np.diff(edges)
    accuracy = np.array([np.nan if a is None else a for a in data["accuracy"]], dtype=np.float64)
    confidence = np.array(
        [np.nan if c is None else c for c in data["confidence"]], dtype=np.float64
    )
    count = np.asarray(data["count"])
    filled = count > 0

    fig = _figure(5.2, 6.0)
    top, bottom = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.bar(
        centres[filled],
        accuracy[filled],
        width=widths[filled],
        edgecolor="#08306b",
        color="#4292c6",
        label="accuracy" if not multilabel else "fraction of positives",
    )
    gap_low = np.minimum(accuracy, confidence)[filled]
    top.bar(
        centres[filled],
        np.abs(confidence - accuracy)[filled],
        bottom=gap_low,
        width=widths[filled],
        color="#ef3b2c",
        alpha=0.3,
        hatch="//",
        edgecolor="#a50f15",
        label="gap to confidence",
    )
    top.plot([0, 1], [0, 1], linestyle="--", color="0.3", label="perfect calibration")
    top.set(xlim=(0, 1), ylim=(0, 1))
    top.set_ylabel("fraction of positives" if multilabel else "accuracy")
    top.set_title(f"Reliability diagram: ECE {data['ece']:.3f} ({len(centres)} bins)")
    top.legend(loc="upper left", fontsize=8)
    top.grid(alpha=0.3)
    bottom.bar(centres, count, width=widths, color="0.5", edgecolor="0.25")
    bottom.set_ylabel("examples" if not multilabel else "predictions")
    bottom.set_xlabel(
        "predicted probability (each label)" if multilabel else "confidence (top-class probability)"
    )
    bottom.grid(alpha=0.3)
    return _finish(fig, path)


def plot_lr_finder(
    lrs,
    losses,
    suggestion: float | Mapping[str, float] | None = None,
    *,
    title: str = "Learning-rate finder",
    path: str | os.PathLike | None = None,
) -> Figure:
    """The learning-rate finder's loss against learning rate (log scale), the suggestion marked.

    Args:
        lrs: The learning rates tried, increasing, all > 0.
        losses: The (smoothed) loss at each rate, same length.
        suggestion: The suggested rate, or `{"valley": ..., "steep": ...}` for several, or None.
        title: Figure title.
        path: If set, the figure is also saved there.

    Returns:
        The matplotlib `Figure`.

    Raises:
        ValueError: for arrays of different lengths, fewer than two points, rates <= 0 or
            suggestions <= 0.

    Example:
    >>> import numpy as np
    >>> lrs = np.geomspace(1e-5, 1, 50)
    >>> fig = plot_lr_finder(lrs, (np.log10(lrs) + 2.5) ** 2, suggestion=3e-3)
    >>> fig.axes[0].get_xscale()
    'log'
    """
    lrs = np.asarray(lrs, dtype=np.float64).reshape(-1)
    losses = np.asarray(losses, dtype=np.float64).reshape(-1)
    if lrs.shape != losses.shape or lrs.size < 2:
        raise ValueError(
            "`lrs` and `losses` must be 1-D arrays of the same length (at least 2). Received: "
            f"{lrs.size} and {losses.size} values."
        )
    if not np.all(np.isfinite(lrs) & (lrs > 0)):
        raise ValueError("`lrs` must be finite learning rates > 0.")
    if suggestion is None:
        suggestions = {}
    elif isinstance(suggestion, Mapping):
        suggestions = {str(k): float(v) for k, v in suggestion.items()}
    else:
        suggestions = {"suggestion": float(suggestion)}
    for name, lr in suggestions.items():
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"Suggested rate {name!r} must be > 0. Received: {lr!r}")

    fig = _figure(6.0, 4.0)
    ax = fig.subplots()
    ax.plot(lrs, losses, color="#1f77b4", label="loss")
    ax.set_xscale("log")
    order = np.argsort(lrs)
    finite = np.isfinite(losses[order])
    for i, (name, lr) in enumerate(suggestions.items()):
        colour = ("#d62728", "#2ca02c", "#9467bd", "#ff7f0e")[i % 4]
        loss = np.interp(np.log(lr), np.log(lrs[order][finite]), losses[order][finite])
        ax.axvline(lr, color=colour, linestyle="--", linewidth=1)
        ax.plot([lr], [loss], "o", color=colour, markersize=8, label=f"{name}: {lr:.2e}")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    # Keep the exploding tail from flattening the interesting part of the curve.
    shown = losses[np.isfinite(losses)]
    if shown.size:
        low = shown.min()
        high = min(shown.max(), low + 4 * (shown[0] - low + 1e-12))
        if high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    transform = blended_transform_factory(ax.transAxes, ax.transAxes)
    ax.text(0.99, 0.02, f"{lrs.size} steps", transform=transform, ha="right", fontsize=8)
    return _finish(fig, path)


# --- saving -----------------------------------------------------------------------------------


def save_report_plots(
    report, folder: str | os.PathLike, *, prefix: str = "", images: np.ndarray | None = None
) -> list[Path]:
    """Writes the PNGs that fit an `EvaluationReport` into `folder`; returns their paths.

    Multi-class: `confusion_matrix.png` (counts and row-normalised), `reliability.png` (when the
    predictions are probabilities) and `misclassified.png` (when the report holds the images or
    `images` is given, and something was misclassified). Multi-label: `reliability.png`.
    Regression: none.

    Args:
        report: An `EvaluationReport`.
        folder: Created if needed.
        prefix: Prepended to each file name (e.g. `"test_"`).
        images: The evaluated inputs, for `misclassified.png` when the report holds no images.

    Returns:
        The paths written, in that order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig: Figure, name: str) -> None:
        target = folder / f"{prefix}{name}.png"
        fig.savefig(target, dpi=100)
        written.append(target)

    kind = report.get("kind", "multiclass")
    if kind == "multiclass":
        save(plot_confusion_matrix(report), "confusion_matrix")
    if kind in ("multiclass", "multilabel") and report.get("reliability") is not None:
        save(plot_reliability_diagram(report), "reliability")
    has_images = images is not None or getattr(report, "misclassified_images", None) is not None
    if kind == "multiclass" and report["misclassified"] and has_images:
        save(plot_misclassified(report, images), "misclassified")
    return written
