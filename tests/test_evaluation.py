"""Tests for keras_transfer.evaluation against values computed by hand."""

import json

import keras
import numpy as np
import pytest

from keras_transfer import evaluation

# 6 examples, 3 classes. Predicted (argmax): 0, 1, 1, 2, 0, 2; true: 0, 0, 1, 2, 2, 1.
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # true 0, pred 0; ranks: truth first
        [0.3, 0.6, 0.1],  # true 0, pred 1; truth second
        [0.1, 0.8, 0.1],  # true 1, pred 1
        [0.2, 0.1, 0.7],  # true 2, pred 2
        [0.5, 0.4, 0.1],  # true 2, pred 0; truth third
        [0.2, 0.3, 0.5],  # true 1, pred 2; truth second
    ]
)
LABELS = np.array([0, 0, 1, 2, 2, 1])
NAMES = ["cat", "dog", "bird"]


@pytest.fixture
def metrics():
    return evaluation.metrics_from_probabilities(PROBS, LABELS, NAMES, top_k=(1, 2, 5))


def test_accuracy_and_top_k(metrics):
    assert metrics["num_examples"] == 6
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    # Truth in the top 2 for all but example 4: 5/6. top_5 > 3 classes is dropped.
    assert metrics["top_k_accuracy"] == {"top_2": pytest.approx(5 / 6)}


def test_confusion_matrix(metrics):
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]


def test_per_class_precision_recall_f1(metrics):
    # Every class: 1 true positive, predicted twice, present twice -> P = R = F1 = 0.5.
    for row, name in zip(metrics["per_class"], NAMES, strict=True):
        assert row["name"] == name
        assert row["support"] == 2
        assert row["precision"] == pytest.approx(0.5)
        assert row["recall"] == pytest.approx(0.5)
        assert row["f1"] == pytest.approx(0.5)
    assert metrics["macro_f1"] == pytest.approx(0.5)


def test_unbalanced_precision_recall():
    # true 0,0,0,1 ; pred 0,0,1,1 -> class 0: P=2/2, R=2/3 ; class 1: P=1/2, R=1/1.
    probs = np.array([[1, 0], [1, 0], [0, 1], [0, 1]], dtype=float)
    m = evaluation.metrics_from_probabilities(probs, [0, 0, 0, 1], top_k=1)
    c0, c1 = m["per_class"]
    assert (c0["precision"], c0["recall"]) == (pytest.approx(1.0), pytest.approx(2 / 3))
    assert c0["f1"] == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))  # 0.8
    assert (c1["precision"], c1["recall"], c1["f1"]) == (
        pytest.approx(0.5),
        pytest.approx(1.0),
        pytest.approx(2 / 3),
    )
    assert m["macro_precision"] == pytest.approx(0.75)
    assert m["class_names"] == ["0", "1"]


def test_never_predicted_class_has_zero_precision_not_nan():
    probs = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1]], dtype=float)
    m = evaluation.metrics_from_probabilities(probs, [0, 1, 2], top_k=1)
    assert m["per_class"][1] == {
        "name": "1",
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 1,
    }
    json.dumps(m)  # serialisable


def test_one_hot_labels_accepted():
    m = evaluation.metrics_from_probabilities(PROBS, np.eye(3)[LABELS], top_k=1)
    assert m["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": [0, 1]}, "6 predictions but 2 labels"),
        ({"labels": [0, 0, 1, 2, 2, 3]}, "outside"),
        ({"class_names": ["a", "b"]}, "class_names"),
        ({"top_k": (0,)}, "top_k"),
    ],
)
def test_bad_input_raises_value_error(kwargs, match):
    args = {"probabilities": PROBS, "labels": LABELS, **kwargs}
    with pytest.raises(ValueError, match=match):
        evaluation.metrics_from_probabilities(**args)


def test_format_report(metrics):
    text = evaluation.format_report(metrics)
    lines = text.splitlines()
    assert lines[0] == "accuracy 0.500 on 6 examples"
    assert "top-2 accuracy 0.833" in text
    assert any(line.split() == ["bird", "0.500", "0.500", "0.500", "2"] for line in lines)
    assert lines[-1].split() == ["bird", "1", "0", "1"]


def test_evaluate_with_model_and_dataset():
    import tensorflow as tf

    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Softmax()(inputs * 10.0))
    ds = tf.data.Dataset.from_tensor_slices((PROBS.astype("float32"), LABELS)).batch(4)
    ds.class_names = NAMES
    m = evaluation.evaluate(model, ds, top_k=(1, 2))
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["class_names"] == NAMES
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
    same = evaluation.evaluate(model, (PROBS.astype("float32"), LABELS), class_names=NAMES)
    assert same["accuracy"] == m["accuracy"]


def test_plots_return_figures(metrics, tmp_path):
    fig = evaluation.plot_confusion_matrix(metrics, normalize=True, path=tmp_path / "cm.png")
    assert (tmp_path / "cm.png").stat().st_size > 0
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == NAMES
    history = keras.callbacks.History()
    history.history = {"loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.7, 0.6], "accuracy": [0.1] * 3}
    history.phases = {"head": (0, 1), "finetune": (1, 3)}
    fig = evaluation.plot_history(history)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="history"):
        evaluation.plot_history({})
