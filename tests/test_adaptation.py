"""Unsupervised domain adaptation: gradient reversal, λ schedule, CORAL and MMD losses, the three
models' `.keras` round trips, `kt.adapt` on kt and plain classifiers, bad input, and DANN /
Deep CORAL under MirroredStrategy over 2 logical CPUs (in a subprocess, as test_distribute does).
"""

import inspect
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import same_weights, weights_of

import keras_transfer as kt
from keras_transfer import adaptation as ad


def small_cnn(num_classes: int = 3, size: int = 32, channels: int = 3, name: str = "cnn"):
    """A user's own classifier: no kt layer names, a softmax fused into its last Dense."""
    inputs = keras.Input((size, size, channels), name="images")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(16, activation="relu", name="features")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classes")(x)
    return keras.Model(inputs, outputs, name=name)


def domains(n_source: int = 48, n_target: int = 32, size: int = 32, seed: int = 0):
    """Labelled source images (brightness by class) and a target domain: the same, inverted."""
    rng = np.random.default_rng(seed)
    y = np.arange(n_source) % 3
    x = rng.uniform(0, 255, (n_source, size, size, 3)) * 0.5 + y[:, None, None, None] * 60.0
    x = np.clip(x, 0, 255).astype("float32")
    target = (255.0 - x[np.arange(n_target) % n_source]).astype("float32")
    return x, y, target


# -- gradient reversal and the schedules ------------------------------------------------------


def test_gradient_reversal_forward_is_identity_and_gradient_is_minus_lambda():
    rng = np.random.default_rng(0)
    x = tf.Variable(rng.normal(size=(4, 5)).astype("float32"))
    w = tf.constant(rng.normal(size=(4, 5)).astype("float32"))
    with tf.GradientTape() as tape:
        plain_loss = tf.reduce_sum(tf.sin(x) * w)
    plain = tape.gradient(plain_loss, x).numpy()
    layer = ad.GradientReversal(scale=0.37)
    for lam in (0.37, 0.8, 0.0):
        layer.current_scale.assign(lam)
        with tf.GradientTape() as tape:
            y = layer(x)
            loss = tf.reduce_sum(tf.sin(y) * w)
        assert np.array_equal(y.numpy(), x.numpy())  # forward: exactly the identity
        reversed_ = tape.gradient(loss, x).numpy()
        # Exactly -λ times the plain gradient, in float32 (not merely close).
        assert np.array_equal(reversed_, np.float32(-lam) * plain)
    with pytest.raises(ValueError, match=r"`scale`.*>= 0.*scale=-1"):
        ad.GradientReversal(scale=-1)


def test_dann_domain_gradient_on_features_is_reversed():
    dann = ad.DANN(small_cnn(), "features", trade_off=0.25, domain_units=(8, 4))
    head = dann.domain_classifier
    features = tf.Variable(np.random.default_rng(1).normal(size=(6, 16)).astype("float32"))
    with tf.GradientTape() as tape:
        reversed_loss = tf.reduce_sum(head(features))
    with tf.GradientTape() as plain_tape:
        x = features
        for layer in head.layers:
            if not isinstance(layer, ad.GradientReversal):
                x = layer(x)
        plain_loss = tf.reduce_sum(x)
    assert float(reversed_loss) == float(plain_loss)
    plain = plain_tape.gradient(plain_loss, features).numpy()
    assert np.abs(plain).max() > 0
    assert np.array_equal(tape.gradient(reversed_loss, features).numpy(), np.float32(-0.25) * plain)


def test_schedule_values_at_progress_0_half_1():
    assert ad.reversal_scale(0.0) == 0.0
    assert ad.reversal_scale(0.5) == pytest.approx(2 / (1 + math.exp(-5)) - 1, abs=1e-15)
    assert ad.reversal_scale(0.5) == pytest.approx(0.986614298, abs=1e-9)
    assert ad.reversal_scale(1.0) == pytest.approx(0.999909204, abs=1e-9)
    assert ad.annealed_learning_rate(0.0, 0.01) == 0.01
    assert ad.annealed_learning_rate(0.5, 0.01) == pytest.approx(0.01 / 6**0.75, rel=1e-12)
    assert ad.annealed_learning_rate(1.0, 0.01) == pytest.approx(0.01 / 11**0.75, rel=1e-12)


class _Record(keras.callbacks.Callback):
    """Reads λ and the learning rate the step is about to use (after the schedules set them)."""

    def __init__(self):
        super().__init__()
        self.scales, self.rates = [], []

    def on_train_batch_begin(self, batch, logs=None):
        self.scales.append(float(self.model.gradient_reversal.current_scale.numpy()))
        self.rates.append(float(self.model.optimizer.learning_rate.numpy()))


def test_schedules_set_lambda_and_learning_rate_every_step():
    x, y, target = domains(n_source=24, n_target=24)
    record = _Record()
    history = kt.adapt(
        small_cnn(),
        (x, y),
        target,
        features_layer="features",
        epochs=2,
        batch_size=8,
        learning_rate=0.01,
        trade_off=0.5,
        domain_units=(8,),
        callbacks=[ad.AnnealedLearningRate(), record],  # kt.adapt puts ReversalSchedule first
        verbose=0,
    )
    total = 2 * 3
    progress = np.arange(total) / total
    assert history.params["steps"] == 3
    np.testing.assert_allclose(
        record.scales, [0.5 * ad.reversal_scale(p) for p in progress], rtol=1e-6, atol=1e-7
    )
    assert record.scales[0] == 0.0
    np.testing.assert_allclose(record.rates, 0.01 / (1 + 10 * progress) ** 0.75, rtol=1e-6)


# -- the losses --------------------------------------------------------------------------------


def _with_covariance(n: int, covariance: np.ndarray, seed: int, shift: float = 0.0):
    """n samples whose sample covariance (over samples, n - 1) is exactly `covariance`."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(covariance)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # cov(z) = I
    return z @ np.linalg.cholesky(covariance).T + shift


def test_coral_loss_on_hand_made_covariances():
    cs, ct = np.diag([1.0, 2.0, 3.0]), np.eye(3)
    source, target = _with_covariance(40, cs, 0), _with_covariance(30, ct, 1, shift=7.0)
    np.testing.assert_allclose(np.cov(source, rowvar=False), cs, atol=1e-10)
    # ‖Cs − Ct‖²_F / (4 d²) = (0 + 1 + 4) / 36; the mean shift of the target does not count.
    assert float(ad.coral_loss(source, target)) == pytest.approx(5 / 36, rel=1e-5)
    cs2 = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 1.5]])
    source = _with_covariance(50, cs2, 2)
    expected = np.sum((cs2 - ct) ** 2) / (4 * 3**2)
    assert float(ad.coral_loss(source, target)) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(ad.covariance(source), cs2, atol=1e-5)
    assert float(ad.coral_loss(target, target + 3.0)) < 1e-10


def test_coral_loss_of_wide_features_equals_the_covariance_formula():
    """Above 512 features the loss goes through Gram matrices: the same value, gradients too."""
    rng = np.random.default_rng(0)
    source = rng.normal(size=(24, 600)).astype("float32")
    target = (rng.normal(size=(20, 600)) * np.linspace(0.5, 2.0, 600) + 3.0).astype("float32")
    s64, t64 = source.astype("float64"), target.astype("float64")
    expected = np.sum((np.cov(s64, rowvar=False) - np.cov(t64, rowvar=False)) ** 2) / (4 * 600**2)
    assert float(ad.coral_loss(source, target)) == pytest.approx(expected, rel=1e-4)
    variable = tf.Variable(source)
    with tf.GradientTape() as tape:
        loss = ad.coral_loss(variable, target)
    gradient = tape.gradient(loss, variable).numpy()
    difference = np.cov(s64, rowvar=False) - np.cov(t64, rowvar=False)
    centred = s64 - s64.mean(axis=0)
    # d/dXs of ‖Cs − Ct‖² / 4d² with Cs = Xcᵀ Xc / (n − 1): 4 Xc (Cs − Ct) / ((n − 1) 4 d²).
    expected_gradient = centred @ difference * 4 / (23 * 4 * 600**2)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-3, atol=1e-9)


def test_mmd_near_zero_for_one_distribution_and_positive_for_shifted():
    for seed in range(3):
        a, b = np.random.default_rng(seed).normal(size=(2, 64, 8)).astype("float32")
        same = float(ad.mmd_loss(a, b))
        assert abs(same) < 0.01
        assert float(ad.mmd_loss(a, b + 1.0)) > 0.05 > 5 * abs(same)
        assert float(ad.mmd_loss(a, 2.0 * b)) > 0.03
        # Unbiased: the same sample twice is not zero, but permuting a sample changes nothing.
        assert float(ad.mmd_loss(a, b[::-1])) == pytest.approx(same, abs=1e-6)


def test_training_losses_equal_the_discrepancy_measures():
    """What adaptation minimises is what kt.discrepancy reports (same kernels, same CORAL)."""
    rng = np.random.default_rng(0)
    # 22 samples pooled: an odd number of pairs, so both medians are the middle distance.
    a, b = rng.normal(size=(11, 5)), rng.normal(size=(11, 5)) + 0.5
    mmd = float(ad.mmd_loss(a.astype("float32"), b.astype("float32")))
    assert mmd == pytest.approx(kt.discrepancy.mmd(a, b), rel=1e-5)
    assert float(ad.coral_loss(a, b)) == pytest.approx(kt.discrepancy.coral(a, b), rel=1e-5)


# -- serialization -----------------------------------------------------------------------------


def test_gradient_reversal_round_trips_in_a_keras_file(tmp_path):
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(2)(ad.GradientReversal(0.3, name="grl")(inputs))
    model = keras.Model(inputs, outputs)
    model.get_layer("grl").current_scale.assign(0.12)
    model.save(tmp_path / "grl.keras")
    loaded = keras.saving.load_model(tmp_path / "grl.keras", safe_mode=True)
    layer = loaded.get_layer("grl")
    assert isinstance(layer, ad.GradientReversal)
    assert layer.get_config() == model.get_layer("grl").get_config()
    assert layer.scale == 0.3 and float(layer.current_scale.numpy()) == pytest.approx(0.12)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype("float32")
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))


@pytest.mark.parametrize(
    "method, options",
    [
        ("dann", {"domain_units": (8, 4), "domain_dropout": 0.1}),
        ("coral", {}),
        ("mmd", {"kernel_multipliers": (0.5, 1.0, 2.0)}),
    ],
)
def test_adaptation_models_round_trip_under_safe_mode(tmp_path, method, options):
    x, y, target = domains(n_source=16, n_target=16)
    history = kt.adapt(
        small_cnn(),
        (x, y),
        target,
        method=method,
        features_layer="features",
        epochs=1,
        batch_size=8,
        trade_off=0.7,
        verbose=0,
        **options,
    )
    model = history.model
    model.save(tmp_path / "adapted.keras")
    loaded = keras.saving.load_model(tmp_path / "adapted.keras", safe_mode=True)
    assert type(loaded) is type(model)
    config, original = loaded.get_config(), model.get_config()
    for key in ("features_layer", "trade_off", *options):
        assert config[key] == original[key]
    assert config["trade_off"] == 0.7
    assert len(loaded.weights) == len(model.weights)
    for a, b in zip(loaded.weights, model.weights, strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(
        loaded.predict(target[:4], verbose=0), model.classifier.predict(target[:4], verbose=0)
    )
    if method == "dann":
        features = np.random.default_rng(0).normal(size=(3, 16)).astype("float32")
        np.testing.assert_array_equal(
            loaded.domain_classifier(features), model.domain_classifier(features)
        )
    # The reloaded model trains on (its compile config came back too).
    data = ad.pair_domains((x, y), target, batch_size=8)
    again = loaded.fit(data, epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(again.history["loss"][0])


# -- kt.adapt ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_adapt_kt_classifier_leaves_a_plain_exportable_model(tmp_path, tiny_model):
    x, y, target = domains(n_source=16, n_target=24)
    n_layers, n_weights = len(tiny_model.layers), len(tiny_model.weights)
    config = tiny_model.get_config()
    before = weights_of(tiny_model)
    history = kt.adapt(
        tiny_model, (x, y), target, epochs=1, batch_size=8, domain_units=(16,), verbose=0
    )
    assert set(history.history) == {
        "loss",
        "task_loss",
        "accuracy",
        "domain_loss",
        "domain_accuracy",
    }
    assert history.params["steps"] == 3  # the larger domain (24 target images) sets the epoch
    assert all(np.isfinite(v[0]) for v in history.history.values())
    # The task loss is cross-entropy on the logits, the domain loss that of 2 classes: at init
    # both sit near log(3) and log(2).
    assert history.history["task_loss"][0] == pytest.approx(math.log(3), abs=0.3)
    assert history.history["domain_loss"][0] == pytest.approx(math.log(2), abs=0.3)
    assert isinstance(history.model, ad.DANN) and history.model.classifier is tiny_model
    # Trained in place (backbone and head), yet nothing was added to the classifier.
    after = weights_of(tiny_model)
    pairs = zip(tiny_model.weights, before, after, strict=True)
    changed = {w.path for w, a, b in pairs if not np.array_equal(a, b)}
    assert {"logits/kernel", "Conv1/kernel"} <= changed  # the head and the backbone's stem
    assert len(tiny_model.layers) == n_layers and len(tiny_model.weights) == n_weights
    assert tiny_model.get_config() == config
    path = tmp_path / "adapted.keras"
    tiny_model.save(path)
    with zipfile.ZipFile(path) as archive:
        saved = archive.read("config.json").decode()
    assert "GradientReversal" not in saved and "DANN" not in saved
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(reloaded(target[:4]), tiny_model(target[:4]), atol=1e-6)
    exported = kt.export_for_serving(
        tiny_model, tmp_path / "served", warmup=False, save_keras=False
    )
    serve = tf.saved_model.load(str(exported)).signatures["serving_default"]
    served = serve(images=tf.constant(target[:3]))["probabilities"].numpy()
    np.testing.assert_allclose(served, tiny_model(target[:3]), atol=1e-5)


def test_split_reads_logits_of_kt_and_plain_classifiers(tiny_model):
    x = domains(n_source=4, n_target=1)[0]
    cnn = small_cnn()
    for model, layer, dim in ((tiny_model, "pooling", 1280), (cnn, "features", 16)):
        split = ad.split_classifier(model, None if model is tiny_model else "features")
        assert split.features_layer == layer and split.feature_dim == dim
        features, logits = split.network(x)
        np.testing.assert_allclose(keras.ops.softmax(logits), model(x), atol=1e-6)
        assert features.shape[0] == 4
        assert split.head.kind == "multiclass" and split.head.num_outputs == 3


def test_adapt_user_cnn_at_its_features_layer_with_validation(tmp_path):
    x, y, target = domains(n_source=32, n_target=16)
    model = small_cnn()
    before = {w.path: w.numpy().copy() for w in model.weights}
    config, n_layers, n_weights = model.get_config(), len(model.layers), len(model.weights)
    history = kt.adapt(
        model,
        (x, y),
        target,
        method="coral",
        features_layer="features",
        epochs=2,
        batch_size=8,
        trade_off=5.0,
        validation_data=(x[:12], y[:12]),
        verbose=0,
    )
    assert history.params["steps"] == 4
    assert {"coral_loss", "val_loss", "val_accuracy"} <= set(history.history)
    assert all(not np.array_equal(before[w.path], w.numpy()) for w in model.weights)
    # Trained in place; nothing added to it.
    assert model.get_config() == config
    assert len(model.layers) == n_layers and len(model.weights) == n_weights
    # val_* is the classifier scored on the labelled data after the last epoch's steps.
    probabilities = model.predict(x[:12], verbose=0)
    accuracy = float(np.mean(probabilities.argmax(-1) == y[:12]))
    cross_entropy = float(np.mean(-np.log(probabilities[np.arange(12), y[:12]])))
    assert history.history["val_accuracy"][-1] == pytest.approx(accuracy)
    assert history.history["val_loss"][-1] == pytest.approx(cross_entropy, rel=1e-4)
    model.save(tmp_path / "cnn.keras")
    reloaded = keras.saving.load_model(tmp_path / "cnn.keras", safe_mode=True)
    assert type(reloaded).__name__ == "Functional" and len(reloaded.layers) == len(model.layers)


@pytest.mark.parametrize("method", ["mmd", "coral"])
def test_alignment_shrinks_the_discrepancy_it_trains_on(method):
    x, y, target = domains(n_source=48, n_target=48)
    measure = ad.mmd_loss if method == "mmd" else ad.coral_loss
    # CORAL grows with the features' fourth power over d²: about 1e-7 on this CNN's features
    # (values ~0.1, d = 16), so it needs a large weight to matter against a task loss of ~1.
    strong = 10.0 if method == "mmd" else 1e6
    gaps = {}
    for trade_off in (0.0, strong):
        keras.utils.set_random_seed(0)
        model = small_cnn()
        kt.adapt(
            model,
            (x, y),
            target,
            method=method,
            features_layer="features",
            epochs=4,
            batch_size=8,
            trade_off=trade_off,
            verbose=0,
        )
        features = ad.split_classifier(model, "features").network
        gaps[trade_off] = float(measure(features(x)[0], features(target)[0]))
    assert gaps[strong] < 0.5 * gaps[0.0]


def test_pair_domains_shorter_domain_repeats_and_labels_follow_images():
    n_source, n_target = 40, 12
    x = np.repeat(np.arange(n_source, dtype="float32"), 4 * 4 * 3).reshape(n_source, 4, 4, 3)
    y = np.arange(n_source) % 3
    target = 1000 + np.repeat(np.arange(n_target, dtype="float32"), 48).reshape(-1, 4, 4, 3)
    data = ad.pair_domains((x, y), target, batch_size=4, seed=3)
    assert int(data.cardinality()) == 10
    epochs = []
    for _ in range(2):
        source_ids, target_ids = [], []
        for (images, labels), target_images in data:
            assert images.shape == target_images.shape == (4, 4, 4, 3)
            assert images.dtype == target_images.dtype == tf.float32
            ids = images.numpy()[:, 0, 0, 0].astype(int)
            np.testing.assert_array_equal(labels.numpy(), ids % 3)
            source_ids += ids.tolist()
            target_ids += (target_images.numpy()[:, 0, 0, 0] - 1000).astype(int).tolist()
        assert sorted(source_ids) == list(range(n_source))  # one pass over the larger domain
        assert len(target_ids) == 40 and np.bincount(target_ids, minlength=12).min() >= 3
        epochs.append(source_ids)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    # Datasets, batched any way (here by kt.data, which reshuffles), are rebatched to pairs.
    source = kt.data.from_arrays(x, y, batch_size=5, seed=1)
    target_ds = tf.data.Dataset.from_tensor_slices(target).batch(3)
    data = ad.pair_domains(source, target_ds, batch_size=4)
    assert int(data.cardinality()) == 10
    source_ids, target_ids = [], []
    for (images, labels), target_images in data:
        ids = images.numpy()[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(labels.numpy(), ids % 3)
        source_ids += ids.tolist()
        target_ids += (target_images.numpy()[:, 0, 0, 0] - 1000).astype(int).tolist()
    assert sorted(source_ids) == list(range(n_source)) and source_ids != list(range(n_source))
    assert target_ids[:12] == list(range(12)) and target_ids[12:24] == list(range(12))


def test_target_labels_are_ignored_with_a_warning():
    x, y, target = domains(n_source=16, n_target=16)
    labelled = tf.data.Dataset.from_tensor_slices((target, y)).batch(5)
    with pytest.warns(UserWarning, match="ignores them"):
        data = ad.pair_domains((x, y), labelled, batch_size=8)
    (_, _), target_batch = next(iter(data))
    assert target_batch.shape == (8, 32, 32, 3)
    with pytest.warns(UserWarning, match="ignores them"):
        ad.pair_domains(tf.data.Dataset.from_tensor_slices((x, y)), (target, y), batch_size=8)


# -- bad input ---------------------------------------------------------------------------------


def _regressor():
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D(name="features")(keras.layers.Conv2D(4, 3)(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="out")(x))


def _multilabel():
    return kt.build_classifier(
        "mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35, multi_label=True
    )


X, Y, T = domains(n_source=16, n_target=16)
BAD = {
    "unknown method": (
        dict(method="dan"),
        r"Unknown adaptation `method` 'dan'\. Did you mean 'dann'\?.*method='dan'",
    ),
    "misspelt method": (dict(method="corral"), r"Did you mean 'coral'\?.*'mmd'"),
    "features layer not in model": (
        dict(features_layer="featurs"),
        r"`features_layer` 'featurs' is not a layer of model 'cnn'\. Did you mean 'features'\?"
        r".*Layers that can give the features: \['rescaling.*'conv', 'gap', 'features', "
        r"'classes'\].*features_layer='featurs'",
    ),
    "target of another size": (
        dict(target=T[:, :28, :28]),
        r"`source` images are 32x32x3.*`target` images are 28x28x3.*tf\.image\.resize",
    ),
    "target of another channel count": (
        dict(target=T[..., :1]),
        r"`target` images are 32x32x1.*channel count.*np\.repeat\(x, 3, axis=-1\)",
    ),
    "domains not the model's size": (
        dict(source=(X[:, :28, :28], Y), target=T[:, :28, :28]),
        r"images are 28x28x3 but the classifier takes 32x32x3.*resize",
    ),
    "empty target": (dict(target=T[:0]), r"`target` is empty.*Received: 0 images"),
    "empty target dataset": (
        dict(target=tf.data.Dataset.from_tensor_slices(T[:0]).batch(4)),
        r"`target` is empty",
    ),
    "target smaller than one batch": (
        dict(target=T[:5]),
        r"`target` has 5 images, fewer than one batch of 8.*smaller `batch_size`.*batch_size=8",
    ),
    "negative trade_off": (dict(trade_off=-0.5), r"`trade_off` must be.*>= 0.*trade_off=-0\.5"),
    "NaN trade_off": (dict(trade_off=float("nan")), r"`trade_off` must be a finite.*trade_off=nan"),
    "source label outside the head": (
        dict(source=(X, np.where(np.arange(16) == 3, 5, Y))),
        r"`source` has label 5, outside the range 0\.\.\.2 of the 3-class head.*num_classes=6",
    ),
    "negative source label in a dataset": (
        dict(source=tf.data.Dataset.from_tensor_slices((X, Y - 1)).batch(4)),
        r"`source` has a negative label -1.*class ids 0\.\.\.2",
    ),
    "classifier with a linear head": (
        dict(classifier=_regressor, features_layer="features"),
        r"`classifier` '.*' has no softmax head to adapt: its output layer 'out'.*"
        r"activation 'linear'.*Activation\('softmax'",
    ),
    "classifier with a sigmoid head": (
        dict(classifier=_multilabel, features_layer=None),
        r"no softmax head to adapt: its 'predictions' layer is a sigmoid \(multilabel\) head",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_refused_before_training(case):
    overrides, pattern = BAD[case]
    overrides = dict(overrides)
    make = overrides.pop("classifier", small_cnn)
    classifier = make()
    before = weights_of(classifier)
    kwargs = dict(
        source=(X, Y),
        target=T,
        method="dann",
        features_layer="features",
        epochs=1,
        batch_size=8,
        verbose=0,
    )
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=pattern):
        kt.adapt(classifier, **kwargs)
    assert same_weights(before, weights_of(classifier))


def test_frozen_features_are_refused(tiny_model):
    kt.freeze_backbone(tiny_model)
    before = weights_of(tiny_model)
    with pytest.raises(
        ValueError,
        match=r"Nothing trainable feeds `features_layer` 'pooling'.*"
        r"kt\.unfreeze\(classifier, blocks=2\)",
    ):
        kt.adapt(tiny_model, (X, Y), T, batch_size=8, verbose=0)
    assert same_weights(before, weights_of(tiny_model))


def test_bad_options_and_types():
    with pytest.raises(TypeError, match=r"Unknown option\(s\) \['kernels'\] for method DANN"):
        kt.adapt(small_cnn(), (X, Y), T, features_layer="features", kernels=(1.0,))
    with pytest.raises(ValueError, match=r"`domain_units` must be.*domain_units=\(\)"):
        kt.adapt(small_cnn(), (X, Y), T, features_layer="features", domain_units=())
    with pytest.raises(ValueError, match=r"`kernel_multipliers` must be.*\[0\.5, -1\]"):
        kt.adapt(
            small_cnn(),
            (X, Y),
            T,
            method="mmd",
            features_layer="features",
            kernel_multipliers=[0.5, -1],
        )
    with pytest.raises(ValueError, match=r"`batch_size` must be an int >= 2"):
        kt.adapt(small_cnn(), (X, Y), T, features_layer="features", batch_size=1)
    with pytest.raises(TypeError, match=r"`source` must be an \(x, y\) tuple"):
        kt.adapt(small_cnn(), X, T, features_layer="features")
    with pytest.raises(ValueError, match=r"features_layer=None means the 'pooling' layer"):
        kt.adapt(small_cnn(), (X, Y), T)
    x, y, target = domains(n_source=8, n_target=8)
    schedule = keras.optimizers.schedules.ExponentialDecay(0.01, 10, 0.9)
    model = small_cnn()
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"AnnealedLearningRate sets the learning rate itself"):
        kt.adapt(
            model,
            (x, y),
            target,
            features_layer="features",
            batch_size=8,
            verbose=0,
            learning_rate=schedule,
            callbacks=[ad.AnnealedLearningRate()],
        )
    with pytest.raises(ValueError, match=r"ReversalSchedule found no GradientReversal layer"):
        kt.adapt(
            model,
            (x, y),
            target,
            method="coral",
            features_layer="features",
            batch_size=8,
            verbose=0,
            callbacks=[ad.ReversalSchedule()],
        )
    assert same_weights(before, weights_of(model))  # both refused before the first step
    with pytest.raises(ValueError, match=r"compile takes only the optimizer"):
        ad.DeepCORAL(small_cnn(), "features").compile("adam", loss="mse")


# -- MirroredStrategy --------------------------------------------------------------------------

WORKER = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    import numpy as np
    import keras
    import keras_transfer as kt

    HELPERS

    x, y, target = domains(n_source=32, n_target=32)
    # DANN reads datasets (kept in order), CORAL arrays (reshuffled with the seed).
    slices = tf.data.Dataset.from_tensor_slices
    data = {
        "dann": (slices((x, y)), slices(target)),
        "coral": ((x, y), target),
    }
    # SGD for DANN: its update is proportional to the gradient, so a loss scaled wrongly
    # across replicas shows in the comparison below (Adam would normalise it away).
    options = {
        "dann": {"domain_units": (8,), "optimizer": "sgd", "learning_rate": 0.05},
        "coral": {},
    }
    result = {"replicas": strategy.num_replicas_in_sync}
    for method in ("dann", "coral"):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = small_cnn()
        before = [w.numpy().copy() for w in model.weights]
        history = kt.adapt(
            model, *data[method], method=method, features_layer="features", epochs=2,
            batch_size=4, trade_off=0.5, strategy=strategy, verbose=0, **options[method],
        )
        adapted = history.model
        domain_head = getattr(adapted, "domain_classifier", None)
        result[method] = {
            "history": history.history,
            "steps": history.params["steps"],
            "changed": [not np.array_equal(a, w.numpy()) for a, w in zip(before, model.weights)],
            "strategy": type(adapted.distribute_strategy).__name__,
        }
        if domain_head:
            result[method]["scale"] = float(adapted.gradient_reversal.current_scale.numpy())
            # The domain classifier's variables live on both replicas and train there.
            result[method]["domain_mirrored"] = all(
                type(getattr(v, "_value", v)).__name__ == "MirroredVariable"
                for v in domain_head.trainable_weights
            )
            # DANN's losses are means over examples, so 2 replicas x 4 images train exactly
            # as one device x 8 does, when the per-replica losses are scaled right.
            keras.utils.set_random_seed(0)
            single = small_cnn()
            kt.adapt(
                single, *data[method], method=method, features_layer="features", epochs=2,
                batch_size=8, trade_off=0.5, verbose=0, **options[method],
            )
            result[method]["single_device_gap"] = max(
                float(np.abs(a.numpy() - b.numpy()).max())
                for a, b in zip(model.weights, single.weights)
            )
            result[method]["trained_distance"] = max(
                float(np.abs(a - b.numpy()).max()) for a, b in zip(before, single.weights)
            )
    print("RESULT " + json.dumps(result), flush=True)
    """
)


@pytest.mark.slow
def test_dann_and_coral_train_under_mirrored_strategy(tmp_path):
    script = tmp_path / "worker.py"
    helpers = inspect.getsource(small_cnn) + inspect.getsource(domains)
    script.write_text(WORKER.replace("HELPERS", helpers))
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["replicas"] == 2
    for method, alignment in (("dann", "domain_loss"), ("coral", "coral_loss")):
        run = result[method]
        assert run["strategy"] == "MirroredStrategy"
        assert run["steps"] == 32 // (4 * 2)  # the global batch is 4 per replica x 2
        assert all(run["changed"])
        for key in ("loss", "task_loss", alignment):
            assert all(math.isfinite(v) for v in run["history"][key])
    dann = result["dann"]
    # λ followed the schedule to its last step: 0.5 * λ_p at p = 7/8.
    assert dann["scale"] == pytest.approx(0.5 * ad.reversal_scale(7 / 8), rel=1e-6)
    assert all(0.0 <= v <= 1.0 for v in dann["history"]["domain_accuracy"])
    assert dann["domain_mirrored"]
    assert dann["single_device_gap"] < 1e-5, dann["single_device_gap"]
    assert dann["trained_distance"] > 1e-3


# -- AdaBN: BatchNorm statistics re-estimated on the target -----------------------------------


def test_recalibrate_batchnorm_sets_population_statistics_and_nothing_else():
    model = kt.build_small_cnn(3, image_size=16, channels=3, widths=(4, 8), augmentation=None)
    _, _, target = domains(n_target=12, size=16)
    trainable = [np.array(w) for w in model.trainable_weights]
    # In small batches, the same population statistics as one batch of all 12 for the first
    # layer (its inputs do not depend on BatchNorm): exact sums over batches of 5, 5 and 2.
    assert ad.recalibrate_batchnorm(model, target, batch_size=5) == ["bn_0", "bn_1"]
    bn_0 = model.get_layer("bn_0")
    inputs = keras.Model(model.inputs, bn_0.input)(target, training=False).numpy()
    np.testing.assert_allclose(bn_0.moving_mean.numpy(), inputs.mean((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(bn_0.moving_variance.numpy(), inputs.var((0, 1, 2)), rtol=1e-4)
    assert same_weights(trainable, [np.array(w) for w in model.trainable_weights])
    # With every image in one batch, each later layer's statistics are those of its inputs
    # under the re-estimated layers before it (AdaBN layer by layer).
    ad.recalibrate_batchnorm(model, target, batch_size=len(target))
    bn_1 = model.get_layer("bn_1")
    inputs = keras.Model(model.inputs, bn_1.input)(target, training=False).numpy()
    np.testing.assert_allclose(bn_1.moving_mean.numpy(), inputs.mean((0, 1, 2)), rtol=1e-4)
    np.testing.assert_allclose(bn_1.moving_variance.numpy(), inputs.var((0, 1, 2)), rtol=1e-4)
    assert "call" not in vars(bn_1)  # the layers are restored


def test_recalibrate_batchnorm_refuses_models_without_batchnorm_and_bad_data():
    with pytest.raises(ValueError, match=r"'cnn' has no BatchNormalization layer"):
        ad.recalibrate_batchnorm(small_cnn(), T)
    model = kt.build_small_cnn(3, image_size=32, channels=3, widths=(4,))
    before = weights_of(model)
    with pytest.raises(ValueError, match=r"`images` is empty"):
        ad.recalibrate_batchnorm(model, T[:0])
    with pytest.raises(ValueError, match=r"`batch_size` .*0"):
        ad.recalibrate_batchnorm(model, T, batch_size=0)
    assert same_weights(before, weights_of(model))
