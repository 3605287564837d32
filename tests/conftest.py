"""Shared fixtures: tiny random backbones, small images, no network."""

import os
from dataclasses import dataclass
from pathlib import Path

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


# --- export and serving -----------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    """One export shared by the export, serving and reliability tests: read it, never write to it.

    `model` is a tiny uncompiled classifier (classes `labels`); `path` is `base / "1"`, written by
    `kt.export_for_serving(model, base, labels=labels, top_k=top_k,
    max_image_pixels=max_image_pixels)` with warm-up requests and the `.keras` copy.
    """

    model: keras.Model
    base: Path
    path: Path
    labels: tuple[str, ...]
    top_k: int
    max_image_pixels: int

    @property
    def name(self) -> str:
        """The TF Serving model name."""
        return self.base.name


@pytest.fixture(scope="session")
def tiny_classifier():
    """A tiny uncompiled 3-class classifier (32 px), built once per session. Do not train it."""
    keras.utils.set_random_seed(0)
    return kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)


@pytest.fixture(scope="session")
def exported_classifier(tiny_classifier, tmp_path_factory) -> Exported:
    """`tiny_classifier` exported once per session as version 1 of model "pets"."""
    labels, top_k, max_pixels = ("cat", "dog", "fox"), 2, 100_000
    base = tmp_path_factory.mktemp("exported") / "pets"
    path = kt.export_for_serving(
        tiny_classifier, base, labels=labels, top_k=top_k, max_image_pixels=max_pixels
    )
    return Exported(tiny_classifier, base, path, labels, top_k, max_pixels)
