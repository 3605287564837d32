"""TF Serving's side of an export: model names and versions, warm-up requests, `models.config`.

The protos come from `tensorflow-serving-api`; every file written here is parsed back with them.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_transfer._validate import is_int
from keras_transfer.export.spec import SERVE_BYTES, SERVING_DEFAULT, ExportSpec

_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def validate_model_name(name: str) -> str:
    """Returns `name` if it is a safe TF Serving model name, else raises `ValueError`."""
    if not isinstance(name, str) or not _NAME_PATTERN.match(name) or ".." in name:
        raise ValueError(
            f"Invalid model name {name!r}. Use letters, digits, '.', '_' and '-' only (no path "
            "separators, no '..', not starting with '.'), e.g. 'flowers_v2'."
        )
    return name


def existing_versions(base_path: str | os.PathLike) -> list[int]:
    """Integer version folders under `base_path`, sorted (what TF Serving would consider)."""
    path = Path(base_path)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit())


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
