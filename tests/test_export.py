"""Tests for `keras_transfer.export`: layout, signatures, equality with `model.predict`, warm-up,
models.config, TFLite, errors, and verification in a clean process."""

from __future__ import annotations

import io
import os
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_transfer import export
from keras_transfer.export import (
    export_for_serving,
    graph,
    verify,
    verify_export,
    write_models_config,
)

LABELS = ["cat", "dog", "fox"]
SIZE = 32
LEGACY_CLASSIFIER = Path(__file__).parent / "fixtures" / "legacy_classifier.keras"
HEAD_OF_ACTIVATION = {"softmax": "classification", "sigmoid": "multi_label", "linear": "regression"}


def tiny_model(
    activation: str = "softmax", units: int = 3, channels: int = 3, logits: bool = False
) -> keras.Model:
    """Input "images" -> Rescaling -> Conv2D -> pooling -> head.

    The head is a legacy `Dense "predictions"` with the activation fused in, or with `logits=True`
    the current layout, `Dense "logits"` -> `Activation "predictions"`.
    """
    inputs = keras.Input((SIZE, SIZE, channels), name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    if logits:
        x = keras.layers.Dense(units, name="logits")(x)
        return keras.Model(inputs, keras.layers.Activation(activation, name="predictions")(x))
    outputs = keras.layers.Dense(units, activation=activation, name="predictions")(x)
    return keras.Model(inputs, outputs)


def encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels.squeeze() if pixels.shape[-1] == 1 else pixels)
    image.save(buffer, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buffer.getvalue()


def random_u8(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def model(tiny_classifier):
    return tiny_classifier


@pytest.fixture(scope="module")
def exported(exported_classifier):
    """The session's shared export (conftest): labels `LABELS`, top_k=2, 100,000 pixels at most."""
    shared = exported_classifier
    assert (shared.labels, shared.top_k, shared.max_image_pixels) == (tuple(LABELS), 2, 100_000)
    return shared.path, tf.saved_model.load(str(shared.path))


def call(loaded, signature: str, value):
    key = "images" if signature == "serving_default" else "image_bytes"
    outputs = loaded.signatures[signature](**{key: tf.constant(value)})
    return {k: v.numpy() for k, v in outputs.items()}


def test_layout_versions_and_no_leftovers(exported, model):
    path, _ = exported
    assert path.name == "1"
    for name in ["saved_model.pb", "variables", "fingerprint.pb", "model.keras"]:
        assert (path / name).exists(), name
    assert (path / "assets.extra" / "tf_serving_warmup_requests").is_file()
    assert export.ExportSpec.read(path).labels == tuple(LABELS)
    assert [p.name for p in path.parent.iterdir()] == ["1"]  # no temporary folders left


def test_refuses_existing_version_then_overwrites_and_numbers_next(tmp_path):
    model = tiny_model()
    first = export_for_serving(model, tmp_path / "m", warmup=False, save_keras=False)
    with pytest.raises(FileExistsError, match="already exists"):
        export_for_serving(model, tmp_path / "m", version=1)
    (first / "marker").write_text("old")
    again = export_for_serving(model, tmp_path / "m", version=1, overwrite=True, save_keras=False)
    assert again == first and not (again / "marker").exists()
    second = export_for_serving(model, tmp_path / "m", warmup=False, save_keras=False)
    assert second.name == "2"
    assert sorted(os.listdir(tmp_path / "m")) == ["1", "2"]


@pytest.mark.parametrize("base", ["bad name", "a/../b", ".hidden", "x/y\\z"])
def test_bad_model_names_are_refused_before_writing(tmp_path, base):
    with pytest.raises(ValueError, match="name|'\\.\\.'"):
        export_for_serving(tiny_model(), tmp_path / base)
    assert not any(tmp_path.iterdir())


def test_argument_errors(tmp_path):
    unbuilt = keras.Sequential([keras.layers.Dense(2, name="predictions")])
    with pytest.raises(ValueError, match="not built"):
        export_for_serving(unbuilt, tmp_path / "m")
    with pytest.raises(TypeError, match="keras.Model"):
        export_for_serving("model.keras", tmp_path / "m")
    with pytest.raises(ValueError, match="3 strings"):
        export_for_serving(tiny_model(), tmp_path / "m", labels=["a", "b"])
    with pytest.raises(ValueError, match="format"):
        export_for_serving(tiny_model(), tmp_path / "m", format="onnx")
    with pytest.raises(ValueError, match="version"):
        export_for_serving(tiny_model(), tmp_path / "m", version=0)
    inputs = keras.Input((8, 8, 3), name="images")
    no_head = keras.Model(inputs, keras.layers.Flatten()(inputs))
    with pytest.raises(ValueError, match="'predictions'.*pass `head='classification'`"):
        export_for_serving(no_head, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_signatures_accept_any_size_greyscale_and_rgb(exported):
    _, loaded = exported
    assert {"serving_default", "serve_bytes"} <= set(loaded.signatures)
    rng = np.random.default_rng(1)
    for shape in [(2, SIZE, SIZE, 3), (1, 50, 17, 3), (1, 9, 9, 1), (3, 64, 64, 1)]:
        out = call(loaded, "serving_default", rng.uniform(0, 255, shape).astype(np.float32))
        assert out["probabilities"].shape == (shape[0], 3)
        np.testing.assert_allclose(out["probabilities"].sum(-1), 1.0, atol=1e-5)
        assert out["top_k_scores"].shape == out["top_k_classes"].shape == (shape[0], 2)
        ids = out["class_ids"]
        assert [c.decode() for c in out["classes"]] == [LABELS[i] for i in ids]
        assert [c.decode() for c in out["top_k_classes"][:, 0]] == [LABELS[i] for i in ids]
    with pytest.raises(tf.errors.InvalidArgumentError, match="channels"):
        call(loaded, "serving_default", np.zeros((1, SIZE, SIZE, 2), np.float32))
    # An empty batch is answered with empty outputs (oneDNN's convolutions fail on one).
    empty = call(loaded, "serving_default", np.zeros((0, SIZE, SIZE, 3), np.float32))
    assert empty["probabilities"].shape == (0, 3) and empty["classes"].shape == (0,)
    assert call(loaded, "serve_bytes", np.array([], object))["top_k_scores"].shape == (0, 2)


def test_outputs_equal_model_predict_on_the_same_decoded_pixels(exported, model):
    _, loaded = exported
    pixels = random_u8(SIZE, SIZE, seed=2)
    png, jpeg = encode(pixels, "PNG"), encode(pixels, "JPEG")
    jpeg_pixels = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    expected = model.predict(np.stack([pixels, jpeg_pixels]).astype(np.float32), verbose=0)
    served = call(loaded, "serve_bytes", [png, jpeg])["probabilities"]
    np.testing.assert_allclose(served, expected, atol=1e-5, rtol=0)
    floats = call(loaded, "serving_default", pixels[None].astype(np.float32))["probabilities"]
    np.testing.assert_allclose(floats, expected[:1], atol=1e-5, rtol=0)
    # A greyscale PNG decodes to three equal channels, the same as sending grey floats.
    grey = random_u8(SIZE, SIZE, 1, seed=3)
    via_bytes = call(loaded, "serve_bytes", [encode(grey, "PNG")])["probabilities"]
    via_float = call(loaded, "serving_default", grey[None].astype(np.float32))["probabilities"]
    np.testing.assert_allclose(via_bytes, via_float, atol=1e-5, rtol=0)


def test_serve_bytes_formats_sizes_and_clean_errors(exported):
    _, loaded = exported
    images = [
        encode(random_u8(200, 120), "JPEG"),
        encode(random_u8(7, 300), "PNG"),
        encode(random_u8(40, 40, 1), "PNG"),
        encode(random_u8(33, 21), "GIF"),
        encode(random_u8(31, 45), "BMP"),
    ]
    if "WEBP" in Image.registered_extensions().values():
        images.append(encode(random_u8(30, 50), "WEBP"))
    out = call(loaded, "serve_bytes", images)
    assert out["probabilities"].shape == (len(images), 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Unknown image file format"):
        call(loaded, "serve_bytes", [b"definitely not an image"])
    # 400 x 400 = 160,000 pixels > max_image_pixels=100,000: refused before decoding.
    with pytest.raises(tf.errors.InvalidArgumentError, match="decoded-size limit"):
        call(loaded, "serve_bytes", [encode(random_u8(400, 400), "PNG")])
    with pytest.raises(tf.errors.InvalidArgumentError, match="decoded-size limit"):
        call(loaded, "serve_bytes", [verify._fake_png_header(90_000, 90_000)])


@pytest.mark.parametrize(
    ("fmt", "shape"), [("JPEG", (500, 300)), ("GIF", (301, 400)), ("BMP", (350, 290))]
)
def test_header_size_check_reads_each_format(fmt, shape):
    data = encode(random_u8(*shape), fmt)
    assert int(graph._header_pixels(tf.constant(data))) == shape[0] * shape[1]


def test_warmup_requests_parse_with_official_protos(exported):
    path, loaded = exported
    logs = export.read_warmup_requests(path / "assets.extra" / "tf_serving_warmup_requests")
    assert [log.predict_log.request.model_spec.signature_name for log in logs] == [
        "serving_default",
        "serve_bytes",
    ]
    for log in logs:
        request = log.predict_log.request
        assert request.model_spec.name == "pets"
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        loaded.signatures[request.model_spec.signature_name](**inputs)


def test_models_config_parses_with_official_protos(tmp_path):
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    text = write_models_config(
        tmp_path / "models.config",
        [
            {
                "name": "pets",
                "base_path": "/models/pets",
                "versions": [1, 2],
                "labels": {"stable": 1, "canary": 2},
            },
            {"name": "flowers", "base_path": "/models/flowers", "versions": "all"},
            {"name": "birds", "base_path": "/models/birds"},
        ],
    )
    config = text_format.Parse(
        (tmp_path / "models.config").read_text(), model_server_config_pb2.ModelServerConfig()
    )
    assert text == (tmp_path / "models.config").read_text()
    pets, flowers, birds = config.model_config_list.config
    assert list(pets.model_version_policy.specific.versions) == [1, 2]
    assert dict(pets.version_labels) == {"stable": 1, "canary": 2}
    assert pets.model_platform == "tensorflow"
    assert flowers.model_version_policy.HasField("all")
    assert birds.model_version_policy.latest.num_versions == 1
    with pytest.raises(ValueError, match="not among the served versions"):
        write_models_config(
            tmp_path / "x", {"name": "p", "base_path": "/m", "versions": [1], "labels": {"c": 2}}
        )
    with pytest.raises(ValueError, match="Invalid model name"):
        write_models_config(tmp_path / "x", {"name": "../p", "base_path": "/m"})
    with pytest.raises(ValueError, match="twice"):
        write_models_config(tmp_path / "x", [{"name": "p", "base_path": "/m"}] * 2)


@pytest.mark.parametrize("logits", [False, True], ids=["fused", "logits"])
@pytest.mark.parametrize("activation", ["sigmoid", "linear"])
def test_multi_label_and_regression_heads(tmp_path, activation, logits):
    model = tiny_model(activation, units=4, logits=logits)
    path = export_for_serving(model, tmp_path / "m", warmup=False, save_keras=False, top_k=3)
    loaded = tf.saved_model.load(str(path))
    x = np.random.default_rng(4).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    out = call(loaded, "serving_default", x)
    expected = model.predict(x, verbose=0)
    if activation == "linear":
        assert set(out) == {"predictions"}
        np.testing.assert_allclose(out["predictions"], expected, atol=1e-5, rtol=0)
    else:
        assert set(out) == {"probabilities", "over_threshold", "top_k_classes", "top_k_scores"}
        np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5, rtol=0)
        np.testing.assert_array_equal(out["over_threshold"], (expected >= 0.5).astype(np.int32))
        assert out["top_k_classes"].shape == (2, 3)


def test_greyscale_model(tmp_path):
    model = tiny_model(channels=1)
    path = export_for_serving(model, tmp_path / "g", warmup=False, save_keras=False)
    loaded = tf.saved_model.load(str(path))
    pixels = random_u8(SIZE, SIZE, 1, seed=5)
    expected = model.predict(pixels[None].astype(np.float32), verbose=0)
    got = call(loaded, "serve_bytes", [encode(pixels, "PNG")])["probabilities"]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    rgb = call(loaded, "serving_default", random_u8(20, 20, 3)[None].astype(np.float32))
    assert rgb["probabilities"].shape == (1, 3)


def test_tflite_interpreter_matches_model(tmp_path):
    model = tiny_model()
    path = export_for_serving(
        model, tmp_path / "t", format="tflite", warmup=False, save_keras=False
    )
    interpreter = tf.lite.Interpreter(model_path=str(path / "model.tflite"))
    runner = interpreter.get_signature_runner("serving_default")
    x = random_u8(SIZE, SIZE, seed=6)[None].astype(np.float32)
    got = runner(images=x)["probabilities"]
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5, rtol=0)


def test_clean_process_really_blocks_keras(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import runpy, sys\n"
        f"mod = runpy.run_path({str(verify._WORKER)!r})\n"
        "mod['install_blocker']()\n"
        "import tensorflow\n"
        "print('BLOCKED' if mod['keras_blocked']() else 'IMPORTABLE', tensorflow.__version__)\n"
    )
    env = dict(os.environ, KT_SITE_DIRS=os.pathsep.join(verify._site_dirs()))
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-I", "-S", str(probe)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BLOCKED" in done.stdout


@pytest.mark.slow
def test_verify_in_clean_process_passes_and_catches_mismatch(exported, model):
    path, _ = exported
    report = verify_export(path, model)
    assert report["keras_blocked"] is True and not report["failures"]
    statuses = {case["name"]: case["status"] for case in report["cases"]}
    assert statuses["garbage_bytes"] == statuses["oversized_image"] == "refused as expected"
    assert statuses["jpeg_several_sizes"] == statuses["png_model_size_and_greyscale"] == "ok"
    assert report["warmup"] == "2 requests replayed"
    other = keras.models.clone_model(model)
    other.set_weights([w + 0.05 for w in model.get_weights()])
    with pytest.raises(export.VerificationError, match="differs by"):
        verify_export(path, other)


@pytest.mark.slow
def test_verify_without_model_loads_the_keras_copy(exported):
    path, _ = exported
    assert not verify_export(path)["failures"]


def test_verify_errors_for_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No SavedModel"):
        verify_export(tmp_path)


@pytest.mark.parametrize("logits", [False, True], ids=["fused", "logits"])
def test_head_is_read_through_head_of_in_both_layouts(logits, monkeypatch):
    kinds = {a: export.infer_head(tiny_model(a, logits=logits)) for a in HEAD_OF_ACTIVATION}
    assert kinds == HEAD_OF_ACTIVATION
    # `kt.head_of` is the only reader: what it says is what the export serves.
    from keras_transfer import heads

    regression = heads.HeadSpec("regression", 3, "logits", "predictions")
    monkeypatch.setattr(heads, "head_of", lambda model: regression)
    assert export.infer_head(tiny_model("softmax", logits=logits)) == "regression"


@pytest.mark.slow
def test_legacy_model_file_exports_and_verifies(tmp_path):
    """A `.keras` file written before the logits layer existed (fused softmax `Dense`)."""
    model = keras.models.load_model(LEGACY_CLASSIFIER)
    assert isinstance(model.get_layer("predictions"), keras.layers.Dense)
    assert "logits" not in [layer.name for layer in model.layers]
    path = export_for_serving(model, tmp_path / "legacy", labels=LABELS)
    spec = export.ExportSpec.read(path)
    assert (spec.head, spec.labels) == ("classification", tuple(LABELS))
    assert spec.outputs[:3] == ("probabilities", "class_ids", "classes")
    x = np.stack([random_u8(SIZE, SIZE, seed=s) for s in (8, 9)]).astype(np.float32)
    served = call(tf.saved_model.load(str(path)), "serving_default", x)["probabilities"]
    np.testing.assert_allclose(served, model.predict(x, verbose=0), atol=1e-5, rtol=0)
    # This MobileNet's float32 outputs differ by up to ~1.4e-5 between eager and graph execution.
    report = verify_export(path, model, atol=1e-4)
    assert report["keras_blocked"] is True and not report["failures"]
    assert all(case["status"] in ("ok", "refused as expected") for case in report["cases"])
    assert report["warmup"] == "2 requests replayed"
