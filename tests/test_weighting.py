"""Importance weights (mean 1, within the clip, target-like samples up) and weighted training."""

import keras
import numpy as np
import pytest
from conftest import weights_of

import keras_transfer as kt
from keras_transfer import weighting


def _shifted_domains(seed=0):
    """Source: 160 samples near 0 and 40 near 3; target: everything near 3."""
    rng = np.random.default_rng(seed)
    fs = np.r_[rng.normal(0.0, 1.0, (160, 4)), rng.normal(3.0, 1.0, (40, 4))]
    ft = rng.normal(3.0, 1.0, (150, 4))
    return fs, ft


def test_weights_have_mean_one_respect_the_clip_and_favour_target_like_samples():
    fs, ft = _shifted_domains()
    for clip in [(0.1, 10.0), (0.5, 2.0), (0.0, 50.0)]:
        w = weighting.importance_weights_from_features(fs, ft, clip=clip)
        assert w.shape == (200,)
        assert w.mean() == pytest.approx(1.0, abs=1e-12)
        assert w.min() >= clip[0] and w.max() <= clip[1]
        # The near-3 source samples look like the target: up-weighted, the others down.
        assert np.median(w[160:]) > 3 * np.median(w[:160])
        assert w[160:].mean() > 1.0 > w[:160].mean()
    tight = weighting.importance_weights_from_features(fs, ft, clip=(0.5, 2.0))
    assert np.isclose(tight, 2.0).sum() > 10 and np.isclose(tight, 0.5).sum() > 10
    # The closer a sample lies to the target's centre, the higher its weight (rank correlation).
    loose = weighting.importance_weights_from_features(fs, ft, clip=None)
    distance = np.linalg.norm(fs - 3.0, axis=1)
    ranks = [np.argsort(np.argsort(v)) for v in (loose, -distance)]
    assert np.corrcoef(*ranks)[0, 1] > 0.8


def test_weights_are_about_one_for_one_distribution():
    rng = np.random.default_rng(1)
    w = weighting.importance_weights_from_features(
        rng.normal(size=(200, 6)), rng.normal(size=(100, 6))
    )
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    assert 0.85 < w.min() and w.max() < 1.15
    assert weighting.effective_sample_size(w) > 195


def test_the_density_ratio_undoes_the_domain_sizes():
    # Identical distributions, target 4x smaller: the raw odds p(t|x)/p(s|x) are ~1/4 and the
    # n_s/n_t factor brings the ratio back to ~1, so no clip bound is hit.
    rng = np.random.default_rng(2)
    w = weighting.importance_weights_from_features(
        rng.normal(size=(200, 3)), rng.normal(size=(50, 3)), clip=(0.9, 1.1)
    )
    assert not np.isclose(w, 0.9).any() and not np.isclose(w, 1.1).any()


def test_normalise_weights_clips_and_normalises_in_one_step():
    w = weighting.normalise_weights([1.0, 1.0, 1.0, 100.0], clip=(0.5, 2.0))
    # Normalise-then-clip would give mean < 1; clip-then-normalise would break the bounds.
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    assert w.min() >= 0.5 and w.max() == pytest.approx(2.0)
    np.testing.assert_allclose(w, [2 / 3, 2 / 3, 2 / 3, 2.0])
    np.testing.assert_allclose(weighting.normalise_weights([1.0, 3.0], clip=None), [0.5, 1.5])


def test_importance_weights_on_images(tiny_model):
    rng = np.random.default_rng(3)
    dark = rng.uniform(0, 60, (15, 32, 32, 3))
    bright = rng.uniform(190, 255, (25, 32, 32, 3))
    source = np.concatenate([dark, bright[:5]])  # 15 dark, 5 bright
    w = kt.importance_weights(
        source, bright[5:], model=tiny_model, at="block_5_add", clip=(0.2, 5.0)
    )
    assert w.shape == (20,)
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    assert w.min() >= 0.2 and w.max() <= 5.0
    assert w[15:].min() > w[:15].max()


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "clip",
    [(2.0, 10.0), (0.1, 0.5), (1.0, 1.0), (0.1,), (-0.1, 2.0), (0.1, np.inf), "0.1,10"],
)
def test_bad_clip_is_refused(clip):
    fs, ft = _shifted_domains()
    with pytest.raises(ValueError, match=r"`clip` must be None or a \(low, high\) pair"):
        weighting.importance_weights_from_features(fs, ft, clip=clip)


def test_bad_domains_are_refused_before_any_work(monkeypatch, tiny_model):
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(kt.features, "extract", refuse)
    images = np.zeros((8, 32, 32, 3))
    with pytest.raises(ValueError, match=r"`target` is empty"):
        kt.importance_weights(images, np.zeros((0, 32, 32, 3)), model=tiny_model)
    with pytest.raises(ValueError, match=r"`target` holds 3 sample\(s\); this needs at least 5"):
        kt.importance_weights(images, images[:3], model=tiny_model)
    with pytest.raises(ValueError, match=r"source 32x32, target 48x48.*image_size="):
        kt.importance_weights(images, np.zeros((8, 48, 48, 3)), model=tiny_model)
    with pytest.raises(ValueError, match=r"channel counts: source 3, target 1"):
        kt.importance_weights(images, np.zeros((8, 32, 32, 1)), model=tiny_model)
    with pytest.raises(ValueError, match=r"same feature width.*\(8, 4\).*\(8, 5\)"):
        kt.importance_weights(np.zeros((8, 4)), np.zeros((8, 5)))
    with pytest.raises(ValueError, match=r"`clip` must be None"):
        kt.importance_weights(images, images, model=tiny_model, clip=(3.0, 4.0))
    with pytest.raises(ValueError, match=r"`folds`=5 is more than the smaller domain's 4"):
        weighting.importance_weights_from_features(np.zeros((8, 2)), np.ones((4, 2)))


# ------------------------------------------------------------------------------- training


def test_from_arrays_yields_weights_that_follow_their_examples():
    x = np.arange(10, dtype="float32")[:, None, None, None] * np.ones((1, 4, 4, 3), "float32")
    y = np.arange(10) % 2
    w = np.linspace(0.1, 1.0, 10)
    train, val = kt.data.from_arrays(x, y, sample_weight=w, validation_split=0.2, batch_size=2)
    for ds in (train, val):
        assert len(ds.element_spec) == 3
        for images, labels, weights in ds:
            index = images.numpy()[:, 0, 0, 0].astype(int)
            np.testing.assert_array_equal(labels.numpy(), y[index])
            np.testing.assert_allclose(weights.numpy(), w[index], rtol=1e-6)
    plain = kt.data.from_arrays(x, y, batch_size=2)
    assert len(plain.element_spec) == 2


@pytest.mark.parametrize(
    "sample_weight, message",
    [
        (np.ones(9), r"shape \(10,\), one weight per image. Received: shape \(9,\)"),
        (np.r_[np.ones(9), -1.0], r"finite and >= 0. Received: \[-1.0\] at indices \[9\]"),
        (np.r_[np.ones(9), np.nan], r"finite and >= 0"),
        (np.zeros(10), r"all zeros"),
        (np.array(["a"] * 10), r"real numbers"),
    ],
)
def test_from_arrays_refuses_bad_sample_weight(sample_weight, message):
    x, y = np.zeros((10, 4, 4, 3)), np.arange(10) % 2
    with pytest.raises(ValueError, match=message):
        kt.data.from_arrays(x, y, sample_weight=sample_weight, batch_size=2)


def _trainer():
    keras.utils.set_random_seed(0)
    model = kt.build_classifier(
        "mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35, dropout=0.0
    )
    start = model.get_weights()

    def train(x, y, sample_weight, cache):
        model.set_weights(start)  # every run from the same weights
        data = kt.data.from_arrays(
            x, y, sample_weight=sample_weight, batch_size=len(x), shuffle=False
        )
        history = kt.fit_phases(
            model,
            [kt.Phase("head", epochs=2, learning_rate=0.05, optimizer="sgd")],
            data,
            cache=cache,
            verbose=0,
        )
        assert history.cached["head"] == ("pooling" if cache else False)
        return weights_of(model.get_layer("logits"))

    return train


def _kept_half(y):
    keep = y < 2  # 16 of 24 examples, classes 0 and 1: the class mix changes
    # Keras divides the weighted loss sum by the batch size: weights 24/16 on the kept
    # examples and 0 on the rest give exactly the mean loss over the kept ones.
    return keep, np.where(keep, len(y) / keep.sum(), 0.0)


def test_training_with_zero_weights_on_half_equals_training_on_the_other_half(images):
    x, y = images
    keep, w = _kept_half(y)
    train = _trainer()
    weighted = train(x, y, w, cache=True)  # the cached activations carry the weights
    subset = train(x[keep], y[keep], None, cache=True)
    unweighted = train(x, y, None, cache=True)
    # The random backbone's pooled features are tiny, so the bias moves most: compare both.
    for a, b in zip(weighted, subset, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    moved = np.abs(subset[1] - unweighted[1]).max()
    assert moved > 1e-2, moved


@pytest.mark.slow
def test_uncached_training_with_zero_weights_equals_the_other_half(images):
    x, y = images
    keep, w = _kept_half(y)
    train = _trainer()
    plain = train(x, y, w, cache=False)  # Keras sees the weights directly
    subset = train(x[keep], y[keep], None, cache=True)
    for a, b in zip(plain, subset, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
