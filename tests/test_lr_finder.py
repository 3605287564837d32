"""kt.find_learning_rate: the curve (schedule, smoothing, stopping), fastai's suggestions, a
quadratic whose best rate is known, and exact restoration of everything the sweep touches."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import same_weights

import keras_transfer as kt
from keras_transfer import lr_finder


def one_weight_model() -> keras.Model:
    """f(x) = w x, w = 0: the mean squared error is a quadratic in w."""
    inputs = keras.Input((1,))
    outputs = keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros", name="predictions")(
        inputs
    )
    return keras.Model(inputs, outputs)


def quadratic_data(scale: float, noise: float, seed: int, batch_size: int = 16):
    """x = ±scale, so every batch's loss (w x - t)² has curvature h = 2 scale² exactly."""
    rng = np.random.default_rng(seed)
    x = (scale * rng.choice([-1.0, 1.0], (256, 1))).astype("float32")
    t = (3.0 * x + rng.normal(0.0, noise, (256, 1))).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, t)).shuffle(256, seed=seed)
    return ds.batch(batch_size)


SGD = kt.Phase("sgd", epochs=1, optimizer="sgd")


# --- the curve -----------------------------------------------------------------------------------


def test_rates_losses_and_stop_follow_the_definitions():
    # x = 1 and t = 3 everywhere: w_{i+1} - 3 = (w_i - 3)(1 - 2 lr_i) under SGD, so each batch's
    # loss is the previous one times (1 - 2 lr_i)² — the rate really applied at step i.
    x = np.ones((64, 1), "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, 3 * x)).batch(8)
    result = kt.find_learning_rate(one_weight_model(), ds, phase=SGD, loss="mse")
    n = len(result.lrs)
    expected_lrs = 1e-7 * (10 / 1e-7) ** (np.arange(100) / 100)
    np.testing.assert_allclose(result.lrs, expected_lrs[:n], rtol=1e-12)
    raw = result.raw_losses
    assert raw[0] == pytest.approx(9.0)
    expected = raw[:-1] * (1 - 2 * result.lrs[:-1]) ** 2  # float32 w: atol for w near 3
    np.testing.assert_allclose(raw[1:], expected, rtol=1e-4, atol=1e-9)
    # Debiased EMA with beta = 0.98.
    ema, smoothed = 0.0, []
    for i, loss in enumerate(raw):
        ema = 0.98 * ema + 0.02 * loss
        smoothed.append(ema / (1 - 0.98 ** (i + 1)))
    np.testing.assert_allclose(result.losses, smoothed, rtol=1e-12)
    # Stopped at the first step whose smoothed loss is over 4x the minimum so far.
    over = [i for i in range(n) if smoothed[i] > 4 * min(smoothed[: i + 1])]
    assert result.stopped == "diverged" and over and n == over[0] + 1


def test_suggestions_are_fastais():
    lrs = 10.0 ** np.arange(13)
    # The longest valley is indices 2..10; fastai starts it one before and goes a third plus a
    # sixth of its length (9) in: 1 + 3 + 1 = 5.
    losses = np.array([1, 2, 9, 8, 7, 6, 5, 4, 3, 2, 1.5, 5, 6], dtype=float)
    assert lr_finder.valley(lrs, losses) == (1e5, 5)
    # Steepest fall per unit of log rate: 2 -> 0.5 between indices 2 and 3.
    assert lr_finder.steep(lrs[:5], np.array([3, 3, 2, 0.5, 0.4])) == (100.0, 2)
    assert lr_finder.minimum(lrs[:5], np.array([3, 3, 2, 0.5, 0.4])) == (1000.0, 4)
    # Read without the first tenth and the last five points.
    assert lr_finder.suggestion_window(100, 100) == slice(10, 95)
    assert lr_finder.suggestion_window(40, 100) == slice(10, 35)
    assert lr_finder.suggestion_window(14, 100) == slice(0, 14)  # too short: whole curve


def test_quadratic_suggestions_land_near_the_best_rate():
    """SGD on a quadratic of curvature h converges fastest at lr = 1/h and diverges past 2/h.

    Measured with the default sweep (1e-7 to 10, 100 steps; 2 seeds x 2 curvatures): `minimum`
    at 0.26-0.39/h, `steep` at 0.20-0.24/h, `valley` at 0.018-0.026/h. Valley sits lower because
    the smoothed loss (an EMA with a memory of ~50 steps) keeps falling long after the raw loss
    has: the longest valley spans from the first movement to the divergence. Each suggestion
    also follows h: 16x the curvature gives 16x smaller suggestions.
    """
    found = {}
    for scale in (1.0, 4.0):
        h = 2 * scale**2
        for seed in (0, 1):
            keras.utils.set_random_seed(seed)
            result = kt.find_learning_rate(
                one_weight_model(), quadratic_data(scale, 0.3, seed), phase=SGD, loss="mse"
            )
            assert result.stopped == "diverged"
            relative = {name: rate * h for name, rate in result.suggestions.items()}
            found[scale, seed] = relative
            assert result.suggestion == result.suggestions["valley"]
            assert all(r < 1.0 for r in relative.values()), relative  # all converge, none waste
            assert 1 / 6 <= relative["minimum"] and 1 / 6 <= relative["steep"], relative
            assert 1 / 100 <= relative["valley"] <= 1 / 10, relative
    for seed in (0, 1):
        for name in lr_finder.SUGGESTIONS:
            ratio = found[4.0, seed][name] / found[1.0, seed][name]
            assert 0.5 <= ratio <= 2.0, (name, ratio)


# --- restoration ---------------------------------------------------------------------------------


def _all_layers(model):
    return model._flatten_layers(include_self=True, recursive=True)


def _values(variables):
    return [np.array(v.numpy()) for v in variables]


def _state(model):
    return {
        "values": _values(model.variables),
        "layers": [(layer.name, layer.trainable) for layer in _all_layers(model)],
        "variables": [(v.path, v.trainable) for v in model.variables],
        "trainable": [v.path for v in model.trainable_variables],
    }


@pytest.fixture
def spy_restore(monkeypatch):
    """Records which variables the sweep had changed when restoration began."""
    changed = []
    restore = lr_finder._Snapshot.restore

    def spy(self):
        changed.append(
            [
                v.path
                for v, value in zip(self.variables, self.values, strict=True)
                if not np.array_equal(v, value)
            ]
        )
        restore(self)

    monkeypatch.setattr(lr_finder._Snapshot, "restore", spy)
    return changed


def _assert_restored(model, before):
    after = _state(model)
    assert same_weights(before["values"], after["values"])  # bit-identical
    assert before["layers"] == after["layers"] and before["variables"] == after["variables"]
    assert before["trainable"] == after["trainable"]


def test_head_sweep_restores_weights_and_trainable_flags(tiny_model, images, spy_restore):
    kt.unfreeze(tiny_model, blocks=1)  # an unusual trainable set the sweep must give back
    before = _state(tiny_model)
    result = kt.find_learning_rate(
        tiny_model, kt.data.from_arrays(*images, batch_size=8), num_iterations=10
    )
    assert result.cached == "pooling" and len(result.lrs) == 10
    assert {p.split("/")[0] for p in spy_restore[0]} >= {"logits"}  # the sweep trained the head
    assert not any(p.startswith("block_16") for p in spy_restore[0])  # and nothing else
    _assert_restored(tiny_model, before)


@pytest.mark.slow  # ~10 s: a compiled tiny model fitted before and after two sweeps
def test_sweeps_leave_the_compiled_model_and_its_optimizer_as_they_were(
    tiny_model, images, spy_restore
):
    model = tiny_model
    kt.unfreeze(model, blocks=1)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    model.fit(*images, batch_size=8, epochs=1, steps_per_epoch=1, verbose=0)
    optimizer = model.optimizer
    before, optimizer_before = _state(model), _values(optimizer.variables)
    assert int(optimizer.iterations) == 1
    data = kt.data.from_arrays(*images, batch_size=8)

    head = kt.find_learning_rate(model, data, num_iterations=10)
    top = kt.find_learning_rate(
        model, data, phase=kt.Phase("top", 1, trainable=2), num_iterations=10
    )

    assert head.cached == "pooling" and top.cached == "block_15_add"  # cached at the cut
    assert any(p.startswith("Conv_1") for p in spy_restore[1])  # the top phase trained the top
    _assert_restored(model, before)
    assert model.optimizer is optimizer and same_weights(
        optimizer_before, _values(optimizer.variables)
    )
    # Still compiled as before: the next step is the optimizer's second.
    model.fit(*images, batch_size=8, epochs=1, steps_per_epoch=1, verbose=0)
    assert int(optimizer.iterations) == 2


@pytest.mark.slow  # ~13 s: ten steps of the whole tiny model
def test_full_model_sweep_restores_an_uncompiled_model(images, spy_restore):
    model = keras.Sequential([keras.layers.RandomFlip("horizontal")], name="augmentation")
    with_aug = kt.build_classifier(
        "mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35, augmentation=model
    )
    before = _state(with_aug)
    result = kt.find_learning_rate(
        with_aug, kt.data.from_arrays(*images, batch_size=8), phase="head", num_iterations=10
    )
    assert result.cached is False  # augmentation before the backbone: no cache
    assert spy_restore[0]  # trained
    _assert_restored(with_aug, before)
    assert not with_aug.compiled and getattr(with_aug, "optimizer", None) is None


def test_leaves_a_reshuffling_dataset_where_it_was(tiny_model, images):
    """The sweep iterates a detached copy, so the next fit sees the order it would have seen."""

    def first_epoch_order(ds):
        return np.concatenate([x.numpy().sum(axis=(1, 2, 3)) for x, _ in ds])

    data = kt.data.from_arrays(*images, batch_size=8)
    twin = kt.data.from_arrays(*images, batch_size=8)
    kt.find_learning_rate(tiny_model, data, num_iterations=10)
    np.testing.assert_array_equal(first_epoch_order(data), first_epoch_order(twin))


# --- arguments -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(start_lr=0), ValueError, "start_lr"),
        (dict(end_lr=float("nan")), ValueError, "end_lr"),
        (dict(start_lr=1.0, end_lr=0.1), ValueError, "larger than `start_lr`"),
        (dict(num_iterations=5), ValueError, "num_iterations"),
        (dict(num_iterations=20.0), TypeError, "num_iterations"),
        (dict(suggestion="slide"), ValueError, "suggestion"),
        (dict(phase="top"), TypeError, "phase"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(kwargs, error, match):
    model = one_weight_model()
    x = np.ones((16, 1), "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, x)).batch(8)
    with pytest.raises(error, match=match):
        kt.find_learning_rate(model, ds, loss="mse", **kwargs)
    assert not model.compiled and float(model.get_layer("predictions").kernel[0, 0]) == 0.0


def test_labels_that_do_not_fit_the_head_are_refused(tiny_model, images):
    x, _ = images
    one_hot_of_four = np.eye(4, dtype="float32")[np.arange(len(x)) % 4]
    ds = tf.data.Dataset.from_tensor_slices((x, one_hot_of_four)).batch(8)
    with pytest.raises(ValueError, match="data"):
        kt.find_learning_rate(tiny_model, ds, num_iterations=10)


def test_plot_marks_the_suggestions(tmp_path):
    x = np.ones((64, 1), "float32")
    ds = tf.data.Dataset.from_tensor_slices((x, 3 * x)).batch(8)
    result = kt.find_learning_rate(one_weight_model(), ds, phase=SGD, loss="mse")
    figure = result.plot()
    path = tmp_path / "lr.png"
    figure.savefig(path)
    assert path.stat().st_size > 5000
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"
    assert any("valley" in text.get_text() for text in ax.get_legend().get_texts())
    assert "suggest" in str(result).lower()
