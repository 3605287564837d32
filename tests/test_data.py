import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt


def _write_image(path, value, size=(12, 10), channels=3, fmt="png"):
    image = np.full((*size, channels), value, dtype="uint8")
    encoded = tf.io.encode_png(image) if fmt == "png" else tf.io.encode_jpeg(image)
    path.write_bytes(encoded.numpy())


@pytest.fixture
def folder(tmp_path):
    for c, name in enumerate(["cat", "dog", "fox"]):
        (tmp_path / name).mkdir()
        for i in range(5):
            _write_image(tmp_path / name / f"{i}.png", 40 * c + i, fmt="png" if i % 2 else "jpg")
    return tmp_path


def test_folder_gives_batched_resized_float_images_with_class_names(folder):
    ds = kt.data.from_folder(folder, image_size=16, batch_size=4, shuffle=False)
    assert ds.class_names == ["cat", "dog", "fox"]
    x, y = next(iter(ds))
    assert x.shape == (4, 16, 16, 3) and x.dtype == tf.float32
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert float(tf.reduce_max(x)) <= 255.0


def test_folder_split_is_stratified_and_seeded(folder):
    train, val = kt.data.from_folder(
        folder, image_size=8, batch_size=2, validation_split=0.4, seed=3
    )
    val_labels = np.concatenate([y.numpy() for _, y in val])
    train_labels = np.concatenate([y.numpy() for _, y in train])
    assert np.bincount(val_labels).tolist() == [2, 2, 2]
    assert len(train_labels) == 9
    again = kt.data.from_folder(folder, image_size=8, batch_size=2, validation_split=0.4, seed=3)[1]
    first = np.concatenate([x.numpy() for x, _ in val])
    np.testing.assert_array_equal(first, np.concatenate([x.numpy() for x, _ in again]))


def test_corrupt_and_truncated_images_are_listed_or_skipped(folder):
    (folder / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = (folder / "dog" / "1.png").read_bytes()
    (folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="2 corrupt or truncated") as info:
        kt.data.from_folder(folder, image_size=8)
    assert "broken.jpg" in str(info.value) and "truncated.png" in str(info.value)
    assert "skip_corrupt=True" in str(info.value)
    ds = kt.data.from_folder(folder, image_size=8, batch_size=1, skip_corrupt=True)
    assert sum(1 for _ in ds) == 15


def test_scan_skips_bad_files_and_keeps_labels_with_their_paths(folder):
    # The scan decodes in parallel and unordered: the paths it keeps must still carry their
    # own class's label, in listing order, and the bad ones are named in listing order too.
    (folder / "cat" / "0_empty.png").write_bytes(b"")
    (folder / "fox" / "9_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    paths, labels, names = kt.data.scan_image_folder(folder, skip_corrupt=True)
    assert len(paths) == len(labels) == 15
    assert [names[c] for c in labels] == [p.split("/")[-2] for p in paths]
    assert paths == sorted(paths)
    bad = [str(folder / "cat" / "0_empty.png"), str(folder / "fox" / "9_garbage.jpg")]
    listed = sorted(str(p) for p in folder.glob("*/*"))
    assert kt.data.undecodable(listed) == bad
    assert kt.data.undecodable([*bad[::-1], str(folder / "missing.png")]) == [
        *bad[::-1],
        str(folder / "missing.png"),
    ]


def _shuffle_inputs(ds):
    """The element specs that the shuffles of `ds`'s pipeline buffer."""
    found, pending = [], [ds]
    while pending:
        d = pending.pop()
        if "Shuffle" in type(d).__name__:
            found.append(d.element_spec)
        pending.extend(d._inputs())
    return found


def test_folder_without_cache_shuffles_file_names_not_decoded_images(folder):
    ds = kt.data.from_folder(folder, image_size=16, batch_size=4, cache=False, seed=1)
    # The only shuffle buffers (path, label) pairs, so no decoded image waits in a buffer.
    specs = _shuffle_inputs(ds)
    assert len(specs) == 1 and specs[0][0].dtype == tf.string
    first = [np.concatenate([y.numpy() for _, y in ds]) for _ in range(2)]
    assert sorted(first[0].tolist()) == [0] * 5 + [1] * 5 + [2] * 5
    assert first[0].tolist() != first[1].tolist()  # reshuffled each epoch
    cached = kt.data.from_folder(folder, image_size=16, batch_size=4, seed=1)
    assert _shuffle_inputs(cached)[0][0].dtype == tf.float32  # after the in-memory cache


@pytest.mark.parametrize("cache", [True, False])
def test_folder_batches_have_a_static_image_shape(folder, cache):
    # Models and the activation cache are built from element_spec: it must carry the size.
    ds = kt.data.from_folder(folder, image_size=(12, 20), channels=1, batch_size=4, cache=cache)
    assert ds.element_spec[0].shape.as_list() == [None, 12, 20, 1]
    assert ds.element_spec[1].dtype == tf.int32
    assert next(iter(ds))[0].shape == (4, 12, 20, 1)


@pytest.mark.parametrize(
    "make_bad, match",
    [
        (lambda root: (root / "cat" / "notes.txt").write_text("x"), "Non-image files"),
        (lambda root: (root / "empty").mkdir(), "is empty"),
        (lambda root: (root / "cat" / "nested").mkdir(), "holds subfolders"),
    ],
)
def test_bad_folders(folder, make_bad, match):
    make_bad(folder)
    with pytest.raises(ValueError, match=match):
        kt.data.from_folder(folder, image_size=8)


def test_a_single_class_folder_is_refused(tmp_path):
    (tmp_path / "only").mkdir()
    _write_image(tmp_path / "only" / "a.png", 1)
    with pytest.raises(ValueError, match="at least 2"):
        kt.data.from_folder(tmp_path, image_size=8)


def test_arrays(images):
    x, y = images
    train, val = kt.data.from_arrays(
        x, y, class_names=["a", "b", "c"], batch_size=4, validation_split=0.25
    )
    assert train.class_names == ["a", "b", "c"]
    assert sum(int(b[1].shape[0]) for b in val) == 6
    grey = kt.data.from_arrays(x[..., 0], y, batch_size=4)
    assert next(iter(grey))[0].shape == (4, 32, 32, 1)


@pytest.mark.parametrize(
    "x, y, kwargs, match",
    [
        (np.zeros((4, 8, 8)), [0, 1, 0], {}, "len\\(x\\)=4, len\\(y\\)=3"),
        (
            np.zeros((4, 8, 8)),
            [0, 1, 0, 3],
            {"class_names": ["a", "b"]},
            "outside \\[0, 1\\]: \\[3\\]",
        ),
        (np.zeros((4, 8, 8)), [0, 1, -1, 1], {}, "\\[-1\\]"),
        (np.zeros((4, 8, 8)), [1, 1, 1, 1], {}, "single class"),
        (np.full((4, 8, 8), np.nan), [0, 1, 0, 1], {}, "NaN or inf"),
        (np.zeros((4, 8, 8)), [0, 1, 0, 1], {"batch_size": 10}, "batch_size`=10"),
        ([np.zeros((8, 8, 3)), np.zeros((6, 8, 3))], [0, 1], {}, "mixed sizes"),
        (np.zeros((4, 8, 8, 2)), [0, 1, 0, 1], {}, "x.shape=\\(4, 8, 8, 2\\)"),
    ],
)
def test_bad_arrays(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        kt.data.from_arrays(x, y, **kwargs)


def test_tfds_builder_reads_local_data_only(tmp_path):
    import tensorflow_datasets as tfds

    for c, name in enumerate(["a", "b"]):
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(3):
            _write_image(tmp_path / "train" / name / f"{i}.png", 100 * c + i)
    builder = tfds.folder_dataset.ImageFolder(str(tmp_path))
    ds = kt.data.from_tfds(builder, split="train", image_size=8, batch_size=2, shuffle=False)
    assert ds.class_names == ["a", "b"]
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_tfds_name_that_is_not_prepared_is_refused_without_downloading(tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        kt.data.from_tfds("mnist", data_dir=str(tmp_path), image_size=8)
