"""kt.Phase and kt.fit_phases: any number of phases, cached at each phase's cut, checked data."""

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import same_weights

import keras_transfer as kt
from keras_transfer import freezing


def _model():
    keras.utils.set_random_seed(0)
    return kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)


def _weights(model):
    return [np.array(w) for w in model.weights]


def _cut_name(model, blocks):
    ops = kt.find_backbone(model).operations
    return ops[freezing.plan_unfreeze(model, blocks)].name


THREE = [
    kt.Phase("head", 1),
    kt.Phase("top2", 1, trainable=2, learning_rate=1e-4),
    kt.Phase("top4", 1, trainable=4, learning_rate=1e-4, warmup_epochs=0.5, schedule="cosine"),
]


def test_three_phases_cache_at_each_cut_and_match_the_plain_run(images):
    x, y = images
    plain = _model()
    start = _weights(plain)
    plain_history = kt.fit_phases(plain, THREE, (x, y), batch_size=8, cache=False, verbose=0)
    cached = _model()
    assert same_weights(start, _weights(cached))
    history = kt.fit_phases(cached, THREE, (x, y), batch_size=8, cache=True, verbose=0)

    assert (
        history.phases == plain_history.phases == {"head": (0, 1), "top2": (1, 2), "top4": (2, 3)}
    )
    cuts = {"head": "pooling", "top2": _cut_name(cached, 2), "top4": _cut_name(cached, 4)}
    assert history.cached == cuts
    assert plain_history.cached == dict.fromkeys(cuts, False)
    assert set(history.cache_info) == set(cuts.values())  # one forward pass filled all three
    np.testing.assert_allclose(history.history["loss"], plain_history.history["loss"], rtol=1e-3)
    for got, want in zip(_weights(cached), _weights(plain), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    # Below the deepest cut nothing trained; above it something did.
    backbone = kt.find_backbone(cached)
    ops = [op.name for op in backbone.operations]
    deepest = ops.index(cuts["top4"])
    for layer, before in zip(backbone.layers, _weights_by_layer(_model()), strict=True):
        if layer.weights and ops.index(layer.name) <= deepest:
            assert same_weights(before, [np.array(w) for w in layer.weights]), layer.name


def _weights_by_layer(model):
    return [[np.array(w) for w in layer.weights] for layer in kt.find_backbone(model).layers]


def test_fine_tune_is_fit_phases_with_its_two_phases(images):
    x, y = images
    recipe = _model()
    kt.fine_tune(
        recipe, (x, y), head_epochs=1, finetune_epochs=1, unfreeze=2, batch_size=8, verbose=0
    )
    phases = [
        kt.Phase("head", 1, learning_rate=1e-3),
        kt.Phase(
            "finetune", 1, trainable=2, learning_rate=1e-4, warmup_epochs=1.0, schedule="cosine"
        ),
    ]
    explicit = _model()
    kt.fit_phases(explicit, phases, (x, y), batch_size=8, verbose=0)
    for got, want in zip(_weights(recipe), _weights(explicit), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_phase_after_a_wider_one_runs_plainly_since_its_cache_would_be_stale(images):
    x, y = images
    model = _model()
    phases = [kt.Phase("wide", 1, trainable=4), kt.Phase("narrow", 1, trainable=2)]
    before = _weights(model)
    with pytest.raises(ValueError, match="'narrow' cannot train on cached.*stale"):
        kt.fit_phases(model, phases, (x, y), batch_size=8, cache=True, verbose=0)
    assert same_weights(before, _weights(model))
    history = kt.fit_phases(model, phases, (x, y), batch_size=8, verbose=0)
    assert history.cached == {"wide": _cut_name(model, 4), "narrow": False}


def test_on_phase_begin_sees_each_phase_unfrozen_and_optimizers_are_cloned(images):
    x, y = images
    model = _model()
    sgd = keras.optimizers.SGD(learning_rate=0.5, momentum=0.9, nesterov=True)
    schedule = keras.optimizers.schedules.ExponentialDecay(1e-3, decay_steps=1, decay_rate=0.5)
    phases = [
        kt.Phase("head", 1, optimizer=sgd, learning_rate=1e-2),
        kt.Phase("top", 1, trainable=2, learning_rate=schedule, callbacks=[]),
    ]
    seen = []

    def on_phase_begin(m, phase):
        assert m is model
        seen.append((phase.name, kt.find_backbone(m).trainable, len(m.trainable_weights)))

    kt.fit_phases(model, phases[:1], (x, y), batch_size=8, on_phase_begin=on_phase_begin, verbose=0)
    assert model.optimizer is not sgd and isinstance(model.optimizer, keras.optimizers.SGD)
    assert model.optimizer.momentum == 0.9 and model.optimizer.nesterov
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-2)
    assert int(sgd.iterations) == 0  # the instance given is a template, never trained
    kt.fit_phases(model, phases, (x, y), batch_size=8, on_phase_begin=on_phase_begin, verbose=0)
    head_only = len(model.get_layer("logits").trainable_weights)
    assert seen[0] == ("head", False, head_only)
    assert seen[2][:2] == ("top", True) and seen[2][2] > head_only
    steps = int(np.asarray(model.optimizer.iterations))
    assert float(model.optimizer.learning_rate) == pytest.approx(1e-3 * 0.5**steps)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(name="", epochs=1), "name=''"),
        (dict(name="a", epochs=-1), "a.epochs=-1"),
        (dict(name="a", epochs=1, learning_rate=0), "a.learning_rate=0"),
        (dict(name="a", epochs=1, schedule="linear"), "schedule='linear'"),
        (dict(name="a", epochs=1, warmup_epochs=-1), "warmup_epochs=-1"),
        (
            dict(
                name="a",
                epochs=1,
                warmup_epochs=1,
                learning_rate=keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9),
            ),
            "brings its own",
        ),
    ],
)
def test_bad_phases_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        kt.Phase(**kwargs)


def test_bad_phase_lists_are_refused_before_training(tiny_model, images):
    x, y = images
    with pytest.raises(ValueError, match="unique.*'a'"):
        kt.fit_phases(tiny_model, [kt.Phase("a", 1), kt.Phase("a", 1)], (x, y), verbose=0)
    with pytest.raises(ValueError, match="Nothing to train"):
        kt.fit_phases(tiny_model, [kt.Phase("a", 0)], (x, y), verbose=0)
    with pytest.raises(TypeError, match="regularizer"):
        kt.Phase("a", 1, regularizer=0.01)
    with pytest.raises(ValueError, match="'l3'"):
        kt.Phase("a", 1, regularizer="l3")
    assert isinstance(kt.Phase("a", 1, regularizer="l2sp").regularizer, kt.regularizers.L2SP)
    with pytest.raises(TypeError, match="non-empty list of kt.Phase"):
        kt.fit_phases(tiny_model, [], (x, y), verbose=0)
    assert not tiny_model.compiled


def _pipeline(x, y):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(8)


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize(
    "bad, match",
    [
        ("label_too_large", r"label 3, outside the range 0\.\.\.2"),
        ("negative_label", "negative label -1"),
        ("nan_pixels", "non-finite pixel values.*first in batch 2"),
        ("one_hot_too_wide", r"labels have shape \[None, 5\]"),
        ("fractional_label", "non-integer class ids"),
    ],
)
def test_bring_your_own_data_is_checked_before_the_first_step(
    tiny_model, images, cache, bad, match
):
    x, y = images
    x, y = x.copy(), y.astype("float32")
    if bad == "label_too_large":
        y[-1] = 3
    elif bad == "negative_label":
        y[5] = -1
    elif bad == "nan_pixels":
        x[17, 3, 3, 0] = np.nan
    elif bad == "one_hot_too_wide":
        y = np.eye(5, dtype="float32")[np.arange(len(x)) % 5]
    else:
        y[0] = 0.5
    before = _weights(tiny_model)
    with pytest.raises(ValueError, match=match):
        kt.fine_tune(
            tiny_model, _pipeline(x, y), head_epochs=1, finetune_epochs=1, cache=cache, verbose=0
        )
    assert same_weights(before, _weights(tiny_model))


def test_bad_validation_data_is_checked_too(tiny_model, images):
    x, y = images
    bad = y.copy()
    bad[0] = 7
    before = _weights(tiny_model)
    for cache in (True, False):
        with pytest.raises(ValueError, match="`validation_data` has label 7"):
            kt.fine_tune(
                tiny_model,
                _pipeline(x, y),
                _pipeline(x, bad),
                head_epochs=1,
                finetune_epochs=0,
                cache=cache,
                verbose=0,
            )
    assert same_weights(before, _weights(tiny_model))


def test_options_objects_are_validated_and_accepted(images, tmp_path):
    with pytest.raises(ValueError, match="cache='sometimes'"):
        kt.CacheOptions("sometimes")
    with pytest.raises(ValueError, match="checkpoint_every"):
        kt.CheckpointOptions(tmp_path, every=0)
    x, y = images
    model = _model()
    history = kt.fit_phases(
        model,
        [kt.Phase("head", 1)],
        (x, y),
        batch_size=8,
        cache=kt.CacheOptions(True, budget_bytes=0, directory=tmp_path / "cache"),
        verbose=0,
    )
    (info,) = history.cache_info["pooling"][:1]
    assert info["path"] is not None and info["examples"] == len(x)  # spilled to disk
    assert not any((tmp_path / "cache").iterdir())  # and deleted afterwards


def test_auto_learning_rate_comes_from_the_lr_finder_and_trains_at_it(images):
    x, y = images
    model = _model()
    history = kt.fit_phases(
        model, [kt.Phase("head", 1, learning_rate="auto")], (x, y), batch_size=8, verbose=0
    )
    found = history.learning_rates["head"]
    assert 1e-7 < found < 10
    assert float(model.optimizer.learning_rate) == pytest.approx(found)
    regularized = kt.fit_phases(
        _model(),
        [kt.Phase("head", 1, learning_rate="auto", regularizer="l2sp")],
        (x, y),
        batch_size=8,
        verbose=0,
    )
    assert regularized.learning_rates["head"] > 0
    with pytest.raises(ValueError, match="head_learning_rate='fast'"):
        kt.fine_tune(model, (x, y), head_learning_rate="fast", verbose=0)


@pytest.mark.parametrize("cache", [True, False])
def test_each_phase_traces_its_train_step_once(images, monkeypatch, cache):
    """Optimizer slots built before fit: a train step that created them while traced would be
    traced twice (the largest fixed cost of a short phase)."""
    x, y = images
    traces = []
    real_train_step = keras.Model.train_step

    def counting_train_step(self, data):
        traces.append(self.name)
        return real_train_step(self, data)

    monkeypatch.setattr(keras.Model, "train_step", counting_train_step)
    history = kt.fine_tune(
        _model(),
        (x, y),
        head_epochs=2,
        finetune_epochs=2,
        unfreeze=2,
        batch_size=8,
        cache=cache,
        verbose=0,
    )
    assert bool(history.cached["head"]) is cache
    assert len(traces) == 2 and len(set(traces)) == (2 if cache else 1), traces
