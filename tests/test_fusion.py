"""Tests for `keras_transfer.fusion` and the toolkit on fusion models: graph, preprocessing,
per-backbone freezing, phases, caching, features, `.keras` and SavedModel round trips, errors."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import same_weights, weights_of

import keras_transfer as kt
from keras_transfer.export import export_for_serving

SIZE = 32
# Two families with other preprocessing ('tf': [-1, 1]; 'none': MobileNetV3 rescales itself).
BACKBONES = [("mobilenet_v2", {"alpha": 0.35}), "mobilenet_v3_small"]
POOLED = {"mobilenet_v2": 1280, "mobilenet_v3_small": 576}


def build(**kwargs):
    kwargs = {"image_size": SIZE, "weights": None, "dropout": 0.0, **kwargs}
    return kt.build_fusion_classifier(BACKBONES, 3, **kwargs)


@pytest.fixture(scope="module")
def fused():
    """One fused model shared by the module; tests that train restore its weights after."""
    keras.utils.set_random_seed(0)
    model = build()
    start = model.get_weights()
    yield model
    model.set_weights(start)


@pytest.fixture
def fresh(fused):
    """`fused` with its starting weights and every backbone frozen; restored afterwards."""
    start = fused.get_weights()
    kt.freeze_backbone(fused)
    yield fused
    fused.set_weights(start)
    kt.freeze_backbone(fused)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.arange(24) % 3
    x = rng.uniform(0, 255, (24, SIZE, SIZE, 3)) * 0.5 + y[:, None, None, None] * 60.0
    return np.clip(x, 0, 255).astype("float32"), y


def test_graph_names_shapes_and_head(fused):
    assert fused.input_shape == (None, SIZE, SIZE, 3) and fused.output_shape == (None, 3)
    assert [b.name for b in kt.find_backbones(fused)] == list(POOLED)
    assert fused.get_layer("pooling").output.shape == (None, sum(POOLED.values()))
    for name, width in POOLED.items():
        assert fused.get_layer(f"{name}_pooling").output.shape == (None, width)
    modes = [fused.get_layer(f"{name}_preprocessing").mode for name in POOLED]
    assert modes == ["tf", "none"]
    head = kt.head_of(fused)
    assert (head.kind, head.num_outputs, head.logits_layer) == ("multiclass", 3, "logits")
    assert fused.get_layer("logits").dtype_policy.name == "float32"


def test_each_backbone_sees_its_own_preprocessing(fused, data):
    x = data[0][:6]
    mobilenet_v2 = kt.find_backbone(fused, "mobilenet_v2")
    mobilenet_v3 = kt.find_backbone(fused, backbone="mobilenet_v3_small")
    # Alone: MobileNetV2 takes [-1, 1]; MobileNetV3 rescales raw [0, 255] pixels itself.
    alone_v2 = np.asarray(mobilenet_v2(x / 127.5 - 1.0, training=False)).mean(axis=(1, 2))
    alone_v3 = np.asarray(mobilenet_v3(x, training=False)).mean(axis=(1, 2))
    features = kt.features.extract(fused, x, at="pooling")
    assert features.shape == (6, 1280 + 576)
    # Relative to each part's scale: a random MobileNetV3's features are tiny (about 1e-11).
    for got, alone in ((features[:, :1280], alone_v2), (features[:, 1280:], alone_v3)):
        scale = np.abs(alone).max()
        assert scale > 0
        np.testing.assert_allclose(got, alone, rtol=1e-3, atol=1e-4 * scale)
    # The other backbone's preprocessing would have given other features.
    swapped = np.asarray(mobilenet_v3(x / 127.5 - 1.0, training=False)).mean(axis=(1, 2))
    assert np.abs(swapped - alone_v3).max() > 0.05 * np.abs(alone_v3).max()
    # The head reads exactly those features.
    logits = kt.logits_model(fused).predict(x, verbose=0)
    head = fused.get_layer("logits")
    expected = features @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)


def test_find_backbone_and_unfreeze_need_a_name_on_a_fusion_model(fresh, data):
    with pytest.raises(ValueError, match=r"fuses 2 backbones .*backbone='mobilenet_v2'"):
        kt.find_backbone(fresh)
    with pytest.raises(ValueError, match="backbone="):
        kt.unfreeze(fresh, blocks=1)
    with pytest.raises(ValueError, match="Did you mean .*'mobilenet_v3_small'"):
        kt.unfreeze(fresh, blocks=1, backbone="mobilenet_v3")
    with pytest.raises(ValueError, match="not both"):
        kt.unfreeze(fresh, backbone="mobilenet_v2", backbones={"mobilenet_v2": {"blocks": 1}})
    before = weights_of(fresh)
    with pytest.raises(ValueError, match="unfreeze= / trainable="):  # refused before training
        kt.fine_tune(fresh, data, head_epochs=1, finetune_epochs=1, batch_size=8, verbose=0)
    assert same_weights(weights_of(fresh), before)
    assert all(not b.trainable for b in kt.find_backbones(fresh))


def test_per_backbone_freezing_and_summary(fresh):
    assert kt.unfreeze(fresh, blocks=2, backbone="mobilenet_v3_small") == "expanded_conv_9_add"
    summary = kt.trainable_summary(fresh)
    parts = {b.name: b for b in summary.backbones}
    assert parts["mobilenet_v2"].trainable_params == 0
    assert parts["mobilenet_v3_small"].trainable_blocks == 2
    assert summary.backbone_name == "mobilenet_v2 + mobilenet_v3_small"
    assert summary.backbone_trainable_params == parts["mobilenet_v3_small"].trainable_params > 0
    assert "backbone mobilenet_v3_small: 2 of 12 blocks train" in str(summary)
    cuts = kt.unfreeze(fresh, backbones={"mobilenet_v2": {"blocks": 1}})
    assert cuts == {"mobilenet_v2": "block_16_project_BN"}
    parts = {b.name: b for b in kt.trainable_summary(fresh).backbones}
    assert parts["mobilenet_v2"].trainable_blocks == 1
    assert parts["mobilenet_v3_small"].trainable_params == 0  # not listed: frozen
    kt.freeze_backbone(fresh, backbone="mobilenet_v2")
    assert kt.trainable_summary(fresh).backbone_trainable_params == 0


def test_fit_phase_unfreezing_one_backbone_leaves_the_other_bit_identical(fresh, data, caplog):
    v2, v3 = kt.find_backbones(fresh)
    before_v2, before_v3 = weights_of(v2), weights_of(v3)
    with caplog.at_level("WARNING"):
        history = kt.fit_phases(
            fresh,
            [kt.Phase("top", 1, trainable={"mobilenet_v3_small": 2}, learning_rate=1e-2)],
            data,
            batch_size=8,
            verbose=0,
        )
    assert history.cached == {"top": False}
    assert "runs plainly" in caplog.text and "fusion" in caplog.text
    assert same_weights(weights_of(v2), before_v2)  # kernels and BatchNorm statistics
    after_v3 = weights_of(v3)
    changed = [not np.array_equal(a, b) for a, b in zip(before_v3, after_v3, strict=True)]
    assert any(changed)
    # Only the top two blocks moved: the stem's kernel is untouched.
    stem = [w.path for w in v3.weights].index(v3.get_layer("conv").kernel.path)
    assert not changed[stem]


def test_head_phase_cached_equals_plain(fresh, data):
    start = fresh.get_weights()
    dataset = tf.data.Dataset.from_tensor_slices(data).batch(8)
    runs = {}
    for cache in (True, False):
        fresh.set_weights(start)
        history = kt.fit_phases(
            fresh, [kt.Phase("head", 1, learning_rate=1e-2)], dataset, cache=cache, verbose=0
        )
        runs[cache] = history, fresh.predict(data[0], verbose=0), weights_of(fresh)
    assert runs[True][0].cached == {"head": "pooling"}
    assert runs[False][0].cached == {"head": False}
    np.testing.assert_allclose(
        runs[True][0].history["loss"], runs[False][0].history["loss"], rtol=1e-5
    )
    np.testing.assert_allclose(runs[True][1], runs[False][1], atol=1e-5)
    for a, b in zip(runs[True][2], runs[False][2], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    fresh.set_weights(start)
    assert np.abs(fresh.predict(data[0], verbose=0) - runs[True][1]).max() > 1e-3  # it trained


def test_keras_round_trip_under_safe_mode(fused, data, tmp_path):
    path = tmp_path / "fused.keras"
    fused.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        reloaded.predict(data[0], verbose=0), fused.predict(data[0], verbose=0), atol=1e-6
    )
    assert [b.name for b in kt.find_backbones(reloaded)] == list(POOLED)
    assert kt.unfreeze(reloaded, blocks=1, backbone="mobilenet_v2") == "block_16_project_BN"


@pytest.mark.slow
def test_export_reload_outputs_equal(fused, data, tmp_path):
    path = export_for_serving(fused, tmp_path / "fused", warmup=False, save_keras=False)
    loaded = tf.saved_model.load(str(path))
    served = loaded.signatures["serving_default"](images=tf.constant(data[0][:4]))
    expected = fused.predict(data[0][:4], verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)


def test_repeated_backbone_resized_branch_and_greyscale(tmp_path):
    model = kt.build_fusion_classifier(
        [("mobilenet_v2", {"alpha": 0.35}), ("mobilenet_v2", {"alpha": 0.35, "image_size": 48})],
        2,
        image_size=SIZE,
        weights=None,
        channels=1,
    )
    assert [b.name for b in kt.find_backbones(model)] == ["mobilenet_v2", "mobilenet_v2_2"]
    assert model.get_layer("mobilenet_v2_2_resize").output.shape == (None, 48, 48, 3)
    assert model.input_shape == (None, SIZE, SIZE, 1)
    assert model.name == "mobilenet_v2_mobilenet_v2_2_fusion"
    # The repeated backbone keeps its registry entry's blocks.
    second = kt.find_backbone(model, "mobilenet_v2_2")
    assert kt.unfreeze_points(second) == kt.unfreeze_points(second, "mobilenet_v2")
    cuts = kt.unfreeze(model, backbones={"mobilenet_v2_2": {"blocks": 1}})
    assert cuts == {"mobilenet_v2_2": "block_16_project_BN"}
    x = np.random.default_rng(1).uniform(0, 255, (2, SIZE, SIZE, 1)).astype("float32")
    assert kt.features.extract(model, x).shape == (2, 2560)
    # Two copies with the same layer names save and reload each with its own weights.
    first, second = kt.find_backbones(model)
    assert not same_weights(weights_of(first), weights_of(second))
    model.save(tmp_path / "twice.keras")
    reloaded = keras.saving.load_model(tmp_path / "twice.keras", safe_mode=True)
    for got, want in zip(kt.find_backbones(reloaded), (first, second), strict=True):
        assert got.name == want.name and same_weights(weights_of(got), weights_of(want))


BAD_INPUT = [
    (["mobilenet_v2", "mobilenet_v3_smal"], {}, ValueError, r"\[1\].*'mobilenet_v3_small'"),
    (["mobilenet_v2"], {}, ValueError, "at least two backbones"),
    ("mobilenet_v2", {}, TypeError, "must be a list"),
    (BACKBONES, {"channels": 2}, ValueError, r"`channels` must be 1 .* channels=2"),
    ([("mobilenet_v2", {"channels": 1}), "mobilenet_v3_small"], {}, ValueError, "set once"),
    (BACKBONES, {"pooling": "mean"}, ValueError, "Unknown `pooling`"),
    (BACKBONES, {"image_size": 16}, ValueError, "below mobilenet_v2's minimum"),
    (BACKBONES, {"weights": "/no/such.weights.h5"}, ValueError, "not a file"),
    (BACKBONES, {"dropout": 1.0}, ValueError, r"`dropout` must be in \[0, 1\)"),
]


def test_bad_input_is_refused_before_building(monkeypatch):
    built = []
    monkeypatch.setattr(kt.Backbone, "build", lambda self, *a, **k: built.append(self))
    for backbones, kwargs, error, match in BAD_INPUT:
        kwargs = {"image_size": SIZE, "weights": None, **kwargs}
        with pytest.raises(error, match=match):
            kt.build_fusion_classifier(backbones, 3, **kwargs)
    assert built == []


def test_phase_trainable_per_backbone_spelling():
    spec = kt.phases.unfreeze_kwargs({"mobilenet_v2": 2, "densenet121": "all", "resnet50": None})
    assert spec == {
        "backbones": {
            "mobilenet_v2": {"blocks": 2},
            "densenet121": {"fraction": 1.0},
            "resnet50": None,
        }
    }
    assert kt.phases.unfreeze_kwargs({"mobilenet_v2": None}) is None  # head only
    assert kt.phases.unfreeze_kwargs({"blocks": 2}) == {"blocks": 2}  # kt.unfreeze's own form


MIRRORED = """
import json, os
os.environ["KERAS_BACKEND"] = "tensorflow"
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import keras_transfer as kt

rng = np.random.default_rng(0)
y = np.arange(16) % 3
x = np.clip(rng.uniform(0, 255, (16, 32, 32, 3)) * 0.5 + y[:, None, None, None] * 60, 0, 255)
data = tf.data.Dataset.from_tensor_slices((x.astype("float32"), y)).batch(8)
# Adam: random-init backbones pass tiny gradients, which SGD's steps would lose in float32.
phases = [kt.Phase("head", 1, learning_rate=1e-3),
          kt.Phase("top", 1, trainable={"mobilenet_v2": 1}, learning_rate=1e-3)]

def run(strategy):
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = kt.build_fusion_classifier([("mobilenet_v2", {"alpha": 0.35}),
                                            "mobilenet_v3_small"], 3, image_size=32,
                                           weights=None, dropout=0.0)
    v2 = kt.find_backbone(model, "mobilenet_v2")
    weights = v2.get_weights() + model.get_layer("logits").get_weights()[:1]
    start = [np.array(w, copy=True) for w in weights]
    history = kt.fit_phases(model, phases, data, strategy=strategy, jit_compile=False,
                            verbose=0)
    after = v2.get_weights() + [model.get_layer("logits").get_weights()[0]]
    moved = [float(np.abs(a - b).max()) for a, b in zip(after, start)]
    return {"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
            "cached": history.cached, "weights": [w.tolist() for w in model.get_weights()],
            "moved": [sum(m > 0 for m in moved[:-1]), moved[-1]]}

one = run(tf.distribute.get_strategy())
two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
print("RESULT " + json.dumps({"one": one, "two": two}))
"""


@pytest.mark.slow
def test_fit_phases_on_a_fusion_model_under_mirrored_strategy(tmp_path):
    """Two replicas (logical CPUs, set before TensorFlow starts: a subprocess) end where one
    device does, through a cached head phase and a plain per-backbone unfreeze."""
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert (out["one"]["replicas"], out["two"]["replicas"]) == (1, 2)
    assert out["two"]["cached"] == out["one"]["cached"] == {"head": "pooling", "top": False}
    np.testing.assert_allclose(out["two"]["loss"], out["one"]["loss"], rtol=1e-5)
    for a, b in zip(out["one"]["weights"], out["two"]["weights"], strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    for run in ("one", "two"):  # it trained: the head, and variables of the unfrozen backbone
        unfrozen_moved, head_moved = out[run]["moved"]
        assert unfrozen_moved > 0 and head_moved > 0, out[run]["moved"]
