"""Run folders: a trained model with its labels, history and metrics (`keras-transfer train`).

A run folder holds

- `model.keras`: the model (reloads without `custom_objects`);
- `labels.txt`: one class name per line, in output order (UTF-8);
- `history.json`: `{"history": {metric: [per-epoch values]}, "epoch": [...], "phases": {...}}`;
- `metrics.json`: whatever metrics the run reported (e.g. `kt.evaluate` results).

`save_run` writes them and `load_run` reads them back, from the command line or a notebook. Each
file is written under a temporary name beside its target and renamed into place, so a reader never
sees half a file. Other files in the folder (e.g. export version folders) are left alone.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_FILE = "model.keras"
LABELS_FILE = "labels.txt"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
RUN_FILES = (MODEL_FILE, LABELS_FILE, HISTORY_FILE, METRICS_FILE)


@dataclass
class Run:
    """A run folder read back by `load_run`.

    Args:
        model: The Keras model from `model.keras`; its `class_names` attribute is set too when
            `labels.txt` is present (so `kt.head_of(model)` reports them).
        class_names: The names from `labels.txt`, in output order; None without that file.
        history: Per-epoch values by metric name, as `keras.callbacks.History.history`; empty
            without `history.json`.
        metrics: The contents of `metrics.json`; empty without that file.
        path: The run folder.
        phases: Phase name to `[first_epoch, end_epoch)` (None for a phase that did not run),
            as `kt.fine_tune` records them.
    """

    model: Any
    class_names: list[str] | None
    history: dict[str, list[float]]
    metrics: dict[str, Any]
    path: Path
    phases: dict[str, list[int] | None] = field(default_factory=dict)


def check_labels(names: Sequence[str]) -> list[str]:
    """Checks that `names` can be written to `labels.txt` and read back unchanged.

    Args:
        names: Class names in output order.

    Returns:
        The names as a list of str.

    Raises:
        TypeError: When `names` is a single string or holds something other than strings.
        ValueError: For an empty name, a name with a line break or surrounding whitespace, or a
            name given twice.
    """
    if isinstance(names, str | bytes) or not hasattr(names, "__iter__"):
        raise TypeError(
            "`class_names` must be a sequence of strings, one per output, e.g. ['cat', 'dog']. "
            f"Received: class_names={names!r}"
        )
    names = list(names)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"`class_names` must hold strings. Received: {name!r} of type "
                f"{type(name).__name__}; convert with `[str(n) for n in class_names]`."
            )
        if not name.strip() or name != name.strip() or "\n" in name or "\r" in name:
            raise ValueError(
                f"Class name {name!r} cannot be stored in {LABELS_FILE} (one name per line): "
                "names must be non-empty, without line breaks or leading/trailing whitespace. "
                "Rename the class, e.g. with `name.strip()`."
            )
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"`class_names` must be unique. Received duplicates: {duplicates}")
    return names


def write_labels(path: str | os.PathLike, names: Sequence[str]) -> Path:
    """Writes `labels.txt`: one class name per line, UTF-8, atomically.

    Args:
        path: The file to write.
        names: Class names in output order (see `check_labels`).

    Returns:
        The path written.

    Raises:
        TypeError, ValueError: When a name cannot round-trip (see `check_labels`).

    Example:
    >>> from keras_transfer import runs
    >>> path = runs.write_labels("/tmp/kt_doc_labels.txt", ["red car", "blue car"])
    >>> runs.read_labels(path)
    ['red car', 'blue car']
    """
    names = check_labels(names)
    path = Path(path)
    _write_atomically(path, lambda tmp: tmp.write_text("\n".join(names) + "\n", encoding="utf-8"))
    return path


def read_labels(path: str | os.PathLike) -> list[str]:
    """Reads a labels file: one class name per line; blank lines and surrounding spaces ignored.

    Args:
        path: A `labels.txt` file (UTF-8, with or without a byte-order mark).

    Returns:
        The class names in file order.

    Raises:
        FileNotFoundError: When `path` is not a file.
        ValueError: When the file lists no names, or a name twice.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Labels file '{path}' does not exist. Pass a text file with one class name per "
            "line, in the model's output order."
        )
    names = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    names = [name for name in names if name]
    if not names:
        raise ValueError(f"Labels file '{path}' lists no class names; write one per line.")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"Labels file '{path}' lists these names more than once: {duplicates}")
    return names


def _write_atomically(path: Path, write) -> None:
    """Calls `write(tmp)` on a temporary path beside `path`, then renames it into place."""
    # Keras insists on the ".keras" suffix, so the temporary name keeps the target's name last.
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _json_default(value: Any) -> Any:
    """JSON for numpy scalars and arrays, paths, and objects with `to_dict()`."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(
        f"`metrics` holds a value of type {type(value).__name__} that JSON cannot store: "
        f"{value!r}. Convert it to a number, string, list or dict."
    )


def _history_json(history: Any) -> dict[str, Any]:
    """`history.json`'s content from a `keras.callbacks.History` or a `History.history` dict."""
    if isinstance(history, Mapping):
        values, epochs, phases = history, None, {}
    elif isinstance(getattr(history, "history", None), Mapping):
        values = history.history
        epochs = list(getattr(history, "epoch", None) or [])
        phases = dict(getattr(history, "phases", None) or {})
    else:
        raise TypeError(
            "`history` must be the `History` returned by `fit`/`kt.fine_tune`, or its "
            f"`.history` dict. Received: history of type {type(history).__name__}"
        )
    try:
        values = {str(k): [float(v) for v in vs] for k, vs in values.items()}
    except (TypeError, ValueError) as error:
        raise TypeError(
            "`history` must map each metric name to a list of per-epoch numbers. "
            f"Received: {dict(values)!r} ({error})"
        ) from None
    if not epochs:
        epochs = list(range(max((len(vs) for vs in values.values()), default=0)))
    return {
        "history": values,
        "epoch": [int(e) for e in epochs],
        "phases": {str(k): _epoch_range(v) for k, v in phases.items()},
    }


def _epoch_range(value: Any) -> list[int] | None:
    """`[first, end)` of a phase from a tuple, list or `range`; None for a phase not run."""
    if value is None:
        return None
    if isinstance(value, range):
        return [value.start, value.stop]
    return [int(i) for i in value]


def _metrics_json(metrics: Any) -> str:
    if hasattr(metrics, "to_dict"):
        metrics = metrics.to_dict()
    if not isinstance(metrics, Mapping):
        raise TypeError(
            "`metrics` must be a dict (e.g. from `kt.evaluate`) or an object with `.to_dict()`. "
            f"Received: metrics of type {type(metrics).__name__}"
        )
    return json.dumps(metrics, indent=1, default=_json_default, ensure_ascii=False)


def save_run(
    folder: str | os.PathLike,
    model: Any,
    *,
    class_names: Sequence[str] | None = None,
    history: Any = None,
    metrics: Any = None,
) -> Path:
    """Writes a run folder: `model.keras`, `labels.txt`, `history.json`, `metrics.json`.

    Everything is checked before anything is written. Each file is written under a temporary name
    and renamed into place. A run file not given this time (e.g. `history=None`) is removed if an
    earlier run left one, so the folder never mixes two runs; other files are left alone.

    Args:
        folder: The run folder, created if needed (e.g. `"saved_models/flowers"`).
        model: The `keras.Model` to save.
        class_names: One name per output, in order; defaults to the model's `class_names`
            attribute when it has one. None writes no `labels.txt`.
        history: The `keras.callbacks.History` from `fit`/`kt.fine_tune` (its `phases` are kept),
            or a `History.history` dict.
        metrics: A dict (e.g. `kt.evaluate`'s result, or several under keys such as
            `"validation"` and `"test"`) or an object with `.to_dict()`.

    Returns:
        The run folder.

    Raises:
        TypeError: When `model` is not a `keras.Model`, or `history`/`metrics` have the wrong
            type.
        ValueError: When `class_names` does not give one unique, storable name per output.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> folder = kt.runs.save_run("/tmp/kt_doc_run", model, class_names=["a", "b", "c"])
    >>> kt.runs.load_run(folder).class_names
    ['a', 'b', 'c']
    """
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a `keras.Model`. Received: model of type {type(model).__name__}."
        )
    if class_names is None:
        class_names = getattr(model, "class_names", None)
    if class_names is not None:
        class_names = check_labels(class_names)
        outputs = _num_outputs(model)
        if outputs is not None and len(class_names) != outputs:
            raise ValueError(
                f"`class_names` must give one name per output of the model ({outputs}). "
                f"Received: {len(class_names)} names {class_names[:5]}"
            )
    texts = {}
    if history is not None:
        texts[HISTORY_FILE] = json.dumps(_history_json(history), indent=1)
    if metrics is not None:
        texts[METRICS_FILE] = _metrics_json(metrics)
    if class_names is not None:
        texts[LABELS_FILE] = "\n".join(class_names) + "\n"

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomically(folder / MODEL_FILE, model.save)
    for name in (LABELS_FILE, HISTORY_FILE, METRICS_FILE):
        path = folder / name
        if name in texts:
            _write_atomically(path, lambda tmp, text=texts[name]: tmp.write_text(text, "utf-8"))
        elif path.is_file():
            path.unlink()
    return folder


def _num_outputs(model: Any) -> int | None:
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) != 1 or outputs[0].shape[-1] is None:
        return None
    return int(outputs[0].shape[-1])


def model_file(path: str | os.PathLike) -> Path:
    """The `.keras` file for a run folder or a `.keras` file path.

    Raises:
        FileNotFoundError: When there is no such file, naming what was looked for.
    """
    given = Path(path)
    target = given / MODEL_FILE if given.is_dir() else given
    if not target.is_file():
        where = f"the folder has no {MODEL_FILE}" if given.is_dir() else f"'{given}' does not exist"
        raise FileNotFoundError(
            f"Model '{path}' not found ({where}). Pass a run folder holding {MODEL_FILE} "
            "(e.g. saved_models/fashion_mnist) or a .keras file."
        )
    return target


def load_model(path: str | os.PathLike, *, compile: bool = False) -> Any:
    """Loads `model.keras` from a run folder, or a `.keras` file, with keras_transfer's layers.

    Args:
        path: A run folder or a `.keras` file.
        compile: Also restore the loss, metrics and optimizer state.

    Returns:
        The `keras.Model`.

    Raises:
        FileNotFoundError: When there is no model file.
    """
    target = model_file(path)
    import keras

    import keras_transfer.layers  # noqa: F401  (registers the layers model.keras refers to)

    return keras.models.load_model(target, compile=compile)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ValueError(f"'{path}' is not valid JSON ({error}). Delete or fix the file.") from None
    if not isinstance(data, dict):
        raise ValueError(f"'{path}' must hold a JSON object; it holds {type(data).__name__}.")
    return data


def load_run(path: str | os.PathLike, *, compile: bool = False) -> Run:
    """Reads a run folder written by `save_run` (or `keras-transfer train`).

    Args:
        path: The run folder, or a `.keras` file inside one (e.g. a checkpoint such as
            `runs/flowers/best.keras`); `labels.txt`, `history.json` and `metrics.json` are read
            from the same folder when present.
        compile: Also restore the loss, metrics and optimizer state (for more `fit`); not needed
            to predict, evaluate or export.

    Returns:
        A `Run`. The model's `class_names` attribute is set from `labels.txt` when present.

    Raises:
        FileNotFoundError: When there is no model file.
        ValueError: When `labels.txt` does not list one name per output, or a JSON file is
            invalid.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> run = kt.runs.load_run(kt.runs.save_run("/tmp/kt_doc_run2", model))
    >>> run.class_names is None
    True
    """
    folder = model_file(path).parent
    model = load_model(path, compile=compile)
    class_names = None
    if (folder / LABELS_FILE).is_file():
        class_names = read_labels(folder / LABELS_FILE)
        outputs = _num_outputs(model)
        if outputs is not None and len(class_names) != outputs:
            raise ValueError(
                f"'{folder / LABELS_FILE}' lists {len(class_names)} labels but the model has "
                f"{outputs} outputs. Fix the file or delete it."
            )
        model.class_names = tuple(class_names)
    history = _read_json(folder / HISTORY_FILE) if (folder / HISTORY_FILE).is_file() else {}
    metrics = _read_json(folder / METRICS_FILE) if (folder / METRICS_FILE).is_file() else {}
    return Run(
        model=model,
        class_names=class_names,
        history=dict(history.get("history", {})),
        metrics=metrics,
        path=folder,
        phases=dict(history.get("phases", {})),
    )
