"""Predictions for image files, through the very graph an export's `serve_bytes` signature runs.

`predict_files` reads each file's bytes and calls the `serve_bytes` function that
`kt.export_for_serving` traces into the SavedModel (`kt.export.make_serving_functions`): the same
decoding, resizing and greyscale conversion, then the model. So `keras-transfer predict`, this
function and a TF Serving `serve_bytes` request give the same probabilities for the same file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keras_transfer._validate import check_int


def _file_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(paths, str | bytes | os.PathLike) or not hasattr(paths, "__iter__"):
        raise TypeError(
            "`paths` must be a list of image file paths, e.g. ['cat.jpg']. "
            f"Received: paths={paths!r}"
        )
    files = [Path(path) for path in paths]
    if not files:
        raise ValueError("`paths` is empty. Pass at least one image file.")
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"Image '{path}' does not exist. Pass an image file path.")
    return files


def serving_spec(
    model: Any,
    *,
    class_names: Sequence[str] | None = None,
    top_k: int = 5,
    max_image_pixels: int | None = None,
):
    """The `kt.export.ExportSpec` an export of `model` would serve with these options.

    Args:
        model: A built `keras.Model` with one image input of a fixed size, 1 or 3 channels.
        class_names: One name per output; defaults to `model.class_names` (set by
            `kt.runs.load_run`), else `"0"`, `"1"`, ...
        top_k: How many classes to rank (capped at the class count).
        max_image_pixels: Largest `height * width` decoded; defaults to the export's default.

    Returns:
        An `ExportSpec` (model name "predict", version 0).

    Raises:
        TypeError: When `model` is not a `keras.Model`.
        ValueError: For a model without one fixed-size image input, bad `class_names`, `top_k`
            or `max_image_pixels`.
    """
    import keras

    from keras_transfer import export

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a `keras.Model`. Received: model of type {type(model).__name__}. "
            "Load one with `kt.runs.load_run(folder).model`."
        )
    top_k = check_int("top_k", top_k, minimum=1)
    shape = tuple(model.inputs[0].shape) if len(getattr(model, "inputs", None) or []) == 1 else ()
    if len(shape) != 4 or shape[1] is None or shape[2] is None or shape[3] not in (1, 3):
        raise ValueError(
            "`model` must have one image input of a fixed size, (batch, height, width, 1 or 3). "
            f"Received: input shapes {[tuple(t.shape) for t in model.inputs]}."
        )
    head = export.infer_head(model)
    units = int(model.outputs[0].shape[-1])
    if head == "regression":
        labels = ()
    else:
        if class_names is None:
            class_names = getattr(model, "class_names", None)
        labels = tuple(str(i) for i in range(units)) if class_names is None else class_names
        if isinstance(labels, str) or len(labels) != units:
            raise ValueError(
                f"`class_names` must give one name per output of the model ({units}). "
                f"Received: class_names={class_names!r}"
            )
        labels = tuple(str(name) for name in labels)
    if max_image_pixels is None:
        max_image_pixels = export.DEFAULT_MAX_IMAGE_PIXELS
    max_image_pixels = check_int(
        "max_image_pixels",
        max_image_pixels,
        minimum=int(shape[1]) * int(shape[2]),
        hint="the largest height*width decoded; at least the model's own size",
    )
    return export.ExportSpec(
        model_name="predict",
        version=0,
        head=head,
        image_size=(int(shape[1]), int(shape[2])),
        channels=int(shape[3]),
        labels=labels,
        top_k=min(top_k, units) if head != "regression" else top_k,
        threshold=0.5,
        max_image_pixels=max_image_pixels,
    )


def predict_files(
    model: Any,
    paths: Sequence[str | os.PathLike],
    *,
    class_names: Sequence[str] | None = None,
    top_k: int = 5,
    batch_size: int = 32,
    max_image_pixels: int | None = None,
) -> list[dict[str, Any]]:
    """Predicts image files (JPEG, PNG, GIF, BMP, WebP) of any size with `model`.

    The files' bytes go through the export's `serve_bytes` function, traced the way
    `kt.export_for_serving` traces it, so the decoding and resizing are those of the served model.

    Args:
        model: A built `keras.Model` with a fixed-size image input (e.g. `kt.build_classifier`,
            or `kt.runs.load_run(folder).model`).
        paths: Image file paths.
        class_names: One name per output; defaults to `model.class_names` (set by
            `kt.runs.load_run`), else `"0"`, `"1"`, ...
        top_k: How many classes each result ranks (capped at the class count).
        batch_size: Files per call of the graph.
        max_image_pixels: Largest `height * width` decoded (default: the export's).

    Returns:
        One dict per file, in order: `{"image": path, "probabilities": [one float per class],
        "top_k": [{"label": name, "probability": p}, ...]}` for a classifier (softmax or
        sigmoid), `{"image": path, "predictions": [floats]}` for a regressor.

    Raises:
        FileNotFoundError: When a path is not a file (checked before anything runs).
        TypeError: When `model` is not a `keras.Model` or `paths` is a single string.
        ValueError: For a file that is not a decodable image or is larger than
            `max_image_pixels` (naming the file), or bad options.

    Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> Image.fromarray(np.zeros((40, 50, 3), "uint8")).save("/tmp/kt_doc.png")
    >>> [result] = kt.inference.predict_files(model, ["/tmp/kt_doc.png"], top_k=2)
    >>> len(result["top_k"])
    2
    """
    files = _file_paths(paths)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    spec = serving_spec(
        model, class_names=class_names, top_k=top_k, max_image_pixels=max_image_pixels
    )
    import tensorflow as tf

    from keras_transfer import export

    serve_bytes = tf.function(
        export.make_serving_functions(model, spec)[export.SERVE_BYTES],
        input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")],
    )
    results = []
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        outputs = _run(serve_bytes, batch)
        for i, path in enumerate(batch):
            results.append(_result(path, outputs, i, spec))
    return results


def _run(serve_bytes, files: list[Path]) -> dict[str, Any]:
    import tensorflow as tf

    try:
        return serve_bytes(tf.constant([path.read_bytes() for path in files]))
    except tf.errors.InvalidArgumentError as error:
        message = _tf_error_line(error.message or str(error))
        if len(files) > 1:  # find the file at fault, so the message can name it
            for path in files:
                _run(serve_bytes, [path])
            raise ValueError(f"Predicting {[str(f) for f in files]} failed: {message}") from None
        if "decoded-size limit" in message:
            raise ValueError(
                f"Image '{files[0]}' is too large to decode: {message}. Resize it, or pass a "
                "larger `max_image_pixels`."
            ) from None
        raise ValueError(
            f"'{files[0]}' is not an image TensorFlow can decode (JPEG, PNG, GIF, BMP, WebP): "
            f"{message}"
        ) from None


def _tf_error_line(message: str) -> str:
    """The line of a TensorFlow graph error that says what went wrong, without the traceback."""
    limit = re.search(
        r"Image exceeds the decoded-size limit of \d+ pixels \(height\*width\)", message
    )
    if limit:
        return limit.group(0)
    noise = ("Graph execution error", "Detected at node", "File ", "[[")
    lines = [line.strip() for line in message.splitlines()]
    lines = [line for line in lines if line and not line.startswith(noise)]
    return lines[-1] if lines else message.strip()


def _result(path: Path, outputs: dict[str, Any], i: int, spec) -> dict[str, Any]:
    if spec.head == "regression":
        return {"image": str(path), "predictions": outputs["predictions"][i].numpy().tolist()}
    classes = [c.decode("utf-8") for c in outputs["top_k_classes"][i].numpy().tolist()]
    scores = outputs["top_k_scores"][i].numpy().tolist()
    return {
        "image": str(path),
        "probabilities": outputs["probabilities"][i].numpy().tolist(),
        "top_k": [
            {"label": label, "probability": score}
            for label, score in zip(classes, scores, strict=True)
        ],
    }
