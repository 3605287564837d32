"""Exports that TF Serving loads as they are, and their verification in a clean process.

`export_for_serving` writes `<base_path>/<version>/`: a SavedModel whose two signatures carry the
whole input pipeline (resizing, channel handling, image decoding, the model's own preprocessing), a
`.keras` copy beside it, TF Serving warm-up requests and, on request, a TFLite file. `verify_export`
loads the SavedModel in a separate Python process in which `keras` and `keras_transfer` cannot be
imported, so an export that only works next to the training code is caught before it ships.
`write_models_config` writes the text-format `models.config` that TF Serving reads.

One module per job:

- `spec`: file and signature names, `ExportSpec` (what an export serves), reading the model's
  input size and head.
- `graph`: the serving graph (`prepare_pixels`, `decode_images`, `make_serving_functions`).
- `saved_model`: writing the version folder (`export_for_serving`, `export_tflite`).
- `tf_serving`: model names and versions, warm-up requests, `models.config`.
- `verify`: the clean-process check (`verify_export`), run by `_clean_worker.py`.

Nothing here imports TensorFlow or Keras until a function needs it.
"""

from keras_transfer.export.graph import decode_images, make_serving_functions, prepare_pixels
from keras_transfer.export.saved_model import export_for_serving, export_tflite
from keras_transfer.export.spec import (
    DEFAULT_MAX_IMAGE_PIXELS,
    FORMATS,
    HEADS,
    KERAS_FILE,
    METADATA_FILE,
    SERVE_BYTES,
    SERVING_DEFAULT,
    TFLITE_FILE,
    WARMUP_FILE,
    ExportSpec,
    infer_head,
)
from keras_transfer.export.tf_serving import (
    existing_versions,
    read_warmup_requests,
    validate_model_name,
    warmup_inputs,
    write_models_config,
    write_warmup_requests,
)
from keras_transfer.export.verify import (
    VerificationError,
    run_clean_process,
    verification_cases,
    verify_export,
)

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "FORMATS",
    "HEADS",
    "KERAS_FILE",
    "METADATA_FILE",
    "SERVE_BYTES",
    "SERVING_DEFAULT",
    "TFLITE_FILE",
    "WARMUP_FILE",
    "ExportSpec",
    "VerificationError",
    "decode_images",
    "existing_versions",
    "export_for_serving",
    "export_tflite",
    "infer_head",
    "make_serving_functions",
    "prepare_pixels",
    "read_warmup_requests",
    "run_clean_process",
    "validate_model_name",
    "verification_cases",
    "verify_export",
    "warmup_inputs",
    "write_models_config",
    "write_warmup_requests",
]
