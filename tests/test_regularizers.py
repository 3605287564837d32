"""L2-SP and L2: the penalty equals its formula, follows the variables (cached phase models,
MirroredStrategy), pulls the backbone toward its start, and leaves no trace once detached."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import regularizers


def _zero_loss(y_true, y_pred):
    return 0.0 * keras.ops.sum(y_pred, axis=-1)


def _parts(model):
    """(backbone trainable, backbone frozen, head trainable) variables of a built classifier."""
    backbone = kt.find_backbone(model)
    source = backbone.trainable_weights
    frozen = [v for v in backbone.non_trainable_weights if "kernel" in v.path]
    ids = {id(v) for v in source}
    head = [v for v in model.trainable_weights if id(v) not in ids]
    return source, frozen, head


def _perturb(variables, rng, scale=0.05):
    for v in variables:
        v.assign(v.numpy() + rng.normal(0, scale, v.shape).astype("float32"))


def _total(model) -> float:
    return float(sum(float(loss) for loss in model.losses))


def _sq(a) -> float:
    return float(np.sum(np.square(np.asarray(a, dtype="float64"))))


def test_l2sp_penalty_is_the_formula_on_perturbed_weights(tiny_model, images):
    model = tiny_model
    kt.unfreeze(model, blocks=2)
    source, frozen, head = _parts(model)
    assert source and frozen and head
    start = [v.numpy().copy() for v in source]
    penalty = regularizers.L2SP(alpha=0.5, beta=0.2)
    penalty.attach(model)
    assert _total(model) == pytest.approx(0.05 * sum(_sq(v.numpy()) for v in head), rel=1e-5)
    rng = np.random.default_rng(1)
    _perturb(source, rng)
    _perturb(head, rng)
    _perturb(frozen, rng)  # frozen weights add nothing
    expected = 0.5 / 2 * sum(_sq(v.numpy() - w0) for v, w0 in zip(source, start, strict=True))
    expected += 0.5 * 0.2 / 2 * sum(_sq(v.numpy()) for v in head)
    assert expected > 1.0
    assert _total(model) == pytest.approx(expected, rel=1e-5)

    # What Keras adds to the loss: evaluate with and without the penalty.
    x, y = images
    model.compile(loss="sparse_categorical_crossentropy")
    with_penalty = model.evaluate(x, y, batch_size=len(x), verbose=0)
    penalty.detach(model)
    without = model.evaluate(x, y, batch_size=len(x), verbose=0)
    assert with_penalty - without == pytest.approx(expected, rel=1e-4)


def test_l2_penalty_is_the_formula_over_every_trainable_weight(tiny_model):
    model = tiny_model
    kt.unfreeze(model, blocks=1)
    _perturb(model.trainable_weights, np.random.default_rng(2))
    penalty = regularizers.L2(alpha=0.3)
    penalty.attach(model)
    expected = 0.3 / 2 * sum(_sq(v.numpy()) for v in model.trainable_weights)
    assert len(model.losses) == len(model.trainable_weights) == 3
    assert _total(model) == pytest.approx(expected, rel=1e-5)
    penalty.detach(model)
    assert model.losses == []


def test_one_sgd_step_follows_the_penalty_gradient(tiny_model, images):
    """With a zero data loss, one SGD step is w - lr * dΩ/dw: the penalty is what trains."""
    model = tiny_model
    kt.unfreeze(model, blocks=2)
    source, _, head = _parts(model)
    start = [v.numpy().copy() for v in source]
    alpha, beta, lr = 2.0, 0.5, 0.1
    penalty = regularizers.L2SP(alpha=alpha, beta=beta)
    penalty.attach(model)
    rng = np.random.default_rng(3)
    _perturb(source, rng)
    before_source = [v.numpy().copy() for v in source]
    before_head = [v.numpy().copy() for v in head]
    model.compile(optimizer=keras.optimizers.SGD(lr), loss=_zero_loss)
    x, y = images
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for v, w, w0 in zip(source, before_source, start, strict=True):
        np.testing.assert_allclose(v.numpy(), w - lr * alpha * (w - w0), rtol=1e-5, atol=1e-6)
    for v, w in zip(head, before_head, strict=True):
        np.testing.assert_allclose(v.numpy(), w - lr * alpha * beta * w, rtol=1e-5, atol=1e-6)
    penalty.detach(model)
    # The traced step is dropped: the next fit trains without the penalty (nothing moves).
    after = [v.numpy().copy() for v in model.trainable_weights]
    model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
    for v, w in zip(model.trainable_weights, after, strict=True):
        np.testing.assert_array_equal(v.numpy(), w)


def test_detach_restores_regularizers_and_config(tiny_model):
    model = tiny_model
    kt.unfreeze(model, blocks=2)
    config = model.get_config()
    layer_configs = {layer.name: layer.get_config() for layer in model.layers}
    kernel = model.get_layer("logits").kernel
    own = keras.regularizers.L2(0.5)
    kernel.regularizer = own  # a regularizer the user set keeps working, and comes back
    before = {id(v): v.regularizer for v in model.weights}
    penalty = regularizers.L2SP(alpha=0.1, beta=1.0)
    penalty.attach(model)
    assert penalty.attached
    expected = 0.5 * _sq(kernel.numpy()) + 0.1 / 2 * _sq(kernel.numpy())
    assert float(kernel.regularizer(kernel)) == pytest.approx(expected, rel=1e-5)
    assert model.get_config() == config
    assert {layer.name: layer.get_config() for layer in model.layers} == layer_configs
    penalty.detach(model)
    assert not penalty.attached
    assert {id(v): v.regularizer for v in model.weights} == before
    assert kernel.regularizer is own
    assert len(model.losses) == 1
    penalty.detach(model)  # a second detach is a no-op


def test_saved_model_carries_no_trace(tiny_model, tmp_path):
    model = tiny_model
    kt.unfreeze(model, blocks=2)
    model.save(tmp_path / "before.keras")
    penalty = regularizers.L2SP(alpha=0.1)
    penalty.attach(model)
    model.save(tmp_path / "during.keras")  # as a ModelCheckpoint callback would mid-phase
    penalty.detach(model)
    model.save(tmp_path / "after.keras")

    def config_of(name):
        with zipfile.ZipFile(tmp_path / name) as archive:
            return json.loads(archive.read("config.json"))

    reference = config_of("before.keras")
    assert config_of("during.keras") == config_of("after.keras") == reference
    assert "L2SP" not in json.dumps(reference)
    keras.backend.clear_session()
    reloaded = keras.saving.load_model(tmp_path / "during.keras")  # no custom_objects
    assert reloaded.losses == []
    assert len(reloaded.weights) == len(model.weights)  # the start copies were not saved


@pytest.mark.slow
def test_large_alpha_keeps_the_backbone_near_its_start(images):
    """SGD, BatchNorm trained so the tiny random backbone gets real gradients; the cached phase
    model shares the variables, so a cached run with the penalty ends where a plain one does."""

    def run(regularizer, cache):
        keras.utils.set_random_seed(0)
        model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
        history = kt.fine_tune(
            model,
            images,
            head_epochs=0,
            finetune_epochs=3,
            unfreeze=2,
            train_batchnorm=True,
            optimizer="sgd",
            finetune_learning_rate=1e-2,
            warmup_epochs=0,
            batch_size=8,
            regularizer=regularizer,
            cache=cache,
            verbose=0,
        )
        source = kt.find_backbone(model).trainable_weights
        assert model.losses == []
        return history, [v.numpy() for v in source]

    keras.utils.set_random_seed(0)
    initial = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    kt.unfreeze(initial, blocks=2, train_batchnorm=True)
    start = [v.numpy() for v in kt.find_backbone(initial).trainable_weights]

    def distance(weights):
        return sum(_sq(w - w0) for w, w0 in zip(weights, start, strict=True)) ** 0.5

    _, plain = run(None, False)
    history, pulled = run(regularizers.L2SP(alpha=50.0), False)
    cached_history, pulled_cached = run(regularizers.L2SP(alpha=50.0), True)
    assert history.cached["finetune"] is False
    assert cached_history.cached["finetune"] == "block_15_add"
    assert distance(plain) > 0.1
    assert distance(pulled) < 0.2 * distance(plain)
    for a, b in zip(pulled, pulled_cached, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


MIRRORED = textwrap.dedent(
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

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (16, 32, 32, 3)).astype("float32")
    y = np.arange(16) % 2
    with strategy.scope():
        model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    kt.unfreeze(model, blocks=2)
    backbone = kt.find_backbone(model)
    source = backbone.trainable_weights
    head = [v for v in model.trainable_weights if all(v is not s for s in source)]
    start = [v.numpy() for v in source]
    penalty = kt.regularizers.L2SP(alpha=2.0, beta=0.5)
    with strategy.scope():
        penalty.attach(model)
    for v in source + head:
        v.assign(v.numpy() + rng.normal(0, 0.05, v.shape).astype("float32"))
    before = [v.numpy() for v in source + head]
    formula = sum(float(np.sum((v.numpy() - w0) ** 2)) for v, w0 in zip(source, start)) + 0.5 * sum(
        float(np.sum(v.numpy() ** 2)) for v in head
    )
    with strategy.scope():
        # A zero data loss: evaluate reports the penalty alone, one SGD step follows its gradient.
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=lambda t, p: 0.0 * keras.ops.sum(p, axis=-1),
        )
    added = model.evaluate(x, y, batch_size=16, verbose=0)
    with strategy.scope():
        model.fit(x[:8], y[:8], batch_size=8, epochs=1, shuffle=False, verbose=0)
    expected = [w - 0.1 * 2.0 * (w - w0) for w, w0 in zip(before[: len(source)], start)] + [
        w - 0.1 * 2.0 * 0.5 * w for w in before[len(source):]
    ]
    step_error = max(
        float(np.abs(v.numpy() - e).max()) for v, e in zip(source + head, expected)
    )
    penalty.detach(model)
    with strategy.scope():  # fine_tune recompiles from the config, which cannot hold a lambda
        model.compile(loss="sparse_categorical_crossentropy")
    history = kt.fine_tune(
        model, (x, y), head_epochs=0, finetune_epochs=1, unfreeze=2, batch_size=4,
        regularizer=kt.regularizers.L2SP(alpha=1.0), cache=True, verbose=0,
    )
    path = os.path.join(sys.argv[1], "model.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    print("RESULT " + json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "added": added,
        "formula": formula,
        "step_error": step_error,
        "cached": history.cached,
        "losses_after": len(model.losses) + len(reloaded.losses),
        "loss": history.history["loss"],
    }), flush=True)
    """
)


@pytest.mark.slow
def test_mirrored_strategy_counts_the_penalty_once(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["replicas"] == 2
    assert result["formula"] > 1.0
    assert result["added"] == pytest.approx(result["formula"], rel=1e-4)
    assert result["step_error"] < 1e-5
    assert result["cached"] == {"head": None, "finetune": "block_15_add"}
    assert result["losses_after"] == 0
    assert all(np.isfinite(result["loss"]))


def test_attach_twice_or_detach_elsewhere_is_refused(tiny_model):
    penalty = regularizers.L2SP()
    penalty.attach(tiny_model)
    with pytest.raises(ValueError, match="already attached"):
        penalty.attach(tiny_model)
    other = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    with pytest.raises(ValueError, match="detach it from the model it was attached to"):
        penalty.detach(other)
    penalty.detach(tiny_model)
    assert tiny_model.losses == []


@pytest.mark.parametrize(
    "make, argument, value",
    [
        (lambda: regularizers.L2SP(alpha=-0.1), "alpha", "-0.1"),
        (lambda: regularizers.L2SP(beta=-1), "beta", "-1"),
        (lambda: regularizers.L2SP(alpha=float("nan")), "alpha", "nan"),
        (lambda: regularizers.L2SP(alpha="0.1"), "alpha", "'0.1'"),
        (lambda: regularizers.L2SP(alpha=True), "alpha", "True"),
        (lambda: regularizers.L2(alpha=-0.5), "alpha", "-0.5"),
    ],
)
def test_bad_strengths_are_refused(make, argument, value):
    with pytest.raises(ValueError) as error:
        make()
    message = str(error.value)
    assert f"`{argument}`" in message and f"{argument}={value}" in message
    assert ">= 0" in message and "Typical values" in message


def test_a_model_without_backbone_is_refused_and_left_unchanged():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="predictions")(inputs))
    penalty = regularizers.L2SP()
    with pytest.raises(ValueError, match="nested pretrained backbone.*kt.regularizers.L2"):
        penalty.attach(model)
    assert not penalty.attached
    assert all(v.regularizer is None for v in model.weights)
    regularizers.L2(0.1).attach(model)  # plain L2 needs no backbone
    assert len(model.losses) == 2


def test_get_by_name():
    assert isinstance(regularizers.get("l2"), regularizers.L2)
    assert isinstance(regularizers.get("L2SP"), regularizers.L2SP)
    assert isinstance(regularizers.get("l2-sp"), regularizers.L2SP)
    assert regularizers.get(None) is None
    mine = regularizers.L2SP(alpha=0.2)
    assert regularizers.get(mine) is mine
    with pytest.raises(ValueError, match="Did you mean 'l2sp'"):
        regularizers.get("l2spp")
    with pytest.raises(TypeError, match="Received: 0.1"):
        regularizers.get(0.1)


def test_phase_and_fine_tune_take_the_object(tiny_model, images):
    penalty = regularizers.L2(alpha=0.1)
    phase = kt.Phase("head", 1, regularizer=penalty)
    assert phase.regularizer is penalty
    assert isinstance(kt.Phase("top", 1, regularizer="l2sp").regularizer, regularizers.L2SP)
    seen = []

    class Spy(regularizers.L2):
        def attach(self, model):
            super().attach(model)
            seen.append(("attach", model.name, len(model.losses)))

        def detach(self, model):
            super().detach(model)
            seen.append(("detach", model.name, len(model.losses)))

    kt.fit_phases(
        tiny_model, [kt.Phase("head", 1, regularizer=Spy(0.1))], images, batch_size=8, verbose=0
    )
    name = tiny_model.name
    assert seen == [("attach", name, 2), ("detach", name, 0)]
