"""The bad-input catalogue: every mistake gets a clear error before any work starts.

One table, one case per mistake. Each case checks the exception type; that the message names the
argument, the value received and the fix; and that it was raised before any training or writing:
the model (when one is involved) is not compiled and its weights did not change, and the case's
temporary folder holds exactly the files it held before the call. Many of these errors also have
focused tests beside their module (test_builders, test_freezing, test_training, test_data,
test_export); this table is the one place that lists them all.

Also here: safe loading (`.keras` files load with `safe_mode=True`; the package defines no
`Lambda` layers) and the decision on exporting an uncompiled model (allowed: serving needs no
optimizer or loss).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import same_weights, weights_of

import keras_transfer as kt

TINY = dict(image_size=32, weights=None, alpha=0.35)
PACKAGE = Path(kt.__file__).parent


class Context:
    """What a case may use: a temporary folder and, built on first use, a tiny model."""

    def __init__(self, tmp_path: Path, monkeypatch):
        self.tmp = tmp_path
        self.monkeypatch = monkeypatch
        self._model = None

    @property
    def model(self) -> keras.Model:
        if self._model is None:
            self._model = kt.build_classifier("mobilenet_v2", 3, **TINY)
        return self._model

    def arrays(self, n: int = 12):
        rng = np.random.default_rng(0)
        return rng.uniform(0, 255, (n, 32, 32, 3)).astype("float32"), np.arange(n) % 3

    def fine_tune(self, **kwargs):
        kwargs = {"verbose": 0, "batch_size": 4, **kwargs}
        return kt.fine_tune(self.model, self.arrays(), head_epochs=1, finetune_epochs=1, **kwargs)

    def image_folder(self, classes: dict[str, int], root: str = "photos") -> Path:
        """`root/<class>/<i>.png` with that many small valid PNGs per class."""
        folder = self.tmp / root
        png = tf.io.encode_png(np.full((8, 8, 3), 128, np.uint8)).numpy()
        for name, count in classes.items():
            (folder / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                (folder / name / f"{i}.png").write_bytes(png)
        return folder


@dataclass(frozen=True)
class Case:
    """One mistake: `call(ctx)` makes it; the error must be `error` and contain every `says`."""

    id: str
    call: Callable[[Context], object]
    error: type[Exception]
    says: tuple[str, ...]
    setup: Callable[[Context], None] | None = None


def _weights_file_of_another_width(ctx: Context) -> None:
    narrow = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.35
    )
    narrow.save_weights(ctx.tmp / "mobilenet_v2_035.weights.h5")


def _weights_file_of_another_architecture(ctx: Context) -> None:
    other = keras.applications.MobileNet(
        input_shape=(32, 32, 3), include_top=False, weights=None, alpha=0.25
    )
    other.save_weights(ctx.tmp / "mobilenet_v1.weights.h5")


def _empty_keras_home(ctx: Context) -> None:
    (ctx.tmp / "keras_home").mkdir()
    ctx.monkeypatch.setenv("KERAS_HOME", str(ctx.tmp / "keras_home"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    ctx.monkeypatch.setattr(keras.utils, "get_file", no_download)
    ctx.monkeypatch.setattr("keras.src.utils.file_utils.get_file", no_download)


def _folder_with_corrupt_image(ctx: Context) -> None:
    folder = ctx.image_folder({"cats": 2, "dogs": 2})
    good = (folder / "cats" / "0.png").read_bytes()
    (folder / "dogs" / "truncated.png").write_bytes(good[: len(good) // 2])


def _folder_with_text_file(ctx: Context) -> None:
    folder = ctx.image_folder({"cats": 2, "dogs": 2})
    (folder / "dogs" / "notes.txt").write_text("not an image")


def _folder_with_empty_class(ctx: Context) -> None:
    ctx.image_folder({"cats": 2, "dogs": 2})
    (ctx.tmp / "photos" / "birds").mkdir()


def _folder_nested(ctx: Context) -> None:
    folder = ctx.image_folder({"cats": 2, "dogs": 2})
    (folder / "dogs" / "puppies").mkdir()
    (folder / "dogs" / "puppies" / "0.png").write_bytes((folder / "cats" / "0.png").read_bytes())


def _existing_version(ctx: Context) -> None:
    (ctx.tmp / "models" / "flowers" / "1").mkdir(parents=True)
    (ctx.tmp / "models" / "flowers" / "1" / "saved_model.pb").write_bytes(b"keep me")


def _x(n: int = 6, fill: float | None = None) -> np.ndarray:
    x = np.random.default_rng(0).uniform(0, 255, (n, 8, 8, 3)).astype("float32")
    if fill is not None:
        x[2, 3, 4, 1] = fill
    return x


CASES = [
    # --- backbone and model -----------------------------------------------------------------
    Case(
        "unknown-backbone",
        lambda ctx: kt.build_classifier("mobilnet_v2", 3, **TINY),
        ValueError,
        ("'mobilnet_v2'", "Did you mean", "'mobilenet_v2'"),
    ),
    Case(
        "image-size-below-minimum",
        lambda ctx: kt.build_classifier("mobilenet_v2", 3, image_size=16, weights=None),
        ValueError,
        ("`image_size`", "16", "image_size >= 32"),
    ),
    Case(
        "four-channels-with-imagenet",
        lambda ctx: kt.build_classifier("mobilenet_v2", 3, image_size=96, channels=4),
        ValueError,
        ("`channels`", "channels=4", "1 (greyscale, replicated to RGB", "Convert"),
    ),
    Case(
        "one-class-softmax",
        lambda ctx: kt.build_classifier("mobilenet_v2", 1, **TINY),
        ValueError,
        ("`num_classes`", "num_classes=1", "multi_label=True"),
    ),
    Case(
        "include-top-passed-through",
        lambda ctx: kt.build_classifier("mobilenet_v2", 3, include_top=True, **TINY),
        ValueError,
        ("`include_top`", "include_top=True", "Use `num_classes`"),
    ),
    Case(
        "weights-file-of-another-width",
        lambda ctx: kt.build_classifier(
            "mobilenet_v2",
            3,
            image_size=32,
            alpha=1.0,
            weights=ctx.tmp / "mobilenet_v2_035.weights.h5",
        ),
        ValueError,
        ("`weights` file", "mobilenet_v2_035.weights.h5", "same architecture and width"),
        setup=_weights_file_of_another_width,
    ),
    Case(
        "weights-file-of-another-architecture",
        lambda ctx: kt.build_classifier(
            "mobilenet_v2", 3, **dict(TINY, weights=ctx.tmp / "mobilenet_v1.weights.h5")
        ),
        ValueError,
        ("`weights` file", "mobilenet_v1.weights.h5", "same architecture and width"),
        setup=_weights_file_of_another_architecture,
    ),
    Case(
        "weights-not-a-file",
        lambda ctx: kt.build_classifier(
            "mobilenet_v2",
            3,
            **dict(TINY, weights="imagenett"),  # offline: a misspelt value, refused up front
        ),
        ValueError,
        ("`weights`", "'imagenett'", "weights=None"),
    ),
    Case(
        "weights-of-wrong-type",
        lambda ctx: kt.build_classifier("mobilenet_v2", 3, **dict(TINY, weights=1)),
        TypeError,
        ("`weights`", "weights=1", "'imagenet', None"),
    ),
    Case(
        "imported-weights-missing-from-cache",
        lambda ctx: kt.build_classifier(
            "mobilenet_v2",
            3,
            image_size=96,
            weights="imagenet",  # offline: KERAS_HOME is empty here; refused before download
        ),
        ValueError,
        (
            "weights='imagenet'",  # offline: an expected message, not a call
            "image_size=96",
            "keras-transfer weights fetch mobilenet_v2",
        ),
        setup=_empty_keras_home,
    ),
    # --- freezing and training --------------------------------------------------------------
    Case(
        "unfreeze-fraction-above-one",
        lambda ctx: ctx.fine_tune(unfreeze=1.5),
        ValueError,
        ("`fraction`", "fraction=1.5", "fraction=0.3"),
    ),
    Case(
        "unfreeze-fraction-negative",
        lambda ctx: kt.unfreeze(ctx.model, fraction=-0.1),
        ValueError,
        ("`fraction`", "fraction=-0.1", "[0, 1]"),
    ),
    Case(
        "more-blocks-than-backbone",
        lambda ctx: ctx.fine_tune(unfreeze=99),
        ValueError,
        ("`blocks`", "blocks=99", "fraction=1.0"),
    ),
    Case(
        "unknown-layer-name",
        lambda ctx: ctx.fine_tune(unfreeze="block_15_addd"),
        ValueError,
        ("`from_layer`", "'block_15_addd'", "Did you mean 'block_15_add'"),
    ),
    Case(
        "learning-rate-zero",
        lambda ctx: ctx.fine_tune(head_learning_rate=0.0),
        ValueError,
        ("`head_learning_rate`", "head_learning_rate=0.0", "Typical values"),
    ),
    Case(
        "learning-rate-not-a-number",
        lambda ctx: ctx.fine_tune(finetune_learning_rate="1e-4"),
        ValueError,
        ("`finetune_learning_rate`", "'1e-4'", "Typical values"),
    ),
    Case(
        "learning-rate-nan",
        lambda ctx: ctx.fine_tune(head_learning_rate=float("nan")),
        ValueError,
        ("`head_learning_rate`", "nan", "Typical values"),
    ),
    Case(
        "zero-epochs-in-both-phases",
        lambda ctx: kt.fine_tune(ctx.model, ctx.arrays(), head_epochs=0, finetune_epochs=0),
        ValueError,
        ("head_epochs=0", "finetune_epochs=0", "Set at least one"),
    ),
    Case(
        "batch-size-larger-than-dataset",
        lambda ctx: ctx.fine_tune(batch_size=100),
        ValueError,
        ("`batch_size`", "100", "batch_size <= 12"),
    ),
    Case(
        "strategy-scope-mismatch",
        lambda ctx: ctx.fine_tune(strategy=tf.distribute.OneDeviceStrategy("/cpu:0")),
        ValueError,
        ("strategy=OneDeviceStrategy", "built under", "strategy.scope()"),
    ),
    Case(
        "checkpoint-every-zero",
        lambda ctx: ctx.fine_tune(checkpoint_dir=ctx.tmp / "ckpt", checkpoint_every=0),
        ValueError,
        ("`checkpoint_every`", "checkpoint_every=0", "checkpoint_every=100"),
    ),
    Case(
        "checkpoint-with-forced-cache",
        lambda ctx: ctx.fine_tune(checkpoint_dir=ctx.tmp / "ckpt", cache=True),
        ValueError,
        ("cache=True", "checkpoint_dir", "cache=False"),
    ),
    # --- data -------------------------------------------------------------------------------
    Case(
        "folder-with-truncated-image",
        lambda ctx: kt.data.from_folder(ctx.tmp / "photos", image_size=32, batch_size=2),
        ValueError,
        ("truncated.png", "corrupt or truncated", "skip_corrupt=True"),
        setup=_folder_with_corrupt_image,
    ),
    Case(
        "folder-with-non-image-file",
        lambda ctx: kt.data.from_folder(ctx.tmp / "photos", image_size=32, batch_size=2),
        ValueError,
        ("Non-image files", "notes.txt", "Move them out"),
        setup=_folder_with_text_file,
    ),
    Case(
        "folder-with-empty-class",
        lambda ctx: kt.data.from_folder(ctx.tmp / "photos", image_size=32, batch_size=2),
        ValueError,
        ("birds", "is empty", "remove the folder"),
        setup=_folder_with_empty_class,
    ),
    Case(
        "folder-with-single-class",
        lambda ctx: kt.data.from_folder(ctx.tmp / "photos", image_size=32, batch_size=2),
        ValueError,
        ("1 class folder", "['cats']", "at least 2"),
        setup=lambda ctx: ctx.image_folder({"cats": 3}),
    ),
    Case(
        "folder-nested-too-deep",
        lambda ctx: kt.data.from_folder(ctx.tmp / "photos", image_size=32, batch_size=2),
        ValueError,
        ("subfolders", "puppies", "Move the images up"),
        setup=_folder_nested,
    ),
    Case(
        "labels-out-of-range",
        lambda ctx: kt.data.from_arrays(_x(), [0, 1, 0, 1, 2, 1], class_names=["a", "b"]),
        ValueError,
        ("`y`", "[2]", "remap them"),
    ),
    Case(
        "labels-negative",
        lambda ctx: kt.data.from_arrays(_x(), [0, 1, -1, 1, 0, 1]),
        ValueError,
        ("`y`", "[-1]", "remap them"),
    ),
    Case(
        "single-class-labels",
        lambda ctx: kt.data.from_arrays(_x(), [1] * 6),
        ValueError,
        ("`y`", "[1]", "at least 2 classes"),
    ),
    Case(
        "nan-pixels",
        lambda ctx: kt.data.from_arrays(_x(fill=np.nan), [0, 1] * 3),
        ValueError,
        ("`x`", "NaN or inf", "index 2", "Drop or repair"),
    ),
    Case(
        "inf-pixels",
        lambda ctx: kt.data.from_arrays(_x(fill=np.inf), [0, 1] * 3),
        ValueError,
        ("`x`", "NaN or inf", "index 2", "Drop or repair"),
    ),
    Case(
        "x-and-y-of-different-lengths",
        lambda ctx: kt.data.from_arrays(_x(), [0, 1, 0, 1]),
        ValueError,
        ("len(x)=6", "len(y)=4", "one label per image"),
    ),
    Case(
        "mixed-image-sizes",
        lambda ctx: kt.data.from_arrays(
            [np.zeros((8, 8, 3)), np.zeros((9, 8, 3)), np.zeros((8, 8, 3))], [0, 1, 0]
        ),
        ValueError,
        ("`x`", "mixed sizes or channel counts", "Resize them"),
    ),
    Case(
        "mixed-channel-counts",
        lambda ctx: kt.data.from_arrays(
            [np.zeros((8, 8, 3)), np.zeros((8, 8, 1)), np.zeros((8, 8, 3))], [0, 1, 0]
        ),
        ValueError,
        ("`x`", "mixed sizes or channel counts", "Resize them"),
    ),
    # --- export -----------------------------------------------------------------------------
    Case(
        "existing-version-folder",
        lambda ctx: kt.export_for_serving(ctx.model, ctx.tmp / "models" / "flowers", version=1),
        FileExistsError,
        ("flowers/1", "already exists", "overwrite=True"),
        setup=_existing_version,
    ),
    Case(
        "model-name-with-dotdot",
        lambda ctx: kt.export_for_serving(ctx.model, ctx.tmp / "models" / ".." / "flowers"),
        ValueError,
        ("`base_path`", "'..'", "Pass the folder directly"),
    ),
    Case(
        "model-name-with-bad-characters",
        lambda ctx: kt.export_for_serving(ctx.model, ctx.tmp / "models" / "my flowers!"),
        ValueError,
        ("Invalid model name", "'my flowers!'", "e.g. 'flowers_v2'"),
    ),
    Case(
        "exporting-an-unbuilt-model",
        lambda ctx: kt.export_for_serving(
            keras.Sequential([keras.layers.Dense(3)]), ctx.tmp / "models" / "flowers"
        ),
        ValueError,
        ("`model`", "is not built", "model.build("),
    ),
    Case(
        "exporting-not-a-model",
        lambda ctx: kt.export_for_serving("model.keras", ctx.tmp / "models" / "flowers"),
        TypeError,
        ("`model`", "str", "keras.models.load_model"),
    ),
    Case(
        "decoded-size-cap-below-model-size",
        lambda ctx: kt.export_for_serving(
            ctx.model, ctx.tmp / "models" / "flowers", max_image_pixels=100
        ),
        ValueError,
        ("`max_image_pixels`", "max_image_pixels=100", "at least the model's own size (1024)"),
    ),
]


def _files(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _trainable_flags(model: keras.Model) -> list[bool]:
    backbone = kt.find_backbone(model)
    return [layer.trainable for layer in (*model.layers, *backbone.layers)]


def test_catalogue_has_at_least_25_cases():
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_fails_fast_and_clearly(case, tmp_path, monkeypatch):
    ctx = Context(tmp_path, monkeypatch)
    if case.setup is not None:
        case.setup(ctx)
    if {"model", "fine_tune"} & set(case.call.__code__.co_names):
        ctx.model  # noqa: B018 - built before the call, so the call's effect on it shows
    before_files = _files(tmp_path)
    before_weights = weights_of(ctx._model) if ctx._model is not None else None
    before_trainable = _trainable_flags(ctx._model) if ctx._model is not None else None
    with pytest.raises(case.error) as raised:
        case.call(ctx)
    message = str(raised.value)
    for text in case.says:
        assert text in message, f"{text!r} missing from: {message}"
    # Raised before any work: no file written or removed, no training started.
    assert _files(tmp_path) == before_files
    if ctx._model is not None:
        assert not ctx.model.compiled, "the model was compiled: training had started"
        if before_weights is not None:
            assert same_weights(weights_of(ctx.model), before_weights)
            assert _trainable_flags(ctx.model) == before_trainable, "layers were (un)frozen"


def test_uncompiled_model_exports(exported_classifier):
    """Exporting an uncompiled model is allowed: serving needs neither optimizer nor loss."""
    model, path = exported_classifier.model, exported_classifier.path  # conftest's shared export
    assert not model.compiled
    loaded = tf.saved_model.load(str(path))
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(
        out["probabilities"].numpy(), model.predict(images, verbose=0), rtol=1e-5, atol=1e-6
    )


# --- safe loading -----------------------------------------------------------------------------


def test_package_defines_no_lambda_layers():
    hits = [
        f"{path.name}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if re.search(r"\bLambda\(", line) and not line.lstrip().startswith("#")
    ]
    assert hits == []


@pytest.mark.parametrize("variant", ["plain", "greyscale-augmented"])
def test_keras_files_load_in_safe_mode(tmp_path, variant):
    kwargs = dict(channels=1, augmentation="default") if variant != "plain" else {}
    model = kt.build_classifier("mobilenet_v2", 3, **TINY, **kwargs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, kwargs.get("channels", 3)))
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )
