"""Writing an export: the SavedModel with its two signatures, the `.keras` copy and TFLite.

`export_for_serving` checks every argument before anything is written, builds the version folder
under a temporary name beside the target and renames it into place, so TF Serving never sees half
an export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from keras_transfer._validate import check_int, is_int
from keras_transfer.export.graph import _input_signatures, make_serving_functions
from keras_transfer.export.spec import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FORMATS,
    HEADS,
    KERAS_FILE,
    METADATA_FILE,
    SERVING_DEFAULT,
    TFLITE_FILE,
    WARMUP_FILE,
    ExportSpec,
    _check_model,
    _output_names,
    infer_head,
)
from keras_transfer.export.tf_serving import (
    existing_versions,
    validate_model_name,
    write_warmup_requests,
)


def _check_base_path(base_path: str | os.PathLike) -> Path:
    path = Path(base_path)
    if ".." in path.parts:
        raise ValueError(
            f"`base_path` must not contain '..'. Received: base_path={str(base_path)!r}. "
            "Pass the folder directly, e.g. 'saved_models/flowers'."
        )
    validate_model_name(path.name)
    return path


def _labels_for(labels: Sequence[str] | None, units: int, head: str) -> tuple[str, ...]:
    if head == "regression":
        if labels is not None:
            raise ValueError(
                "`labels` only apply to classification heads; this model is a regressor. "
                "Pass `labels=None`."
            )
        return ()
    if labels is None:
        return tuple(str(i) for i in range(units))
    if isinstance(labels, str) or len(labels) != units:
        count = "a string" if isinstance(labels, str) else f"{len(labels)} labels"
        raise ValueError(
            f"`labels` must be a sequence of {units} strings, one per output unit. "
            f"Received: {count}."
        )
    labels = tuple(str(label) for label in labels)
    if len(set(labels)) != len(labels):
        raise ValueError(f"`labels` must be unique. Received: labels={list(labels)}")
    return labels


def export_for_serving(
    model: Any,
    base_path: str | os.PathLike,
    version: int | None = None,
    labels: Sequence[str] | None = None,
    *,
    top_k: int = 5,
    head: str | None = None,
    threshold: float = 0.5,
    image_size: int | Sequence[int] | None = None,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    format: str = "tf_saved_model",
    overwrite: bool = False,
    save_keras: bool = True,
    warmup: bool = True,
) -> Path:
    """Writes a SavedModel that TF Serving loads as it is, to `<base_path>/<version>/`.

    The version folder holds the SavedModel with two `tensorflow/serving/predict` signatures:

    - `serving_default`, input `images`: float32 pixels in [0, 255], any height and width,
      1 or 3 channels; resized in the graph to the model's size.
    - `serve_bytes`, input `image_bytes`: encoded JPEG/PNG/GIF/BMP/WebP of any size, decoded and
      resized in the graph; images over `max_image_pixels` are refused with an error.

    Both return `probabilities`, `class_ids`, `classes`, `top_k_classes`, `top_k_scores` for a
    softmax head; `probabilities`, `over_threshold`, `top_k_classes`, `top_k_scores` for a
    multi-label (sigmoid) head; `predictions` for a regression (linear) head. Beside the SavedModel
    go `model.keras`, `assets.extra/tf_serving_warmup_requests`,
    `assets.extra/keras_transfer.json` (what `verify_export` reads) and, with `format="tflite"`,
    `model.tflite`. The folder is written under a temporary name beside it and renamed into place,
    so TF Serving never sees half an export.

    Args:
        model: A built `keras.Model` with one input `(H, W, C)` of raw pixels, C in {1, 3}.
        base_path: The model's folder, e.g. `"saved_models/flowers"`; its last part is the TF
            Serving model name.
        version: The integer version; `None` takes the next one after the highest present.
        labels: One label per class; defaults to `"0"`, `"1"`, ... Not for regressors.
        top_k: How many classes `top_k_classes` / `top_k_scores` hold (capped at the class count).
        head: `"classification"`, `"multi_label"` or `"regression"`; `None` reads it with
            `kt.head_of` (the activation of the layer named "predictions").
        threshold: Multi-label decision threshold for the `over_threshold` output.
        image_size: `(height, width)` to resize to, only needed when the model accepts any size.
        max_image_pixels: Largest `height * width` that `serve_bytes` will decode.
        format: `"tf_saved_model"`, or `"tflite"` to also write `model.tflite` (float input at the
            model's size, outputs `probabilities` or `predictions`).
        overwrite: Replace an existing version folder instead of refusing.
        save_keras: Write `model.keras` beside the SavedModel.
        warmup: Write TF Serving warm-up requests.

    Returns:
        The version folder written.

    Raises:
        TypeError: When `model` is not a `keras.Model`.
        ValueError: For an unbuilt model, a bad model name or `base_path`, bad `labels`,
            `version`, `top_k`, `head` or `format`.
        FileExistsError: When the version folder exists and `overwrite` is False.

    Example:
    >>> import keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    >>> path = kt.export_for_serving(model, "/tmp/kt_doc/flowers", labels=["a", "b", "c"])
    >>> report = kt.verify_export(path, model)
    """
    base = _check_base_path(base_path)
    size, channels = _check_model(model, image_size)
    if format not in FORMATS:
        raise ValueError(f"Unknown `format` {format!r}. Expected one of {FORMATS}.")
    if head is None:
        head = infer_head(model)
    elif head not in HEADS:
        raise ValueError(f"Unknown `head` {head!r}. Expected one of {HEADS}.")
    units = int(model.outputs[0].shape[-1]) if len(model.outputs) == 1 else -1
    if units < 1 or len(model.outputs[0].shape) != 2:
        raise ValueError(
            "`model` must have one output of shape (batch, units). "
            f"Received: output shapes {[tuple(t.shape) for t in model.outputs]}."
        )
    labels = _labels_for(labels, units, head)
    top_k = check_int("top_k", top_k, minimum=1)
    if not is_int(max_image_pixels) or max_image_pixels < size[0] * size[1]:
        raise ValueError(
            f"`max_image_pixels` must be an int of at least the model's own size "
            f"({size[0] * size[1]}). Received: max_image_pixels={max_image_pixels!r}"
        )
    if version is None:
        version = (existing_versions(base) or [0])[-1] + 1
    version = check_int("version", version, minimum=1, hint="TF Serving ignores other folder names")
    target = base / str(version)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Version folder '{target}' already exists. Pass `version=None` for the next "
            "version, or `overwrite=True` to replace it."
        )

    spec = ExportSpec(
        model_name=base.name,
        version=version,
        head=head,
        image_size=size,
        channels=channels,
        labels=labels,
        top_k=min(top_k, units),
        threshold=float(threshold),
        max_image_pixels=int(max_image_pixels),
        outputs=_output_names(head),
    )
    base.mkdir(parents=True, exist_ok=True)
    staging = base / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    try:
        _write_saved_model(model, spec, staging)
        extra = staging / "assets.extra"
        extra.mkdir(exist_ok=True)
        (extra / METADATA_FILE).write_text(json.dumps(asdict(spec), indent=2))
        if warmup:
            write_warmup_requests(extra / WARMUP_FILE, spec)
        if save_keras:
            model.save(staging / KERAS_FILE)
        if format == "tflite":
            export_tflite(model, staging / TFLITE_FILE, spec)
        _move_into_place(staging, target, overwrite)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _write_saved_model(model: Any, spec: ExportSpec, path: Path) -> None:
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    functions = make_serving_functions(model, spec)
    for name, signature in _input_signatures().items():
        archive.add_endpoint(name, functions[name], input_signature=signature)
    archive.write_out(str(path), verbose=False)


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    retired = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"Version folder '{target}' appeared while exporting.")
        retired = target.with_name(f".old-{target.name}-{uuid.uuid4().hex[:8]}")
        os.rename(target, retired)
    try:
        os.rename(staging, target)
    except OSError as error:
        raise FileExistsError(
            f"Could not move the export into '{target}' ({error}). Another export may have "
            "written that version; export again with `version=None`."
        ) from error
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def export_tflite(model: Any, path: str | os.PathLike, spec: ExportSpec) -> Path:
    """Writes a TFLite flatbuffer of `model` at its own input size.

    Args:
        model: The Keras model.
        path: Where to write the `.tflite` file.
        spec: What the export serves (input size, channels, head).

    Returns:
        The path written. The TFLite signature `serving_default` takes `images` of shape
        `(1, H, W, C)` float32 and returns `probabilities` (or `predictions` for regression).
    """
    import tensorflow as tf

    name = "predictions" if spec.head == "regression" else "probabilities"
    shape = [1, spec.image_size[0], spec.image_size[1], spec.channels]

    def serve(images):
        return {name: tf.cast(model(images, training=False), tf.float32)}

    # Converting from a SavedModel (not a concrete function) keeps Keras 3 variables as weights.
    with tempfile.TemporaryDirectory(prefix="kt-tflite-") as work:
        import keras

        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(
            SERVING_DEFAULT, serve, input_signature=[tf.TensorSpec(shape, tf.float32, "images")]
        )
        archive.write_out(work, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(work)
        flatbuffer = converter.convert()
    Path(path).write_bytes(flatbuffer)
    return Path(path)
