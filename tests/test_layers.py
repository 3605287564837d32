"""Every layer keras_transfer registers round-trips through its config and a `.keras` file."""

import importlib
import pkgutil

import keras
import pytest
from helpers import run_serialization_test

import keras_transfer as kt

# One example per registered layer: how to build it, and an input shape. A new registered layer
# without an entry here fails `test_every_registered_layer_has_an_example`.
EXAMPLES = {
    "keras_transfer>BackbonePreprocessing": (
        lambda: kt.layers.BackbonePreprocessing("torch", name="pre"),
        (4, 4, 3),
    ),
    "keras_transfer>GradientReversal": (
        lambda: kt.adaptation.GradientReversal(scale=0.5, name="reverse"),
        (6,),
    ),
}


def _registered_layers() -> set[str]:
    for module in pkgutil.walk_packages(kt.__path__, "keras_transfer."):
        if module.name.split(".")[-1] not in ("cli", "__main__") and "_clean" not in module.name:
            importlib.import_module(module.name)
    return {
        name
        for name, obj in keras.saving.get_custom_objects().items()
        if name.startswith("keras_transfer>")
        and isinstance(obj, type)
        and issubclass(obj, keras.layers.Layer)
        and not issubclass(obj, keras.Model)
    }


def test_every_registered_layer_has_an_example():
    assert _registered_layers() <= set(EXAMPLES), sorted(_registered_layers() - set(EXAMPLES))


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_registered_layer_round_trips(name, tmp_path):
    make, input_shape = EXAMPLES[name]
    run_serialization_test(make(), input_shape, tmp_path)
