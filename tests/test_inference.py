"""Tests for `kt.inference.predict_files`: one image path for the CLI, the library and serving."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn.datasets import load_sample_image

import keras_transfer as kt
from keras_transfer import cli, inference, runs

NAMES = ["temple", "sky", "tree"]
PHOTO_SIZE = (61, 45)  # PIL's (width, height): neither is the models' 32 px
PHOTOS = [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"), ("L", "PNG")]
ATOL = 1e-5


def tiny_cnn(channels: int) -> keras.Model:
    """A small classifier whose outputs move with its input pixels.

    A random-init `kt.build_classifier` backbone at 32 px outputs near-constant features, so two
    decoding paths would agree however different they are; this model tells them apart. It keeps
    the model contract (`images` input, `logits` Dense, `predictions` softmax).
    """
    keras.utils.set_random_seed(channels)
    inputs = keras.Input((32, 32, channels), name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten(name="pooling")(x)
    init = keras.initializers.RandomNormal(stddev=0.05, seed=channels)
    logits = keras.layers.Dense(len(NAMES), name="logits", kernel_initializer=init)(x)
    outputs = keras.layers.Activation("softmax", name="predictions")(logits)
    return keras.Model(inputs, outputs, name=f"tiny_cnn_{channels}")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """china.jpg at 61x45 px, colour and greyscale, as JPEG and PNG files."""
    root = tmp_path_factory.mktemp("photos")
    image = Image.fromarray(load_sample_image("china.jpg")).resize(PHOTO_SIZE)
    paths = []
    for mode, fmt in PHOTOS:
        path = root / f"china_{mode}.{fmt.lower()}"
        image.convert(mode).save(path, fmt)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module", params=[3, 1], ids=["rgb_model", "greyscale_model"])
def exported(request, tmp_path_factory):
    """One model, its run folder and its exported `serve_bytes` signature, shared by the cases."""
    channels = request.param
    model = tiny_cnn(channels)
    root = tmp_path_factory.mktemp(f"model_{channels}")
    folder = runs.save_run(root / "run", model, class_names=NAMES)
    version = kt.export_for_serving(
        model, root / "export", labels=NAMES, warmup=False, save_keras=False
    )
    serve_bytes = tf.saved_model.load(str(version)).signatures["serve_bytes"]
    return model, folder, serve_bytes


def _served(serve_bytes, paths):
    data = tf.constant([open(path, "rb").read() for path in paths])
    return serve_bytes(image_bytes=data)["probabilities"].numpy()


def test_cli_library_and_serve_bytes_give_the_same_probabilities(
    exported, photos, capsys, tmp_path
):
    model, folder, serve_bytes = exported
    served = _served(serve_bytes, photos)
    # The model must see the JPEG artefacts (a JPEG and a PNG of the same photo), or the
    # agreement below, within 1e-5, would prove nothing about decoding.
    assert np.abs(served[0] - served[1]).max() > 10 * ATOL

    results = inference.predict_files(model, photos, class_names=NAMES, top_k=len(NAMES))
    library = np.array([r["probabilities"] for r in results])

    assert cli.main(["predict", str(folder), *photos, "--top-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == photos
    by_label = [{r["label"]: r["probability"] for r in line["top_k"]} for line in lines]
    from_cli = np.array([[ranked[name] for name in NAMES] for ranked in by_label])

    for i, (mode, fmt) in enumerate(PHOTOS):
        case = f"{mode} {fmt} photo, {model.inputs[0].shape[-1]}-channel model"
        np.testing.assert_allclose(library[i], served[i], rtol=0, atol=ATOL, err_msg=case)
        np.testing.assert_allclose(from_cli[i], served[i], rtol=0, atol=ATOL, err_msg=case)
        ranked = results[i]["top_k"]
        assert [r["label"] for r in ranked] == [NAMES[j] for j in np.argsort(-served[i])], case
        assert [r["probability"] for r in ranked] == sorted(results[i]["probabilities"])[::-1]


def test_the_old_predict_decoding_differs_for_a_greyscale_model(photos, tmp_path):
    """What `keras-transfer predict` did before: decode to the model's channels, then resize.

    For a 1-channel model and a colour photo that is not what `serve_bytes` does (decode RGB,
    resize, then take the luma), and the probabilities differ by far more than the tolerance
    the test above holds the three paths to.
    """
    model = tiny_cnn(1)
    version = kt.export_for_serving(
        model, tmp_path / "export", labels=NAMES, warmup=False, save_keras=False
    )
    served = _served(tf.saved_model.load(str(version)).signatures["serve_bytes"], photos[:2])
    old = []
    for path in photos[:2]:  # the colour JPEG and PNG
        image = tf.io.decode_image(tf.io.read_file(path), channels=1, expand_animations=False)
        old.append(tf.image.resize(tf.cast(image, tf.float32), (32, 32)))
    old = model.predict(tf.stack(old), verbose=0)
    assert np.abs(old - served).max() > 10 * ATOL


def test_predict_files_ranks_with_the_model_class_names_and_caps_top_k(photos):
    model = tiny_cnn(3)
    model.class_names = tuple(NAMES)  # as kt.runs.load_run sets it
    [result] = inference.predict_files(model, photos[:1], top_k=10)
    assert result["image"] == photos[0]
    assert len(result["probabilities"]) == 3
    assert sum(result["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    assert sorted(r["label"] for r in result["top_k"]) == sorted(NAMES)
    [result] = inference.predict_files(model, photos[:1], class_names=["x", "y", "z"], top_k=1)
    assert len(result["top_k"]) == 1 and result["top_k"][0]["label"] in "xyz"


def test_predict_files_batches_give_the_same_results(photos):
    model = tiny_cnn(3)
    one_call = inference.predict_files(model, photos)
    batched = inference.predict_files(model, photos, batch_size=3)
    np.testing.assert_allclose(
        [r["probabilities"] for r in batched], [r["probabilities"] for r in one_call], atol=1e-6
    )


def test_predict_files_names_the_file_it_cannot_decode(photos, tmp_path):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    with pytest.raises(ValueError, match=r"'.*notes\.png' is not an image TensorFlow can decode"):
        inference.predict_files(tiny_cnn(3), [photos[0], str(bogus), photos[1]])


def test_predict_files_refuses_images_over_max_image_pixels(photos):
    with pytest.raises(ValueError, match=r"china_RGB\.jpeg' is too large to decode"):
        inference.predict_files(tiny_cnn(3), photos[:1], max_image_pixels=32 * 32)


@pytest.mark.parametrize(
    "paths, kwargs, error, message",
    [
        (["/no/such.jpg"], {}, FileNotFoundError, "Image '/no/such.jpg' does not exist"),
        ("cat.jpg", {}, TypeError, "`paths` must be a list of image file paths"),
        ([], {}, ValueError, "`paths` is empty"),
        (None, {"top_k": 0}, ValueError, "`top_k` must be a positive int. Received: top_k=0"),
        (None, {"class_names": ["a"]}, ValueError, "one name per output of the model (3)"),
        (None, {"batch_size": 0}, ValueError, "`batch_size` must be a positive int"),
    ],
)
def test_predict_files_checks_its_arguments(photos, paths, kwargs, error, message):
    with pytest.raises(error) as info:
        inference.predict_files(tiny_cnn(3), photos[:1] if paths is None else paths, **kwargs)
    assert message in str(info.value)


def test_predict_files_refuses_what_is_not_a_model(photos):
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        inference.predict_files("model.keras", photos[:1])
