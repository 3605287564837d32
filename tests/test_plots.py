"""Tests for keras_transfer.plots: each figure saves a PNG and shows the data it was given."""

import json

import keras
import numpy as np
import pytest

from keras_transfer import evaluation, plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000, f"{path} is not a non-empty PNG"


def report_for(num_classes: int, n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, n)
    logits = rng.normal(0, 1, (n, num_classes))
    logits[np.arange(n), labels] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    images = rng.uniform(0, 255, (n, 8, 8, 3)).astype("float32")
    names = [f"class {i}" for i in range(num_classes)]
    return evaluation.metrics_from_probabilities(probs, labels, names, images=images), images


def test_training_curves_mark_and_name_every_phase(tmp_path):
    history = keras.callbacks.History()
    history.history = {
        "loss": [2.0, 1.5, 1.2, 1.0, 0.9, 0.8],
        "val_loss": [2.1, 1.7, 1.4, 1.2, 1.1, 1.0],
        "accuracy": [0.2, 0.3, 0.4, 0.5, 0.55, 0.6],
        "learning_rate": [1e-3, 1e-3, 1e-4, 5e-5, 1e-5, 1e-6],
    }
    history.epoch = list(range(6))
    history.phases = {"head": (0, 2), "top": (2, 5), "skipped": None, "all": (5, 6)}
    fig = plots.plot_training_curves(history, path=tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")
    loss, accuracy, rate = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "learning rate (per epoch)"]
    for ax in fig.axes:
        # Phase names above each panel, centred on their epochs (numbered from 1).
        names = ax.child_axes[0].get_xticklabels()
        assert [t.get_text() for t in names] == ["head", "top", "all"]
        assert ax.child_axes[0].get_xticks().tolist() == [1.5, 4.0, 6.0]
        boundaries = [line.get_xdata()[0] for line in ax.lines if len(set(line.get_xdata())) == 1]
        assert boundaries == [2.5, 5.5]
    assert loss.lines[0].get_xdata().tolist() == [1, 2, 3, 4, 5, 6]
    assert loss.lines[1].get_ydata().tolist() == history.history["val_loss"]
    assert rate.get_yscale() == "log"
    # The same history as kt.runs writes it to history.json gives the same panels and phases.
    saved = {"history": history.history, "epoch": history.epoch, "phases": history.phases}
    again = plots.plot_training_curves(json.loads(json.dumps(saved)), metrics=["loss"])
    assert [ax.get_title() for ax in again.axes] == ["loss"]
    assert [t.get_text() for t in again.axes[0].child_axes[0].get_xticklabels()] == [
        "head",
        "top",
        "all",
    ]
    with pytest.raises(ValueError, match="metrics"):
        plots.plot_training_curves(history, metrics=["auc"])
    with pytest.raises(ValueError, match="history"):
        plots.plot_training_curves({})


@pytest.mark.parametrize("num_classes", [10, 40])
def test_confusion_matrix_counts_and_row_normalised(tmp_path, num_classes):
    report, _ = report_for(num_classes, n=4 * num_classes)
    fig = plots.plot_confusion_matrix(report, path=tmp_path / "cm.png")
    assert_png(tmp_path / "cm.png")
    assert len(fig.axes) == 4
    counts_ax, shares_ax = fig.axes[:2]  # then their colour bars
    counts = np.array(report["confusion_matrix"], dtype=float)
    np.testing.assert_array_equal(counts_ax.images[0].get_array(), counts)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    np.testing.assert_allclose(shares_ax.images[0].get_array(), shares)
    for ax in (counts_ax, shares_ax):
        assert [t.get_text() for t in ax.get_xticklabels()] == report["class_names"]
        assert [t.get_text() for t in ax.get_yticklabels()] == report["class_names"]
    # The largest cell is written in it; zeros are left blank past 20 classes.
    i, j = np.unravel_index(counts.argmax(), counts.shape)
    texts = {(t.get_position()): t.get_text() for t in counts_ax.texts}
    assert texts[(j, i)] == str(int(counts[i, j]))
    assert len(counts_ax.texts) == (counts.size if num_classes <= 20 else np.count_nonzero(counts))
    only_counts = plots.plot_confusion_matrix(report["confusion_matrix"], normalize=False)
    assert len(only_counts.axes) == 2 and only_counts.axes[0].get_title().endswith("(counts)")


def test_confusion_matrix_shortens_long_names_and_checks_input():
    names = ["a" * 40, "b"]
    fig = plots.plot_confusion_matrix(np.eye(2), names, normalize=True)
    label = fig.axes[0].get_xticklabels()[0].get_text()
    assert len(label) == 24 and label.endswith("…")
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_matrix(np.ones((2, 3)))
    with pytest.raises(ValueError, match="normalize"):
        plots.plot_confusion_matrix(np.eye(2), normalize="rows")
    with pytest.raises(ValueError, match="confusion matrix"):
        plots.plot_confusion_matrix(evaluation.regression_metrics([1.0, 2.0], [1.0, 3.0]))


def test_misclassified_grid_shows_the_most_confident_mistakes(tmp_path):
    report, images = report_for(10)
    wrong = report["misclassified"]
    assert len(wrong) > 12
    fig = plots.plot_misclassified(report, max_images=12, columns=4, path=tmp_path / "m.png")
    assert_png(tmp_path / "m.png")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 12
    first = wrong[0]
    assert shown[0].get_title() == (
        f"#{first['index']} true: {first['true']}\n"
        f"pred: {first['predicted']} ({first['confidence']:.2f})"
    )
    np.testing.assert_allclose(shown[0].images[0].get_array(), images[first["index"]] / 255)
    # The same grid from the evaluated images, for a report that kept none.
    report.misclassified_images = None
    with pytest.raises(ValueError, match="images="):
        plots.plot_misclassified(report)
    again = plots.plot_misclassified(report, images, max_images=12)
    np.testing.assert_allclose(again.axes[0].images[0].get_array(), images[first["index"]] / 255)
    perfect = evaluation.metrics_from_probabilities(np.eye(3), [0, 1, 2])
    fig = plots.plot_misclassified(perfect, path=tmp_path / "none.png")
    assert_png(tmp_path / "none.png")
    assert fig.texts[0].get_text() == "No misclassified examples."


class _Invert(keras.layers.Layer):
    """Inverts pixels in training mode only, so the plot shows which mode ran."""

    def call(self, inputs, training=None):
        return 255.0 - inputs if training else inputs


def test_augmented_batch_runs_the_augmentation_layer_in_training_mode(tmp_path):
    inputs = keras.Input((8, 8, 3), name="images")
    x = keras.Sequential([_Invert()], name="augmentation")(inputs)
    outputs = keras.layers.Activation("softmax", name="predictions")(
        keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    )
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (10, 8, 8, 3)).astype("float32")
    labels = np.arange(10) % 2
    fig = plots.plot_augmented_batch(
        model, (images, labels), num_images=6, class_names=["cat", "dog"], path=tmp_path / "a.png"
    )
    assert_png(tmp_path / "a.png")
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert len(shown) == 6 and [ax.get_title() for ax in shown[:2]] == ["cat", "dog"]
    np.testing.assert_allclose(shown[0].images[0].get_array(), (255 - images[0]) / 255, atol=1e-6)
    assert "training mode" in fig.get_suptitle()
    # A model without an augmentation layer shows the input as given, and says so.
    import tensorflow as tf

    plain = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
    fig = plots.plot_augmented_batch(plain, batches)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 4  # the first batch
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), images[0] / 255, atol=1e-6)
    assert fig.get_suptitle().startswith("No 'augmentation' layer")
    grey = plots.plot_augmented_batch(plain, images[:2, :, :, :1])
    assert grey.axes[0].images[0].get_cmap().name == "gray"


def test_reliability_diagram_draws_the_report_bins(tmp_path):
    report, _ = report_for(10)
    rel = report["reliability"]
    fig = plots.plot_reliability_diagram(report, path=tmp_path / "r.png")
    assert_png(tmp_path / "r.png")
    diagram, counts = fig.axes
    assert f"ECE {report['ece']:.3f}" in diagram.get_title()
    filled = [a for a, c in zip(rel["accuracy"], rel["count"], strict=True) if c]
    accuracy_bars = diagram.containers[0]
    assert [bar.get_height() for bar in accuracy_bars] == pytest.approx(filled)
    assert [bar.get_height() for bar in counts.containers[0]] == rel["count"]
    ml = evaluation.multilabel_metrics([[0.9, 0.2], [0.3, 0.7]], [[1, 0], [0, 1]])
    assert plots.plot_reliability_diagram(ml).axes[0].get_ylabel() == "fraction of positives"
    with pytest.raises(ValueError, match="calibration"):
        plots.plot_reliability_diagram(evaluation.regression_metrics([1.0, 2.0], [1.0, 3.0]))


def test_lr_finder_marks_the_suggestion(tmp_path):
    lrs = np.geomspace(1e-6, 1.0, 60)
    losses = (np.log10(lrs) + 3) ** 2 + 1.0
    fig = plots.plot_lr_finder(lrs, losses, suggestion=1e-3, path=tmp_path / "lr.png")
    assert_png(tmp_path / "lr.png")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    marker = [line for line in ax.lines if line.get_marker() == "o"][0]
    assert marker.get_xdata()[0] == 1e-3
    assert marker.get_ydata()[0] == pytest.approx(1.0, abs=1e-2)  # the curve's minimum
    assert marker.get_label() == "suggestion: 1.00e-03"
    several = plots.plot_lr_finder(lrs, losses, {"valley": 1e-3, "steep": 1e-4})
    labels = [line.get_label() for line in several.axes[0].lines if line.get_marker() == "o"]
    assert labels == ["valley: 1.00e-03", "steep: 1.00e-04"]
    with pytest.raises(ValueError, match="same length"):
        plots.plot_lr_finder(lrs, losses[:-1])
    with pytest.raises(ValueError, match="> 0"):
        plots.plot_lr_finder(-lrs, losses)


def test_save_report_plots_writes_the_pngs(tmp_path):
    report, _ = report_for(3, n=30)
    paths = plots.save_report_plots(report, tmp_path / "plots", prefix="test_")
    assert [p.name for p in paths] == [
        "test_confusion_matrix.png",
        "test_reliability.png",
        "test_misclassified.png",
    ]
    for path in paths:
        assert_png(path)
    regression = evaluation.regression_metrics([1.0, 2.0], [1.0, 3.0])
    assert plots.save_report_plots(regression, tmp_path / "none") == []


# --- the command line writes them -------------------------------------------------------------


@pytest.fixture
def run_folder(tmp_path):
    """A saved run of a tiny image model (no backbone) and a folder of 8 PNGs in two classes."""
    from PIL import Image

    from keras_transfer import runs

    inputs = keras.Input((16, 16, 3), name="images")
    logits = keras.layers.Dense(2, name="logits")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, keras.layers.Activation("softmax", name="predictions")(logits))
    # Red minus blue: the 'red' class (id 1) wins on reddish images, 'blue' (0) on bluish ones.
    model.get_layer("logits").set_weights(
        [np.array([[0.1, -0.1], [0, 0], [-0.1, 0.1]], "float32")[[2, 1, 0]], np.zeros(2)]
    )
    runs.save_run(tmp_path / "run", model, class_names=["blue", "red"])
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(tmp_path / "images" / name / f"{i}.png")
    # One bluish image filed under 'red': a mistake for the misclassified grid.
    Image.fromarray(np.full((16, 16, 3), (30, 30, 200), "uint8")).save(
        tmp_path / "images" / "red" / "odd.png"
    )
    return tmp_path / "run", tmp_path / "images"


def test_cli_evaluate_plots(run_folder, tmp_path, capsys):
    from keras_transfer import cli

    run, images = run_folder
    out = tmp_path / "plots"
    assert cli.main(["evaluate", str(run), str(images), "--plots", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_examples"] == 9 and report["accuracy"] == pytest.approx(8 / 9)
    assert report["misclassified"][0]["true"] == "red"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["confusion_matrix.png", "misclassified.png", "reliability.png"]
    for name in names:
        assert_png(out / name)


@pytest.mark.slow  # builds a tiny MobileNetV2 with augmentation (about 6 s on 2 cores)
def test_cli_train_plots_and_tensorboard(run_folder, tmp_path, monkeypatch, capsys):
    import functools

    import keras_transfer as kt
    from keras_transfer import cli

    _, images = run_folder
    seen = {}
    real = kt.fine_tune

    @functools.wraps(real)  # the CLI reads fine_tune's defaults from its signature
    def fake_fine_tune(model, train, val=None, *, callbacks=(), **kwargs):
        seen["callbacks"] = list(callbacks)
        history = keras.callbacks.History()
        history.history = {"loss": [1.0, 0.8, 0.5], "val_loss": [1.1, 0.9, 0.7]}
        history.epoch, history.phases = [0, 1, 2], {"head": (0, 1), "finetune": (1, 3)}
        return history

    monkeypatch.setattr(kt, "fine_tune", fake_fine_tune)
    argv = ["train", str(images), "--backbone", "mobilenet_v2", "--alpha", "0.35"]
    argv += ["--weights", "none", "--image-size", "32", "--augmentation", "default"]
    argv += ["--validation-split", "0.34", "--batch-size", "3", "--quiet"]
    argv += ["--output-dir", str(tmp_path / "out")]
    argv += ["--plots", str(tmp_path / "p"), "--tensorboard", str(tmp_path / "tb")]
    # Without the tensorboard package the option is refused before any work starts.
    monkeypatch.setattr(cli, "_has_tensorboard", lambda: False)
    assert cli.main(argv) == 2
    assert "pip install tensorboard" in capsys.readouterr().err
    assert not seen and not (tmp_path / "out").exists()
    monkeypatch.setattr(cli, "_has_tensorboard", lambda: True)
    assert cli.main(argv) == 0
    board = [c for c in seen["callbacks"] if isinstance(c, keras.callbacks.TensorBoard)]
    assert len(board) == 1 and board[0].log_dir == str(tmp_path / "tb")
    assert any(type(c).__name__ == "PhaseNames" for c in seen["callbacks"])
    written = sorted(p.name for p in (tmp_path / "p").iterdir())
    assert written[:2] == ["augmentation.png", "training_curves.png"]
    assert "validation_confusion_matrix.png" in written
    for name in written:
        assert_png(tmp_path / "p" / name)
