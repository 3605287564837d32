"""The model contract: `head_of`, `logits_model`, loss defaults, and models saved before logits."""

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer import heads

LEGACY = Path(__file__).parent / "fixtures" / "legacy_classifier.keras"


def _tiny(kind, **kwargs):
    args = {"image_size": 32, "weights": None, "alpha": 0.35, **kwargs}
    if kind == "multiclass":
        return kt.build_classifier("mobilenet_v2", 3, **args)
    if kind == "multilabel":
        return kt.build_classifier("mobilenet_v2", 4, multi_label=True, **args)
    return kt.build_regressor("mobilenet_v2", 2, **args)


def _pixels(n=4, size=32, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype("float32")


def _vector_model(activation, *, fused=False):
    """A small model with a signal-carrying feature layer: new-style head, or a fused one."""
    inputs = keras.Input((6,), name="images")
    x = keras.layers.Dense(5, activation="tanh", name="pooling")(inputs)
    if fused:
        return keras.Model(inputs, keras.layers.Dense(3, activation, name="predictions")(x))
    x = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, keras.layers.Activation(activation, name="predictions")(x))


ACTIVATE = {
    "softmax": lambda z: keras.ops.softmax(z),
    "sigmoid": lambda z: keras.ops.sigmoid(z),
    "linear": lambda z: z,
}


@pytest.mark.parametrize(
    "kind, outputs, activation",
    [("multiclass", 3, "softmax"), ("multilabel", 4, "sigmoid"), ("regression", 2, "linear")],
)
def test_builders_emit_a_float32_logits_dense_then_the_activation(kind, outputs, activation):
    model = _tiny(kind)
    head = kt.head_of(model)
    assert head == kt.HeadSpec(kind, outputs, "logits", "predictions", None)
    assert head.activation == activation and not head.is_legacy
    logits, predictions = model.get_layer("logits"), model.get_layer("predictions")
    assert isinstance(logits, keras.layers.Dense) and logits.activation.__name__ == "linear"
    assert isinstance(predictions, keras.layers.Activation)
    assert model.layers[-2:] == [logits, predictions]
    assert logits.dtype_policy.name == predictions.dtype_policy.name == "float32"


def test_mixed_precision_keeps_logits_and_outputs_float32():
    model = _tiny("multiclass", dtype="mixed_float16")
    assert model.get_layer("pooling").compute_dtype == "float16"
    assert model.get_layer("logits").compute_dtype == "float32"
    assert model.output.dtype == "float32"
    assert kt.logits_model(model).output.dtype == "float32"


@pytest.mark.parametrize("kind", ["multiclass", "multilabel", "regression"])
def test_logits_model_outputs_the_pre_activation_of_a_built_model(kind):
    model = _tiny(kind)
    bias = model.get_layer("logits").bias
    bias.assign(np.random.default_rng(1).normal(0, 2, bias.shape))
    x = _pixels()
    logits = kt.logits_model(model)(x)
    expected_logits = keras.Model(model.input, model.get_layer("logits").output)(x)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-6)
    probabilities = ACTIVATE[kt.head_of(model).activation](logits)
    np.testing.assert_allclose(probabilities, model(x), atol=1e-6)
    if kind != "regression":
        assert not np.allclose(logits, model(x), atol=1e-3)


@pytest.mark.parametrize("fused", [False, True])
def test_logits_model_shares_weights_with_the_model(fused):
    model = _vector_model("softmax", fused=fused)
    logits_model = kt.logits_model(model)
    layer = model.get_layer("predictions" if fused else "logits")
    assert any(w is layer.kernel for w in logits_model.trainable_weights)
    x = np.random.default_rng(0).normal(size=(8, 6)).astype("float32")
    before = np.array(logits_model(x))
    layer.kernel.assign(layer.kernel + 0.5)
    after = np.array(logits_model(x))
    assert not np.allclose(before, after, atol=1e-3)
    np.testing.assert_allclose(keras.ops.softmax(after), model(x), atol=1e-6)
    features = np.array(keras.Model(model.input, model.get_layer("pooling").output)(x))
    np.testing.assert_allclose(after, features @ np.array(layer.kernel) + layer.bias, atol=1e-5)


@pytest.mark.parametrize(
    "activation, kind", [("softmax", "multiclass"), ("sigmoid", "multilabel"), (None, "regression")]
)
def test_head_of_reads_a_fused_legacy_dense(activation, kind):
    head = kt.head_of(_vector_model(activation, fused=True))
    assert head == kt.HeadSpec(kind, 3, None, "predictions") and head.is_legacy


def test_class_names_come_from_the_argument_or_the_model():
    model = _vector_model("softmax")
    assert kt.head_of(model).class_names is None
    assert kt.head_of(model, ["a", "b", "c"]).class_names == ("a", "b", "c")
    model.class_names = ["cat", "dog", "eel"]
    assert kt.head_of(model).class_names == ("cat", "dog", "eel")
    assert kt.head_of(model, ("x", "y", "z")).class_names == ("x", "y", "z")
    with pytest.raises(ValueError, match=r"one name per output .*\(3\).*class_names=\['a', 'b'\]"):
        kt.head_of(model, ["a", "b"])


def test_a_model_without_a_readable_head_is_refused_with_the_fix():
    inputs = keras.Input((6,))
    no_head = keras.Model(inputs, keras.layers.Dense(3, name="scores")(inputs), name="plain")
    with pytest.raises(ValueError, match=r"Model 'plain' has no head .*kt.build_classifier"):
        kt.head_of(no_head)
    with pytest.raises(ValueError, match="has no head"):
        kt.logits_model(no_head)
    with pytest.raises(ValueError, match="`loss=`"):
        heads.default_loss_and_metrics(no_head)
    relu = keras.Model(inputs, keras.layers.Dense(3, "relu", name="predictions")(inputs))
    with pytest.raises(ValueError, match=r"activation 'relu'; expected one of"):
        kt.head_of(relu)
    with pytest.raises(TypeError, match="must be a keras.Model"):
        kt.head_of("model.keras")


def test_head_spec_is_frozen_and_checks_its_kind():
    head = kt.HeadSpec("multiclass", 3, "logits", "predictions")
    with pytest.raises(dataclasses.FrozenInstanceError):
        head.kind = "regression"
    with pytest.raises(ValueError, match="kind='classification'"):
        kt.HeadSpec("classification", 3, "logits", "predictions")


@pytest.mark.parametrize(
    "kind, label_spec, loss, metric_names",
    [
        ("multiclass", None, "sparse_categorical_crossentropy", ["sparse_categorical_accuracy"]),
        ("multiclass", tf.TensorSpec((None,), tf.int64), "sparse_categorical_crossentropy",
         ["sparse_categorical_accuracy"]),
        ("multiclass", tf.TensorSpec((None, 3), tf.float32), "categorical_crossentropy",
         ["categorical_accuracy"]),
        ("multiclass", tf.TensorSpec((None, 1), tf.int64), "sparse_categorical_crossentropy",
         ["sparse_categorical_accuracy"]),
        ("multilabel", tf.TensorSpec((None, 4), tf.float32), "binary_crossentropy",
         ["binary_accuracy", "auc"]),
        ("regression", None, "mean_squared_error", ["mae"]),
    ],
)  # fmt: skip
def test_default_loss_and_metrics_follow_the_head(kind, label_spec, loss, metric_names):
    got_loss, metrics = heads.default_loss_and_metrics(_tiny(kind), label_spec)
    assert got_loss == loss
    assert [m if isinstance(m, str) else m.name for m in metrics] == metric_names
    if kind == "multilabel":
        assert metrics[1].multi_label


def test_legacy_model_loads_predicts_and_reads_as_multiclass():
    model = keras.saving.load_model(LEGACY)
    assert isinstance(model.get_layer("predictions"), keras.layers.Dense)
    assert not any(layer.name == "logits" for layer in model.layers)
    x = _pixels(6)
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (6, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(probabilities[:, 0]) > 1e-3  # the fixture's features depend on the image
    head = kt.head_of(model)
    assert head == kt.HeadSpec("multiclass", 3, None, "predictions") and head.is_legacy
    assert heads.default_loss_and_metrics(model)[0] == "sparse_categorical_crossentropy"
    logits = kt.logits_model(model)(x)
    # Both eager: `predict` runs a compiled graph, which rounds differently (~1e-5).
    np.testing.assert_allclose(keras.ops.softmax(logits), model(x), atol=1e-6)
    dense = model.get_layer("predictions")
    assert any(w is dense.kernel for w in kt.logits_model(model).trainable_weights)


def test_legacy_model_still_trains(images):
    model = keras.saving.load_model(LEGACY)
    dense, backbone = model.get_layer("predictions"), kt.find_backbone(model)
    head_before = [np.array(w) for w in dense.weights]
    backbone_before = [np.array(w) for w in backbone.weights]
    history = kt.fine_tune(model, images, head_epochs=1, finetune_epochs=0, batch_size=8, verbose=0)
    assert len(history.history["loss"]) == 1
    assert "sparse_categorical_accuracy" in history.history
    assert not np.array_equal(dense.kernel, head_before[0])
    assert not np.array_equal(dense.bias, head_before[1])
    assert all(np.array_equal(w, b) for w, b in zip(backbone.weights, backbone_before, strict=True))
