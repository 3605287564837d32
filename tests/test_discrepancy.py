"""Discrepancy measures against their formulas, on known cases, and their argument checks."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer import discrepancy

RNG_SEED = 0


def _normal(n, d=8, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# --------------------------------------------------------------------------------- CORAL


def test_coral_matches_the_formula_on_hand_made_covariances():
    # Zero-mean rows whose sample covariance is diag(2, 8) / 3 (unbiased, n - 1 = 3).
    fs = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    ft = np.array([[5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])  # constant: covariance 0
    expected = ((2 / 3) ** 2 + (8 / 3) ** 2) / (4 * 2**2)
    assert discrepancy.coral(fs, ft) == pytest.approx(expected, rel=1e-12)
    # One feature: variances 2 and 0, (2 - 0)^2 / (4 * 1^2) = 1.
    assert discrepancy.coral([[0.0], [2.0]], [[0.0], [0.0]]) == pytest.approx(1.0)


def test_coral_centres_over_samples_and_matches_numpy_cov():
    fs, ft = _normal(50, 5, seed=1), _normal(40, 5, seed=2) * 2.0
    cs, ct = np.cov(fs, rowvar=False), np.cov(ft, rowvar=False)
    expected = np.sum((cs - ct) ** 2) / (4 * 5**2)
    assert discrepancy.coral(fs, ft) == pytest.approx(expected, rel=1e-10)
    # Covariances do not see a shift of the mean; centring over the feature axis would.
    assert discrepancy.coral(fs + 3.0, ft - 7.0) == pytest.approx(expected, rel=1e-10)
    assert discrepancy.coral(fs, fs) == 0.0


# --------------------------------------------------------------------------------- MMD


def test_mmd_equals_the_unbiased_estimator_written_out():
    fs, ft = _normal(6, 3, seed=3), _normal(5, 3, shift=0.5, seed=4)
    sigmas = (0.7, 1.4)  # multipliers × bandwidth 2.0

    def k(a, b):
        return np.mean([np.exp(-np.sum((a - b) ** 2) / (2 * (m * 2.0) ** 2)) for m in sigmas])

    xx = np.mean([k(fs[i], fs[j]) for i, j in itertools.permutations(range(6), 2)])
    yy = np.mean([k(ft[i], ft[j]) for i, j in itertools.permutations(range(5), 2)])
    xy = np.mean([k(a, b) for a in fs for b in ft])
    got = discrepancy.mmd(fs, ft, kernels=sigmas, bandwidth=2.0)
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_mmd_default_bandwidths_are_powers_of_two_of_the_median_distance():
    fs, ft = _normal(30, 4, seed=5), _normal(30, 4, shift=1.0, seed=6)
    median = discrepancy.median_distance(np.concatenate([fs, ft]))
    explicit = discrepancy.mmd(fs, ft, kernels=[2.0**k for k in range(-3, 2)], bandwidth=median)
    assert discrepancy.mmd(fs, ft) == pytest.approx(explicit, rel=1e-12)


def test_mmd_is_about_zero_for_one_distribution_and_clearly_positive_for_a_shift():
    same = discrepancy.measure_features(
        _normal(200, seed=7), _normal(200, seed=8), methods="mmd", n_boot=20
    )["mmd"]
    shifted = discrepancy.measure_features(
        _normal(200, seed=7), _normal(200, shift=1.0, seed=8), methods="mmd", n_boot=20
    )["mmd"]
    # Within the estimator's noise: the interval covers 0 and the value is tiny.
    assert same.low <= 0.0 <= same.high
    assert abs(same.value) < 0.005
    assert shifted.low > 0.05
    assert shifted.value > 20 * (same.high - same.low)


# --------------------------------------------------------------------------------- PAD


def test_proxy_a_distance_near_zero_for_one_distribution_split_in_two():
    pool = _normal(600, seed=9)
    assert discrepancy.proxy_a_distance(pool[:300], pool[300:]) < 0.3
    # Unequal domain sizes: the balanced error does not read the size ratio as a distance.
    assert discrepancy.proxy_a_distance(pool[:540], pool[540:]) < 0.3


def test_proxy_a_distance_near_two_for_disjoint_domains():
    fs, ft = _normal(200, seed=10), _normal(200, shift=4.0, seed=11)
    assert discrepancy.proxy_a_distance(fs, ft) == pytest.approx(2.0, abs=0.05)
    # Partly overlapping domains land in between, and the measure is seeded.
    fs, ft = _normal(200, seed=12), _normal(200, shift=0.3, seed=13)
    middle = discrepancy.proxy_a_distance(fs, ft, seed=3)
    assert 0.3 < middle < 1.9
    assert discrepancy.proxy_a_distance(fs, ft, seed=3) == middle


def test_measure_features_intervals_hold_the_value_and_follow_the_seed():
    fs, ft = _normal(80, 4, seed=14), _normal(60, 4, shift=0.4, seed=15)
    out = discrepancy.measure_features(fs, ft, n_boot=10, seed=1)
    assert list(out) == ["proxy_a_distance", "mmd", "coral"]
    for name, estimate in out.items():
        assert isinstance(estimate, discrepancy.Estimate)
        assert estimate.low <= estimate.value <= estimate.high, name
        assert estimate.high > estimate.low, name
    assert out["coral"].value == discrepancy.coral(fs, ft)
    assert out["mmd"].value == pytest.approx(discrepancy.mmd(fs, ft), rel=1e-12)
    assert discrepancy.measure_features(fs, ft, n_boot=10, seed=1) == out
    assert discrepancy.measure_features(fs, ft, n_boot=10, seed=2) != out


# --------------------------------------------------------------------------------- images


def _domains():
    rng = np.random.default_rng(RNG_SEED)
    dark = rng.uniform(0, 80, (24, 32, 32, 3)).astype("float32")
    bright = rng.uniform(170, 255, (24, 32, 32, 3)).astype("float32")
    return dark, bright


@pytest.fixture
def recorded_extract(monkeypatch):
    """Records each `kt.features.extract` call's data, point and result."""
    calls = []
    real_extract = kt.features.extract

    def recording(model, data, **kwargs):
        out = real_extract(model, data, **kwargs)
        calls.append({"data": data, "at": kwargs.get("at"), "out": out})
        return out

    monkeypatch.setattr(kt.features, "extract", recording)
    return calls


def test_domain_discrepancy_on_images_extracts_once_per_domain(tiny_model, recorded_extract):
    dark, bright = _domains()
    # Random-weight networks shrink activations layer by layer; an early block still sees.
    far = kt.domain_discrepancy(dark, bright, model=tiny_model, at="block_5_add", n_boot=3)
    assert [c["at"] for c in recorded_extract] == ["block_5_add", "block_5_add"]
    fs, ft = (c["out"].reshape(24, -1) for c in recorded_extract)
    assert far == discrepancy.measure_features(fs, ft, n_boot=3)
    assert list(far) == ["proxy_a_distance", "mmd", "coral"]
    assert far["proxy_a_distance"].value > 1.8
    near = discrepancy.measure_features(fs[:12], fs[12:], n_boot=3)  # dark split in two
    assert near["proxy_a_distance"].value < far["proxy_a_distance"].value - 1.0
    assert near["mmd"].value < far["mmd"].value / 5


def test_domain_discrepancy_resizes_images_and_drops_labels(tiny_model, recorded_extract):
    dark, bright = _domains()
    big = tf.image.resize(bright, (40, 40)).numpy()
    labelled = tf.data.Dataset.from_tensor_slices((big, np.zeros(24))).batch(8)
    out = kt.domain_discrepancy(
        (dark, np.zeros(24)), labelled, model=tiny_model, image_size=32, methods=["coral"], n_boot=2
    )
    assert list(out) == ["coral"]
    source, target = recorded_extract
    assert source["data"] is dark  # already at the size: passed on untouched
    seen = np.concatenate([batch[0].numpy() for batch in target["data"]])
    np.testing.assert_allclose(seen, tf.image.resize(big, (32, 32)).numpy(), rtol=1e-6)
    fs, (ft, _) = source["out"], target["out"]  # the dataset's labels came back alongside
    assert out["coral"].value == discrepancy.coral(fs, ft)


def test_feature_arrays_go_straight_to_the_measures():
    fs, ft = _normal(40, 6, seed=16), _normal(30, 6, shift=1.0, seed=17)
    assert kt.domain_discrepancy(fs, ft, n_boot=4) == discrepancy.measure_features(fs, ft, n_boot=4)


# --------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if any features are extracted or a model is built."""

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    monkeypatch.setattr(kt.features, "extract", refuse)
    monkeypatch.setattr(kt.builders, "build_classifier", refuse)


def test_unknown_method_suggests_close_names(no_work):
    dark, bright = _domains()
    with pytest.raises(ValueError, match=r"Unknown discrepancy method 'mdd'.*Did you mean 'mmd'"):
        kt.domain_discrepancy(dark, bright, methods=("mdd",), weights=None)
    with pytest.raises(ValueError, match=r"'coral_'.*Did you mean 'coral'"):
        discrepancy.measure_features(_normal(5), _normal(5), methods="coral_")


@pytest.mark.parametrize("n_boot", [0, -1, 2.5, True])
def test_n_boot_below_one_is_refused(no_work, n_boot):
    dark, bright = _domains()
    with pytest.raises(ValueError, match=rf"`n_boot` must be a positive int.*n_boot={n_boot!r}"):
        kt.domain_discrepancy(dark, bright, n_boot=n_boot, weights=None)


@pytest.mark.parametrize(
    "measure",
    [discrepancy.coral, discrepancy.mmd, discrepancy.proxy_a_distance],
)
def test_feature_arrays_of_different_widths_are_refused(measure):
    with pytest.raises(ValueError, match=r"same feature width.*\(10, 4\).*\(10, 5\)"):
        measure(_normal(10, 4), _normal(10, 5))


def test_feature_arrays_of_different_widths_to_domain_discrepancy():
    with pytest.raises(ValueError, match=r"`source` and `target` must have the same feature width"):
        kt.domain_discrepancy(_normal(10, 4), _normal(10, 5))


def test_images_of_different_sizes_need_image_size(no_work):
    dark, bright = _domains()
    with pytest.raises(ValueError, match=r"source 32x32, target 40x40.*image_size="):
        kt.domain_discrepancy(dark, np.zeros((4, 40, 40, 3)), weights=None)
    ds = tf.data.Dataset.from_tensor_slices(np.zeros((4, 40, 40, 3), "float32")).batch(2)
    with pytest.raises(ValueError, match=r"source 32x32, target 40x40"):
        kt.domain_discrepancy(dark, ds, weights=None)


def test_images_of_different_channel_counts_are_refused(no_work):
    dark, _ = _domains()
    with pytest.raises(ValueError, match=r"channel counts: source 3, target 1.*np.repeat"):
        kt.domain_discrepancy(dark, np.zeros((4, 32, 32, 1)), image_size=32, weights=None)


def test_empty_target_is_refused(no_work):
    dark, _ = _domains()
    with pytest.raises(ValueError, match=r"`target` is empty"):
        kt.domain_discrepancy(dark, np.zeros((0, 32, 32, 3)), weights=None)
    empty = tf.data.Dataset.from_tensor_slices(np.zeros((0, 32, 32, 3), "float32")).batch(2)
    with pytest.raises(ValueError, match=r"`target` is an empty dataset"):
        kt.domain_discrepancy(dark, empty, weights=None)
    with pytest.raises(ValueError, match=r"`ft` holds 1 sample"):
        discrepancy.mmd(_normal(5), _normal(1))


def test_images_that_do_not_fit_the_model_are_refused(tiny_model, no_work):
    with pytest.raises(ValueError, match=r"`model` takes 32x32 images.*image_size=\(32, 32\)"):
        kt.domain_discrepancy(np.zeros((4, 48, 48, 3)), np.zeros((4, 48, 48, 3)), model=tiny_model)


def test_other_bad_arguments_are_refused(no_work):
    dark, bright = _domains()
    with pytest.raises(ValueError, match=r"Unknown backbone"):
        kt.domain_discrepancy(dark, bright, backbone="mobilenet_v9", weights=None)
    with pytest.raises(ValueError, match=r"`weights` must be 'imagenet', None"):
        kt.domain_discrepancy(dark, bright, weights="no/such/file.weights.h5")
    with pytest.raises(ValueError, match=r"both be images or both be feature arrays"):
        kt.domain_discrepancy(dark, _normal(5), weights=None)
    with pytest.raises(ValueError, match=r"`kernels` must be a non-empty sequence"):
        discrepancy.mmd(_normal(5), _normal(5), kernels=[1.0, -2.0])
    with pytest.raises(ValueError, match=r"`ft` holds NaN or inf in 1 row"):
        discrepancy.coral(_normal(5), np.r_[_normal(4), [[np.nan] * 8]])


# --------------------------------------------------------------------------------- CLI


def _folder(root, low, high, seed):
    """Two class folders of three 32x32 PNGs with pixels in [low, high)."""
    rng = np.random.default_rng(seed)
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            image = rng.integers(low, high, (32, 32, 3)).astype("uint8")
            (root / name / f"{i}.png").write_bytes(tf.io.encode_png(image).numpy())
    return root


def test_cli_discrepancy_json_equals_the_library(tmp_path, capsys):
    import json

    import keras

    from keras_transfer import cli

    src = _folder(tmp_path / "src", 0, 80, seed=1)
    tgt = _folder(tmp_path / "tgt", 170, 255, seed=2)
    options = ["--weights", "none", "--image-size", "32", "--at", "block_5_add", "--n-boot", "3"]
    assert cli.main(["discrepancy", str(src), str(tgt), *options, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["weights"] is None and printed["at"] == "block_5_add"
    keras.utils.set_random_seed(0)
    expected = kt.domain_discrepancy(
        kt.data.from_folder(src, image_size=32, batch_size=6, shuffle=False),
        kt.data.from_folder(tgt, image_size=32, batch_size=6, shuffle=False),
        weights=None,
        at="block_5_add",
        n_boot=3,
    )
    assert printed["measures"] == {name: e._asdict() for name, e in expected.items()}
    assert printed["measures"]["proxy_a_distance"]["value"] > 1.5


def test_cli_discrepancy_prints_a_table_of_the_library_result(tmp_path, capsys, monkeypatch):
    from keras_transfer import cli

    src = _folder(tmp_path / "src", 0, 80, seed=1)
    seen = {}

    def fake(source, target, **kwargs):
        seen.update(kwargs, source=source, target=target)
        return {"mmd": discrepancy.Estimate(0.0123, 0.01, 0.015)}

    monkeypatch.setattr(discrepancy, "domain_discrepancy", fake)
    argv = ["discrepancy", str(src), str(src), "--weights", "none", "--image-size", "32"]
    assert cli.main([*argv, "--methods", "mmd", "--n-boot", "7", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "mobilenet_v2 (weights=none) features at 'pooling', 32 px, 7 bootstrap" in out
    assert "mmd" in out and "0.0123  [0.01, 0.015]" in out
    assert seen["weights"] is None and seen["methods"] == ("mmd",)
    assert (seen["n_boot"], seen["seed"], seen["backbone"]) == (7, 3, "mobilenet_v2")
    assert seen["source"].element_spec[0].shape[1:] == (32, 32, 3)


def test_cli_discrepancy_refuses_an_unknown_method_before_reading_data(capsys):
    from keras_transfer import cli

    code = cli.main(["discrepancy", "no/such/folder", "other", "--methods", "mdd"])
    assert code == 2
    assert "Unknown discrepancy method 'mdd'. Did you mean 'mmd'?" in capsys.readouterr().err
