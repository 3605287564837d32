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


# --- the report against scikit-learn on fixed predictions -------------------------------------

# 10 examples, 4 classes. Class 3 never occurs in the labels but is predicted twice (examples 2
# and 7), so its precision, recall and F1 are 0 and the macro averages include it.
MC_PROBS = np.array(
    [
        [0.81, 0.09, 0.05, 0.05],
        [0.18, 0.62, 0.10, 0.10],
        [0.30, 0.09, 0.09, 0.52],
        [0.10, 0.19, 0.66, 0.05],
        [0.41, 0.34, 0.15, 0.10],
        [0.05, 0.91, 0.02, 0.02],
        [0.25, 0.25, 0.43, 0.07],
        [0.09, 0.09, 0.21, 0.61],
        [0.57, 0.15, 0.18, 0.10],
        [0.31, 0.30, 0.37, 0.02],
    ]
)  # confidences away from the 15 bins' edges (k / 15), so float32 rounding keeps each bin
MC_LABELS = np.array([0, 1, 0, 2, 1, 1, 0, 2, 0, 2])
MC_NAMES = ["ant", "bee", "cat", "<dog>"]


@pytest.fixture
def mc_report():
    return evaluation.metrics_from_probabilities(MC_PROBS, MC_LABELS, MC_NAMES, top_k=(1, 2, 3))


def test_multiclass_numbers_equal_sklearn_with_a_class_absent_from_the_labels(mc_report):
    from sklearn import metrics as skm

    r = mc_report
    pred = MC_PROBS.argmax(axis=1)
    classes = list(range(4))
    assert r.kind == "multiclass" and r["num_examples"] == 10
    assert r["accuracy"] == pytest.approx(skm.accuracy_score(MC_LABELS, pred))
    assert r["confusion_matrix"] == skm.confusion_matrix(MC_LABELS, pred, labels=classes).tolist()
    p, rec, f, s = skm.precision_recall_fscore_support(
        MC_LABELS, pred, labels=classes, zero_division=0
    )
    for i, row in enumerate(r["per_class"]):
        assert row == {
            "name": MC_NAMES[i],
            "precision": pytest.approx(p[i]),
            "recall": pytest.approx(rec[i]),
            "f1": pytest.approx(f[i]),
            "support": s[i],
        }
    assert r["per_class"][3]["support"] == 0 and r["per_class"][3]["precision"] == 0.0
    for average in ("macro", "weighted"):
        p, rec, f, _ = skm.precision_recall_fscore_support(
            MC_LABELS, pred, labels=classes, average=average, zero_division=0
        )
        assert r[f"{average}_precision"] == pytest.approx(p)
        assert r[f"{average}_recall"] == pytest.approx(rec)
        assert r[f"{average}_f1"] == pytest.approx(f)
    # The absent class counts in the macro average (the old numpy code skipped it).
    present_only = np.mean([row["f1"] for row in r["per_class"][:3]])
    assert r["macro_f1"] == pytest.approx(present_only * 3 / 4)
    for k in (2, 3):
        expected = skm.top_k_accuracy_score(MC_LABELS, MC_PROBS, k=k, labels=classes)
        assert r["top_k_accuracy"][f"top_{k}"] == pytest.approx(expected)
    assert r["log_loss"] == pytest.approx(skm.log_loss(MC_LABELS, MC_PROBS, labels=classes))


def test_multiclass_calibration_and_errors(mc_report):
    from sklearn.calibration import calibration_curve

    r = mc_report
    pred = MC_PROBS.argmax(axis=1)
    confidence = MC_PROBS.max(axis=1)
    correct = pred == MC_LABELS
    rel = r["reliability"]
    assert rel["num_bins"] == 15 and len(rel["count"]) == 15 and sum(rel["count"]) == 10
    # Non-empty bins equal scikit-learn's calibration curve on (correct, confidence).
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=15)
    filled = [i for i, c in enumerate(rel["count"]) if c]
    assert [rel["accuracy"][i] for i in filled] == pytest.approx(accuracy.tolist())
    assert [rel["confidence"][i] for i in filled] == pytest.approx(mean_confidence.tolist())
    assert all(rel["accuracy"][i] is None for i in range(15) if i not in filled)
    # ECE by its definition, example by example.
    bins = np.minimum((np.ceil(confidence * 15) - 1).astype(int), 14)
    ece = sum(
        np.mean(bins == b) * abs(correct[bins == b].mean() - confidence[bins == b].mean())
        for b in set(bins)
    )
    assert r["ece"] == pytest.approx(ece)
    wrong = np.flatnonzero(~correct)
    assert sorted(m["index"] for m in r["misclassified"]) == wrong.tolist()
    assert [m["confidence"] for m in r["misclassified"]] == sorted(confidence[wrong], reverse=True)
    first = r["misclassified"][0]  # example 7: true cat, predicted <dog> at 0.61
    assert first == {"index": 7, "true": "cat", "predicted": "<dog>", "confidence": 0.61}
    matrix = np.array(r["confusion_matrix"])
    cell = r["most_confused"][0]
    i, j = MC_NAMES.index(cell["true"]), MC_NAMES.index(cell["predicted"])
    assert cell["count"] == matrix[i, j] == (matrix - np.diag(np.diag(matrix))).max()


def test_logits_give_ranking_metrics_only():
    r = evaluation.metrics_from_probabilities(np.log(MC_PROBS) * 3, MC_LABELS, top_k=(1, 2))
    assert r["accuracy"] == pytest.approx(np.mean(MC_PROBS.argmax(1) == MC_LABELS))
    assert r["log_loss"] is None and r["ece"] is None and r["reliability"] is None


ML_PROBS = np.array(
    [
        [0.9, 0.2, 0.6],
        [0.1, 0.7, 0.4],
        [0.8, 0.6, 0.3],
        [0.3, 0.1, 0.9],
        [0.6, 0.4, 0.2],
        [0.2, 0.8, 0.7],
    ]
)
ML_LABELS = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]])


def test_multilabel_numbers_equal_sklearn():
    from sklearn import metrics as skm

    r = evaluation.multilabel_metrics(ML_PROBS, ML_LABELS, ["sky", "sea", "sun"])
    pred = (ML_PROBS >= 0.5).astype(int)
    assert r.kind == "multilabel"
    assert r["subset_accuracy"] == pytest.approx(skm.accuracy_score(ML_LABELS, pred))
    assert r["hamming_loss"] == pytest.approx(skm.hamming_loss(ML_LABELS, pred))
    assert r["mean_average_precision"] == pytest.approx(
        skm.average_precision_score(ML_LABELS, ML_PROBS, average="macro")
    )
    ap = skm.average_precision_score(ML_LABELS, ML_PROBS, average=None)
    p, rec, f, s = skm.precision_recall_fscore_support(ML_LABELS, pred, zero_division=0)
    for i, row in enumerate(r["per_label"]):
        assert row["name"] == ["sky", "sea", "sun"][i]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((p[i], rec[i], f[i]))
        assert row["average_precision"] == pytest.approx(ap[i]) and row["support"] == s[i]
    for average in ("macro", "micro", "weighted"):
        expected = skm.f1_score(ML_LABELS, pred, average=average, zero_division=0)
        assert r[f"{average}_f1"] == pytest.approx(expected)
    bce = -np.mean(ML_LABELS * np.log(ML_PROBS) + (1 - ML_LABELS) * np.log(1 - ML_PROBS))
    assert r["log_loss"] == pytest.approx(bce)
    assert sum(r["reliability"]["count"]) == ML_PROBS.size


REG_PRED = np.array([[1.0, 10.0], [2.5, 12.0], [2.0, 9.0], [4.5, 15.0], [5.0, 11.0]])
REG_TRUE = np.array([[1.5, 10.0], [2.0, 13.0], [3.0, 8.0], [4.0, 14.0], [7.0, 11.5]])


def test_regression_numbers_equal_sklearn():
    from sklearn import metrics as skm

    r = evaluation.regression_metrics(REG_PRED, REG_TRUE, ["width", "height"])
    assert r.kind == "regression" and r["num_examples"] == 5
    assert r["mae"] == pytest.approx(skm.mean_absolute_error(REG_TRUE, REG_PRED))
    assert r["mse"] == pytest.approx(skm.mean_squared_error(REG_TRUE, REG_PRED))
    assert r["rmse"] == pytest.approx(skm.root_mean_squared_error(REG_TRUE, REG_PRED))
    assert r["r2"] == pytest.approx(skm.r2_score(REG_TRUE, REG_PRED))
    for i, row in enumerate(r["per_target"]):
        assert row["mae"] == pytest.approx(skm.mean_absolute_error(REG_TRUE[:, i], REG_PRED[:, i]))
        assert row["r2"] == pytest.approx(skm.r2_score(REG_TRUE[:, i], REG_PRED[:, i]))
    # Mean absolute error per example: 0.25, 0.75, 1.0, 0.75, 1.25 -> example 4 first.
    assert [e["index"] for e in r["largest_errors"]] == [4, 2, 1, 3, 0]
    assert r["largest_errors"][0] == {
        "index": 4,
        "true": [7.0, 11.5],
        "predicted": [5.0, 11.0],
        "error": 1.25,
    }
    single = evaluation.regression_metrics(REG_PRED[:, 0], REG_TRUE[:, 0])
    assert single["mae"] == pytest.approx(skm.mean_absolute_error(REG_TRUE[:, 0], REG_PRED[:, 0]))


def test_report_is_a_json_dict_with_text_and_html(mc_report):
    r = mc_report
    assert isinstance(r, dict) and r.accuracy == r["accuracy"]
    assert json.loads(r.to_json()) == r.to_dict() == json.loads(json.dumps(r))
    assert repr(r) == "EvaluationReport(kind='multiclass', num_examples=10, accuracy=0.600)"
    text = str(r)
    assert text.splitlines()[0] == "accuracy 0.600 on 10 examples"
    assert "weighted precision" in text and "most confused" in text and "ECE" in text
    assert any(
        line.split() == ["<dog>", "0.000", "0.000", "0.000", "0"] for line in text.split("\n")
    )
    page = r._repr_html_()
    assert page.count("<table>") == 2 and "&lt;dog&gt;" in page and "<dog>" not in page
    assert not hasattr(r, "no_such_metric")
    # NaN never reaches the JSON: one example gives R² None, and to_json stays strict.
    one = evaluation.regression_metrics([1.0], [2.0])
    assert one["r2"] is None and json.loads(one.to_json())["r2"] is None
    assert "R²" in str(one) and "<table>" in one._repr_html_()
    ml = evaluation.multilabel_metrics(ML_PROBS, ML_LABELS)
    assert str(ml).startswith("mAP ") and "Hamming" in ml._repr_html_()


def test_text_report_leaves_big_matrices_to_plots():
    probs = np.eye(25)[np.arange(50) % 25]
    text = str(evaluation.metrics_from_probabilities(probs, np.arange(50) % 25))
    assert "confusion matrix" not in text and "24" in text


def test_bad_report_input_raises_value_error():
    calls = [
        (lambda: evaluation.multilabel_metrics(ML_PROBS, ML_LABELS[:, :2]), "shape"),
        (lambda: evaluation.multilabel_metrics(ML_PROBS, ML_LABELS * 2), "0/1"),
        (lambda: evaluation.multilabel_metrics(ML_PROBS, ML_LABELS, threshold=1.0), "threshold"),
        (lambda: evaluation.regression_metrics(REG_PRED, REG_TRUE[:, 0]), "shape"),
        (lambda: evaluation.regression_metrics(REG_PRED, REG_TRUE, ["a"]), "target_names"),
        (lambda: evaluation.metrics_from_probabilities(PROBS, LABELS + 0.5), "integer"),
        (lambda: evaluation.report_from_predictions("ranking", PROBS, LABELS), "kind"),
        (lambda: evaluation.reliability([0.5], [1, 0]), "same length"),
    ]
    for call, match in calls:
        with pytest.raises(ValueError, match=match):
            call()


# --- evaluate on models with each head --------------------------------------------------------


def _contract_model(units: int, activation: str) -> keras.Model:
    """The head contract of kt.build_*: Dense 'logits' -> Activation 'predictions'."""
    inputs = keras.Input((units,), name="images")
    logits = keras.layers.Dense(units, name="logits")(inputs)
    outputs = keras.layers.Activation(activation, name="predictions", dtype="float32")(logits)
    model = keras.Model(inputs, outputs)
    model.get_layer("logits").set_weights([np.eye(units, dtype="float32"), np.zeros(units)])
    return model


def test_evaluate_reads_the_head():
    # Identity logits: a softmax model predicts softmax(x), a sigmoid model sigmoid(x), ...
    x = np.log(MC_PROBS).astype("float32")
    model = _contract_model(4, "softmax")
    model.class_names = MC_NAMES  # as kt.runs.load_run sets it
    r = evaluation.evaluate(model, (x, MC_LABELS), top_k=(1, 2))
    expected = evaluation.metrics_from_probabilities(MC_PROBS, MC_LABELS, MC_NAMES, top_k=(1, 2))
    assert r.kind == "multiclass" and r["class_names"] == MC_NAMES
    for key in ("accuracy", "macro_f1", "weighted_f1", "log_loss", "ece"):
        assert r[key] == pytest.approx(expected[key], abs=1e-6)
    assert r["confusion_matrix"] == expected["confusion_matrix"]
    # Small data: the misclassified images are kept, in the report's order.
    order = [m["index"] for m in r["misclassified"]]
    np.testing.assert_array_equal(r.misclassified_images, x[order])
    assert evaluation.evaluate(model, (x, MC_LABELS), keep_images=9).misclassified_images is None

    logit = np.log(ML_PROBS / (1 - ML_PROBS)).astype("float32")
    ml = evaluation.evaluate(_contract_model(3, "sigmoid"), (logit, ML_LABELS))
    assert ml.kind == "multilabel"
    want = evaluation.multilabel_metrics(ML_PROBS, ML_LABELS)["mean_average_precision"]
    assert ml["mean_average_precision"] == pytest.approx(want)

    reg = evaluation.evaluate(_contract_model(2, "linear"), (REG_PRED.astype("float32"), REG_TRUE))
    assert reg.kind == "regression"
    assert reg["mae"] == pytest.approx(evaluation.regression_metrics(REG_PRED, REG_TRUE)["mae"])


def test_evaluate_outside_the_contract_needs_probabilities_or_kind():
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))  # no 'predictions' layer
    x = REG_PRED.astype("float32")
    with pytest.raises(ValueError, match="kind="):
        evaluation.evaluate(model, (x, REG_TRUE))
    model.layers[-1].set_weights([np.eye(2, dtype="float32"), np.zeros(2)])
    r = evaluation.evaluate(model, (x, REG_TRUE), kind="regression")
    assert r["mae"] == pytest.approx(evaluation.regression_metrics(REG_PRED, REG_TRUE)["mae"])
    with pytest.raises(ValueError, match="keep_images"):
        evaluation.evaluate(model, (x, REG_TRUE), keep_images=-1)
