"""Exports that TF Serving loads as they are, and their verification in a clean process.

`export_for_serving` writes `<base_path>/<version>/`: a SavedModel whose two signatures carry the
whole input pipeline (resizing, channel handling, image decoding, the model's own preprocessing), a
`.keras` copy beside it, TF Serving warm-up requests and, on request, a TFLite file. `verify_export`
loads the SavedModel in a separate Python process in which `keras` and `keras_transfer` cannot be
imported, so an export that only works next to the training code is caught before it ships.
`write_models_config` writes the text-format `models.config` that TF Serving reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_transfer._validate import check_int, image_hw, is_int

SERVING_DEFAULT = "serving_default"
SERVE_BYTES = "serve_bytes"
FORMATS = ("tf_saved_model", "tflite")
HEADS = ("classification", "multi_label", "regression")
METADATA_FILE = "keras_transfer.json"
WARMUP_FILE = "tf_serving_warmup_requests"
KERAS_FILE = "model.keras"
TFLITE_FILE = "model.tflite"
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_ACTIVATION_TO_HEAD = {
    "softmax": "classification",
    "sigmoid": "multi_label",
    "linear": "regression",
}
_WORKER = Path(__file__).with_name("_clean_worker.py")


class VerificationError(RuntimeError):
    """An exported SavedModel disagrees with its Keras model, or fails to load or run."""


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
    """The kind of head a model ends in, from its final Dense layer named "predictions".

    Args:
        model: A `keras.Model` built by `kt.build_classifier` or `kt.build_regressor`.

    Returns:
        `"classification"` (softmax), `"multi_label"` (sigmoid) or `"regression"` (linear).

    Raises:
        ValueError: When there is no layer named "predictions" or its activation is another one.
    """
    import keras

    try:
        layer = model.get_layer("predictions")
    except ValueError:
        raise ValueError(
            "`model` has no layer named 'predictions', so the kind of head is unknown. Pass "
            "`head='classification'`, `'multi_label'` or `'regression'`."
        ) from None
    activation = keras.activations.serialize(getattr(layer, "activation", None))
    if isinstance(activation, dict):
        activation = activation.get("config", {}).get("name", activation.get("class_name"))
    if activation not in _ACTIVATION_TO_HEAD:
        raise ValueError(
            f"The 'predictions' layer has activation {activation!r}; expected one of "
            f"{sorted(_ACTIVATION_TO_HEAD)}. Pass `head=` explicitly."
        )
    return _ACTIVATION_TO_HEAD[activation]


def _output_names(head: str) -> tuple[str, ...]:
    if head == "classification":
        return ("probabilities", "class_ids", "classes", "top_k_classes", "top_k_scores")
    if head == "multi_label":
        return ("probabilities", "over_threshold", "top_k_classes", "top_k_scores")
    return ("predictions",)


# --- the serving graph ----------------------------------------------------------------------------


def _resize(images, size: tuple[int, int]):
    """Bilinear resize to `size`, skipped when the images already have it (so it is exact)."""
    import tensorflow as tf

    shape = tf.shape(images)
    same = tf.logical_and(tf.equal(shape[-3], size[0]), tf.equal(shape[-2], size[1]))
    return tf.cond(
        same,
        lambda: tf.identity(images),
        lambda: tf.image.resize(images, size, method="bilinear"),
    )


def _rgb_to_grey(images):
    """ITU-R 601 luma; the weights sum to exactly 1, so a grey image stays the same grey."""
    import tensorflow as tf

    weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
    return tf.reduce_sum(images[..., :3] * weights, axis=-1, keepdims=True)


def _match_channels(images, channels: int):
    """Greyscale or RGB in, the model's channel count out."""
    import tensorflow as tf

    found = tf.shape(images)[-1]
    check = tf.debugging.Assert(
        tf.logical_or(tf.equal(found, 1), tf.equal(found, 3)),
        ["`images` must have 1 (greyscale) or 3 (RGB) channels; received", found],
    )
    with tf.control_dependencies([check]):
        if channels == 3:
            return tf.cond(
                tf.equal(found, 1),
                lambda: tf.image.grayscale_to_rgb(images[..., :1]),
                lambda: tf.identity(images[..., :3]),
            )
        return tf.cond(
            tf.equal(found, 3),
            lambda: _rgb_to_grey(images),
            lambda: tf.identity(images[..., :1]),
        )


def prepare_pixels(images, image_size: tuple[int, int], channels: int):
    """Float pixels of any size, greyscale or RGB, to the model's input size and channels.

    This is the exact graph the `serving_default` signature runs before the model.

    Args:
        images: A float tensor `(batch, height, width, 1 or 3)` of pixels in [0, 255].
        image_size: `(height, width)` of the model input.
        channels: The model's input channels (1 or 3).

    Returns:
        A float32 tensor `(batch, image_size[0], image_size[1], channels)`.
    """
    import tensorflow as tf

    images = tf.cast(images, tf.float32)
    images = _resize(_match_channels(images, channels), image_size)
    images.set_shape([None, image_size[0], image_size[1], channels])
    return images


def _header_pixels(data):
    """`height * width` read from an encoded image's header, before anything is decoded.

    Covers JPEG, PNG, GIF, BMP and WebP (lossy, lossless, extended); 0 for anything else, which
    the decoder then refuses as an unknown format.
    """
    import tensorflow as tf

    padded = tf.strings.join([tf.strings.substr(data, 0, 32), tf.constant(b"\0" * 32)])
    head = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, 32), tf.uint8), tf.int64)

    def le(start: int, count: int):
        return sum(head[start + i] * (256**i) for i in range(count))

    def be(start: int, count: int):
        return sum(head[start + i] * (256 ** (count - 1 - i)) for i in range(count))

    def magic(start: int, text: bytes):
        return tf.reduce_all(tf.equal(head[start : start + len(text)], list(text)))

    bmp_height = le(22, 4)
    bmp_height = tf.abs(tf.where(bmp_height >= 2**31, bmp_height - 2**32, bmp_height))
    webp = tf.logical_and(magic(0, b"RIFF"), magic(8, b"WEBP"))
    vp8l_w = 1 + (head[22] % 64) * 256 + head[21]
    vp8l_h = 1 + (head[24] % 16) * 1024 + head[23] * 4 + head[22] // 64
    candidates = [
        (magic(0, b"\x89PNG"), be(16, 4) * be(20, 4)),
        (magic(0, b"GIF8"), le(6, 2) * le(8, 2)),
        (magic(0, b"BM"), le(18, 4) * bmp_height),
        (tf.logical_and(webp, magic(12, b"VP8 ")), (le(26, 2) % 16384) * (le(28, 2) % 16384)),
        (tf.logical_and(webp, magic(12, b"VP8L")), vp8l_w * vp8l_h),
        (tf.logical_and(webp, magic(12, b"VP8X")), (1 + le(24, 3)) * (1 + le(27, 3))),
    ]
    pixels = tf.constant(0, tf.int64)
    for is_format, count in reversed(candidates):
        pixels = tf.where(is_format, count, pixels)
    return tf.cond(
        magic(0, b"\xff\xd8"),
        lambda: tf.reduce_prod(tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64)),
        lambda: pixels,
    )


def decode_images(image_bytes, image_size: tuple[int, int], channels: int, max_pixels: int):
    """Encoded JPEG/PNG/GIF/BMP/WebP bytes of any size to the model's input size and channels.

    This is the exact graph the `serve_bytes` signature runs before the model. Each image is
    decoded with 3 channels (greyscale files are expanded; the first frame of an animation is
    kept), resized, then converted to greyscale if the model wants 1 channel. An image whose header
    declares more than `max_pixels` pixels is refused before it is decoded.

    Args:
        image_bytes: A string tensor `(batch,)` of encoded images.
        image_size: `(height, width)` of the model input.
        channels: The model's input channels (1 or 3).
        max_pixels: Largest accepted `height * width`.

    Returns:
        A float32 tensor `(batch, image_size[0], image_size[1], channels)`, pixels in [0, 255].
    """
    import tensorflow as tf

    def decode_one(data):
        pixels = _header_pixels(data)
        check = tf.debugging.assert_less_equal(
            pixels,
            tf.constant(max_pixels, tf.int64),
            message=f"Image exceeds the decoded-size limit of {max_pixels} pixels (height*width)",
        )
        with tf.control_dependencies([check]):
            image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
        image.set_shape([None, None, 3])
        decoded = tf.cast(tf.shape(image)[0], tf.int64) * tf.cast(tf.shape(image)[1], tf.int64)
        check = tf.debugging.assert_less_equal(
            decoded,
            tf.constant(max_pixels, tf.int64),
            message=f"Image exceeds the decoded-size limit of {max_pixels} pixels (height*width)",
        )
        with tf.control_dependencies([check]):
            image = _resize(tf.cast(image, tf.float32), image_size)
        if channels == 1:
            image = _rgb_to_grey(image)
        image.set_shape([image_size[0], image_size[1], channels])
        return image

    return tf.map_fn(
        decode_one,
        image_bytes,
        fn_output_signature=tf.TensorSpec([image_size[0], image_size[1], channels], tf.float32),
    )


def _head_outputs(predictions, spec: ExportSpec) -> dict[str, Any]:
    import tensorflow as tf

    predictions = tf.cast(predictions, tf.float32)
    if spec.head == "regression":
        return {"predictions": predictions}
    vocabulary = tf.constant(list(spec.labels), dtype=tf.string)
    scores, indices = tf.math.top_k(predictions, k=spec.top_k)
    outputs = {"probabilities": predictions}
    if spec.head == "classification":
        class_ids = tf.argmax(predictions, axis=-1, output_type=tf.int64)
        outputs["class_ids"] = class_ids
        outputs["classes"] = tf.gather(vocabulary, class_ids)
    else:
        outputs["over_threshold"] = tf.cast(predictions >= spec.threshold, tf.int32)
    outputs["top_k_classes"] = tf.gather(vocabulary, indices)
    outputs["top_k_scores"] = scores
    return outputs


def make_serving_functions(model: Any, spec: ExportSpec) -> dict[str, Any]:
    """The Python functions behind each signature, keyed by signature name.

    `export_for_serving` traces these into the SavedModel; `verify_export` runs them eagerly on
    the Keras model to get the expected outputs.

    Args:
        model: The Keras model.
        spec: What the export serves.

    Returns:
        `{"serving_default": fn(images), "serve_bytes": fn(image_bytes)}`, each returning a dict of
        named output tensors.
    """

    def serve_images(images):
        pixels = prepare_pixels(images, spec.image_size, spec.channels)
        return _head_outputs(model(pixels, training=False), spec)

    def serve_bytes(image_bytes):
        pixels = decode_images(image_bytes, spec.image_size, spec.channels, spec.max_image_pixels)
        return _head_outputs(model(pixels, training=False), spec)

    return {SERVING_DEFAULT: serve_images, SERVE_BYTES: serve_bytes}


def _input_signatures() -> dict[str, Any]:
    import tensorflow as tf

    return {
        SERVING_DEFAULT: [tf.TensorSpec([None, None, None, None], tf.float32, name="images")],
        SERVE_BYTES: [tf.TensorSpec([None], tf.string, name="image_bytes")],
    }


# --- export ---------------------------------------------------------------------------------------


def validate_model_name(name: str) -> str:
    """Returns `name` if it is a safe TF Serving model name, else raises `ValueError`."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"Invalid model name {name!r}. Use letters, digits, '.', '_' and '-' only (no path "
            "separators, no '..', not starting with '.'), e.g. 'flowers_v2'."
        )
    return name


def _check_base_path(base_path: str | os.PathLike) -> Path:
    path = Path(base_path)
    if ".." in path.parts:
        raise ValueError(
            f"`base_path` must not contain '..'. Received: base_path={str(base_path)!r}. "
            "Pass the folder directly, e.g. 'saved_models/flowers'."
        )
    validate_model_name(path.name)
    return path


def existing_versions(base_path: str | os.PathLike) -> list[int]:
    """Integer version folders under `base_path`, sorted (what TF Serving would consider)."""
    path = Path(base_path)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


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
        head: `"classification"`, `"multi_label"` or `"regression"`; `None` infers it from the
            activation of the layer named "predictions".
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


# --- TF Serving extras ----------------------------------------------------------------------------


def _serving_protos():
    try:
        from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2
        from tensorflow_serving.config import model_server_config_pb2
    except ImportError as error:
        raise ImportError(
            "The TF Serving protos are missing. Install them with "
            "`pip install --no-deps tensorflow-serving-api==2.21.0` (or `make install`)."
        ) from error
    return model_pb2, predict_pb2, prediction_log_pb2, model_server_config_pb2


def warmup_inputs(spec: ExportSpec) -> dict[str, dict[str, np.ndarray]]:
    """One small request per signature: a mid-grey image at the model's size."""
    import tensorflow as tf

    height, width = spec.image_size
    grey = np.full((height, width, spec.channels), 128.0, np.float32)
    jpeg = tf.io.encode_jpeg(tf.constant(np.full((height, width, 3), 128, np.uint8))).numpy()
    return {
        SERVING_DEFAULT: {"images": grey[None]},
        SERVE_BYTES: {"image_bytes": np.array([jpeg], dtype=object)},
    }


def write_warmup_requests(path: str | os.PathLike, spec: ExportSpec) -> Path:
    """Writes TF Serving warm-up requests: a TFRecord of `PredictionLog`, one per signature."""
    import tensorflow as tf

    model_pb2, predict_pb2, prediction_log_pb2, _ = _serving_protos()
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, inputs in warmup_inputs(spec).items():
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=spec.model_name, signature_name=signature)
            )
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request)
            )
            writer.write(log.SerializeToString())
    return Path(path)


def read_warmup_requests(path: str | os.PathLike) -> list[Any]:
    """Parses a warm-up file back into `PredictionLog` protos."""
    import tensorflow as tf

    _, _, prediction_log_pb2, _ = _serving_protos()
    logs = []
    for record in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(record.numpy())
        logs.append(log)
    return logs


def write_models_config(
    path: str | os.PathLike, models: Sequence[Mapping[str, Any]] | Mapping[str, Any]
) -> str:
    """Writes TF Serving's text-format `models.config` (a `ModelServerConfig`).

    Args:
        path: Where to write, e.g. `"saved_models/models.config"`.
        models: One mapping per model (or a single mapping) with keys `name` (str), `base_path`
            (str, as the server sees it, e.g. `"/models/flowers"`), optional `versions`
            (`None` or `"latest"` for the newest, `"all"`, or a list of ints to serve exactly
            those) and optional `labels` (e.g. `{"stable": 1, "canary": 2}`).

    Returns:
        The text written; it has been parsed back with the official protos.

    Raises:
        ValueError: For a bad name, a duplicate name, unknown keys, bad versions, or a label that
            points at a version not in `versions`.

    Example:
    >>> text = write_models_config("/tmp/models.config", [{"name": "flowers",
    ...     "base_path": "/models/flowers", "versions": [1, 2],
    ...     "labels": {"stable": 1, "canary": 2}}])
    """
    from google.protobuf import text_format

    *_, model_server_config_pb2 = _serving_protos()
    if isinstance(models, Mapping):
        models = [models]
    if not models:
        raise ValueError("`models` is empty. Pass at least one {'name': ..., 'base_path': ...}.")
    config = model_server_config_pb2.ModelServerConfig()
    seen = set()
    for entry in models:
        unknown = set(entry) - {"name", "base_path", "versions", "labels"}
        if unknown or "name" not in entry or "base_path" not in entry:
            raise ValueError(
                "Each entry of `models` needs 'name' and 'base_path' and may have 'versions' and "
                f"'labels'. Received keys: {sorted(entry)}."
            )
        name = validate_model_name(entry["name"])
        if name in seen:
            raise ValueError(f"Model name {name!r} appears twice in `models`.")
        seen.add(name)
        item = config.model_config_list.config.add(
            name=name, base_path=str(entry["base_path"]), model_platform="tensorflow"
        )
        versions = entry.get("versions")
        if versions in (None, "latest"):
            item.model_version_policy.latest.num_versions = 1
        elif versions == "all":
            item.model_version_policy.all.SetInParent()
        else:
            if isinstance(versions, (str, int)) or not versions:
                raise ValueError(
                    f"`versions` of {name!r} must be 'latest', 'all' or a non-empty list of ints. "
                    f"Received: {versions!r}"
                )
            if not all(is_int(v) and v >= 1 for v in versions):
                raise ValueError(f"`versions` of {name!r} must be positive ints: {versions!r}")
            item.model_version_policy.specific.versions.extend(sorted({int(v) for v in versions}))
        for label, version in (entry.get("labels") or {}).items():
            if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", str(label)):
                raise ValueError(f"Version label {label!r} of {name!r} must be a plain word.")
            if isinstance(versions, Sequence) and not isinstance(versions, str):
                if version not in versions:
                    raise ValueError(
                        f"Label {label!r} of {name!r} points at version {version}, which is not "
                        f"among the served versions {list(versions)}. Add it to 'versions'."
                    )
            if not is_int(version) or version < 1:
                raise ValueError(f"Label {label!r} of {name!r} needs a positive int version.")
            item.version_labels[str(label)] = int(version)
    text = text_format.MessageToString(config)
    text_format.Parse(text, model_server_config_pb2.ModelServerConfig())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    staging.write_text(text)
    os.replace(staging, path)
    return text


# --- verification ---------------------------------------------------------------------------------


def _bmp_bytes(pixels: np.ndarray) -> bytes:
    """A 24-bit BMP, written by hand so verification needs nothing beyond TensorFlow."""
    height, width, _ = pixels.shape
    row = (width * 3 + 3) // 4 * 4
    body = np.zeros((height, row), np.uint8)
    body[:, : width * 3] = pixels[::-1, :, ::-1].reshape(height, width * 3)
    size = 54 + body.size
    header = b"BM" + size.to_bytes(4, "little") + b"\0\0\0\0" + (54).to_bytes(4, "little")
    info = (40).to_bytes(4, "little") + width.to_bytes(4, "little") + height.to_bytes(4, "little")
    info += (1).to_bytes(2, "little") + (24).to_bytes(2, "little") + b"\0" * 24
    return header + info + body.tobytes()


def _fake_png_header(height: int, width: int) -> bytes:
    """PNG signature and IHDR only: enough for the size check to refuse it without decoding."""
    ihdr = height.to_bytes(4, "big")
    ihdr = width.to_bytes(4, "big") + ihdr + bytes([8, 2, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR" + ihdr + b"\0" * 4


def verification_cases(spec: ExportSpec, seed: int = 0) -> list[dict[str, Any]]:
    """Sample requests for every signature: sizes, greyscale, real encoded bytes, bad bytes.

    Returns:
        Dicts with `name`, `signature`, `inputs` (`{key: array}`) and optionally `error` (a
        substring the SavedModel's error must contain).
    """
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    height, width = spec.image_size
    rgb_in = 3 if spec.channels == 3 else 1
    other_in = 1 if spec.channels == 3 else 3

    def pixels(h: int, w: int, c: int) -> np.ndarray:
        return rng.uniform(0, 255, (h, w, c)).astype(np.float32)

    def image_u8(h: int, w: int, c: int) -> np.ndarray:
        return rng.integers(0, 256, (h, w, c), dtype=np.uint8)

    def jpeg(h: int, w: int) -> bytes:
        return tf.io.encode_jpeg(tf.constant(image_u8(h, w, 3))).numpy()

    def png(h: int, w: int, c: int) -> bytes:
        return tf.io.encode_png(tf.constant(image_u8(h, w, c))).numpy()

    def strings(*items: bytes) -> np.ndarray:
        return np.array(list(items), dtype=object)

    cases = [
        ("float_model_size", np.stack([pixels(height, width, rgb_in) for _ in range(2)])),
        ("float_larger", pixels(height + 17, width * 2 + 3, rgb_in)[None]),
        ("float_smaller", pixels(max(1, height // 2), max(1, width // 3), rgb_in)[None]),
        ("float_other_channels", pixels(height + 5, width, other_in)[None]),
    ]
    out = [{"name": n, "signature": SERVING_DEFAULT, "inputs": {"images": x}} for n, x in cases]
    out += [
        {
            "name": "jpeg_several_sizes",
            "signature": SERVE_BYTES,
            "inputs": {
                "image_bytes": strings(
                    jpeg(height, width), jpeg(height * 2 + 9, width + 31), jpeg(17, 23)
                )
            },
        },
        {
            "name": "png_model_size_and_greyscale",
            "signature": SERVE_BYTES,
            "inputs": {"image_bytes": strings(png(height, width, 3), png(height + 3, width, 1))},
        },
        {
            "name": "bmp",
            "signature": SERVE_BYTES,
            "inputs": {"image_bytes": strings(_bmp_bytes(image_u8(height, width + 2, 3)))},
        },
        {
            "name": "garbage_bytes",
            "signature": SERVE_BYTES,
            "inputs": {"image_bytes": strings(b"this is not an image at all")},
            "error": "Unknown image file format",
        },
        {
            "name": "oversized_image",
            "signature": SERVE_BYTES,
            "inputs": {"image_bytes": strings(_fake_png_header(100_000, 100_000))},
            "error": "decoded-size limit",
        },
    ]
    return out


def _expected_outputs(model: Any, spec: ExportSpec, cases: list[dict]) -> list[dict | None]:
    """Runs each case eagerly through the same functions the SavedModel was traced from."""
    import tensorflow as tf

    functions = make_serving_functions(model, spec)
    expected = []
    for case in cases:
        if "error" in case:
            expected.append(None)
            continue
        ((key, value),) = case["inputs"].items()
        tensor = tf.constant(list(value) if value.dtype == object else value)
        outputs = functions[case["signature"]](tensor)
        expected.append({k: v.numpy() for k, v in outputs.items()})
    # The pipeline must agree with the model itself on pixels it needs no resizing for.
    direct = np.asarray(model.predict(cases[0]["inputs"]["images"], verbose=0), np.float32)
    first = expected[0]["predictions" if spec.head == "regression" else "probabilities"]
    if not np.allclose(first, direct, atol=1e-5, rtol=0):
        raise VerificationError(
            "The serving pipeline disagrees with `model.predict` on model-size pixels "
            f"(max difference {np.max(np.abs(first - direct)):.3g})."
        )
    return expected


def _site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return list(dict.fromkeys([paths["purelib"], paths["platlib"]]))


def run_clean_process(
    script_args: Sequence[str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """Runs `_clean_verify.py` isolated: `python -I -S`, only site-packages on the path, and a
    `sys.meta_path` blocker so `keras` and `keras_transfer` cannot be imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["KT_SITE_DIRS"] = os.pathsep.join(_site_dirs())
    return subprocess.run(
        [sys.executable, "-I", "-S", str(_WORKER), *script_args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=tempfile.gettempdir(),
    )


def verify_export(
    version_dir: str | os.PathLike,
    model: Any = None,
    *,
    atol: float = 1e-5,
    timeout: float = 600,
) -> dict[str, Any]:
    """Loads an export in a clean process and checks every signature against the Keras model.

    The separate process runs with `python -I -S`, only the interpreter's site-packages on its
    path and an import blocker, so `keras` and `keras_transfer` cannot be imported: it sees only
    what TF Serving sees. It checks the signature names, input keys and method names, replays the
    warm-up requests, runs float images of several sizes, a greyscale/RGB variant, JPEG of several
    sizes, PNG (RGB and greyscale) and BMP bytes, and checks that garbage bytes and an oversized
    image fail with a clean error.

    Args:
        version_dir: The version folder, e.g. `"saved_models/flowers/3"`.
        model: The Keras model for the expected outputs; `None` loads `model.keras` from the
            version folder.
        atol: Largest absolute difference allowed for float outputs.
        timeout: Seconds before the clean process is abandoned.

    Returns:
        A report dict: `cases` (name, status, max difference), `seconds`, `keras_blocked`.

    Raises:
        FileNotFoundError: When the folder is not an export.
        VerificationError: On any mismatch, load failure or missing error.

    Example:
    >>> report = kt.verify_export("saved_models/flowers/1")  # doctest: +SKIP
    """
    version_dir = Path(version_dir)
    if not (version_dir / "saved_model.pb").is_file():
        raise FileNotFoundError(
            f"No SavedModel at '{version_dir}'. Pass a version folder such as "
            "'saved_models/<name>/<version>'."
        )
    spec = ExportSpec.read(version_dir)
    if model is None:
        keras_file = version_dir / KERAS_FILE
        if not keras_file.is_file():
            raise FileNotFoundError(
                f"No `model` given and no '{keras_file}' to compute expected outputs from. "
                "Pass the Keras model: `verify_export(path, model)`."
            )
        import keras

        try:  # registers the custom layers before loading
            import keras_transfer.layers  # noqa: F401
        except ImportError:
            pass

        model = keras.models.load_model(keras_file)
    start = time.perf_counter()
    cases = verification_cases(spec)
    expected = _expected_outputs(model, spec, cases)
    with tempfile.TemporaryDirectory(prefix="kt-verify-") as work:
        work = Path(work)
        arrays: dict[str, np.ndarray] = {}
        manifest_cases = []
        for index, (case, outputs) in enumerate(zip(cases, expected, strict=True)):
            ((key, value),) = case["inputs"].items()
            if value.dtype == object:
                import base64

                value = np.array([base64.b64encode(v).decode("ascii") for v in value])
            arrays[f"c{index}_in"] = value
            entry = {
                "name": case["name"],
                "signature": case["signature"],
                "input_key": key,
                "input_b64": case["inputs"][key].dtype == object,
                "error": case.get("error"),
                "outputs": sorted(outputs) if outputs else [],
            }
            for name, array in (outputs or {}).items():
                if array.dtype == object:
                    array = np.array([_decode(v) for v in array.ravel()]).reshape(array.shape)
                arrays[f"c{index}_out_{name}"] = array
            manifest_cases.append(entry)
        np.savez(work / "cases.npz", **arrays)
        manifest = {
            "saved_model": str(version_dir.resolve()),
            "arrays": str(work / "cases.npz"),
            "result": str(work / "result.json"),
            "atol": atol,
            "signatures": {
                SERVING_DEFAULT: ["images"],
                SERVE_BYTES: ["image_bytes"],
            },
            "outputs": list(spec.outputs),
            "warmup": str(version_dir / "assets.extra" / WARMUP_FILE),
            "cases": manifest_cases,
        }
        (work / "manifest.json").write_text(json.dumps(manifest))
        try:
            process = run_clean_process([str(work / "manifest.json")], timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise VerificationError(f"The clean verification process timed out: {error}") from None
        result_path = work / "result.json"
        if not result_path.is_file():
            raise VerificationError(
                f"The clean verification process crashed (exit {process.returncode}):\n"
                + process.stderr[-4000:]
            )
        report = json.loads(result_path.read_text())
    report["seconds"] = round(time.perf_counter() - start, 2)
    if report.get("failures") or process.returncode != 0:
        raise VerificationError(
            f"Export '{version_dir}' failed verification:\n  " + "\n  ".join(report["failures"])
        )
    return report


def _decode(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
