"""kt.fit_joint: L_s + λ·L_t + Ω logged term by term, a target head over a shared backbone, a
regularizer attached for the run only, bad input refused before training.

fit_joint under MirroredStrategy is checked with the distillation models in one subprocess:
tests/test_distillation.py::test_mirrored_strategy_trains_as_one_device.
"""

import keras
import numpy as np
import pytest
from conftest import same_weights

import keras_transfer as kt


def mlp(num_classes=3, hidden=16, name=None):
    images = keras.Input((4, 4, 3), name="images")
    h = keras.layers.Flatten(name="flatten")(images)
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    predictions = keras.layers.Activation("softmax", name="predictions")(logits)
    return keras.Model(images, predictions, name=name)


def data(n, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4, 4, 3)).astype("float32"), np.arange(n) % num_classes


def cross_entropy(model, x, y):
    p = np.asarray(model.predict(x, verbose=0), "float64")
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def test_logged_total_is_the_sum_of_the_terms_on_a_fixed_batch():
    model = mlp()
    (xs, ys), (xt, yt) = data(16), data(8, seed=1)
    before = model.get_weights()
    expected_s, expected_t = cross_entropy(model, xs, ys), cross_entropy(model, xt, yt)
    alpha = 0.05
    omega = 0.5 * alpha * sum(float(np.sum(w.numpy() ** 2)) for w in model.trainable_weights)
    history = kt.fit_joint(
        model,
        (xs, ys),
        (xt, yt),
        lambda_=3.0,
        regularizer=kt.regularizers.L2(alpha=alpha),
        epochs=1,
        batch_size=16,  # one source batch and one target batch: one step
        optimizer="sgd",
        learning_rate=0.1,
        verbose=0,
    )
    logs = {k: v[0] for k, v in history.history.items()}
    assert logs["source_loss"] == pytest.approx(expected_s, 1e-5)
    assert logs["target_loss"] == pytest.approx(expected_t, 1e-5)
    assert logs["regularization_loss"] == pytest.approx(omega, 1e-5) and omega > 0
    assert logs["loss"] == pytest.approx(
        logs["source_loss"] + 3.0 * logs["target_loss"] + logs["regularization_loss"], 1e-6
    )
    assert {"source_sparse_categorical_accuracy", "target_sparse_categorical_accuracy"} <= set(logs)
    assert not same_weights(model.get_weights(), before)
    assert model.losses == []  # the regularizer is detached again
    assert history.source_model is model and history.target_model is model


def test_target_loss_weight_moves_the_model_toward_the_target():
    """λ large: the model fits the target labels (which disagree with the source's) first."""
    (xs, ys), (xt, _) = data(32), data(8, seed=1)
    yt = (np.arange(8) + 1) % 3
    results = {}
    for lambda_ in (0.0, 20.0):
        keras.utils.set_random_seed(0)
        model = mlp()
        kt.fit_joint(
            model, (xs, ys), (xt, yt), lambda_=lambda_, epochs=15, batch_size=8,
            learning_rate=1e-2, jit_compile=False, verbose=0,
        )  # fmt: skip
        results[lambda_] = cross_entropy(model, xt, yt)
    assert results[20.0] < results[0.0] / 2, results


def test_target_head_trains_two_heads_over_one_backbone(tmp_path):
    model = mlp()
    (xs, ys), (xt, yt) = data(16), data(8, num_classes=2, seed=1)
    hidden_before = model.get_layer("hidden").get_weights()
    head_before = model.get_layer("logits").get_weights()
    history = kt.fit_joint(
        model,
        (xs, ys),
        (xt, yt),
        target_head=True,
        target_num_classes=2,
        validation_data=(xt, yt),
        regularizer="l2",
        epochs=2,
        batch_size=8,
        jit_compile=False,
        verbose=0,
    )
    target = history.target_model
    assert target.output_shape == (None, 2) and model.output_shape == (None, 3)
    assert target.get_layer("hidden") is model.get_layer("hidden")  # shared backbone
    assert kt.head_of(target).logits_layer == "target_logits"
    assert not same_weights(model.get_layer("hidden").get_weights(), hidden_before)
    assert not same_weights(model.get_layer("logits").get_weights(), head_before)
    assert {"val_loss", "val_target_loss", "val_target_sparse_categorical_accuracy"} <= set(
        history.history
    )
    assert history.history["val_loss"] == history.history["val_target_loss"]
    assert history.history["val_loss"][-1] == pytest.approx(cross_entropy(target, xt, yt), 1e-5)
    assert target.losses == [] and model.losses == []
    target.save(tmp_path / "target.keras")
    again = keras.saving.load_model(tmp_path / "target.keras")
    np.testing.assert_allclose(again.predict(xt, verbose=0), target.predict(xt, verbose=0))


def test_joint_training_on_datasets_with_l2sp_on_a_nested_backbone():
    import tensorflow as tf

    images, inner = keras.Input((4, 4, 3), name="images"), keras.Input((4, 4, 3))
    features = keras.layers.Dense(8, name="dense")(keras.layers.Flatten()(inner))
    backbone = keras.Model(inner, features, name="backbone")
    logits = keras.layers.Dense(3, name="logits")(backbone(images))
    model = keras.Model(images, keras.layers.Activation("softmax", name="predictions")(logits))
    (xs, ys), (xt, yt) = data(8), data(2, seed=1)
    target = tf.data.Dataset.from_tensor_slices((xt, yt)).batch(2)
    before = model.get_weights()
    # L2-SP starts at the run's weights: at the first step only the head's αβ/2·‖w‖² counts.
    head_l2 = 0.5 * 0.1 * 0.5 * sum(float(np.sum(w**2)) for w in model.get_layer("logits").weights)
    one_step = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(8)
    history = kt.fit_joint(
        model, one_step, target, regularizer=kt.regularizers.L2SP(alpha=0.1, beta=0.5), epochs=1,
        optimizer="sgd", learning_rate=0.1, jit_compile=False, verbose=0,
    )  # fmt: skip
    assert history.history["regularization_loss"][0] == pytest.approx(head_l2, 1e-5)
    assert not same_weights(model.get_weights(), before)
    assert model.losses == []
    # An epoch is one pass over the source; the one target batch is cycled.
    two_steps = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(4)
    history = kt.fit_joint(model, two_steps, target, epochs=1, jit_compile=False, verbose=0)
    assert history.params["steps"] == 2


def test_bad_joint_input_is_refused_before_training():
    model = mlp()
    before = model.get_weights()
    source, target = data(8), data(4, seed=1)

    def refused(exception, *parts, **kwargs):
        kwargs = {"epochs": 1, **kwargs}
        with pytest.raises(exception) as error:
            kt.fit_joint(model, kwargs.pop("source", source), kwargs.pop("target", target),
                         verbose=0, **kwargs)  # fmt: skip
        for part in parts:
            assert part in str(error.value), (part, str(error.value))

    refused(ValueError, "`lambda_`", "lambda_=-1", "Typical values", lambda_=-1)
    refused(ValueError, "`lambda_`", "lambda_=nan", lambda_=float("nan"))
    refused(ValueError, "`epochs`", "epochs=0", epochs=0)
    refused(ValueError, "`target_num_classes`", target_head=True)
    refused(ValueError, "only applies with target_head=True", target_num_classes=2)
    refused(ValueError, "Unknown regularizer 'l3'", regularizer="l3")
    refused(ValueError, "`learning_rate`", learning_rate=0)
    refused(TypeError, "`source`", source="images/")
    refused(ValueError, "`target` has label 5", "3-class head", target=(target[0], [0, 1, 2, 5]))
    with pytest.raises(TypeError, match="`model` must be a keras.Model"):
        kt.fit_joint("mobilenet_v2", source, target, epochs=1)
    assert same_weights(model.get_weights(), before) and model.losses == []
