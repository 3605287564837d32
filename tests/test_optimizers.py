"""kt.optimizers: per-block learning rates scale each variable's update (SGD, Adam, AdamW's weight
decay), through fit_phases, a .keras round trip, checkpoint-resume and MirroredStrategy."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer import checkpointing, optimizers

DECAY = 0.5
BLOCKS = 3


def _model():
    # No dropout: the step fit takes must be the one a GradientTape sees.
    return kt.build_classifier(
        "mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35, dropout=0.0
    )


def _expected_factors(model, decay):
    """Factor per trainable variable, from the definition: block k below the top at decay**k."""
    backbone = kt.find_backbone(model)
    names = [op.name for op in backbone.operations]
    ends = [names.index(p) for p in kt.unfreeze_points(backbone)]
    factors = {}
    for i, op in enumerate(backbone.operations):
        k = len([end for end in ends if i <= end])
        for v in op.weights:
            factors[id(v)] = decay**k
    return {id(v): factors.get(id(v), 1.0) for v in model.trainable_variables}


def _one_step(images, optimizer, learning_rate, decay=DECAY):
    """One fit_phases step on 8 images with BatchNorm trained (random-init MobileNetV2 with frozen
    BatchNorm has vanishing gradients); returns (model, before, after, gradients, factors)."""
    x, y = images[0][:8], images[1][:8]
    model = _model()
    kt.unfreeze(model, blocks=BLOCKS, train_batchnorm=True)
    loss = keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        value = loss(y, model(x, training=True))
    grads = [np.array(g) for g in tape.gradient(value, model.trainable_variables)]
    before = [np.array(v) for v in model.trainable_variables]
    factors = _expected_factors(model, decay)
    phase = kt.Phase(
        "top",
        1,
        trainable=BLOCKS,
        learning_rate=learning_rate,
        optimizer=optimizer,
        train_batchnorm=True,
        layer_lr_decay=decay,
    )
    kt.fit_phases(model, [phase], (x, y), batch_size=8, loss=loss, cache=False, verbose=0)
    after = [np.array(v) for v in model.trainable_variables]
    return model, before, after, grads, [factors[id(v)] for v in model.trainable_variables]


def test_block_multipliers_follow_the_unfreeze_points(tiny_model):
    factors = optimizers.block_lr_multipliers(tiny_model, DECAY)
    points = kt.unfreeze_points(kt.find_backbone(tiny_model))
    assert points[:2] == ["block_16_project_BN", "block_15_add"]
    assert "Conv_1/kernel" not in factors and "logits/kernel" not in factors  # top block, head
    assert factors["block_16_project/kernel"] == DECAY
    assert factors["block_15_expand/kernel"] == DECAY**2
    assert factors["Conv1/kernel"] == DECAY ** len(points)  # the stem, below the last point
    assert optimizers.block_lr_multipliers(tiny_model, 1.0) == {}


def test_sgd_one_step_updates_follow_the_decay_exactly(images):
    model, before, after, grads, factors = _one_step(images, "sgd", 0.1)
    assert sorted(set(factors)) == [DECAY**2, DECAY, 1.0]
    eps = np.finfo("float32").eps
    kernels = [v.path.endswith("kernel") for v in model.trainable_variables]
    assert sorted({f for f, k in zip(factors, kernels, strict=True) if k}) == [0.25, 0.5, 1.0]
    for b, a, g, f, kernel in zip(before, after, grads, factors, kernels, strict=True):
        # SGD without momentum: w - lr * factor * g. (Kernels only: some BatchNorm betas of this
        # random network have gradients at float noise, where fit's and the tape's differ.)
        if not kernel:
            continue
        step = np.float32(0.1 * f) * g
        atol = 1e-4 * np.abs(step).max() + 4 * eps * np.abs(b).max()
        np.testing.assert_allclose(b - a, step, rtol=1e-3, atol=atol)
    # The update itself is measurable in every block and its size halves block by block.
    ratio = {f: [] for f in set(factors)}
    for b, a, g, f, kernel in zip(before, after, grads, factors, kernels, strict=True):
        big = np.abs(0.1 * f * g) > 1e-4 * np.abs(b).max()  # float32 rounding below 1e-3
        if kernel and big.any():
            ratio[f].append(np.median((b - a)[big] / (0.1 * g[big])))
    for f, values in ratio.items():
        assert values, f"no measurable update at factor {f}"
        np.testing.assert_allclose(values, f, rtol=1e-3)


def test_sgd_step_is_the_scaled_rate_times_the_gradient_bit_for_bit():
    variables = [keras.Variable(np.zeros(4, "float32"), name=n) for n in ("top", "mid", "low")]
    factors = {variables[1].path: DECAY, variables[2].path: DECAY**2}
    optimizer = optimizers.DiscriminativeOptimizer(keras.optimizers.SGD(0.1), factors)
    grads = [np.random.default_rng(i).normal(size=4).astype("float32") for i in range(3)]
    optimizer.apply(grads, variables)
    rate = np.float32(0.1)
    for v, g, f in zip(variables, grads, (1.0, DECAY, DECAY**2), strict=True):
        np.testing.assert_array_equal(np.array(v), -(rate * np.float32(f)) * g)


def test_adam_first_step_magnitude_follows_the_decay(images):
    """Adam's first step is lr * g / (|g| + eps / sqrt(1 - beta_2)) in Keras: lr_k wherever
    |g| >> 3e-6."""
    model, before, after, grads, factors = _one_step(images, "adam", 1e-3)
    checked = set()
    for v, b, a, g, f in zip(model.trainable_variables, before, after, grads, factors, strict=True):
        big = np.abs(g) > 1e-5
        if v.path.endswith("kernel") and big.any():  # kernels: see the SGD test
            expected = 1e-3 * f * np.abs(g) / (np.abs(g) + 1e-7 / np.sqrt(1 - 0.999))
            np.testing.assert_allclose(np.abs(b - a)[big], expected[big], rtol=2e-3)
            checked.add(f)
    assert checked == {1.0, DECAY, DECAY**2}
    # Scaling the gradient instead would leave Adam's step at lr everywhere.
    lower = [np.abs(b - a).max() for b, a, f in zip(before, after, factors, strict=True) if f < 1]
    assert max(lower) < 0.6e-3


def test_adamw_weight_decay_follows_the_scaled_rate():
    top, low = (
        keras.Variable(np.ones(3, "float32"), name="top"),
        keras.Variable(np.ones(3, "float32"), name="low"),
    )
    inner = keras.optimizers.AdamW(learning_rate=0.1, weight_decay=0.5)
    optimizer = optimizers.DiscriminativeOptimizer(inner, {low.path: 0.25})
    optimizer.apply([np.zeros(3, "float32")] * 2, [top, low])  # zero gradients: decay only
    np.testing.assert_allclose(np.array(top), 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.array(low), 1 - 0.1 * 0.25 * 0.5, rtol=1e-6)
    assert int(optimizer.iterations) == 1
    optimizer.learning_rate = 0.2  # callbacks set the phase rate; the factors stay
    assert float(inner.learning_rate) == pytest.approx(0.2)


def test_saved_model_reloads_with_the_optimizer_state(tmp_path, images):
    model, *_ = _one_step(images, "adam", 1e-3)
    assert isinstance(model.optimizer, optimizers.DiscriminativeOptimizer)
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(reloaded.optimizer, optimizers.DiscriminativeOptimizer)
    assert reloaded.optimizer.multipliers == model.optimizer.multipliers
    got = [np.array(v) for v in reloaded.optimizer.variables]
    want = [np.array(v) for v in model.optimizer.variables]
    assert len(got) == len(want) and int(reloaded.optimizer.iterations) == 1
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    # kt.unfreeze recompiles from the compile config: the wrapper survives it.
    kt.unfreeze(reloaded, blocks=1)
    assert reloaded.optimizer.multipliers == model.optimizer.multipliers


def test_a_clone_at_another_rate_keeps_the_factors():
    optimizer = optimizers.DiscriminativeOptimizer(keras.optimizers.SGD(0.1), {"a/kernel": 0.5})
    clone = kt.phases.make_optimizer(optimizer, 0.01, keras.Sequential())
    assert clone.multipliers == {"a/kernel": 0.5}
    assert float(clone.learning_rate) == pytest.approx(0.01)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"top.layer_lr_decay=0"):
        kt.Phase("top", 1, trainable=2, layer_lr_decay=0)
    with pytest.raises(ValueError, match="layer_lr_decay=1.5"):
        kt.fine_tune(_model(), (np.zeros((2, 32, 32, 3)), np.zeros(2)), layer_lr_decay=1.5)
    with pytest.raises(TypeError, match="LossScaleOptimizer"):
        optimizers.DiscriminativeOptimizer(
            keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD())
        )
    with pytest.raises(ValueError, match="positive finite"):
        optimizers.DiscriminativeOptimizer(keras.optimizers.SGD(), {"a/kernel": -1.0})


def test_unregistered_backbone_is_refused_before_training():
    inputs = keras.Input((8, 8, 3))
    body = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs), name="my_body")
    outputs = keras.layers.Dense(2, activation="softmax", name="predictions")(
        keras.layers.GlobalAveragePooling2D()(body(inputs))
    )
    model = keras.Model(inputs, outputs)
    before = [np.array(w) for w in model.weights]
    with pytest.raises(ValueError, match="not in the registry"):
        kt.fit_phases(
            model,
            [kt.Phase("top", 1, trainable="all", layer_lr_decay=0.5)],
            (np.zeros((4, 8, 8, 3), "float32"), np.arange(4) % 2),
            loss="sparse_categorical_crossentropy",
            batch_size=4,
            verbose=0,
        )
    for a, b in zip(before, model.weights, strict=True):
        np.testing.assert_array_equal(a, np.array(b))


class _Kill(keras.callbacks.Callback):
    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.at:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_checkpoint_resume_restores_the_discriminative_optimizer(tmp_path, images):
    x, y = images
    phases = lambda *extra: [  # noqa: E731
        kt.Phase(
            "top",
            2,
            trainable=2,
            learning_rate=1e-3,
            train_batchnorm=True,
            layer_lr_decay=DECAY,
            callbacks=extra,
        ),
    ]

    def run(folder, *extra):
        keras.utils.set_random_seed(0)
        model = _model()
        kt.fit_phases(
            model,
            phases(*extra),
            (x, y),
            batch_size=8,
            verbose=0,
            checkpoint=kt.CheckpointOptions(folder, every=1),
        )
        return model

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", _Kill(at=4))  # killed in the second epoch (3 steps an epoch)
    state, _, arrays = checkpointing.read_checkpoint(tmp_path / "b")
    assert state["batch"] == 0 and state["epoch"] == 1 and not state["done"]
    resumed = run(tmp_path / "b")
    assert isinstance(resumed.optimizer, optimizers.DiscriminativeOptimizer)
    assert len(arrays) == len(resumed.optimizer.variables)
    assert int(resumed.optimizer.iterations) == int(uninterrupted.optimizer.iterations) == 6
    for a, b in zip(resumed.weights, uninterrupted.weights, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-5, atol=1e-6)


MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import numpy as np, keras
    import keras_transfer as kt

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    rng = np.random.default_rng(0)
    # Each replica gets 4 of the 8 images: the same 4, so BatchNorm's batch statistics (trained
    # here) are those of the single device's 8.
    x = np.concatenate([rng.uniform(0, 255, (4, 32, 32, 3))] * 2).astype("float32")
    y = np.arange(8) % 4 % 3
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    result = {}
    for name, current in (("mirrored", strategy), ("default", tf.distribute.get_strategy())):
        keras.utils.set_random_seed(0)
        with current.scope():
            model = kt.build_classifier(
                "mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35, dropout=0.0
            )
        before = [np.array(v) for v in model.weights]
        phase = kt.Phase("top", 1, trainable=2, learning_rate=0.1, optimizer="sgd",
                         train_batchnorm=True, layer_lr_decay=0.5)
        kt.fit_phases(model, [phase], data, cache=False, verbose=0)
        deltas = {v.path: (b - np.array(v)).tolist() for v, b in zip(model.weights, before)}
        result[name] = {
            "replicas": current.num_replicas_in_sync,
            "optimizer": type(model.optimizer).__name__,
            "deltas": deltas,
        }
    print("RESULT " + json.dumps(result), flush=True)
    """
)


@pytest.mark.slow
def test_mirrored_strategy_step_equals_the_single_device_step(tmp_path):
    """Two replicas of 4 images take the same per-block SGD step as one device with all 8."""
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["mirrored"]["replicas"] == 2
    assert result["mirrored"]["optimizer"] == "DiscriminativeOptimizer"
    mirrored, single = result["mirrored"]["deltas"], result["default"]["deltas"]
    assert mirrored.keys() == single.keys()
    moved = {"block_16_project/kernel": 0, "Conv_1/kernel": 0}
    for path, delta in single.items():
        np.testing.assert_allclose(mirrored[path], delta, rtol=1e-3, atol=1e-7)
        if path in moved:
            moved[path] = np.abs(delta).max()
    assert all(value > 0 for value in moved.values()), moved
