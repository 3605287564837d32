import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import same_weights, weights_of

import keras_transfer as kt


def _snapshot(model):
    backbone = kt.find_backbone(model)
    return {layer.name: weights_of(layer) for layer in backbone.layers if layer.weights}


def test_two_phases_change_exactly_what_they_should(tiny_model, images):
    x, y = images
    backbone = kt.find_backbone(tiny_model)
    start = _snapshot(tiny_model)
    head_start = weights_of(tiny_model.get_layer("logits"))

    history = kt.fine_tune(
        tiny_model, (x, y), head_epochs=1, finetune_epochs=0, batch_size=8, verbose=0
    )
    after_head = _snapshot(tiny_model)
    assert all(same_weights(start[name], after_head[name]) for name in start)  # bit-identical
    assert not same_weights(head_start, weights_of(tiny_model.get_layer("logits")))
    assert history.phases == {"head": (0, 1), "finetune": None}

    history = kt.fine_tune(
        tiny_model, (x, y), head_epochs=0, finetune_epochs=1, unfreeze=2, batch_size=8, verbose=0
    )
    after_finetune = _snapshot(tiny_model)
    ops = [op.name for op in backbone.operations]
    cut = ops.index("block_15_add")
    for layer in backbone.layers:
        if not layer.weights:
            continue
        changed = not same_weights(after_head[layer.name], after_finetune[layer.name])
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert changed == (ops.index(layer.name) > cut and not is_bn), layer.name


def test_history_is_merged_with_phase_two_numbered_after_phase_one(tiny_model, images):
    x, y = images
    seen_epochs = []
    callback = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: seen_epochs.append(e))
    history = kt.fine_tune(
        tiny_model,
        (x[:16], y[:16]),
        (x[16:], y[16:]),
        head_epochs=2,
        finetune_epochs=2,
        batch_size=8,
        callbacks=[callback],
        verbose=0,
    )
    assert seen_epochs == [0, 1, 2, 3]
    assert history.epoch == [0, 1, 2, 3]
    assert history.phases == {"head": (0, 2), "finetune": (2, 4)}
    assert len(history.history["loss"]) == len(history.history["val_loss"]) == 4
    assert "sparse_categorical_accuracy" in history.history
    assert isinstance(history, keras.callbacks.History)


def test_phase_two_learning_rate_warms_up_then_decays():
    schedule = kt.training.finetune_schedule(1e-3, total_steps=100, warmup_steps=10)
    rates = [float(schedule(step)) for step in (0, 5, 10, 55, 99)]
    assert rates[0] == 0.0 and rates[1] == pytest.approx(5e-4)
    assert rates[2] == pytest.approx(1e-3)
    assert rates[2] > rates[3] > rates[4] >= 0.0


def test_loss_follows_the_head():
    multi = kt.build_classifier(
        "mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35, multi_label=True
    )
    reg = kt.build_regressor("mobilenet_v2", image_size=32, weights=None, alpha=0.35)
    soft = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    assert kt.training.default_loss_and_metrics(multi)[0] == "binary_crossentropy"
    assert kt.training.default_loss_and_metrics(reg)[0] == "mean_squared_error"
    one_hot = tf.TensorSpec((None, 3))
    assert kt.training.default_loss_and_metrics(soft, one_hot)[0] == "categorical_crossentropy"
    assert kt.training.default_loss_and_metrics(soft, tf.TensorSpec((None,)))[0] == (
        "sparse_categorical_crossentropy"
    )


def test_regressor_fine_tunes(images):
    x, _ = images
    targets = x.mean(axis=(1, 2, 3))[:, None] / 255.0
    model = kt.build_regressor("mobilenet_v2", image_size=32, weights=None, alpha=0.35)
    history = kt.fine_tune(
        model, (x, targets), head_epochs=1, finetune_epochs=1, batch_size=8, verbose=0
    )
    assert "mae" in history.history and len(history.history["loss"]) == 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(head_epochs=0, finetune_epochs=0), "Nothing to train"),
        (dict(head_learning_rate=0.0), "head_learning_rate=0.0"),
        (dict(finetune_learning_rate=-1e-4), "finetune_learning_rate=-0.0001"),
        (dict(finetune_learning_rate="fast"), "finetune_learning_rate='fast'"),
        (dict(unfreeze=99), "blocks=99"),
        (dict(unfreeze=1.5), "fraction=1.5"),
        (dict(unfreeze="no_such_layer"), "no_such_layer"),
        (dict(head_epochs=-1), "head_epochs=-1"),
    ],
)
def test_bad_arguments_fail_before_any_training(tiny_model, images, kwargs, match):
    x, y = images
    before = [np.array(w) for w in tiny_model.weights]
    with pytest.raises(ValueError, match=match):
        kt.fine_tune(tiny_model, (x, y), batch_size=8, verbose=0, **kwargs)
    assert all(
        np.array_equal(a, np.array(b)) for a, b in zip(before, tiny_model.weights, strict=True)
    )
    assert not tiny_model.compiled


def test_a_model_from_another_strategy_scope_is_refused(images):
    x, y = images
    strategy = tf.distribute.OneDeviceStrategy("/cpu:0")
    model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    with pytest.raises(ValueError, match="strategy.scope"):
        kt.fine_tune(model, (x, y), batch_size=8, strategy=strategy, verbose=0)
    with strategy.scope():
        scoped = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    history = kt.fine_tune(
        scoped, (x, y), head_epochs=1, finetune_epochs=0, batch_size=8, strategy=strategy, verbose=0
    )
    assert len(history.history["loss"]) == 1
