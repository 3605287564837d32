"""kt.distillation: the loss against numpy, the Distiller's train step, a frozen teacher, saving,
unlabelled distillation, learning without forgetting, bad input, MirroredStrategy."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import same_weights

import keras_transfer as kt
from keras_transfer.distillation import Distiller, LearningWithoutForgetting, distillation_loss


def mlp(num_classes=3, hidden=16, name=None, input_shape=(4, 4, 3), batchnorm=False):
    """A tiny classifier with the library's head contract: ... -> "logits" -> "predictions".

    With `batchnorm`, BatchNormalization and Dropout that follow the `training` flag.
    """
    images = keras.Input(input_shape, name="images")
    h = keras.layers.Flatten(name="flatten")(images)
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(h)
    if batchnorm:
        h = keras.layers.BatchNormalization(name="bn")(h)
        h = keras.layers.Dropout(0.3, name="dropout")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    predictions = keras.layers.Activation("softmax", name="predictions")(logits)
    return keras.Model(images, predictions, name=name)


def data(n=32, num_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 4, 4, 3)).astype("float32"), np.arange(n) % num_classes


def logits_of(model, x):
    return np.asarray(kt.logits_model(model).predict(x, verbose=0), "float64")


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_loss(y, zs, zt, temperature, alpha, w=None):
    """The formula written out in numpy, per example, then Σ wᵢ·lᵢ / n."""
    ce = -np_log_softmax(zs)[np.arange(len(zs)), y] if y is not None else 0.0
    log_p, log_q = np_log_softmax(zt / temperature), np_log_softmax(zs / temperature)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)
    per_example = alpha * ce + (1 - alpha) * temperature**2 * kl
    w = np.ones(len(zs)) if w is None else w
    return float((w * per_example).sum() / len(zs))


# --- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, alpha", [(1.0, 0.5), (4.0, 0.1), (10.0, 0.0), (2.0, 1.0)])
def test_distillation_loss_equals_the_formula(temperature, alpha):
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=(2, 6, 5)) * 3
    y = rng.integers(0, 5, 6)
    w = rng.uniform(0, 2, 6)
    for weights in (None, w):
        got = distillation_loss(
            y, zs, zt, temperature=temperature, alpha=alpha, sample_weight=weights
        )
        assert float(got) == pytest.approx(np_loss(y, zs, zt, temperature, alpha, weights), 1e-5)
    # One-hot labels give the same value as class ids.
    one_hot = np.eye(5)[y]
    same = distillation_loss(one_hot, zs, zt, temperature=temperature, alpha=alpha)
    assert float(same) == pytest.approx(np_loss(y, zs, zt, temperature, alpha), 1e-5)


def test_distillation_loss_soft_term_scale_and_unlabelled():
    rng = np.random.default_rng(2)
    zs, zt = rng.normal(size=(2, 4, 3))
    # alpha=0 needs no labels; equal logits give zero.
    assert float(distillation_loss(None, zt, zt, temperature=3.0, alpha=0.0)) == pytest.approx(
        0.0, abs=1e-6
    )
    soft = float(distillation_loss(None, zs, zt, temperature=3.0, alpha=0.0))
    assert soft == pytest.approx(np_loss(None, zs, zt, 3.0, 0.0), 1e-5) and soft > 0
    with pytest.raises(ValueError, match=r"`y_true` is None but alpha=0.5"):
        distillation_loss(None, zs, zt, temperature=3.0, alpha=0.5)
    with pytest.raises(ValueError, match=r"3 classes but `teacher_logits` has 4"):
        distillation_loss([0], zs[:1], np.zeros((1, 4)), temperature=3.0, alpha=0.5)


# --- the Distiller ----------------------------------------------------------------------------


def test_distiller_logs_the_formula_on_a_fixed_batch():
    """One step on one batch: the logged terms are the formula on the logits before the step."""
    teacher, student = mlp(name="teacher"), mlp(name="student")
    x, y = data(16)
    w = np.linspace(0.5, 1.5, 16).astype("float32")
    zs, zt = logits_of(student, x), logits_of(teacher, x)
    distiller = Distiller(teacher, student, temperature=3.0, alpha=0.25)
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), metrics=["accuracy"])
    logs = distiller.fit(x, y, sample_weight=w, batch_size=16, epochs=1, verbose=0).history
    assert logs["loss"][0] == pytest.approx(np_loss(y, zs, zt, 3.0, 0.25, w), 1e-5)
    assert logs["student_loss"][0] == pytest.approx(np_loss(y, zs, zt, 3.0, 1.0, w), 1e-5)
    assert logs["distillation_loss"][0] == pytest.approx(np_loss(y, zs, zt, 3.0, 0.0, w), 1e-5)
    assert logs["loss"][0] == pytest.approx(
        0.25 * logs["student_loss"][0] + 0.75 * logs["distillation_loss"][0], 1e-6
    )
    expected_accuracy = np.mean(zs.argmax(1) == y)
    assert logs["accuracy"][0] == pytest.approx(expected_accuracy)
    # Evaluation runs the student alone: its cross-entropy on the labels.
    result = distiller.evaluate(x, y, verbose=0, return_dict=True)
    zs_after = logits_of(student, x)
    assert result["loss"] == pytest.approx(np_loss(y, zs_after, zs_after, 1.0, 1.0), 1e-5)
    assert "distillation_loss" not in result
    np.testing.assert_allclose(distiller.predict(x, verbose=0), student.predict(x, verbose=0))


def test_teacher_never_changes_and_unlabelled_images_distil():
    """The teacher's BatchNorm and Dropout would move in training mode; it runs in inference."""
    teacher = mlp(name="teacher", batchnorm=True)
    student = mlp(name="student", batchnorm=True)
    before_teacher = [w.numpy().copy() for w in teacher.weights]
    trainable_flags = [layer.trainable for layer in teacher.layers]
    before_student = [w.numpy().copy() for w in student.weights]
    x, _ = data(16)
    history = kt.distill(
        teacher, student, x, epochs=2, alpha=0.0, batch_size=8, jit_compile=False, verbose=0
    )
    assert sorted(history.history) == ["distillation_loss", "loss"]
    assert history.history["loss"] == history.history["distillation_loss"]
    assert same_weights([w.numpy() for w in teacher.weights], before_teacher)
    assert [layer.trainable for layer in teacher.layers] == trainable_flags
    after_student = [w.numpy() for w in student.weights]
    moved = [not np.array_equal(a, b) for a, b in zip(before_student, after_student, strict=True)]
    assert all(moved)  # kernels, biases, and the student's BatchNorm statistics
    # The optimizer holds state for the student's trainable weights only.
    distiller = history.model
    assert {id(v) for v in distiller.trainable_variables} == {
        id(v) for v in student.trainable_variables
    }
    assert history.student is student


def test_student_saves_alone_and_the_distiller_round_trips(tmp_path):
    teacher, student = mlp(name="teacher"), mlp(name="student")
    x, y = data(16)
    history = kt.distill(
        teacher, student, (x, y), epochs=1, batch_size=8, jit_compile=False, verbose=0
    )
    distiller = history.model
    distiller.save(tmp_path / "distiller.keras")
    again = keras.saving.load_model(tmp_path / "distiller.keras")
    assert isinstance(again, Distiller)
    assert (again.temperature, again.alpha) == (4.0, 0.1)
    assert same_weights(again.student.get_weights(), student.get_weights())
    assert same_weights(again.teacher.get_weights(), teacher.get_weights())
    np.testing.assert_allclose(again.predict(x, verbose=0), student.predict(x, verbose=0))


def _message_names(error, *parts):
    text = str(error.value)
    for part in parts:
        assert part in text, (part, text)


def test_bad_distillation_input_is_refused_before_any_work():
    teacher, student = mlp(name="teacher"), mlp(name="student")
    before = student.get_weights()
    x, y = data(8)
    for temperature in (0, -1.0, float("nan"), True):
        with pytest.raises(ValueError) as error:
            Distiller(teacher, student, temperature=temperature)
        _message_names(error, "`temperature`", f"temperature={temperature!r}", "Typical values")
    for alpha in (-0.1, 1.5, float("inf")):
        with pytest.raises(ValueError) as error:
            kt.distill(teacher, student, (x, y), epochs=1, alpha=alpha)
        _message_names(error, "`alpha`", f"alpha={alpha!r}", "[0, 1]")
    with pytest.raises(ValueError) as error:
        Distiller(teacher, mlp(4, name="four"))
    _message_names(error, "predicts 3 classes", "predicts 4", "num_classes=3")
    images = keras.Input((4, 4, 3), name="images")
    no_logits = keras.Model(
        images,
        keras.layers.Dense(3, activation="softmax", name="probs")(keras.layers.Flatten()(images)),
    )
    with pytest.raises(ValueError) as error:
        Distiller(no_logits, student)
    _message_names(error, "`teacher`", "has no logits", "kt.build_classifier")
    with pytest.raises(ValueError) as error:
        Distiller(teacher, mlp(input_shape=(8, 8, 3)))
    _message_names(error, "(None, 4, 4, 3)", "(None, 8, 8, 3)", "image_size=")
    with pytest.raises(TypeError, match="`student` must be a keras.Model"):
        Distiller(teacher, "mobilenet_v2")
    with pytest.raises(ValueError, match="has no labels but alpha=0.1"):
        kt.distill(teacher, student, x, epochs=1)
    with pytest.raises(ValueError, match="`epochs` must be a positive int"):
        kt.distill(teacher, student, (x, y), epochs=0)
    with pytest.raises(TypeError, match="takes no `loss`"):
        Distiller(teacher, student).compile(loss="mse")
    assert same_weights(student.get_weights(), before)


# --- learning without forgetting --------------------------------------------------------------


def test_lwf_keeps_the_old_model_records_its_outputs_and_warms_up_the_new_head():
    old = mlp(name="old")
    x, y = data(16, num_classes=2)
    before = old.get_weights()
    lwf = LearningWithoutForgetting(old, 2, temperature=2.0, lambda_old=0.5)
    np.testing.assert_allclose(lwf.record(x), logits_of(old, x), rtol=1e-5, atol=1e-6)
    lwf.compile(optimizer=keras.optimizers.SGD(0.5), metrics=["accuracy"], jit_compile=False)
    hidden = lwf.old_task_model.get_layer("hidden").get_weights()
    old_head = lwf.old_task_model.get_layer("logits").get_weights()
    new_head = lwf.new_task_model.get_layer("new_logits").get_weights()
    history = lwf.fit(x, y, warmup_epochs=1, epochs=0, batch_size=16, verbose=0)
    assert history.phases == {"warmup": (0, 1), "joint": None}
    # Warm-up: only the new head moved.
    assert same_weights(lwf.old_task_model.get_layer("hidden").get_weights(), hidden)
    assert same_weights(lwf.old_task_model.get_layer("logits").get_weights(), old_head)
    assert not same_weights(lwf.new_task_model.get_layer("new_logits").get_weights(), new_head)
    history = lwf.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert not same_weights(lwf.old_task_model.get_layer("hidden").get_weights(), hidden)
    assert same_weights(old.get_weights(), before)  # the model passed in never trains
    # The two task models share the backbone and load without custom objects.
    assert lwf.new_task_model.get_layer("hidden") is lwf.old_task_model.get_layer("hidden")
    assert kt.head_of(lwf.new_task_model).num_outputs == 2
    assert kt.head_of(lwf.old_task_model).num_outputs == 3


def test_lwf_loss_equals_the_formula_on_a_fixed_batch():
    old = mlp(name="old")
    x, y = data(8, num_classes=2)
    lwf = LearningWithoutForgetting(old, 2, temperature=2.0, lambda_old=0.7)
    lwf.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=False)
    recorded = logits_of(old, x)
    z_old, z_new = logits_of(lwf.old_task_model, x), logits_of(lwf.new_task_model, x)
    logs = lwf.fit(x, y, epochs=1, batch_size=8, verbose=0).history
    new_loss = -np_log_softmax(z_new)[np.arange(8), y].mean()
    p = np.exp(np_log_softmax(recorded / 2.0))
    old_loss = -(p * np_log_softmax(z_old / 2.0)).sum(-1).mean()
    assert logs["new_loss"][0] == pytest.approx(new_loss, 1e-5)
    assert logs["old_loss"][0] == pytest.approx(old_loss, 1e-5)
    assert logs["loss"][0] == pytest.approx(new_loss + 0.7 * old_loss, 1e-5)


@pytest.mark.slow
def test_lwf_forgets_the_old_task_much_less_than_plain_fine_tuning():
    """Two tasks on random vectors through an 8-unit backbone: the new task reshapes it."""
    rng = np.random.default_rng(0)
    old_w, new_w = rng.normal(size=(48, 3)), rng.normal(size=(48, 2))

    def task(n, weights):
        x = rng.normal(size=(n, 4, 4, 3)).astype("float32")
        return x, np.argmax(x.reshape(n, -1) @ weights, axis=1)

    (x_old, y_old), (x_old_test, y_old_test) = task(512, old_w), task(512, old_w)
    x_new, y_new = task(256, new_w)
    old = mlp(hidden=8, name="old")
    old.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    old.fit(x_old, y_old, epochs=30, batch_size=64, verbose=0)

    def old_accuracy(model):
        return np.mean(model.predict(x_old_test, verbose=0).argmax(1) == y_old_test)

    start = old_accuracy(old)
    assert start > 0.75
    drops, new_accuracy = {}, {}
    for name, lambda_old in (("plain", 0.0), ("lwf", 1.0)):
        keras.utils.set_random_seed(1)
        lwf = LearningWithoutForgetting(old, 2, lambda_old=lambda_old)
        lwf.compile(optimizer=keras.optimizers.Adam(0.1), metrics=["accuracy"], jit_compile=False)
        history = lwf.fit(x_new, y_new, warmup_epochs=2, epochs=10, batch_size=32, verbose=0)
        drops[name] = start - old_accuracy(lwf.old_task_model)
        new_accuracy[name] = history.history["accuracy"][-1]
    assert drops["plain"] > 0.2, drops
    assert drops["lwf"] < drops["plain"] / 3, drops
    assert min(new_accuracy.values()) > 0.9, new_accuracy  # both learn the new task


def test_bad_lwf_input_is_refused():
    old = mlp(name="old")
    with pytest.raises(ValueError) as error:
        LearningWithoutForgetting(old, 1)
    _message_names(error, "`new_num_classes`", "Received: new_num_classes=1")
    with pytest.raises(ValueError) as error:
        LearningWithoutForgetting(old, 2, temperature=0.0)
    _message_names(error, "`temperature`", "temperature=0.0")
    with pytest.raises(ValueError) as error:
        LearningWithoutForgetting(old, 2, lambda_old=-1)
    _message_names(error, "`lambda_old`", "lambda_old=-1")
    images = keras.Input((4, 4, 3), name="images")
    sigmoid = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(images))
    multilabel = keras.Model(
        images, keras.layers.Activation("sigmoid", name="predictions")(sigmoid)
    )
    with pytest.raises(ValueError) as error:
        LearningWithoutForgetting(multilabel, 2)
    _message_names(error, "`old_model`", "multilabel head", "softmax")
    lwf = LearningWithoutForgetting(old, 2)
    lwf.compile(optimizer="adam")
    with pytest.raises(ValueError, match="Nothing to train"):
        lwf.fit(*data(8, 2), warmup_epochs=0, epochs=0)


# --- MirroredStrategy -------------------------------------------------------------------------

MIRRORED = textwrap.dedent(
    """
    import json, os, sys
    os.environ["KERAS_BACKEND"] = "tensorflow"
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    sys.path.insert(0, sys.argv[1])
    from test_distillation import mlp, data
    import keras_transfer as kt

    def run(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            teacher, student, old, joint = (mlp(name=n) for n in ("t", "s", "o", "j"))
        x, y = data(32)
        w = np.linspace(0.5, 1.5, 32).astype("float32")
        ds = tf.data.Dataset.from_tensor_slices((x, y, w)).batch(8)
        history = kt.distill(teacher, student, ds, epochs=2, optimizer="sgd",
                             learning_rate=0.5, jit_compile=False, verbose=0)
        lwf = kt.distillation.LearningWithoutForgetting(old, 2)
        lwf.compile(optimizer=keras.optimizers.SGD(0.5), jit_compile=False)
        lwf.fit(x, y % 2, warmup_epochs=1, epochs=1, batch_size=8, shuffle=False, verbose=0)
        xt, yt = data(8, seed=1)
        # Unshuffled datasets: array data is shuffled in another order under a strategy.
        source = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
        target = tf.data.Dataset.from_tensor_slices((xt, yt % 2)).batch(4)
        kt.fit_joint(joint, source, target, target_head=True, target_num_classes=2,
                     regularizer="l2", epochs=1, batch_size=8, optimizer="sgd",
                     learning_rate=0.5, jit_compile=False, verbose=0)
        return {"replicas": strategy.num_replicas_in_sync, "loss": history.history["loss"],
                "student": [w.tolist() for w in student.get_weights()],
                "lwf": [w.tolist() for w in lwf.new_task_model.get_weights()],
                "joint": [w.tolist() for w in joint.get_weights()]}

    one = run(tf.distribute.get_strategy())
    two = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print("RESULT " + json.dumps({"one": one, "two": two}))
    """
)


@pytest.mark.slow
def test_mirrored_strategy_trains_as_one_device(tmp_path):
    """Two replicas with half batches each end where one device with whole batches does.

    Covers `kt.distill`, `LearningWithoutForgetting` and `kt.fit_joint` (one subprocess: the
    logical devices must be set before TensorFlow starts).
    """
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    here = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, str(script), here], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT ") :])
    assert (out["one"]["replicas"], out["two"]["replicas"]) == (1, 2)
    np.testing.assert_allclose(out["two"]["loss"], out["one"]["loss"], rtol=1e-5)
    for key in ("student", "lwf", "joint"):
        for a, b in zip(out["one"][key], out["two"][key], strict=True):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# --- command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "0"], "`--temperature` must be a finite number > 0"),
        (["--alpha", "1.5"], "`--alpha` must be a number in [0, 1]"),
        (["--epochs", "0"], "--epochs must be >= 1"),
    ],
)
def test_cli_distill_refuses_bad_numbers_before_loading(tmp_path, capsys, extra, message):
    from keras_transfer import cli

    missing = tmp_path / "no_such_run"
    assert cli.main(["distill", str(missing), str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("keras-transfer distill: error: ") and message in err
    assert len(err.splitlines()) == 1
    assert cli.main(["distill", str(missing), str(tmp_path)]) == 2  # then the missing teacher
    assert "no_such_run" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_distill_writes_a_student_run(tmp_path, capsys):
    from PIL import Image

    from keras_transfer import cli

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    for name, color in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
        (images / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(images / name / f"{i}.png")
    teacher = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    teacher_dir = kt.runs.save_run(tmp_path / "teacher", teacher, class_names=["blue", "red"])
    argv = ["distill", str(teacher_dir), str(images), "--student", "mobilenet_v2"]
    argv += ["--alpha-width", "0.35", "--student-weights", "none", "--epochs", "1"]
    argv += ["--batch-size", "4", "--validation-split", "0.5", "--output-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "student", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "validation accuracy on 4 held-out images:" in out
    assert "teacher mobilenet_v2_classifier" in out and "student mobilenet_v2_classifier" in out
    run = kt.runs.load_run(tmp_path / "student")
    assert run.class_names == ["blue", "red"]
    assert {"loss", "distillation_loss", "student_loss", "val_loss"} <= set(run.history)
    assert 0 <= run.metrics["student"]["accuracy"] <= 1
    assert run.metrics["teacher"]["num_examples"] == 4
    # The student is a plain model: Keras alone loads it, no custom objects.
    student = keras.saving.load_model(tmp_path / "student" / "model.keras")
    assert type(student).__name__ == "Functional" and student.output_shape == (None, 2)
    x = np.zeros((1, 32, 32, 3), "float32")
    np.testing.assert_allclose(student.predict(x, verbose=0), run.model.predict(x, verbose=0))
    assert kt.head_of(student).logits_layer == "logits"
