import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer.builders import INPUT_NAME, OUTPUT_NAME


def test_classifier_graph_is_functional_with_preprocessing_inside(tiny_model):
    model = tiny_model
    assert type(model).__name__ == "Functional"  # plain Functional model, no subclass
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 3)
    assert model.inputs[0].name == INPUT_NAME
    names = [layer.name for layer in model.layers]
    assert names == [
        INPUT_NAME,
        "preprocessing",
        "mobilenet_v2",
        "pooling",
        "head_dropout",
        "logits",
        OUTPUT_NAME,
    ]
    assert model.get_layer("preprocessing").mode == "tf"
    x = np.full((1, 32, 32, 3), 255.0, "float32")
    probe = keras.Model(model.input, model.get_layer("preprocessing").output)
    np.testing.assert_allclose(np.asarray(probe(x)), 1.0)  # [0, 255] -> [-1, 1] for MobileNetV2


def test_backbone_runs_in_inference_mode(tiny_model):
    """BatchNorm statistics must not move even in training mode (Keras 3 overrides the nested
    `training=False`, so the builders freeze BatchNorm)."""
    backbone = kt.find_backbone(tiny_model)
    bn = next(
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    )
    before = np.array(bn.moving_mean)
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    tiny_model(x, training=True)
    np.testing.assert_array_equal(np.array(bn.moving_mean), before)
    tiny_model.compile("adam", "sparse_categorical_crossentropy")
    tiny_model.fit(x, np.arange(4) % 3, verbose=0)
    np.testing.assert_array_equal(np.array(bn.moving_mean), before)
    assert not any(
        "batch_normalization" in v.path or "_BN/" in v.path or "_bn/" in v.path
        for v in tiny_model.trainable_weights
    )


def test_keras_round_trip_gives_identical_predictions(tmp_path, images):
    model = kt.build_classifier(
        "resnet50", 3, image_size=32, weights=None, hidden_units=(8,), augmentation="default"
    )
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    x = images[0][:4]
    np.testing.assert_allclose(
        model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-6, atol=1e-6
    )
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]


def test_greyscale_is_replicated_to_rgb_inside_the_graph():
    model = kt.build_classifier(
        "mobilenet_v2", 2, image_size=32, weights=None, channels=1, alpha=0.35
    )
    assert model.input_shape == (None, 32, 32, 1)
    grey = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 1)).astype("float32")
    rgb = np.repeat(grey, 3, axis=-1)
    rgb_model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    rgb_model.set_weights(model.get_weights())
    np.testing.assert_allclose(model(grey), rgb_model(rgb), rtol=1e-5, atol=1e-6)


def test_augmentation_is_active_only_in_training():
    model = kt.build_classifier(
        "mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35, dropout=0.0,
        augmentation=[keras.layers.RandomFlip("horizontal_and_vertical", seed=1)],
    )  # fmt: skip
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x), model(x))  # inference: deterministic, no flip
    aug = keras.Model(model.input, model.get_layer("augmentation").output)
    np.testing.assert_array_equal(np.asarray(aug(x, training=False)), x)
    assert not np.array_equal(np.asarray(aug(x, training=True)), x)


def test_multi_label_and_regressor_heads():
    multi = kt.build_classifier(
        "mobilenet_v2", 4, image_size=32, weights=None, alpha=0.35, multi_label=True
    )
    assert multi.get_layer(OUTPUT_NAME).activation.__name__ == "sigmoid"
    reg = kt.build_regressor("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    assert reg.output_shape == (None, 2)
    assert reg.get_layer(OUTPUT_NAME).activation.__name__ == "linear"
    assert reg.get_layer(OUTPUT_NAME).dtype_policy.name == "float32"


def test_weights_file_loads_and_a_wrong_architecture_is_refused(tmp_path):
    base = kt.get_backbone("mobilenet_v2").build(32, alpha=0.35)
    path = tmp_path / "base.weights.h5"
    base.save_weights(path)
    model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=path, alpha=0.35)
    for a, b in zip(kt.find_backbone(model).weights, base.weights, strict=True):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    with pytest.raises(ValueError, match="does not fit mobilenet_v2"):
        kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=path, alpha=1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backbone="mobilenet_v2", num_classes=1), "num_classes=1"),
        (dict(backbone="mobilenet_v2", num_classes=3, image_size=16), "minimum of 32"),
        (dict(backbone="xception", num_classes=3, image_size=64), "minimum of 71"),
        (dict(backbone="mobilenet_v2", num_classes=3, channels=4), "channels=4"),
        (dict(backbone="mobilenet_v2", num_classes=3, pooling="mean"), "pooling='mean'"),
        (dict(backbone="mobilenet_v2", num_classes=3, weights="/no/such.h5"), "not a file"),
        (dict(backbone="mobilenet_v2", num_classes=3, include_top=True), "include_top=True"),
        (dict(backbone="mobilenet_v2", num_classes=3, dropout=1.5), "dropout=1.5"),
        (dict(backbone="mobilenet_v22", num_classes=3), "Did you mean 'mobilenet_v2'"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, match):
    kwargs.setdefault("weights", None)
    with pytest.raises(ValueError, match=match):
        kt.build_classifier(**kwargs)


def test_backbone_dropout_is_inert_in_training_mode():
    """Keras 3 overrides the nested `training=False`: stochastic depth must not fire anyway."""
    model = kt.build_classifier("efficientnet_b0", 2, image_size=32, weights=None, dropout=0.0)
    dropouts = [
        layer for layer in kt.find_backbone(model).layers if isinstance(layer, keras.layers.Dropout)
    ]
    assert dropouts and all(layer.rate == 0.0 for layer in dropouts)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(model(x, training=True), model(x, training=False), rtol=1e-5)


def test_small_cnn_follows_the_model_contract(tmp_path):
    model = kt.build_small_cnn(4, image_size=16, channels=1, widths=(8, 16))
    assert model.inputs[0].name == INPUT_NAME and model.input_shape == (None, 16, 16, 1)
    names = [layer.name for layer in model.layers]
    assert names == [
        INPUT_NAME,
        "augmentation",
        "rescaling",
        "conv_0",
        "bn_0",
        "relu_0",
        "max_pool_0",
        "conv_1",
        "bn_1",
        "relu_1",
        "pooling",
        "head_dropout",
        "logits",
        OUTPUT_NAME,
    ]
    head = kt.head_of(model)
    assert (head.kind, head.num_outputs, head.logits_layer) == ("multiclass", 4, "logits")
    assert model.get_layer("logits").dtype_policy.name == "float32"
    x = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 1)).astype("float32")
    # `training=False` as predict passes it: a bare call leaves Keras' random layers in training.
    probabilities = model(x, training=False)
    logits = kt.logits_model(model)(x, training=False)
    np.testing.assert_allclose(probabilities, keras.ops.softmax(logits), rtol=1e-5, atol=1e-6)
    path = tmp_path / "small_cnn.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    np.testing.assert_allclose(loaded(x, training=False), probabilities, rtol=1e-6, atol=1e-6)


def test_small_cnn_trains_with_batchnorm_in_training_mode(images):
    """Nothing is frozen: the convolutions and the BatchNorm statistics move, the loss falls."""
    x, y = images
    model = kt.build_small_cnn(3, image_size=32, channels=3, widths=(8, 16), augmentation=None)
    bn = model.get_layer("bn_0")
    kernel, moving_mean = np.array(model.get_layer("conv_0").kernel), np.array(bn.moving_mean)
    assert len(model.trainable_weights) == len(model.weights) - 4  # all but moving mean/var
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy")
    history = model.fit(x, y, batch_size=8, epochs=5, verbose=0)
    assert not np.allclose(np.array(model.get_layer("conv_0").kernel), kernel)
    assert not np.allclose(np.array(bn.moving_mean), moving_mean)
    assert history.history["loss"][-1] < history.history["loss"][0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), "num_classes=1"),
        (dict(widths=()), r"widths=\(\)"),
        (dict(widths=(8, -4)), r"widths=\(8, -4\)"),
        (dict(image_size=2), "at least 4 px"),
        (dict(channels=2), "channels=2"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_small_cnn_bad_arguments_raise_clear_errors(kwargs, match):
    kwargs = {"num_classes": 3, "image_size": 28, **kwargs}
    with pytest.raises(ValueError, match=match):
        kt.build_small_cnn(**kwargs)
