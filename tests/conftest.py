"""Shared fixtures: tiny random backbones, small images, no network."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_transfer as kt  # noqa: E402


def weights_of(layer) -> list[np.ndarray]:
    return [np.array(w) for w in layer.weights]


def same_weights(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(autouse=True)
def _fresh_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield


@pytest.fixture
def tiny_model():
    return kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)


@pytest.fixture
def images():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (24, 32, 32, 3)).astype("float32")
    y = np.arange(24) % 3
    # Make the classes learnable: shift the mean brightness by class.
    x = np.clip(x * 0.5 + y[:, None, None, None] * 60.0, 0, 255).astype("float32")
    return x, y
