"""kt.soups: uniform and greedy soups, WiSE-FT interpolation, what is (not) averaged, refusals."""

import keras
import numpy as np
import pytest
from conftest import same_weights

import keras_transfer as kt
from keras_transfer import soups


def mlp(num_classes=3, hidden=16, name=None, dropout=False):
    images = keras.Input((4, 4, 3), name="images")
    h = keras.layers.Flatten(name="flatten")(images)
    h = keras.layers.Dense(hidden, activation="relu", name="hidden")(h)
    h = keras.layers.BatchNormalization(name="bn")(h)
    if dropout:
        h = keras.layers.Dropout(0.5, seed=1, name="dropout")(h)
    logits = keras.layers.Dense(num_classes, name="logits")(h)
    predictions = keras.layers.Activation("softmax", name="predictions")(logits)
    return keras.Model(images, predictions, name=name)


def by_path(model):
    return {w.path: np.asarray(w) for w in model.weights}


def ingredients(n, **kwargs):
    models = []
    for i in range(n):
        keras.utils.set_random_seed(i)
        models.append(mlp(**kwargs))
    return models


def test_uniform_soup_averages_every_float_weight_into_a_new_plain_model(tmp_path):
    models = ingredients(3, dropout=True)
    weights = [by_path(m) for m in models]
    soup = soups.uniform_soup(models)
    assert soup is not models[0] and isinstance(soup, keras.Model)
    got = by_path(soup)
    assert set(got) == set(weights[0])
    for path, value in got.items():  # kernels, biases, BatchNorm moving statistics
        np.testing.assert_allclose(value, np.mean([w[path] for w in weights], axis=0), 1e-6)
    # The soup's seed state is its own, not an average: the seed generators are new variables.
    seeds = [v for v in soup.variables if "seed" in v.path]
    assert seeds and all(
        v is not u for v in seeds for m in models for u in m.variables if "seed" in u.path
    )
    # Ingredients untouched; the soup saves and reloads as a plain model.
    assert all(same_weights([by_path(m)[p] for p in sorted(w)], [w[p] for p in sorted(w)])
               for m, w in zip(models, weights, strict=True))  # fmt: skip
    soup.save(tmp_path / "soup.keras")
    again = keras.saving.load_model(tmp_path / "soup.keras")
    x = np.random.default_rng(0).normal(size=(4, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), soup.predict(x, verbose=0))


def test_integer_weights_come_from_the_first_model():
    class Counter(keras.layers.Layer):
        def build(self, shape):
            self.count = self.add_weight(shape=(), dtype="int32", initializer="zeros",
                                         trainable=False)  # fmt: skip

        def call(self, x):
            return x

    def counted(value):
        images = keras.Input((4, 4, 3), name="images")
        counter = Counter(name="counter")
        out = keras.layers.Dense(2, name="logits")(keras.layers.Flatten()(counter(images)))
        model = keras.Model(images, keras.layers.Activation("softmax", name="predictions")(out))
        counter.count.assign(value)
        return model

    a, b = counted(3), counted(8)
    soup = soups.uniform_soup([a, b])
    assert int(soup.get_layer("counter").count.numpy()) == 3
    assert int(soups.interpolate(b, a, 0.5).get_layer("counter").count.numpy()) == 8


def test_interpolate_is_wise_ft_between_the_two_models():
    a, b = ingredients(2)
    wa, wb = by_path(a), by_path(b)
    for alpha in (0.0, 0.3, 1.0):
        mixed = by_path(soups.interpolate(a, b, alpha))
        for path in wa:
            np.testing.assert_allclose(mixed[path], (1 - alpha) * wa[path] + alpha * wb[path],
                                       rtol=1e-6, atol=1e-7)  # fmt: skip
    assert same_weights(list(by_path(soups.interpolate(a, b, 0)).values()), list(wa.values()))


def test_greedy_soup_adds_a_model_only_when_the_soup_strictly_improves():
    """Noisy copies of one model (averaging cancels noise) and one far from it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 4, 4, 3)).astype("float32")
    reference = ingredients(1, hidden=16)[0]
    y = reference.predict(x, verbose=0).argmax(1)  # labels the reference model gets right
    models = []
    for i, scale in enumerate((0.3, 0.3, 0.3, 3.0)):
        model = mlp(hidden=16, name=f"run{i}")
        noise = np.random.default_rng(i + 1)
        model.set_weights(
            [w + scale * noise.normal(size=w.shape).astype(w.dtype) if w.ndim == 2 else w
             for w in reference.get_weights()]
        )  # fmt: skip
        models.append(model)

    def accuracy(model):
        return np.mean(model.predict(x, verbose=0).argmax(1) == y)

    scores = [accuracy(m) for m in models]
    soup, info = soups.greedy_soup(models, (x, y), return_info=True)
    assert info.scores == pytest.approx(tuple(scores))
    assert list(info.order) == sorted(range(4), key=lambda i: -scores[i])  # stable for ties
    # Wortsman et al.'s rule, replayed by hand with uniform soups.
    kept, best = [info.order[0]], scores[info.order[0]]
    for i in info.order[1:]:
        score = accuracy(soups.uniform_soup([models[j] for j in [*kept, i]]))
        if score > best:
            kept, best = [*kept, i], score
    assert list(info.ingredients) == kept and info.soup_score == pytest.approx(best)
    assert 2 <= len(kept) < 4 and 3 not in kept  # some added, the far run refused
    assert same_weights(
        soup.get_weights(), soups.uniform_soup([models[j] for j in kept]).get_weights()
    )
    assert accuracy(soup) == pytest.approx(best) and best > max(scores)
    # A dataset and a Keras metric give the same decisions.
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(32)
    again = soups.greedy_soup(models, ds, metric="sparse_categorical_accuracy", return_info=True)
    assert again[1].ingredients == info.ingredients


def test_greedy_soup_of_equal_scores_keeps_only_the_best():
    """Strictly better, not as good: an ingredient that changes nothing is not added."""
    a = ingredients(1)[0]
    b = mlp()
    b.set_weights(a.get_weights())
    x = np.random.default_rng(0).normal(size=(16, 4, 4, 3)).astype("float32")
    y = a.predict(x, verbose=0).argmax(1)
    soup, info = soups.greedy_soup([a, b], (x, y), return_info=True)
    assert info.ingredients == (0,)
    assert same_weights(soup.get_weights(), a.get_weights()) and soup is not a


def test_soups_refuse_one_model_and_other_architectures():
    a, b = ingredients(2)
    before = a.get_weights()
    with pytest.raises(ValueError) as error:
        soups.uniform_soup([a])
    assert "at least 2 models" in str(error.value) and "has 1" in str(error.value)
    with pytest.raises(TypeError, match="list of keras.Model"):
        soups.uniform_soup(a)
    wider = mlp(hidden=32, name="wider")
    for call in (
        lambda: soups.uniform_soup([a, b, wider]),
        lambda: soups.greedy_soup([a, wider], (np.zeros((2, 4, 4, 3)), [0, 1])),
        lambda: soups.interpolate(a, wider, 0.5),
    ):
        with pytest.raises(ValueError) as error:
            call()
        text = str(error.value)
        assert "'hidden' (Dense; (48, 16), (16,))" in text and "(48, 32), (32,)" in text, text
        assert "one architecture" in text
    with pytest.raises(ValueError, match="'logits'"):
        soups.uniform_soup([a, mlp(num_classes=4)])
    with pytest.raises(ValueError, match="nothing"):
        soups.uniform_soup([a, keras.Model(a.input, a.get_layer("hidden").output)])
    for alpha in (-0.1, 1.5, float("nan"), "0.5"):
        with pytest.raises(ValueError) as error:
            soups.interpolate(a, b, alpha)
        assert "`alpha` must be a number in [0, 1]" in str(error.value)
        assert f"alpha={alpha!r}" in str(error.value)
    with pytest.raises(ValueError, match="images and 3 labels"):
        soups.greedy_soup([a, b], (np.zeros((2, 4, 4, 3)), [0, 1, 2]))
    with pytest.raises(TypeError, match="`metric`"):
        soups.greedy_soup([a, b], (np.zeros((2, 4, 4, 3)), [0, 1]), metric=3)
    assert same_weights(a.get_weights(), before)


def test_soup_of_backbone_classifiers(tiny_model):
    keras.utils.set_random_seed(1)
    other = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    soup = kt.soups.uniform_soup([tiny_model, other])
    kernel = soup.get_layer("mobilenet_v2").get_layer("Conv1").kernel.numpy()
    expected = (
        tiny_model.get_layer("mobilenet_v2").get_layer("Conv1").kernel.numpy()
        + other.get_layer("mobilenet_v2").get_layer("Conv1").kernel.numpy()
    ) / 2
    np.testing.assert_allclose(kernel, expected, rtol=1e-6)
    assert kt.head_of(soup).num_outputs == 3
    wider = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.5)
    with pytest.raises(ValueError, match=r"layer \d+ is 'mobilenet_v2/\w+' \(\w+; \(") as error:
        kt.soups.uniform_soup([tiny_model, wider])
    assert len(str(error.value)) < 600  # one layer described, not the whole backbone
