"""Serving robustness: bad bytes never crash `serve_bytes` or the local server.

A seeded generator makes valid JPEG/PNG/GIF/BMP/WebP files and then breaks them: truncations, byte
flips, random bytes behind each format's magic number, pure random bytes, empty strings, and
headers that declare huge (or inconsistent) dimensions. Every input goes through the exported
SavedModel's `serve_bytes` signature, one request each and in mixed batches: each call returns
well-formed outputs or raises `tf.errors.InvalidArgumentError`, and the process carries on. The
local server answers bad requests with HTTP 400 (never 500) and keeps serving; concurrent
requests get the same answers as sequential ones.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from keras_transfer import serving

# What the session's shared export (conftest `exported_classifier`) serves.
MODEL_NAME = "pets"
MAX_PIXELS = 100_000
TOP_K = 2
FUZZ_INPUTS = 1200
NUM_CLASSES = 3
FORMATS = ("jpeg", "png", "gif", "bmp", "webp")


def encode(rng: np.random.Generator, fmt: str, height: int, width: int) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt.upper())
    return buffer.getvalue()


def huge_header(data: bytes, fmt: str, height: int, width: int) -> bytes:
    """`data` with its header claiming `height` x `width` pixels (pixel data unchanged)."""
    data = bytearray(data)
    if fmt == "png":
        data[16:24] = struct.pack(">II", width, height)
    elif fmt == "gif":
        data[6:10] = struct.pack("<HH", min(width, 65535), min(height, 65535))
    elif fmt == "bmp":
        data[18:26] = struct.pack("<ii", min(width, 2**31 - 1), min(height, 2**31 - 1))
    elif fmt == "jpeg":
        start = data.find(b"\xff\xc0")
        if start < 0:
            start = data.find(b"\xff\xc2")
        data[start + 5 : start + 9] = struct.pack(">HH", min(height, 65535), min(width, 65535))
    else:  # webp VP8X-style: fall back to a random mutation of the size bytes
        data[24:30] = b"\xff" * 6
    return bytes(data)


def fuzz_inputs(seed: int, count: int):
    """`count` (kind, bytes) pairs, mostly broken images."""
    rng = np.random.default_rng(seed)
    kinds = ("valid", "truncated", "flipped", "magic+random", "random", "empty", "huge", "lying")
    for i in range(count):
        kind = kinds[i % len(kinds)]
        fmt = FORMATS[rng.integers(len(FORMATS))]
        height, width = (int(s) for s in rng.integers(1, 48, 2))
        if kind == "empty":
            yield kind, b""
            continue
        if kind == "random":
            yield kind, rng.bytes(int(rng.integers(1, 300)))
            continue
        valid = encode(rng, fmt, height, width)
        if kind == "valid":
            yield kind, valid
        elif kind == "truncated":
            yield kind, valid[: int(rng.integers(0, len(valid)))]
        elif kind == "flipped":
            data = bytearray(valid)
            for _ in range(int(rng.integers(1, 8))):
                data[int(rng.integers(len(data)))] = int(rng.integers(256))
            yield kind, bytes(data)
        elif kind == "magic+random":
            yield kind, valid[: int(rng.integers(2, 16))] + rng.bytes(int(rng.integers(0, 200)))
        elif kind == "huge":
            side = int(rng.choice([2**14, 2**16 - 1, 2**20, 2**31 - 1]))
            yield kind, huge_header(valid, fmt, side, side)
        else:  # a header that lies: small enough to pass the size check, but not the data's size
            yield kind, huge_header(valid, fmt, 300, 300)


@pytest.fixture(scope="module")
def exported(exported_classifier):
    shared = exported_classifier
    assert (shared.name, shared.max_image_pixels, shared.top_k) == (MODEL_NAME, MAX_PIXELS, TOP_K)
    assert len(shared.labels) == NUM_CLASSES
    return shared.base, shared.path


@pytest.fixture(scope="module")
def serve_bytes(exported):
    return tf.saved_model.load(str(exported[1])).signatures["serve_bytes"]


def _check_outputs(outputs, n: int) -> None:
    probabilities = outputs["probabilities"].numpy()
    assert probabilities.shape == (n, NUM_CLASSES)
    assert np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities.sum(axis=-1), 1.0, rtol=1e-4)
    assert outputs["class_ids"].numpy().shape == (n,)
    assert outputs["top_k_classes"].numpy().shape == (n, TOP_K)


def test_fuzzed_bytes_give_outputs_or_invalid_argument(serve_bytes):
    counts: dict[tuple[str, str], int] = {}
    for kind, data in fuzz_inputs(seed=0, count=FUZZ_INPUTS):
        try:
            outputs = serve_bytes(image_bytes=tf.constant([data], tf.string))
        except tf.errors.InvalidArgumentError:
            result = "refused"
        else:
            _check_outputs(outputs, 1)
            result = "served"
        counts[kind, result] = counts.get((kind, result), 0) + 1
    assert sum(counts.values()) == FUZZ_INPUTS
    # Every valid image is served; nothing empty, random, cut short or oversized gets through.
    # (A header that lies about a small size may still decode: the decoded size is checked too.)
    assert counts.get(("valid", "refused"), 0) == 0
    for kind in ("empty", "random", "truncated", "huge"):
        assert counts.get((kind, "served"), 0) == 0, (kind, counts)


def test_batches_empty_and_mixed(serve_bytes):
    _check_outputs(serve_bytes(image_bytes=tf.constant([], tf.string)), 0)
    rng = np.random.default_rng(1)
    valid = [encode(rng, fmt, 20, 30) for fmt in FORMATS]
    _check_outputs(serve_bytes(image_bytes=tf.constant(valid, tf.string)), len(valid))
    broken = [data for kind, data in fuzz_inputs(seed=2, count=80) if kind != "valid"]
    for start in range(0, len(broken), 10):
        batch = valid[:2] + broken[start : start + 10]
        with pytest.raises(tf.errors.InvalidArgumentError):
            serve_bytes(image_bytes=tf.constant(batch, tf.string))


def test_decoded_size_cap_message(serve_bytes):
    rng = np.random.default_rng(3)
    big = encode(rng, "png", 600, 600)  # 360,000 pixels > MAX_PIXELS, small file
    with pytest.raises(tf.errors.InvalidArgumentError, match=f"decoded-size limit of {MAX_PIXELS}"):
        serve_bytes(image_bytes=tf.constant([big], tf.string))


# --- the local server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(exported):
    with serving.serve(exported[0], port=0, block=False) as running:
        yield running


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _bad_requests(rng: np.random.Generator):
    """(description, raw body) pairs that a predict endpoint must answer with 400."""
    yield "not json", b"{not json"
    yield "not utf-8", b"\xff\xfe\x00garbage"
    yield "empty body", b""
    yield "json list", b"[1, 2, 3]"
    yield "no instances", json.dumps({"signature_name": "serve_bytes"}).encode()
    yield "unknown signature", json.dumps({"signature_name": "nope", "instances": [1]}).encode()
    yield "empty instances", json.dumps({"instances": []}).encode()
    yield "strings as pixels", json.dumps({"instances": ["abc"]}).encode()
    yield (
        "bad b64",
        json.dumps({"signature_name": "serve_bytes", "instances": [{"b64": "%%"}]}).encode(),
    )
    yield "number as bytes", json.dumps({"signature_name": "serve_bytes", "inputs": [3]}).encode()
    yield "ragged pixels", json.dumps({"instances": [[[1, 2, 3]], [[1, 2]]]}).encode()
    yield (
        "infinite pixel (served, as TF Serving does)",
        json.dumps({"inputs": [[[[1e400]]]]}).encode(),
    )
    yield (
        "ragged bytes",
        json.dumps({"signature_name": "serve_bytes", "inputs": [["a"], "b"]}).encode(),
    )
    yield "nested junk", json.dumps({"inputs": {"images": {"x": 1}}}).encode()
    yield "one pixel image", json.dumps({"inputs": [[[[1.0, 2.0]]]]}).encode()
    for _ in range(20):
        yield "random json-ish", rng.bytes(int(rng.integers(1, 64)))
    for kind, data in fuzz_inputs(seed=4, count=160):
        if kind == "valid":
            continue
        body = serving.Client("http://x", MODEL_NAME).build_predict_request(
            inputs={"image_bytes": [data]}, signature_name="serve_bytes"
        )
        yield f"fuzzed {kind}", json.dumps(body).encode()


def test_server_answers_bad_requests_with_400_and_stays_up(server):
    url = f"{server.url}/v1/models/{MODEL_NAME}:predict"
    statuses: dict[int, int] = {}
    for description, body in _bad_requests(np.random.default_rng(5)):
        status, answer = _post(url, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status in (200, 400), (description, status, answer)
        if status == 400:
            assert answer["error"], description
        else:  # only a mutated image that still decodes may be served
            assert description.startswith(("fuzzed flipped", "fuzzed lying", "infinite")), (
                description
            )
    assert statuses.get(400, 0) >= 100
    client = serving.Client(server.url, MODEL_NAME)
    valid = encode(np.random.default_rng(6), "jpeg", 32, 32)
    assert len(client.predict_bytes([valid])["probabilities"]) == 1


def test_concurrent_requests_match_sequential(server):
    client = serving.Client(server.url, MODEL_NAME)
    rng = np.random.default_rng(7)
    images = [encode(rng, FORMATS[i % len(FORMATS)], 24 + i % 9, 30) for i in range(50)]
    expected = [client.predict_bytes([image])["probabilities"] for image in images]
    results: dict[tuple[int, int], object] = {}
    errors: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            for i, image in enumerate(images):
                results[thread, i] = client.predict_bytes([image])["probabilities"]
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors[:3]
    assert len(results) == 8 * 50
    for (_, i), probabilities in results.items():
        np.testing.assert_allclose(probabilities, expected[i], rtol=1e-6, atol=1e-7)
