"""Verification in a clean process: the export loaded the way TF Serving loads it.

`verify_export` computes the expected outputs eagerly with the Keras model (through the same
functions the SavedModel was traced from), then runs `_clean_worker.py` under `python -I -S` with
`keras` and `keras_transfer` blocked, and compares.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_transfer.export.graph import make_serving_functions
from keras_transfer.export.spec import (
    KERAS_FILE,
    SERVE_BYTES,
    SERVING_DEFAULT,
    WARMUP_FILE,
    ExportSpec,
)

_WORKER = Path(__file__).with_name("_clean_worker.py")


class VerificationError(RuntimeError):
    """An exported SavedModel disagrees with its Keras model, or fails to load or run."""


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


def _expected_outputs(
    model: Any, spec: ExportSpec, cases: list[dict], atol: float = 1e-5
) -> list[dict | None]:
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
    if not np.allclose(first, direct, atol=atol, rtol=0):
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
    """Runs `_clean_worker.py` isolated: `python -I -S`, only site-packages on the path, and a
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
        atol: Largest absolute difference allowed for float outputs, between the SavedModel and
            the Keras model and between the serving pipeline and `model.predict`.
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
    expected = _expected_outputs(model, spec, cases, atol)
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
