"""Cached phases agree with plain fits, keep the frozen part untouched and spill to disk."""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_transfer as kt  # noqa: E402
from keras_transfer import caching, freezing  # noqa: E402

SIZE = 32


def calibrate(model: keras.Model, x: np.ndarray) -> keras.Model:
    """Sets every BatchNorm's moving statistics from one batch, so a random backbone's features
    keep their scale (untrained BatchNorm lets them shrink to ~1e-12)."""
    backbone = kt.find_backbone(model)
    norms = [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    for layer in norms:
        layer.momentum, layer.trainable = 0.0, True
    prefix = keras.Model(model.inputs[0], model.get_layer("preprocessing").output)
    backbone(prefix(x), training=True)
    for layer, (momentum, trainable) in zip(norms, saved, strict=True):
        layer.momentum, layer.trainable = momentum, trainable
    return model


def make_model(x, **kwargs):
    keras.utils.set_random_seed(1)
    kwargs.setdefault("dropout", 0.0)
    model = kt.build_classifier(
        "mobilenet_v2", 3, image_size=SIZE, weights=None, alpha=0.35, **kwargs
    )
    return calibrate(model, x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.arange(48) % 3
    x = rng.uniform(0, 255, (48, SIZE, SIZE, 3)) * 0.5 + y[:, None, None, None] * 60.0
    return np.clip(x, 0, 255).astype("float32"), y


def fit(x, y, cache, head_epochs=2, finetune_epochs=2, **kwargs):
    model = make_model(x, **kwargs.pop("build", {}))
    kwargs.setdefault("unfreeze", 2)
    train = kt.data.from_arrays(x, y, batch_size=16, shuffle=False)
    history = kt.fine_tune(
        model,
        train,
        train,
        head_epochs=head_epochs,
        finetune_epochs=finetune_epochs,
        cache=cache,
        verbose=0,
        **kwargs,
    )
    return model, history


def max_difference(a: keras.Model, b: keras.Model) -> float:
    return max(
        float(np.abs(u - v).max()) for u, v in zip(a.get_weights(), b.get_weights(), strict=True)
    )


@pytest.mark.parametrize("finetune_epochs", [0, 2])
def test_cached_and_plain_agree(data, finetune_epochs):
    x, y = data
    plain, plain_history = fit(x, y, False, finetune_epochs=finetune_epochs)
    cached, history = fit(x, y, True, finetune_epochs=finetune_epochs)
    assert plain_history.cached["head"] is False
    assert history.cached == {
        "head": True,
        "finetune": "block_15_add" if finetune_epochs else None,
    }
    assert history.phases == plain_history.phases
    assert set(history.history) == set(plain_history.history)
    # The runs trained: losses moved.
    assert history.history["loss"][0] != history.history["loss"][-1]
    np.testing.assert_allclose(history.history["loss"], plain_history.history["loss"], rtol=1e-3)
    assert max_difference(plain, cached) < 1e-4
    np.testing.assert_allclose(cached.predict(x, verbose=0), plain.predict(x, verbose=0), atol=1e-4)


@pytest.mark.parametrize("source", ["reshuffled dataset", "arrays"])
def test_cached_and_plain_agree_on_reshuffled_data(data, source):
    # A reshuffling source draws a new order per iterator: the cached run must see the very
    # batches, epoch by epoch, that the plain fit sees.
    x, y = data

    def run(cache):
        model = make_model(x)
        train = kt.data.from_arrays(x, y, batch_size=16, seed=3) if source != "arrays" else (x, y)
        history = kt.fine_tune(
            model,
            train,
            head_epochs=3,
            finetune_epochs=2,
            unfreeze=2,
            batch_size=16,
            cache=cache,
            verbose=0,
        )
        return model, history

    plain, plain_history = run(False)
    cached, history = run(True)
    assert history.cached == {"head": True, "finetune": "block_15_add"}
    np.testing.assert_allclose(history.history["loss"], plain_history.history["loss"], rtol=1e-4)
    assert max_difference(plain, cached) < 1e-4


def test_cached_and_plain_agree_on_an_image_folder(data, tmp_path):
    # The usual pipeline: decode, cache in memory, reshuffle; the copy shares the decoded cache.
    x, y = data
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / f"class_{label}"
        folder.mkdir(exist_ok=True)
        png = tf.io.encode_png(tf.cast(tf.round(image), tf.uint8))
        (folder / f"{i}.png").write_bytes(png.numpy())

    def run(cache):
        model = make_model(x)
        train = kt.data.from_folder(tmp_path, image_size=SIZE, batch_size=16, seed=4)
        history = kt.fine_tune(
            model, train, head_epochs=2, finetune_epochs=2, unfreeze=2, cache=cache, verbose=0
        )
        return model, history

    plain, _ = run(False)
    cached, history = run(True)
    assert history.cached == {"head": True, "finetune": "block_15_add"}
    assert max_difference(plain, cached) < 1e-4


def test_caching_leaves_the_sources_orders_untouched():
    x = np.arange(40, dtype="float32")
    make = lambda: tf.data.Dataset.from_tensor_slices(x).shuffle(40, seed=5).batch(8)  # noqa: E731
    reference = [np.concatenate(list(make().as_numpy_iterator())) for _ in range(1)]
    source = make()
    copy = caching.detached_copy(source)
    copied = [np.concatenate(list(copy.as_numpy_iterator())) for _ in range(2)]
    np.testing.assert_array_equal(copied[0], reference[0])  # same seeds, own generator
    assert not np.array_equal(copied[0], copied[1])  # still reshuffles
    # Iterating the copy twice did not advance the source: its first order is order #0.
    np.testing.assert_array_equal(np.concatenate(list(source.as_numpy_iterator())), reference[0])


def test_random_pipeline_is_not_cached(data, caplog):
    # Noise added in tf.data is a different image on every pass: caching would freeze one draw.
    x, y = data
    noise = tf.random.Generator.from_seed(1)  # its state moves on with every batch drawn
    noisy = kt.data.from_arrays(x, y, batch_size=16, shuffle=False).map(
        lambda images, labels: (images + noise.uniform(tf.shape(images)), labels)
    )
    model = make_model(x)
    with caplog.at_level("WARNING"):
        history = kt.fine_tune(model, noisy, head_epochs=1, finetune_epochs=1, verbose=0)
    assert history.cached == {"head": False, "finetune": False}
    assert "different images on each pass" in caplog.text
    with pytest.raises(ValueError, match="cache=True but the training data cannot be cached"):
        kt.fine_tune(make_model(x), noisy, head_epochs=1, finetune_epochs=0, cache=True)


def test_pipeline_that_cannot_be_copied_still_caches(data):
    # from_generator cannot be serialized: the cache then reshuffles on its own.
    x, y = data
    generated = (
        tf.data.Dataset.from_generator(
            lambda: iter(zip(x, y, strict=True)),
            output_signature=(
                tf.TensorSpec(x.shape[1:], tf.float32),
                tf.TensorSpec((), tf.int64),
            ),
        )
        .shuffle(48, seed=1)
        .batch(16)
    )
    assert caching.detached_copy(generated) is None
    history = kt.fine_tune(
        make_model(x), generated, head_epochs=1, finetune_epochs=1, unfreeze=2, verbose=0
    )
    assert history.cached == {"head": True, "finetune": "block_15_add"}


def test_phase1_leaves_backbone_untouched(data):
    x, y = data
    model = make_model(x)
    before = [w.copy() for w in kt.find_backbone(model).get_weights()]
    head_before = [w.copy() for w in model.get_layer("logits").get_weights()]
    kt.fine_tune(model, (x, y), head_epochs=2, finetune_epochs=0, cache=True, verbose=0)
    after = kt.find_backbone(model).get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
    assert not np.array_equal(head_before[0], model.get_layer("logits").get_weights()[0])


def test_phase2_trains_full_model_top_only(data):
    x, y = data
    model = make_model(x)
    backbone = kt.find_backbone(model)
    bottom = backbone.get_layer("block_14_project")
    top = backbone.get_layer("Conv_1")
    bottom_before, top_before = bottom.get_weights()[0].copy(), top.get_weights()[0].copy()
    history = kt.fine_tune(
        model, (x, y), head_epochs=1, finetune_epochs=2, unfreeze=2, cache=True, verbose=0
    )
    assert history.cached["finetune"] == "block_15_add"
    assert np.array_equal(bottom.get_weights()[0], bottom_before)
    assert not np.array_equal(top.get_weights()[0], top_before)
    # The full model holds the trained weights: evaluating it gives the phase's last loss.
    loss = model.evaluate(x, y, verbose=0)[0]
    assert loss == pytest.approx(history.history["loss"][-1], rel=0.5)


def test_spills_to_disk_beyond_budget(data, tmp_path):
    x, y = data
    model = make_model(x)
    freezing.freeze_backbone(model)
    train = kt.data.from_arrays(x, y, batch_size=16, shuffle=False)
    cut = freezing.plan_unfreeze(model, blocks=2)
    phases = caching.prepare(model, train, train, cut_index=cut, budget_bytes=0, cache_dir=tmp_path)
    assert [p.cut for p in phases] == ["block_15_add", "pooling"]
    assert all(c.on_disk for p in phases for c in p.caches)
    assert any(tmp_path.iterdir())
    in_memory = caching.prepare(model, train, None, cut_index=cut)
    for on_disk, memory in zip(phases, in_memory, strict=True):
        a = np.concatenate([b[0].numpy() for b in on_disk.train_data])
        b = np.concatenate([b[0].numpy() for b in memory.train_data])
        np.testing.assert_array_equal(a, b)
    for phase in phases:
        phase.close()
    assert not any(tmp_path.iterdir())


def test_spilled_cache_of_a_class_ordered_source_gives_mixed_batches(data, tmp_path):
    """A budget-bound shuffle buffer alone would hand out single-class batches here."""
    x, y = data
    order = np.argsort(y, kind="stable")  # the source comes class by class, as a folder does
    x, y = x[order], y[order]
    model = make_model(x)
    freezing.freeze_backbone(model)
    train = kt.data.from_arrays(x, y, batch_size=8, shuffle=True, seed=0)
    keras.utils.set_random_seed(0)  # a global seed of 0 trips seed tensors in Dataset.shuffle
    (phase,) = caching.prepare(model, train, None, budget_bytes=0, cache_dir=tmp_path)
    assert phase.caches[0].on_disk
    for _ in range(2):  # two epochs
        batches = [b[1].numpy() for b in phase.train_data]
        labels = np.concatenate(batches)
        assert sorted(labels.tolist()) == sorted(y.tolist())  # every example once per epoch
        mixed = sum(len(set(b.tolist())) > 1 for b in batches)
        assert mixed >= len(batches) - 1, [b.tolist() for b in batches]
    phase.close()


def test_fine_tune_spills_and_cleans_up(data, tmp_path):
    x, y = data
    seen = []

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append(len(list(tmp_path.iterdir())))

    model, history = fit(
        x,
        y,
        True,
        head_epochs=1,
        finetune_epochs=1,
        cache_budget_bytes=1,
        cache_dir=str(tmp_path),
        callbacks=[Look()],
    )
    assert seen and all(n > 0 for n in seen)
    assert not any(tmp_path.iterdir())
    assert history.cached == {"head": True, "finetune": "block_15_add"}


def test_augmentation_runs_plainly_unless_views_given(data, caplog):
    x, y = data
    build = {"augmentation": [keras.layers.RandomFlip("horizontal")]}
    with caplog.at_level("WARNING"):
        _, history = fit(x, y, "auto", head_epochs=1, finetune_epochs=1, build=build)
    assert history.cached == {"head": False, "finetune": False}
    assert "augment_views" in caplog.text
    with pytest.raises(ValueError, match="augment_views"):
        fit(x, y, True, head_epochs=1, finetune_epochs=0, build=build)
    _, history = fit(x, y, True, head_epochs=1, finetune_epochs=1, build=build, augment_views=2)
    assert history.cached == {"head": True, "finetune": "block_15_add"}


def test_augmented_views_differ(data):
    x, y = data
    model = make_model(x, augmentation=[keras.layers.RandomFlip("horizontal")])
    train = kt.data.from_arrays(x, y, batch_size=16, shuffle=False)
    (phase,) = caching.prepare(model, train, None, cut_index=None, augment_views=3)
    features = phase.caches[0].dataset
    first = next(iter(features))[0].numpy()
    assert first.shape[0] == 3
    assert not np.allclose(first[0], first[1]) or not np.allclose(first[0], first[2])
    batch = next(iter(phase.train_data))[0]
    assert batch.shape == (16, first.shape[-1])


def test_reshuffled_batches_draw_one_of_the_cached_views(data):
    x, y = data
    model = make_model(x, augmentation=[keras.layers.RandomFlip("horizontal")])
    train = kt.data.from_arrays(x, y, batch_size=16, seed=2)
    (phase,) = caching.prepare(model, train, None, cut_index=None, augment_views=2)
    cache = phase.caches[0]
    views = {int(k): cache.activations[i].numpy() for i, k in enumerate(cache.keys)}
    features, batch_labels = next(iter(phase.train_data))
    # Its first batch is the source's first order, image for image: a twin source shows it.
    twin = kt.data.from_arrays(x, y, batch_size=16, seed=2)
    images, labels = next(iter(twin))
    np.testing.assert_array_equal(batch_labels.numpy(), labels.numpy())
    keys = caching.image_keys(images).numpy()
    assert features.shape == (16, views[int(keys[0])].shape[-1])
    for key, feature in zip(keys, features.numpy(), strict=True):
        assert any(np.array_equal(feature, view) for view in views[int(key)])


def test_checkpoint_callback_runs_plainly(data, tmp_path):
    x, y = data
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "m.keras"))
    _, history = fit(x, y, "auto", head_epochs=1, finetune_epochs=0, callbacks=[checkpoint])
    assert history.cached["head"] is False


def test_not_a_single_tensor_cut_runs_plainly(data):
    x, y = data
    _, history = fit(x, y, "auto", head_epochs=0, finetune_epochs=1, unfreeze="block_15_project")
    assert history.cached == {"head": None, "finetune": False}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cache": "yes"}, "`cache`"),
        ({"augment_views": 0}, "augment_views"),
        ({"cache_budget_bytes": -1}, "cache_budget_bytes"),
        ({"mixed_precision": "mixed_float16"}, "dtype='mixed_float16'"),
        ({"mixed_precision": "float64"}, "mixed_precision"),
    ],
)
def test_bad_arguments(data, kwargs, match):
    x, y = data
    model = kt.build_classifier("mobilenet_v2", 3, image_size=SIZE, weights=None, alpha=0.35)
    with pytest.raises(ValueError, match=match):
        kt.fine_tune(model, (x, y), head_epochs=1, finetune_epochs=0, verbose=0, **kwargs)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_dtypes_and_closeness(data, policy):
    x, y = data
    reference, ref_history = fit(x, y, True, head_epochs=2, finetune_epochs=1)
    mixed, history = fit(
        x,
        y,
        True,
        head_epochs=2,
        finetune_epochs=1,
        mixed_precision=policy,
        build={"dtype": policy},
    )
    assert kt.find_backbone(mixed).compute_dtype == policy.removeprefix("mixed_")
    assert mixed.get_layer("predictions").compute_dtype == "float32"
    predictions = mixed.predict(x, verbose=0)
    assert predictions.dtype == np.float32
    np.testing.assert_allclose(predictions.sum(axis=1), 1.0, atol=1e-5)
    tolerance = 0.05 if policy == "mixed_float16" else 0.15
    np.testing.assert_allclose(
        history.history["loss"], ref_history.history["loss"], rtol=tolerance, atol=tolerance
    )
    # Same weights, float32 versus mixed computation: the outputs stay close.
    mixed.set_weights(reference.get_weights())
    difference = np.abs(mixed.predict(x, verbose=0) - reference.predict(x, verbose=0)).mean()
    assert difference < tolerance


def test_jit_compile(data):
    x, y = data
    _, history = fit(x, y, True, head_epochs=1, finetune_epochs=1, jit_compile=True)
    assert history.cached == {"head": True, "finetune": "block_15_add"}
    assert np.isfinite(history.history["loss"]).all()


def test_one_pass_one_trace(data, monkeypatch):
    """The caching pass traces the prefix once for train and validation data (the partial last
    batch included) and, when the caches fit the budget, does not count the examples first."""
    x, y = data
    model = make_model(x)
    freezing.freeze_backbone(model)
    train = kt.data.from_arrays(x, y, batch_size=16, seed=0)
    val = kt.data.from_arrays(x[:40], y[:40], batch_size=16, shuffle=False)  # 16, 16, 8
    cut = freezing.plan_unfreeze(model, blocks=2)

    def no_count(dataset):
        raise AssertionError("counted the examples in a separate pass")

    monkeypatch.setattr(caching, "_count_examples", no_count)
    traces = []
    real_extractor = caching._Split.__init__

    def counting_init(self, start, extractor, *args, **kwargs):
        real_call = extractor.call

        def call(*a, **k):
            traces.append(1)
            return real_call(*a, **k)

        extractor.call = call
        real_extractor(self, start, extractor, *args, **kwargs)

    monkeypatch.setattr(caching._Split, "__init__", counting_init)
    phases = caching.prepare(model, train, val, cut_index=cut)
    assert len(traces) == 1
    assert [c.num_examples for c in phases[0].caches] == [48, 40]
    assert [int(b[0].shape[0]) for b in phases[1].validation_data] == [16, 16, 8]
    # A budget too small for the upper bound falls back to counting, with the same result.
    monkeypatch.setattr(caching, "_count_examples", lambda d: 48)
    spilled = caching.prepare(model, train, None, cut_index=cut, budget_bytes=1)
    assert all(c.on_disk for p in spilled for c in p.caches)
    for phase in spilled:
        phase.close()


def test_array_pipeline_skips_the_key_pass(data, monkeypatch):
    """A pipeline of in-memory tensors replays by construction: no pass over its image keys
    before caching; a mapped one (which could be random) still gets that pass."""
    x, y = data
    model = make_model(x)
    freezing.freeze_backbone(model)
    passes = []
    real_all_keys = caching._all_keys
    monkeypatch.setattr(caching, "_all_keys", lambda ds: passes.append(1) or real_all_keys(ds))
    train = kt.data.from_arrays(x, y, batch_size=16, seed=0)
    assert caching.replays(caching.unshuffled(train))
    phases = caching.prepare(model, train, None)
    assert passes == [] and phases[0].caches[0].num_examples == 48
    mapped = train.map(lambda images, labels: (images * 1.0, labels))
    assert not caching.replays(mapped)
    caching.prepare(model, mapped, None)
    assert passes == [1]


def test_unshuffled_sees_through_a_per_batch_map(data):
    """`shuffle.batch.map(resize)` is read below its shuffle with the map applied again (no
    serialized copy holding the arrays as constants), and the shuffle's orders stay untouched."""
    x, y = data

    def pipeline():
        keras.utils.set_random_seed(3)
        ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(48).batch(16)
        return ds.map(lambda i, t: (tf.image.resize(i, (8, 8)), t)).prefetch(1)

    first = [b[1].numpy().tolist() for b in pipeline()]
    ds = pipeline()
    fixed = caching.unshuffled(ds)
    assert fixed is not None
    images, labels = (np.concatenate(p) for p in zip(*fixed.as_numpy_iterator(), strict=True))
    np.testing.assert_array_equal(labels, y)  # the source's own order, every example once
    np.testing.assert_allclose(images, tf.image.resize(x, (8, 8)).numpy())
    assert [b[1].numpy().tolist() for b in ds] == first  # the shuffle did not advance


@pytest.mark.parametrize(
    "images, labels",
    [
        (np.ones((3, 2, 2, 1), "float32"), np.array([0, 2, 1])),
        (np.array([[[[np.nan]]], [[[1.0]]]], "float32"), np.array([0.5, -1.0], "float32")),
        (np.full((2, 2, 2, 3), 7, "uint8"), np.array([[0.0, 1.0], [np.inf, 0.0]], "float32")),
        (np.zeros((0, 2, 2, 1), "float32"), np.zeros((0,), "int64")),
    ],
)
def test_caching_pass_data_check_equals_the_graph_check(images, labels):
    """The caching pass's numpy statistics equal the tf.data ones (`datacheck.batch_stats`)."""
    from keras_transfer import datacheck

    expected = [np.asarray(v).item() for v in datacheck.batch_stats(tf.constant(images), labels)]
    found = [np.asarray(v).item() for v in datacheck.array_stats(tf.constant(images), labels)]
    assert found == expected


_MEMORY_RUN = """
import os, resource, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
import numpy as np, tensorflow as tf
import keras_transfer as kt
cache = sys.argv[1] == "True"
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (2048, 64, 64, 3)).astype("float32")
ds = tf.data.Dataset.from_tensor_slices((x, np.arange(2048) % 10)).shuffle(2048).batch(32)
model = kt.build_classifier("mobilenet_v2", 10, image_size=64, weights=None, alpha=0.35)
history = kt.fine_tune(model, ds, head_epochs=1, finetune_epochs=0, cache=cache, verbose=0)
cached = sum(c["bytes"] for caches in history.cache_info.values() for c in caches)
print("PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, cached, history.cached)
"""


@pytest.mark.slow
def test_cached_path_memory_is_bounded_by_the_plain_path_plus_the_cache():
    """Peak RSS (own process each): cached <= plain + cache size + 10%, for a reshuffling
    array pipeline (whose arrays a serialized pipeline copy would duplicate several times)."""
    import subprocess
    import sys

    peaks = {}
    for cache in (True, False):
        done = subprocess.run(
            [sys.executable, "-c", _MEMORY_RUN, str(cache)],
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        )
        assert done.returncode == 0, done.stderr[-2000:]
        line = [x for x in done.stdout.splitlines() if x.startswith("PEAK")][-1].split(maxsplit=3)
        peaks[cache] = (int(line[1]), int(line[2]), line[3])
    (cached_peak, cache_bytes, path), (plain_peak, _, _) = peaks[True], peaks[False]
    assert path == "{'head': True, 'finetune': None}"
    assert cached_peak <= (plain_peak + cache_bytes) * 1.10, (cached_peak, plain_peak, cache_bytes)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_store_fills_one_aligned_buffer_that_the_tensor_shares(dtype):
    """Batches land in one preallocated array (grown when a pass brings more than its capacity),
    and the cache tensor is that array: same values, same address, no copy, any dtype."""
    rng = np.random.default_rng(0)
    batches = [
        rng.normal(size=(size, 3, 2)).astype(tf.as_dtype(dtype).as_numpy_dtype)
        for size in (4, 4, 7, 2)
    ]
    store = caching._Store(capacity=8)  # the third batch outgrows it, and the fourth again
    for batch in batches:
        store.append(batch)
    assert store.capacity == 32 and store.size == 17
    buffer = store.array
    assert buffer.ctypes.data % caching._ALIGNMENT == 0
    tensor = store.tensor()
    assert tensor.dtype == tf.as_dtype(dtype) and tensor.shape == (17, 3, 2)
    assert tensor._numpy().ctypes.data == buffer.ctypes.data
    np.testing.assert_array_equal(tensor.numpy(), np.concatenate(batches))
    assert store.array is None  # the store lets go of its buffer: the tensor owns it now


def test_aliasing_tensor_keeps_its_buffer_alive():
    array = caching._aligned_empty((1000, 64), np.float32)
    array[:] = np.arange(1000, dtype=np.float32)[:, None]
    tensor = caching._aliasing_tensor(array[:900])
    del array
    import gc

    gc.collect()
    overwrite = [np.full((1000, 64), -1.0, np.float32) for _ in range(8)]  # reuse freed memory
    assert float(tf.reduce_sum(tensor[:, 0])) == sum(range(900))
    del overwrite


def _peak_growth(work) -> int:
    """Bytes by which this process's peak resident memory grows while `work()` runs (Linux)."""
    import gc

    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak resident set size, to the current size
    except OSError:
        pytest.skip("needs /proc/self/clear_refs (Linux) to reset the peak RSS")

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

    before = status("VmRSS:")
    work()
    return status("VmHWM:") - before


@pytest.mark.parametrize("keyed", [True, False])
def test_training_on_an_in_memory_cache_copies_none_of_it(keyed):
    """An epoch over a 100 MB cache (looked up by key, or shuffled and batched) holds no copy of
    it: tf.data's graph rewrites copied the keyed lookup's captured cache (1.1x its size), and
    a shuffle buffer over the examples themselves copied them all (1.0x)."""
    n = 8000
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(n)
    source = tf.data.Dataset.from_tensor_slices((images, labels))
    train = source.shuffle(n, seed=0).batch(32)
    keys = np.concatenate([caching.image_keys(x).numpy() for x, _ in source.batch(32)])

    def batches(width):
        store = caching._Store(n)
        store.append(np.ones((n, width), np.float32))
        activations = store.tensor()
        cache = caching.FeatureCache(
            tf.data.Dataset.from_tensor_slices((activations, labels)),
            n,
            n * width * 4,
            keys=keys,
            activations=activations,
            targets=(tf.constant(labels),),
        )
        if keyed:
            return cache, caching.keyed_batches(cache, train, augment_views=None)
        return cache, caching.batch_cache(cache, batch_size=32, shuffle=True, augment_views=None)

    def epoch(ds):
        assert sum(int(tf.reduce_sum(f[:, 0])) for f, _ in ds) == n

    epoch(batches(1)[1])  # first-time costs of the path (traces, tf.data's threads) uncounted
    cache, ds = batches(3201)  # 102 MB in batches of 0.4 MB; rows not a multiple of 64 bytes
    assert _peak_growth(lambda: epoch(ds)) < 0.25 * cache.nbytes


@pytest.mark.slow
def test_caching_pass_holds_the_cache_once():
    """The pass's peak grows by about the cache (batches written in place, the tensor sharing
    their buffer), not by two or three times it (a list of batches, its concatenation and a
    `tf.constant` copy of that measured 3.6x here)."""
    keras.utils.set_random_seed(0)
    model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    names = [op.name for op in kt.find_backbone(model).operations]
    cut = names.index("block_1_expand_relu")  # 16 x 16 x 48 floats: 48 KB per image at 32 px

    def data(n):
        x = np.random.default_rng(0).integers(0, 255, (n, SIZE, SIZE, 3), dtype=np.uint8)
        return tf.data.Dataset.from_tensor_slices((x, np.arange(n) % 3)).batch(32)

    caching.prepare(model, data(64), None, cut_index=cut)  # traces the forward pass
    train, phases = data(1000), []
    growth = _peak_growth(lambda: phases.extend(caching.prepare(model, train, None, cut_index=cut)))
    cache = sum(c.nbytes for phase in phases for c in phase.caches)
    assert cache > 50e6
    assert growth < 1.5 * cache, (growth, cache)
