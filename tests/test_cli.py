"""Tests for the `keras-transfer` train / evaluate / predict sub-commands."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import keras_transfer as kt
from keras_transfer import cli

TINY = ["--backbone", "mobilenet_v2", "--alpha", "0.35", "--weights", "none"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two classes of four 32 px PNGs each: reddish and bluish noise."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, color in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
        (root / name).mkdir()
        for i in range(4):
            pixels = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory):
    """Trains once through the CLI, options half from a YAML config, half on the command line."""
    out = tmp_path_factory.mktemp("saved_models")
    config = out / "train.yaml"
    config.write_text("head_epochs: 1\nfinetune_epochs: 1\nimage-size: 32\nbatch_size: 4\n")
    argv = ["train", str(image_folder), *TINY, "--config", str(config), "--name", "tiny"]
    argv += ["--output-dir", str(out), "--validation-split", "0.25", "--quiet"]
    assert cli.main(argv) == 0
    return out / "tiny"


def test_help_lists_the_sub_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "evaluate", "predict"):
        assert command in out


def _sub_commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield [*prefix, name]
                yield from _sub_commands(sub, [*prefix, name])


def test_help_imports_neither_tensorflow_nor_keras():
    """`--help` and every `SUB --help` answer without TensorFlow (times: benchmarks/startup.py)."""
    commands = [[], *_sub_commands(cli.build_parser())]
    assert ["train"] in commands and ["weights", "fetch"] in commands
    code = (
        "import sys, json\n"
        "from keras_transfer import cli\n"
        f"for argv in {commands!r}:\n"
        "    try:\n"
        "        cli.main([*argv, '--help'])\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, argv\n"
        "print(json.dumps([m for m in ('tensorflow', 'keras') if m in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    root = Path(kt.__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == []
    assert result.stderr == ""  # no TensorFlow log lines


def test_package_loads_public_names_lazily():
    for name in kt.__all__:
        assert getattr(kt, name) is not None, name
    assert kt.build_classifier is kt.builders.build_classifier
    assert "build_classifier" in dir(kt) and "runs" in dir(kt)
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        kt.no_such_name  # noqa: B018
    assert not hasattr(kt, "no_such_name")


def test_plain_keras_loads_a_saved_model_after_a_lazy_import(tiny_model, tmp_path):
    """`import keras_transfer` imports no Keras, yet registers its layers once Keras loads."""
    path = tmp_path / "model.keras"
    tiny_model.save(path)
    code = (
        "import sys, keras_transfer\n"
        "assert 'keras' not in sys.modules\n"
        "import keras\n"
        f"model = keras.saving.load_model({str(path)!r})\n"
        "print(type(model.get_layer('preprocessing')).__name__)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "BackbonePreprocessing"


def test_a_module_importing_keras_first_thing_after_a_lazy_import():
    """`kt.list_backbones()` first loads `kt.backbones`, whose `import keras` fires the layer
    registration hook in the middle of that import: the hook must not need `kt.backbones`."""
    code = (
        "import sys, keras_transfer as kt\n"
        "assert 'keras' not in sys.modules\n"
        "print('mobilenet_v2' in kt.list_backbones(), kt.layers.BackbonePreprocessing.__name__)\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["True", "BackbonePreprocessing"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "/no/such/folder", *TINY], "neither a folder nor a built-in dataset"),
        (["train", *TINY], "Give the data"),
        (["evaluate", "/no/such/model.keras", "fashion_mnist"], "not found"),
        (["predict", "/no/such/model.keras", "x.png"], "does not exist"),
        (["train", "/no/such/folder", *TINY, "--compare-scratch"], "drop --weights none"),
    ],
)
def test_bad_input_exits_2_with_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1


def test_unknown_config_key_exits_2(image_folder, tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"head_epoch": 3}))
    assert cli.main(["train", str(image_folder), *TINY, "--config", str(config)]) == 2
    assert "Unknown option 'head_epoch'" in capsys.readouterr().err


@pytest.mark.slow
def test_train_writes_model_labels_history_metrics(trained):
    for name in ("model.keras", "labels.txt", "history.json", "metrics.json"):
        assert (trained / name).is_file(), name
    assert (trained / "labels.txt").read_text().split() == ["blue", "red"]
    history = json.loads((trained / "history.json").read_text())
    assert history["phases"] == {"head": [0, 1], "finetune": [1, 2]}
    assert len(history["history"]["loss"]) == 2
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["validation"]["num_examples"] == 2
    assert metrics["config"]["head_epochs"] == 1  # from the YAML file
    assert metrics["config"]["image_size"] == 32


@pytest.mark.slow
def test_evaluate_json_parses(trained, image_folder, capsys):
    assert cli.main(["evaluate", str(trained), str(image_folder), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["num_examples"] == 8
    assert metrics["class_names"] == ["blue", "red"]
    assert np.array(metrics["confusion_matrix"]).sum() == 8
    assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.slow
def test_evaluate_text_report(trained, image_folder, capsys):
    assert cli.main(["evaluate", str(trained / "model.keras"), str(image_folder)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accuracy ")
    assert "confusion matrix" in out


@pytest.mark.slow
def test_predict_prints_top_k_labels(trained, image_folder, capsys):
    images = [str(image_folder / "red" / "0.png"), str(image_folder / "blue" / "1.png")]
    assert cli.main(["predict", str(trained), *images, "--top-k", "2", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["image"] for line in lines] == images
    for line in lines:
        assert sorted(r["label"] for r in line["top_k"]) == ["blue", "red"]
        assert sum(r["probability"] for r in line["top_k"]) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_predict_rejects_a_file_that_is_not_an_image(trained, tmp_path, capsys):
    bogus = tmp_path / "notes.png"
    bogus.write_text("not an image")
    assert cli.main(["predict", str(trained), str(bogus)]) == 2
    assert "not an image" in capsys.readouterr().err


def test_multi_worker_strategy_without_cluster_exits_2(image_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    argv = ["train", str(image_folder), *TINY, "--image-size", "32", "--batch-size", "4"]
    argv += ["--strategy", "multi_worker", "--output-dir", str(tmp_path)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "multi_worker" in err
    assert len(err.splitlines()) == 1


@pytest.mark.slow
def test_train_under_mirrored_strategy(image_folder, tmp_path):
    argv = ["train", str(image_folder), *TINY, "--image-size", "32", "--batch-size", "4"]
    argv += ["--head-epochs", "1", "--finetune-epochs", "1", "--strategy", "mirrored"]
    argv += ["--output-dir", str(tmp_path), "--name", "mirrored", "--quiet"]
    assert cli.main(argv) == 0
    assert (tmp_path / "mirrored" / "model.keras").is_file()


def test_export_reads_labels_txt_beside_the_model(trained, tmp_path):
    argv = ["export", str(trained / "model.keras"), str(tmp_path / "tiny"), "--no-verify"]
    assert cli.main(argv) == 0
    metadata = json.loads(
        (tmp_path / "tiny" / "1" / "assets.extra" / "keras_transfer.json").read_text()
    )
    assert metadata["labels"] == ["blue", "red"]


@pytest.mark.slow
def test_train_with_checkpoint_dir_gives_checkpointing_a_fixed_order(
    image_folder, tmp_path, caplog
):
    checkpoints = tmp_path / "checkpoints"
    argv = ["train", str(image_folder), *TINY, "--image-size", "32", "--batch-size", "4"]
    argv += ["--head-epochs", "1", "--finetune-epochs", "1", "--output-dir", str(tmp_path)]
    argv += ["--checkpoint-dir", str(checkpoints), "--checkpoint-every", "1", "--quiet"]
    with caplog.at_level("WARNING", logger="keras_transfer.checkpointing"):
        assert cli.main(argv) == 0
    assert list(checkpoints.rglob("checkpoint.npz"))  # one folder per trained model
    assert not [r for r in caplog.records if "reshuffl" in r.getMessage()]


def _epoch(callback, epoch, logs):
    callback.on_epoch_begin(epoch)
    callback.on_epoch_end(epoch, logs)


def test_progress_prints_one_line_per_epoch_when_stdout_is_not_a_terminal(capsys):
    callback, verbose = cli._progress(2)
    assert verbose == 0  # no Keras bar: off a terminal it would redraw on every step
    callback.on_train_begin()
    _epoch(callback, 0, {"loss": 0.5, "accuracy": 0.75})
    callback.on_train_end()
    callback.on_train_begin()  # fine_tune fits once per phase: one count across both
    _epoch(callback, 1, {"loss": 0.25, "accuracy": 1.0})
    callback.on_train_end()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("epoch 1/2 - ") and "- loss: 0.5000 - accuracy: 0.7500 -" in lines[0]
    assert lines[1].startswith("epoch 2/2 - ") and lines[1].endswith("ETA 0 s")


def test_progress_in_a_terminal_leaves_the_bars_to_keras(capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    callback, verbose = cli._progress(2)
    assert verbose == "auto"
    callback.on_train_begin()
    _epoch(callback, 0, {"loss": 0.5})
    assert capsys.readouterr().out == ""  # the ETA waits for Keras's bar to end its line
    _epoch(callback, 1, {"loss": 0.25})
    callback.on_train_end()
    out = capsys.readouterr().out
    assert "[1/2 epochs" in out and "[2/2 epochs" in out and "loss" not in out
    quiet, verbose = cli._progress(2, quiet=True)
    quiet.on_train_begin()
    _epoch(quiet, 0, {"loss": 0.5})
    quiet.on_train_end()
    assert verbose == 0 and capsys.readouterr().out == ""


def _fake_fashion_mnist(calls):
    """A stand-in for the built-in loader: 28 px uint8 images, or resized float32 ones."""

    def load(*, split="train", per_class=None, seed=0, image_size=None, channels=1):
        calls.append((split, per_class, seed, image_size))
        labels = np.repeat(np.arange(10), per_class)
        noise = np.random.default_rng(seed).normal(0, 10, (len(labels), 28, 28, channels))
        x = np.clip(labels[:, None, None, None] * 25.0 + noise, 0, 255).astype("uint8")
        if image_size is not None:
            import tensorflow as tf

            x = tf.image.resize(x.astype("float32"), (image_size, image_size)).numpy()
        return x, labels

    return load


@pytest.mark.slow
def test_compare_scratch_trains_a_small_cnn_on_the_same_examples(tmp_path, monkeypatch, capsys):
    from keras_transfer import datasets

    calls = []
    monkeypatch.setitem(datasets.DATASETS, "fashion_mnist", _fake_fashion_mnist(calls))
    weights = tmp_path / "base.weights.h5"
    kt.get_backbone("mobilenet_v2").build(32, alpha=0.35).save_weights(weights)
    argv = ["train", "fashion_mnist", "--per-class", "2", "--test-size", "20"]
    argv += ["--image-size", "32", "--alpha", "0.35", "--weights", str(weights)]
    argv += ["--head-epochs", "1", "--finetune-epochs", "0", "--batch-size", "10"]
    argv += ["--compare-scratch", "--scratch-epochs", "1", "--output-dir", str(tmp_path)]
    assert cli.main([*argv, "--name", "demo"]) == 0
    out = capsys.readouterr().out
    # The backbone's data at 32 px, the small CNN's at the dataset's own 28 px: same examples.
    assert ("train", 2, 0, 32) in calls and ("test", 2, 1234, 32) in calls
    assert ("train", 2, 0, None) in calls and ("test", 2, 1234, None) in calls
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    scratch = metrics["scratch"]
    assert scratch["model"] == "small_cnn" and scratch["image_size"] == [28, 28]
    assert (scratch["epochs"], scratch["updates"]) == (1, 2)  # 20 images in batches of 10
    assert scratch["test"]["num_examples"] == metrics["test"]["num_examples"] == 20
    assert metrics["run_seconds"] > 0 and scratch["run_seconds"] > 0
    header, pretrained, small = out.splitlines()[-3:]
    assert header.startswith("test accuracy on 20 held-out images (wall time")
    assert pretrained.split()[-3:] == [f"{metrics['test']['accuracy']:.3f}", *_secs(metrics)]
    assert "small CNN from scratch, 28 px, 2 updates (1 epochs)" in small
    assert small.split()[-3:] == [f"{scratch['test']['accuracy']:.3f}", *_secs(scratch)]
    assert "\r" not in out  # stdout is not a terminal: one line per epoch, no redrawn bars
    assert len([line for line in out.splitlines() if line.startswith("epoch 1/1 - ")]) == 2


def _secs(run):
    return [f"{run['run_seconds']:.0f}", "s"]


def test_lr_find_prints_the_suggestion_and_saves_the_curve(image_folder, tmp_path, capsys):
    plot = tmp_path / "lr.png"
    argv = ["lr-find", str(image_folder), *TINY, "--image-size", "32", "--batch-size", "4"]
    argv += ["--num-iterations", "30", "--suggestion", "minimum", "--plot", str(plot), "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "minimum" and out["phase"] == "head" and out["image_size"] == 32
    assert set(out["suggestions"]) == {"valley", "steep", "minimum"}
    assert out["suggestion"] == out["suggestions"]["minimum"]
    assert 1e-8 <= out["suggestion"] <= 1.0  # fastai: the rate at the minimum, over 10
    assert 0 < out["steps"] <= 30 and out["stopped"] in ("completed", "diverged")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    # A bad --phase is refused before any data is read or model built.
    assert cli.main(["lr-find", str(tmp_path / "missing"), "--phase", "top"]) == 2
    assert "--phase must be head or a number" in capsys.readouterr().err
