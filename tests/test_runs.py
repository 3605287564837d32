"""Tests for run folders: `kt.runs.save_run` / `load_run` and the labels file."""

import json

import keras
import numpy as np
import pytest

import keras_transfer as kt
from keras_transfer import runs

NAMES = ["red car", "café au lait", "東京 タワー"]


class _Report:
    """Stands in for an object with `.to_dict()`, such as an evaluation report."""

    def to_dict(self):
        return {"accuracy": np.float32(0.75), "confusion_matrix": np.eye(3, dtype="int64")}


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)


@pytest.fixture(scope="module")
def history():
    history = keras.callbacks.History()
    history.history = {"loss": [1.5, 1.0, np.float32(0.5)], "accuracy": [0.2, 0.5, 0.9]}
    history.epoch = [0, 1, 2]
    history.phases = {"head": (0, 1), "finetune": range(1, 3), "skipped": None}
    return history


@pytest.fixture(scope="module")
def saved(model, history, tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs") / "flowers"
    metrics = {"test": _Report(), "seconds": 1.5, "config": {"name": "flowers"}}
    written = runs.save_run(folder, model, class_names=NAMES, history=history, metrics=metrics)
    assert written == folder
    return folder


def test_save_run_writes_the_four_files_and_nothing_else(saved):
    assert sorted(p.name for p in saved.iterdir()) == sorted(runs.RUN_FILES)
    assert (saved / "labels.txt").read_text(encoding="utf-8") == "\n".join(NAMES) + "\n"
    history = json.loads((saved / "history.json").read_text())
    assert history == {
        "history": {"loss": [1.5, 1.0, 0.5], "accuracy": [0.2, 0.5, 0.9]},
        "epoch": [0, 1, 2],
        "phases": {"head": [0, 1], "finetune": [1, 3], "skipped": None},
    }
    metrics = json.loads((saved / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["test"] == {"accuracy": 0.75, "confusion_matrix": np.eye(3).tolist()}
    assert metrics["seconds"] == 1.5


def test_load_run_round_trips_model_labels_history_metrics(saved, model):
    run = runs.load_run(saved)
    assert run.path == saved
    assert run.class_names == NAMES
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(run.model.predict(x, verbose=0), model.predict(x, verbose=0))
    assert run.history == {"loss": [1.5, 1.0, 0.5], "accuracy": [0.2, 0.5, 0.9]}
    assert run.phases == {"head": [0, 1], "finetune": [1, 3], "skipped": None}
    assert run.metrics["test"]["accuracy"] == 0.75
    # The names travel on the model too, where the head contract reads them.
    assert run.model.class_names == tuple(NAMES)
    assert kt.head_of(run.model).class_names == tuple(NAMES)


def test_load_run_from_a_keras_file_reads_the_files_beside_it(saved):
    run = runs.load_run(saved / "model.keras")
    assert run.class_names == NAMES
    assert run.path == saved


def test_save_run_replaces_files_atomically_and_drops_stale_ones(saved, model, tmp_path):
    folder = tmp_path / "run"
    runs.save_run(folder, model, class_names=NAMES, history={"loss": [2.0]}, metrics={"a": 1})
    (folder / "1").mkdir()  # an export version folder, say: not ours to touch
    runs.save_run(folder, model, metrics={"a": 2})
    # No temporary files left behind, no stale labels/history from the first run.
    assert sorted(p.name for p in folder.iterdir()) == ["1", "metrics.json", "model.keras"]
    assert json.loads((folder / "metrics.json").read_text()) == {"a": 2}
    # The model's own `class_names` attribute is the default for `class_names`.
    loaded = runs.load_run(saved).model
    runs.save_run(folder, loaded)
    assert runs.read_labels(folder / "labels.txt") == NAMES


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"class_names": ["a", "b"]}, ValueError, "one name per output of the model (3)"),
        ({"class_names": ["a", "b\nc", "d"]}, ValueError, "without line breaks"),
        ({"class_names": ["a", " b", "c"]}, ValueError, "leading/trailing whitespace"),
        ({"class_names": ["a", "a", "c"]}, ValueError, "Received duplicates: ['a']"),
        ({"class_names": "abc"}, TypeError, "sequence of strings"),
        ({"class_names": ["a", 2, "c"]}, TypeError, "Received: 2 of type int"),
        ({"history": [1.0, 2.0]}, TypeError, "`history` must be the `History`"),
        ({"metrics": [0.5]}, TypeError, "`metrics` must be a dict"),
        ({"metrics": {"f": print}}, TypeError, "JSON cannot store"),
    ],
)
def test_save_run_checks_everything_before_writing(model, tmp_path, kwargs, error, message):
    folder = tmp_path / "run"
    with pytest.raises(error) as info:
        runs.save_run(folder, model, **kwargs)
    assert message in str(info.value)
    assert not folder.exists() or not any(folder.iterdir())


def test_save_run_refuses_what_is_not_a_model(tmp_path):
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        runs.save_run(tmp_path, "model.keras")


def test_labels_round_trip_with_unicode_and_spaces(tmp_path):
    path = runs.write_labels(tmp_path / "labels.txt", NAMES)
    assert runs.read_labels(path) == NAMES
    # Hand-written files: a byte-order mark, CRLF line ends, blank lines, stray spaces.
    path.write_bytes("\ufeffred car\r\n\r\n  café au lait \r\n東京 タワー".encode())
    assert runs.read_labels(path) == NAMES


def test_missing_or_broken_files_give_clear_errors(saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="'.*nowhere' does not exist.*run folder"):
        runs.load_run(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="the folder has no model.keras"):
        runs.load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="Labels file .* does not exist"):
        runs.read_labels(tmp_path / "labels.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="lists no class names"):
        runs.read_labels(tmp_path / "empty.txt")
    (tmp_path / "twice.txt").write_text("a\nb\na\n")
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        runs.read_labels(tmp_path / "twice.txt")

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.keras").write_bytes((saved / "model.keras").read_bytes())
    (broken / "labels.txt").write_text("a\nb\n")
    with pytest.raises(ValueError, match="lists 2 labels but the model has 3 outputs"):
        runs.load_run(broken)
    (broken / "labels.txt").unlink()
    (broken / "metrics.json").write_text("{not json")
    with pytest.raises(ValueError, match="metrics.json' is not valid JSON"):
        runs.load_run(broken)
    (broken / "metrics.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        runs.load_run(broken)
    (broken / "metrics.json").unlink()
    run = runs.load_run(broken)  # only the model: the rest is empty, not an error
    assert (run.class_names, run.history, run.metrics, run.phases) == (None, {}, {}, {})
    assert getattr(run.model, "class_names", None) is None
