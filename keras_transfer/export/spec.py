"""What an export serves: the file and signature names, `ExportSpec`, and the model it reads.

`ExportSpec` is written beside every export (`assets.extra/keras_transfer.json`) and read back by
`verify_export`; every other module of the package takes one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keras_transfer._validate import image_hw

SERVING_DEFAULT = "serving_default"
SERVE_BYTES = "serve_bytes"
FORMATS = ("tf_saved_model", "tflite")
HEADS = ("classification", "multi_label", "regression")
METADATA_FILE = "keras_transfer.json"
WARMUP_FILE = "tf_serving_warmup_requests"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

# `kt.head_of`'s kinds in the words of the export's `head=` argument and metadata.
HEAD_OF_KIND = {
    "multiclass": "classification",
    "multilabel": "multi_label",
    "regression": "regression",
}


@dataclass(frozen=True)
class ExportSpec:
    """What an export serves: read back from `<version>/assets.extra/keras_transfer.json`.

    Args:
        model_name: The TF Serving model name (the last folder of `base_path`).
        version: The integer version folder.
        head: `"classification"`, `"multi_label"` or `"regression"`.
        image_size: `(height, width)` the graph resizes every input to.
        channels: 1 or 3, the model's input channels.
        labels: One label per output unit (empty for regression).
        top_k: How many classes the `top_k_*` outputs hold.
        threshold: Multi-label decision threshold for the `over_threshold` output.
        max_image_pixels: Largest `height * width` that `serve_bytes` decodes.
        outputs: Output names of every signature, in order.
    """

    model_name: str
    version: int
    head: str
    image_size: tuple[int, int]
    channels: int
    labels: tuple[str, ...]
    top_k: int
    threshold: float
    max_image_pixels: int
    outputs: tuple[str, ...] = field(default=())

    @classmethod
    def read(cls, version_dir: str | os.PathLike) -> ExportSpec:
        path = Path(version_dir) / "assets.extra" / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"No export metadata at '{path}'. Expected a version folder written by "
                "`kt.export_for_serving`, e.g. 'saved_models/<name>/1'."
            )
        data = json.loads(path.read_text())
        data["image_size"] = tuple(data["image_size"])
        data["labels"] = tuple(data["labels"])
        data["outputs"] = tuple(data["outputs"])
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


# --- model inspection -----------------------------------------------------------------------------


def _check_model(model: Any, image_size: Sequence[int] | None) -> tuple[tuple[int, int], int]:
    import keras

    if not isinstance(model, keras.Model):
        raise TypeError(
            f"`model` must be a `keras.Model`. Received: model of type {type(model).__name__}. "
            "Build one with `kt.build_classifier(...)` or load one with `keras.models.load_model`."
        )
    if not model.built or not getattr(model, "inputs", None):
        raise ValueError(
            f"`model` {model.name!r} is not built, so its input shape is unknown. Build it first, "
            "e.g. `model.build((None, 224, 224, 3))`, or use a Functional model from "
            "`kt.build_classifier`."
        )
    if len(model.inputs) != 1 or len(model.inputs[0].shape) != 4:
        shapes = [tuple(t.shape) for t in model.inputs]
        raise ValueError(
            "`model` must have exactly one image input of shape (batch, height, width, channels). "
            f"Received: input shapes {shapes}."
        )
    _, height, width, channels = model.inputs[0].shape
    if channels not in (1, 3):
        raise ValueError(
            f"`model` input must have 1 (greyscale) or 3 (RGB) channels. Received: {channels}."
        )
    if image_size is not None:
        height, width = image_hw(image_size)
    if height is None or width is None:
        raise ValueError(
            "`model` accepts any image size, so the export cannot know what to resize to. "
            "Pass `image_size=(height, width)`."
        )
    return (int(height), int(width)), int(channels)


def infer_head(model: Any) -> str:
    """The kind of head a model ends in, in the export's words, read by `kt.head_of`.

    Both layouts `kt.head_of` reads are understood: `Dense "logits"` -> `Activation
    "predictions"` (models built now) and a `Dense "predictions"` with the activation fused in
    (models saved before the logits layer existed).

    Args:
        model: A `keras.Model` built by `kt.build_classifier` or `kt.build_regressor`.

    Returns:
        `"classification"` (softmax), `"multi_label"` (sigmoid) or `"regression"` (linear).

    Raises:
        ValueError: When the model has no layer named "predictions" or its activation is
            another one.
    """
    from keras_transfer.heads import head_of

    try:
        kind = head_of(model).kind
    except ValueError as error:
        raise ValueError(
            f"{error} To export it anyway, pass `head='classification'`, `'multi_label'` or "
            "`'regression'`."
        ) from None
    return HEAD_OF_KIND[kind]


def _output_names(head: str) -> tuple[str, ...]:
    if head == "classification":
        return ("probabilities", "class_ids", "classes", "top_k_classes", "top_k_scores")
    if head == "multi_label":
        return ("probabilities", "over_threshold", "top_k_classes", "top_k_scores")
    return ("predictions",)
