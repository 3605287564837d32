import keras
import numpy as np
import pytest
from keras.applications import (
    convnext,
    densenet,
    efficientnet,
    efficientnet_v2,
    inception_resnet_v2,
    inception_v3,
    mobilenet,
    mobilenet_v2,
    mobilenet_v3,
    nasnet,
    resnet,
    resnet_v2,
    vgg16,
    vgg19,
    xception,
)

import keras_transfer as kt
from keras_transfer.backbones import REGISTRY, single_tensor_cuts

# The keras.applications module whose own `preprocess_input` each family uses.
PREPROCESS_MODULE = {
    "MobileNet": None,  # resolved per name below
    "EfficientNet": efficientnet,
    "EfficientNetV2": efficientnet_v2,
    "ResNet": resnet,
    "ResNetV2": resnet_v2,
    "DenseNet": densenet,
    "ConvNeXt": convnext,
    "Xception": xception,
    "NASNet": nasnet,
}
BY_NAME = {
    "mobilenet": mobilenet,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v3_small": mobilenet_v3,
    "mobilenet_v3_large": mobilenet_v3,
    "inception_v3": inception_v3,
    "inception_resnet_v2": inception_resnet_v2,
    "vgg16": vgg16,
    "vgg19": vgg19,
}

ISSUE_LIST = [
    "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large",
    *[f"EfficientNetB{i}" for i in range(8)],
    *[f"EfficientNetV2{v}" for v in ("B0", "B1", "B2", "B3", "S", "M", "L")],
    "ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2", "ResNet152V2",
    "DenseNet121", "DenseNet169", "DenseNet201",
    *[f"ConvNeXt{s}" for s in ("Tiny", "Small", "Base", "Large", "XLarge")],
    "Xception", "InceptionV3", "InceptionResNetV2", "NASNetMobile", "NASNetLarge",
    "VGG16", "VGG19",
]  # fmt: skip


def test_every_keras_application_is_registered():
    assert len(REGISTRY) == len(ISSUE_LIST) == 40
    for app in ISSUE_LIST:
        assert kt.get_backbone(app).constructor is getattr(keras.applications, app)


def test_names_accept_both_spellings():
    assert kt.get_backbone("resnet_50").name == "resnet50"
    assert kt.get_backbone("EfficientNetV2B0").name == "efficientnet_v2_b0"


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="Did you mean 'resnet50'"):
        kt.get_backbone("resnt50")
    with pytest.raises(ValueError, match="efficientnet_b0"):
        kt.get_backbone("efficentnet_b0")
    with pytest.raises(TypeError, match="backbone=3"):
        kt.get_backbone(3)


def test_list_backbones_by_family():
    assert kt.list_backbones("vgg") == ["vgg16", "vgg19"]
    with pytest.raises(ValueError, match="family='nope'"):
        kt.list_backbones("nope")


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_preprocessing_matches_keras_applications(name):
    spec = REGISTRY[name]
    module = BY_NAME.get(name) or PREPROCESS_MODULE[spec.family]
    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = module.preprocess_input(x.copy())
    got = kt.BackbonePreprocessing(spec.preprocessing)(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_backbone_builds_at_minimum_size_and_splits_at_its_unfreeze_points(name):
    spec = REGISTRY[name]
    model = kt.build_classifier(name, 2, image_size=spec.min_size, weights=None, dropout=0.0)
    x = np.random.default_rng(0).uniform(0, 255, (1, spec.min_size, spec.min_size, 3))
    out = np.asarray(model(x.astype("float32")))
    assert out.shape == (1, 2) and np.isfinite(out).all()
    np.testing.assert_allclose(out.sum(), 1.0, atol=1e-5)

    backbone = kt.find_backbone(model)
    points = kt.unfreeze_points(backbone)
    assert points, f"{name} has no unfreeze point"
    cuts = set(single_tensor_cuts(backbone))
    assert set(points) <= cuts
    ops = [op.name for op in backbone.operations]
    positions = [ops.index(p) for p in points]
    assert positions == sorted(positions, reverse=True), "points must be listed from the top"


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50", "efficientnet_b0", "convnext_tiny"])
def test_a_backbone_split_at_an_unfreeze_point_computes_the_same_features(name):
    base = kt.get_backbone(name).build(32)
    cut = kt.unfreeze_points(base)[1]
    op = next(op for op in base.operations if op.name == cut)
    bottom = keras.Model(base.inputs, op.output)
    top = keras.Model(op.output, base.outputs)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(top(bottom(x))), np.asarray(base(x)), rtol=1e-5, atol=1e-5
    )


def test_single_tensor_cuts_see_raw_operations():
    inputs = keras.Input((4,))
    a = keras.layers.Dense(4, name="a")(inputs)
    b = keras.layers.Dense(4, name="b")(a)
    c = a + b  # a raw op, not a layer: `a` stays live across `b`
    d = keras.layers.Dense(2, name="d")(c)
    model = keras.Model(inputs, d)
    cuts = single_tensor_cuts(model)
    assert "a" in cuts and "b" not in cuts
