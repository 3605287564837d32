"""Tests for `keras_transfer.serving`: the REST client driven against the local server on
loopback, with TF Serving's request formats and error rules."""

from __future__ import annotations

import base64
import io
import json
import shutil
import urllib.error
import urllib.request

import keras
import numpy as np
import pytest
from PIL import Image

from keras_transfer.serving import Client, ServingError, serve

SIZE = 24
LABELS = ["cat", "dog", "fox"]


def tiny_model() -> keras.Model:
    inputs = keras.Input((SIZE, SIZE, 3), name="images")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


def jpeg(h: int, w: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(exported_classifier):
    return exported_classifier.model


@pytest.fixture(scope="module")
def server(exported_classifier, tmp_path_factory):
    """Versions 1 and 2 of "pets": two copies of the session's shared export (conftest)."""
    assert (exported_classifier.labels, exported_classifier.top_k) == (tuple(LABELS), 2)
    base = tmp_path_factory.mktemp("serving") / "pets"
    for version in ("1", "2"):
        shutil.copytree(exported_classifier.path, base / version)
    running = serve(base, port=0, block=False, versions=[1, 2], labels={"stable": 1})
    yield running
    running.shutdown()


@pytest.fixture(scope="module")
def client(server):
    return Client(server.url, "pets")


def test_request_building_is_tf_serving_json():
    client = Client("http://localhost:8501/", "pets")
    assert client.predict_url() == "http://localhost:8501/v1/models/pets:predict"
    assert client.predict_url(version=3).endswith("/v1/models/pets/versions/3:predict")
    assert client.predict_url(label="canary").endswith("/v1/models/pets/labels/canary:predict")
    body = client.build_predict_request([b"\xff\xd8", b"ab"], signature_name="serve_bytes")
    assert body == {
        "signature_name": "serve_bytes",
        "instances": [{"b64": base64.b64encode(b"\xff\xd8").decode()}, {"b64": "YWI="}],
    }
    body = client.build_predict_request(inputs={"images": np.zeros((1, 1, 1, 3), np.float32)})
    assert body == {"inputs": {"images": [[[[0.0, 0.0, 0.0]]]]}}
    with pytest.raises(ValueError, match="exactly one"):
        client.build_predict_request()
    with pytest.raises(ValueError, match="exactly one"):
        client.build_predict_request([1], inputs=[1])
    with pytest.raises(ValueError, match="url"):
        Client("localhost:8501", "pets")
    with pytest.raises(ValueError, match="model_name"):
        Client("http://localhost:8501", "../pets")
    with pytest.raises(ValueError, match="not both"):
        client.model_url(version=1, label="stable")


def test_status_and_metadata(client):
    status = client.status()["model_version_status"]
    assert [s["version"] for s in status] == ["1", "2"]
    assert all(s["state"] == "AVAILABLE" for s in status)
    assert client.status(label="stable")["model_version_status"][0]["version"] == "1"
    meta = client.metadata()
    assert meta["model_spec"] == {"name": "pets", "signature_name": "", "version": "2"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(defs) >= {"serving_default", "serve_bytes"}
    assert list(defs["serve_bytes"]["inputs"]) == ["image_bytes"]
    assert defs["serving_default"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"


def test_predict_row_and_columnar_floats_match_model(client, model):
    shape = (2, *model.input_shape[1:])
    x = np.random.default_rng(1).uniform(0, 255, shape).astype(np.float32)
    expected = model.predict(x, verbose=0)
    rows = client.predict(list(x))
    assert [r["classes"] for r in rows] == [LABELS[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose([r["probabilities"] for r in rows], expected, atol=1e-5)
    columns = client.predict_images(x, version=1)
    np.testing.assert_allclose(columns["probabilities"], expected, atol=1e-5)
    assert np.asarray(columns["top_k_scores"]).shape == (2, 2)
    # Integers are fine for a float input; any size is resized in the graph.
    ints = client.predict(inputs=np.full((1, 40, 31, 3), 7).tolist())
    assert np.asarray(ints["probabilities"]).shape == (1, 3)


def test_predict_b64_bytes_rows_and_columns(client):
    images = [jpeg(50, 40, 1), jpeg(13, 90, 2)]
    columns = client.predict_bytes(images)
    rows = client.predict(images, signature_name="serve_bytes", label="stable")
    np.testing.assert_allclose(
        columns["probabilities"], [r["probabilities"] for r in rows], atol=1e-6
    )
    named = client.predict([{"image_bytes": images[0]}], signature_name="serve_bytes")
    assert named[0]["classes"] in LABELS


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({"instances": [[0.0]], "signature_name": "nope"}, 400, 'signature key "nope" not found'),
        ({"inputs": {"pixels": [[0.0]]}}, 400, "Missing input(s) ['images']"),
        (
            {"inputs": {"image_bytes": [b"garbage"]}, "signature_name": "serve_bytes"},
            400,
            "Unknown image file format",
        ),
        ({"inputs": {"images": [["a"]]}}, 400, "expects float"),
        ({"instances": [[0.0]], "version": 9}, 404, "Servable not found"),
        ({"instances": [[0.0]], "label": "canary"}, 404, "version label"),
    ],
)
def test_errors_follow_tf_serving_rules(client, kwargs, status, message):
    with pytest.raises(ServingError) as caught:
        client.predict(**kwargs)
    assert caught.value.status == status
    assert message in caught.value.message


def test_bad_json_and_unknown_model_answer_json_errors(server):
    request = urllib.request.Request(
        server.url + "/v1/models/pets:predict", data=b"{not json", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    assert "error" in json.loads(caught.value.read())
    with pytest.raises(ServingError) as unknown:
        Client(server.url, "other").status()
    assert unknown.value.status == 404


def test_serve_refuses_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="No version folders"):
        serve(tmp_path, port=0, block=False)


def test_cli_export_verify_serve_parse(tmp_path):
    from keras_transfer import cli

    tiny_model().save(tmp_path / "m.keras")
    code = cli.main(
        [
            "export",
            str(tmp_path / "m.keras"),
            str(tmp_path / "pets"),
            "--labels",
            ",".join(LABELS),
            "--no-verify",
        ]
    )
    assert code == 0 and (tmp_path / "pets" / "1" / "saved_model.pb").is_file()
    assert cli.main(["export", str(tmp_path / "missing.keras"), str(tmp_path / "x")]) == 2
    assert cli.main(["verify", str(tmp_path)]) == 2
    args = cli.build_parser().parse_args(["serve", str(tmp_path / "pets"), "--port", "0"])
    assert args.func.__name__ == "_run_serve"
