"""Transferability scores: LogME against the closed-form evidence (N < D and N > D), LEEP and NCE
against their definitions, and rank_backbones on tiny models whose ranking is known."""

import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_transfer as kt
from keras_transfer import ranking


def _closed_form(features, y, alpha, beta) -> float:
    """log N(y; 0, β⁻¹I + α⁻¹FFᵀ), straight from the N × N covariance."""
    n = len(features)
    cov = np.eye(n) / beta + features @ features.T / alpha
    _, log_det = np.linalg.slogdet(cov)
    return -0.5 * (n * math.log(2 * math.pi) + log_det + y @ np.linalg.solve(cov, y))


def _features(n, d, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    means = rng.normal(size=(classes, d))
    return rng.normal(size=(n, d)) + 0.5 * means[labels], labels


@pytest.mark.parametrize("n, d", [(50, 200), (120, 20), (40, 40), (8, 1000)])
def test_logme_evidence_is_the_closed_form_maximum(n, d):
    features, labels = _features(n, d)
    targets = np.eye(5)[labels]
    evidence, alpha, beta = ranking.logme_evidence(features, targets)
    for j in range(5):
        exact = _closed_form(features, targets[:, j], alpha[j], beta[j])
        assert evidence[j] == pytest.approx(exact, abs=1e-5)
        # ... and no (α, β) nearby does better: it is the maximised evidence.
        around = [
            _closed_form(features, targets[:, j], alpha[j] * a, beta[j] * b)
            for a in (0.5, 0.9, 1.1, 2.0)
            for b in (0.5, 0.9, 1.1, 2.0, 100.0)
        ]
        assert max(around) <= evidence[j] + 1e-5
    assert ranking.logme(features, labels) == pytest.approx(np.mean(evidence) / n, rel=1e-12)
    if n < d:
        # The term the reference code's fast path drops is far from negligible here.
        dropped = (d - n) / 2 * np.log(alpha)
        assert np.all(np.abs(dropped) > 10 * n * 0.01)


def test_logme_ranks_informative_features_first_and_ignores_scale():
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    informative = np.eye(3)[labels] + 0.3 * rng.normal(size=(60, 3))
    noise = rng.normal(size=(60, 3))
    good, bad = ranking.logme(informative, labels), ranking.logme(noise, labels)
    assert good > bad + 0.5
    # Scaling the features changes α, not the evidence (tiny random backbones give 1e-12).
    assert ranking.logme(informative * 1e-9, labels) == pytest.approx(good, abs=1e-6)
    assert ranking.logme(informative, np.eye(3)[labels]) == pytest.approx(good, rel=1e-12)


def _leep_by_definition(theta, labels):
    n, z_count = theta.shape
    classes = labels.max() + 1
    joint = np.zeros((classes, z_count))
    for i in range(n):
        for z in range(z_count):
            joint[labels[i], z] += theta[i, z] / n
    total = 0.0
    for i in range(n):
        total += math.log(
            sum(joint[labels[i], z] / joint[:, z].sum() * theta[i, z] for z in range(z_count))
        )
    return total / n


def test_leep_matches_its_definition():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(30, 5)) * 2
    theta = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 3, 30)
    value = ranking.leep(theta, labels)
    assert value == pytest.approx(_leep_by_definition(theta, labels), rel=1e-10)
    assert value < 0
    assert ranking.leep(np.eye(4)[[0, 1, 2, 3, 0, 1]], np.array([0, 0, 1, 1, 0, 0])) == 0.0


def test_nce_is_minus_the_conditional_entropy():
    rng = np.random.default_rng(2)
    z = rng.integers(0, 4, 40)
    labels = rng.integers(0, 3, 40)
    entropy = 0.0
    for source in np.unique(z):
        members = labels[z == source]
        p_z = len(members) / 40
        for target in np.unique(members):
            p = np.mean(members == target)
            entropy -= p_z * p * math.log(p)
    assert ranking.nce(z, labels) == pytest.approx(-entropy, rel=1e-10)
    scores = rng.normal(size=(40, 4))
    assert ranking.nce(scores, labels) == ranking.nce(scores.argmax(axis=1), labels)
    assert ranking.nce(np.array([7, 7, 2, 2, 9]), np.array([0, 0, 1, 1, 2])) == 0.0
    uniform = np.arange(30) % 3
    assert ranking.nce(np.zeros(30, int), uniform) == pytest.approx(-math.log(3))


@pytest.mark.parametrize(
    "call, pattern",
    [
        (lambda: ranking.logme(np.ones((6, 3)), np.zeros(6, int)), r"1 class \(\[0\]\)"),
        (
            lambda: ranking.logme(np.ones((2, 3)), np.array([0, 5])),
            r"fewer samples \(2\) than classes \(6",
        ),
        (
            lambda: ranking.logme(np.ones((10, 3)), np.arange(9) % 2),
            r"`labels` has 9 entries but the features \(or predictions\) have 10 rows",
        ),
        (lambda: ranking.logme(np.ones((4, 2, 2, 3)), np.arange(4) % 2), r"at='pooling'"),
        (lambda: ranking.logme(np.ones((4, 3)), np.array([0, 1, 0.5, 1])), "integer class ids"),
        (lambda: ranking.logme(np.ones((4, 3)), np.array([0, 1, -1, 1])), ">= 0"),
        (lambda: ranking.leep(np.ones((4, 3)), np.arange(4) % 2), "apply a softmax"),
        (lambda: ranking.leep(np.full((4, 2), 0.5), np.arange(3) % 2), "has 3 entries"),
        (lambda: ranking.nce(np.zeros(4, int), np.zeros(4, int)), "at least 2 classes"),
    ],
)
def test_bad_scores_input_is_refused(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


# --- rank_backbones -------------------------------------------------------------------------------


def _brightness_model(informative: bool) -> keras.Model:
    """images -> backbone (1x1 conv: mean brightness, or 0) -> pooling -> logits -> softmax.

    The source head sorts images into three brightness bins, which are the classes of the
    `images` fixture (class means near 64, 124 and 184); the blind model sees nothing.
    """
    inputs = keras.Input((32, 32, 3), name="images")
    conv = keras.layers.Conv2D(
        1,
        1,
        kernel_initializer=keras.initializers.Constant(1 / 3 if informative else 0.0),
        name="brightness",
    )
    backbone_in = keras.Input((32, 32, 3))
    backbone = keras.Model(backbone_in, conv(backbone_in), name="toy_backbone")
    x = keras.layers.GlobalAveragePooling2D(name="pooling")(backbone(inputs))
    logits = keras.layers.Dense(
        3,
        kernel_initializer=keras.initializers.Constant([[-1.0, 0.0, 1.0]]),
        bias_initializer=keras.initializers.Constant([94.0, 0.0, -154.0]),
        name="logits",
    )(x)
    outputs = keras.layers.Activation("softmax", name="predictions")(logits)
    return keras.Model(inputs, outputs, name="informative" if informative else "blind")


@pytest.mark.parametrize("method", ["logme", "leep", "nce"])
def test_rank_backbones_puts_the_informative_model_first(images, method):
    good, blind = _brightness_model(True), _brightness_model(False)
    ranked = kt.rank_backbones(images, [blind, good], method=method)
    assert [c for c, _ in ranked] == [good, blind]
    scores = dict((c.name, s) for c, s in ranked)
    if method == "nce":
        assert scores == {"informative": 0.0, "blind": pytest.approx(-math.log(3))}
    if method == "leep":
        assert scores["informative"] == pytest.approx(0.0, abs=1e-6)
        assert scores["blind"] == pytest.approx(-math.log(3))
    if method == "logme":
        pooled = kt.features.extract(good, images[0])
        assert scores["informative"] == pytest.approx(ranking.logme(pooled, images[1]))


def test_rank_backbones_reads_a_labelled_dataset(images):
    good, blind = _brightness_model(True), _brightness_model(False)
    x, y = images
    dataset = tf.data.Dataset.from_tensor_slices((x, np.eye(3)[y])).batch(5)
    from_arrays = kt.rank_backbones(images, [good, blind], method="nce")
    from_dataset = kt.rank_backbones(dataset, [good, blind], method="nce")
    assert from_dataset == from_arrays


@pytest.mark.slow
def test_rank_backbones_on_registry_names_pairs_and_models(images, tiny_model):
    x, y = images
    candidates = [("mobilenet_v2", "block_3_expand_relu"), tiny_model]
    candidates.append((tiny_model, "block_1_project"))
    ranked = kt.rank_backbones(images, candidates, weights=None)  # image size from the data
    assert sorted(map(id, (c for c, _ in ranked))) == sorted(map(id, candidates))
    scores = [s for _, s in ranked]
    assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    by_id = {id(c): s for c, s in ranked}
    assert by_id[id(candidates[1])] == pytest.approx(
        ranking.logme(kt.features.extract(tiny_model, x), y), rel=1e-9
    )
    block = kt.features.extract(tiny_model, x, at="block_1_project")
    assert block.ndim == 4  # a feature map: rank_backbones pools it
    assert by_id[id(candidates[2])] == pytest.approx(
        ranking.logme(block.mean(axis=(1, 2)), y), rel=1e-9
    )


def test_unknown_candidates_are_refused_before_any_work(images, monkeypatch, tiny_model):
    from keras_transfer import builders, features

    calls = []
    monkeypatch.setattr(builders, "build_classifier", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(features, "extract", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"candidates\[1\]='mobilenet_v3'.*Did you mean"):
        kt.rank_backbones(images, ["mobilenet_v2", "mobilenet_v3"], weights=None)
    with pytest.raises(ValueError, match=r"method='leep' scores a source model's own"):
        kt.rank_backbones(images, [tiny_model, "mobilenet_v2"], method="leep")
    with pytest.raises(ValueError, match="Unknown `method` 'logmee'. Did you mean 'logme'"):
        kt.rank_backbones(images, [tiny_model], method="logmee")
    with pytest.raises(ValueError, match="must be labelled"):
        kt.rank_backbones(tf.data.Dataset.from_tensor_slices(images[0]).batch(4), [tiny_model])
    with pytest.raises(ValueError, match="24 images but 23 labels"):
        kt.rank_backbones((images[0], images[1][:-1]), [tiny_model])
    with pytest.raises(ValueError, match="non-empty list"):
        kt.rank_backbones(images, [])
    with pytest.raises(TypeError, match=r"candidates\[0\]=3"):
        kt.rank_backbones(images, [3])
    assert calls == []
    monkeypatch.undo()

    extracted = []
    monkeypatch.setattr(features, "extract", lambda *a, **k: extracted.append(a))
    with pytest.raises(ValueError, match=r"candidates\[1\].*Unknown `at` point 'block_99_add'"):
        kt.rank_backbones(images, [tiny_model, (tiny_model, "block_99_add")])
    assert extracted == []


# --- CLI ------------------------------------------------------------------------------------------


@pytest.fixture
def brightness_folder(tmp_path):
    """Three classes of four 32 px PNGs, at the brightness levels `_brightness_model` bins."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, level in (("a_dark", 64), ("b_mid", 124), ("c_bright", 184)):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(level + rng.normal(0, 10, (32, 32, 3)), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    good, blind = tmp_path / "good.keras", tmp_path / "blind.keras"
    _brightness_model(True).save(good)
    _brightness_model(False).save(blind)
    return tmp_path / "images", good, blind


def test_cli_rank_prints_the_library_ranking(brightness_folder, capsys):
    from keras_transfer import cli

    folder, good, blind = brightness_folder
    argv = ["rank", str(folder), "--candidates", str(blind), str(good), "--method", "nce"]
    assert cli.main([*argv, "--batch-size", "5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["classes"] == 3 and out["image_size"] == 32 and out["method"] == "nce"
    assert [row["candidate"] for row in out["ranking"]] == [str(good), str(blind)]
    assert out["ranking"][0]["score"] == 0.0
    assert out["ranking"][1]["score"] == pytest.approx(-math.log(3))

    pair = f"{good}:brightness"  # a model's backbone layer, pooled
    assert cli.main(["rank", str(folder), "--candidates", str(blind), pair]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "3 classes, 32 px, logme" in lines[0]
    assert lines[1].split() == ["rank", "candidate", "logme"]
    assert lines[2].split()[:2] == ["1", pair] and lines[3].split()[:2] == ["2", str(blind)]


def test_cli_rank_refuses_unknown_candidates(brightness_folder, capsys):
    from keras_transfer import cli

    folder, good, _ = brightness_folder
    argv = ["rank", str(folder), "--candidates", str(good), "mobilenet_v22"]
    assert cli.main([*argv, "--image-size", "32"]) == 2
    assert "candidates[1]='mobilenet_v22'" in capsys.readouterr().err
    assert cli.main(["rank", str(folder), "--candidates", "runs/missing"]) == 2
    assert "no model at 'runs/missing'" in capsys.readouterr().err
