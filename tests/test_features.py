"""kt.features: activations at named points, in inference mode, labels kept in line."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt


def test_extract_at_named_points_matches_the_model(tiny_model, images):
    x, y = images
    pooled = kt.features.extract(tiny_model, x, batch_size=7)  # a partial last batch
    assert pooled.shape == (len(x), tiny_model.get_layer("pooling").output.shape[-1])
    logits = kt.features.extract(tiny_model, x, at="logits")
    np.testing.assert_allclose(
        keras.ops.softmax(logits).numpy(), tiny_model.predict(x, verbose=0), atol=1e-5
    )
    kernel, bias = tiny_model.get_layer("logits").get_weights()
    np.testing.assert_allclose(pooled @ kernel + bias, logits, atol=1e-4)
    block, labels = kt.features.extract(tiny_model, (x, y), at="block_15_add")
    assert block.shape[0] == len(x) and block.ndim == 4
    np.testing.assert_array_equal(labels, y)
    feature_map = kt.features.extract(tiny_model, x, at="backbone")
    np.testing.assert_allclose(feature_map.mean(axis=(1, 2)), pooled, atol=1e-5)


def test_a_reshuffling_dataset_keeps_labels_in_line(tiny_model, images):
    x, y = images
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(24, seed=1).batch(5)
    feats, labels = kt.features.extract(tiny_model, ds)
    reference = kt.features.extract(tiny_model, x)
    # Each row equals the reference row of an image of the same label.
    for row, label in zip(feats, labels, strict=True):
        distances = np.abs(reference - row).max(axis=1)
        assert y[int(np.argmin(distances))] == label and distances.min() < 1e-5


def test_unknown_points_and_bad_input_are_refused(tiny_model, images):
    x, _ = images
    with pytest.raises(ValueError, match="Did you mean 'block_15_add'"):
        kt.features.extract(tiny_model, x, at="block_15_ad")
    with pytest.raises(ValueError, match=r"shape \(32, 32, 3\)"):
        kt.features.extract(tiny_model, x[0])
    with pytest.raises(ValueError, match="batch_size=0"):
        kt.features.extract(tiny_model, x, batch_size=0)
    with pytest.raises(ValueError, match="3 images, 2 labels"):
        kt.features.extract(tiny_model, (x[:3], np.zeros(2)))


def test_a_model_whose_head_the_library_cannot_read_trains_with_a_given_loss(images):
    x, y = images
    built = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    own = keras.Model(built.inputs, built.get_layer("logits").output)  # no "predictions"
    before = own.get_layer("logits").get_weights()[0].copy()
    history = kt.fit_phases(
        own,
        [kt.Phase("head", 1)],
        (x, y),
        batch_size=8,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        verbose=0,
    )
    assert history.cached == {"head": "pooling"}
    assert not np.array_equal(before, own.get_layer("logits").get_weights()[0])
