"""Test helpers shared across test modules (import as `from helpers import ...`)."""

import keras
import numpy as np


def run_serialization_test(layer: keras.layers.Layer, input_shape, tmp_path) -> None:
    """A layer's config round-trips and a model holding it reloads, under safe_mode, unchanged.

    Checks `get_config` -> `from_config` gives an equal config and equal outputs, and that a
    Functional model around the layer saves to `.keras` and reloads with no custom_objects.
    """
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    x = np.random.default_rng(0).uniform(0, 255, (2, *input_shape)).astype("float32")
    np.testing.assert_allclose(np.asarray(clone(x)), np.asarray(layer(x)), atol=1e-6)
    inputs = keras.Input(input_shape)
    model = keras.Model(inputs, layer(inputs))
    path = tmp_path / f"{layer.name}.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert type(reloaded.layers[-1]) is type(layer)
    assert reloaded.layers[-1].get_config() == config
