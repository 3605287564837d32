"""Which backbone to fine-tune: transferability scores from one forward pass, before training.

`logme` (You et al., ICML 2021) is the evidence of a Bayesian linear model from the features to
each one-hot label, maximised over its two precisions; `leep` (Nguyen et al., ICML 2020) and
`nce` (Tran et al., ICCV 2019) read how well the source model's own predictions explain the
target labels. Higher is better for all three. `rank_backbones` extracts features (or source
predictions) once per candidate with `kt.features.extract` and sorts the candidates by score.

All three are plain numpy functions on arrays, so they also score features computed elsewhere.

Example:
>>> import numpy as np, keras_transfer as kt
>>> rng = np.random.default_rng(0)
>>> labels = np.arange(60) % 3
>>> informative = np.eye(3)[labels] + 0.1 * rng.normal(size=(60, 3))
>>> noise = rng.normal(size=(60, 3))
>>> bool(kt.ranking.logme(informative, labels) > kt.ranking.logme(noise, labels))
True
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["METHODS", "leep", "logme", "logme_evidence", "nce", "rank_backbones"]

METHODS = ("logme", "leep", "nce")

_MAX_ITERATIONS = 200
_TOLERANCE = 1e-9


def _as_matrix(name: str, value, what: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype="float64")
    except (TypeError, ValueError):
        raise TypeError(
            f"`{name}` must be a numeric array of {what}. Received: {type(value).__name__}"
        ) from None
    if array.ndim != 2:
        hint = (
            " Pool feature maps first (e.g. features.mean(axis=(1, 2))), or pass "
            "kt.features.extract(model, data, at='pooling')."
            if array.ndim > 2
            else ""
        )
        raise ValueError(
            f"`{name}` must be a 2-D array (samples, {what}). Received: shape {array.shape}.{hint}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` contains NaN or infinite values; remove or fix those rows.")
    return array


def _class_ids(labels, n: int) -> tuple[np.ndarray, int]:
    """Integer class ids and the number of classes, checked against `n` samples."""
    y = np.asarray(labels)
    if y.ndim == 2 and y.shape[1] > 1:  # one-hot (or soft) labels
        num_classes = y.shape[1]
        y = np.argmax(y, axis=1)
    else:
        y = y.reshape(-1) if y.ndim == 2 else y
        if y.ndim != 1:
            raise ValueError(
                "`labels` must be class ids of shape (samples,) or one-hot of shape (samples, "
                f"classes). Received: shape {y.shape}"
            )
        if y.size and (not np.issubdtype(y.dtype, np.number) or np.any(y != np.round(y))):
            raise ValueError(
                "`labels` must be integer class ids (0, 1, ...). Received values such as "
                f"{y[:3].tolist()}. Map class names to ids first (e.g. np.unique(labels, "
                "return_inverse=True)[1])."
            )
        if y.size and y.min() < 0:
            raise ValueError(f"`labels` must be class ids >= 0. Received a minimum of {y.min()}.")
        y = y.astype("int64")
        num_classes = int(y.max()) + 1 if y.size else 0
    if len(y) != n:
        raise ValueError(
            f"`labels` has {len(y)} entries but the features (or predictions) have {n} rows: "
            "pass one label per sample, in the same order."
        )
    present = np.unique(y)
    if len(present) < 2:
        raise ValueError(
            f"`labels` holds {len(present)} class{'es' if len(present) != 1 else ''} "
            f"({present.tolist()}); a transferability score compares at least 2 classes. Pass "
            "labelled samples of two or more classes."
        )
    if n < num_classes:
        raise ValueError(
            f"There are fewer samples ({n}) than classes ({num_classes}, from the largest "
            "label id + 1 or the one-hot width): each class needs at least one sample. Pass "
            f"at least {num_classes} samples, or renumber the classes 0..k-1."
        )
    return y, num_classes


def _evidence(alpha, beta, sigma2, z2, outside, n: int, d: int):
    """Log evidence per target, from the SVD of F (squared singular values `sigma2`, squared
    projections `z2` of the targets on the left singular vectors, `outside` the squared norm of
    the part of each target outside their span)."""
    k = len(sigma2)
    denom = alpha + beta * sigma2[:, None]
    m2 = np.sum(beta**2 * sigma2[:, None] * z2 / denom**2, axis=0)
    residual = outside + np.sum(alpha**2 * z2 / denom**2, axis=0)
    # log|A| over all D eigenvalues of A = αI + βFᵀF: the D − k beyond the SVD all equal α.
    log_det = np.sum(np.log(denom), axis=0) + (d - k) * np.log(alpha)
    return (
        d / 2 * np.log(alpha)
        + n / 2 * np.log(beta)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * m2
        - log_det / 2
    )


def _profile(log_ratio, sigma2, z2, outside, n: int):
    """Evidence with β at its optimum for each λ = α/β (`log_ratio` = log λ, shape (G, T)).

    β⁻¹I + α⁻¹FFᵀ = β⁻¹(I + FFᵀ/λ): with e = 1 + σ²/λ along the singular vectors (1 beyond
    them) and q = Σ z²/e + outside, the best β is N/q and the evidence
    −N/2·(log 2π + log(q/N) + 1) − ½·Σ log e.
    """
    e = 1.0 + sigma2[None, :, None] / np.exp(log_ratio)[:, None, :]
    q = outside + np.sum(z2[None] / e, axis=1)
    evidence = -n / 2 * (np.log(2 * np.pi) + np.log(q / n) + 1.0) - np.sum(np.log(e), axis=1) / 2
    return evidence, n / q


def _fixed_point(sigma2, z2, outside, n: int, d: int):
    """You et al.'s iteration: γ = Σ βσ²/(α + βσ²), α = γ/‖m‖², β = (N − γ)/‖y − Fm‖²."""
    alpha = np.ones(z2.shape[1])
    beta = np.ones(z2.shape[1])
    evidence = _evidence(alpha, beta, sigma2, z2, outside, n, d)
    tiny, huge = 1e-200, 1e200
    for _ in range(_MAX_ITERATIONS):
        denom = alpha + beta * sigma2[:, None]
        gamma = np.sum(beta * sigma2[:, None] / denom, axis=0)
        m2 = np.sum(beta**2 * sigma2[:, None] * z2 / denom**2, axis=0)
        residual = outside + np.sum(alpha**2 * z2 / denom**2, axis=0)
        new_alpha = np.clip(np.maximum(gamma, tiny) / np.maximum(m2, tiny), tiny, huge)
        new_beta = np.clip(np.maximum(n - gamma, tiny) / np.maximum(residual, tiny), tiny, huge)
        new_evidence = _evidence(new_alpha, new_beta, sigma2, z2, outside, n, d)
        done = np.all(np.abs(new_alpha - alpha) <= _TOLERANCE * alpha) and np.all(
            np.abs(new_evidence - evidence) <= _TOLERANCE * (1.0 + np.abs(evidence))
        )
        alpha, beta, evidence = new_alpha, new_beta, new_evidence
        if done:
            break
    return evidence, alpha, beta


def _profile_search(sigma2, z2, outside, n: int):
    """Maximises the profile evidence over log λ: a log grid, then golden-section refinement."""
    positive = sigma2[sigma2 > sigma2.max() * 1e-12] if sigma2.size and sigma2.max() > 0 else None
    low, high = (0.0, 0.0) if positive is None else (np.log(positive.min()), np.log(positive.max()))
    grid = np.linspace(low - 36.0, high + 36.0, 301)
    targets = z2.shape[1]
    values, _ = _profile(np.repeat(grid[:, None], targets, axis=1), sigma2, z2, outside, n)
    best = np.argmax(values, axis=0)
    step = grid[1] - grid[0]
    a, b = grid[best] - step, grid[best] + step
    golden = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        c, d = b - golden * (b - a), a + golden * (b - a)
        fc, _ = _profile(c[None], sigma2, z2, outside, n)
        fd, _ = _profile(d[None], sigma2, z2, outside, n)
        left = fc[0] >= fd[0]
        a, b = np.where(left, a, c), np.where(left, d, b)
    log_ratio = (a + b) / 2.0
    _, beta = _profile(log_ratio[None], sigma2, z2, outside, n)
    return np.exp(log_ratio) * beta[0], beta[0]


def logme_evidence(features, targets) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maximised log evidence of Bayesian linear regression from `features` to each target column.

    For targets y (N,) and features F (N, D): y = Fw + ε, w ~ N(0, α⁻¹I), ε ~ N(0, β⁻¹I), so
    the evidence is log N(y; 0, β⁻¹I + α⁻¹FFᵀ), computed from one SVD of F. Its log|A| runs
    over all D eigenvalues of A = αI + βFᵀF, including the −(D − k)/2·log α of the D − k beyond
    k = min(N, D), which the public reference code drops when N < D.

    α and β come from You et al.'s (2021) fixed-point iteration, and from a 1-D search over
    λ = α/β with β at its closed-form optimum; the better of the two is kept. The search finds
    the optima that lie on the boundary, which the iteration only creeps toward: β → ∞ when
    the features interpolate the targets (common when N < D), α → ∞ when they explain nothing.

    Args:
        features: Array (N, D).
        targets: Array (N,) or (N, T) of real-valued targets (columns scored independently).

    Returns:
        `(evidence, alpha, beta)`, each of shape (T,): the log evidence (not divided by N) and
        the precisions that maximise it.

    Raises:
        ValueError: for arrays of the wrong rank, different lengths, or a target that is all
            zeros (its evidence grows without bound as β → ∞).
    """
    f = _as_matrix("features", features, "features")
    y = np.asarray(targets, dtype="float64")
    y = y[:, None] if y.ndim == 1 else y
    if y.ndim != 2 or len(y) != len(f):
        raise ValueError(
            f"`targets` must have one row per feature row ({len(f)}). Received: shape {y.shape}"
        )
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma2 = s**2
    z = u.T @ y
    z2 = z**2
    # The part of y outside the span of F, from the residual itself: ‖y‖² − ‖z‖² would leave
    # rounding noise that reads as a (tiny) noise floor and caps β when F interpolates y.
    outside = np.sum((y - u @ z) ** 2, axis=0)
    if np.any(np.sum(z2, axis=0) + outside == 0):
        raise ValueError("A target column is all zeros; its evidence is unbounded. Drop it.")
    evidence, alpha, beta = _fixed_point(sigma2, z2, outside, n, d)
    searched_alpha, searched_beta = _profile_search(sigma2, z2, outside, n)
    searched = _evidence(searched_alpha, searched_beta, sigma2, z2, outside, n, d)
    better = searched > evidence
    return (
        np.where(better, searched, evidence),
        np.where(better, searched_alpha, alpha),
        np.where(better, searched_beta, beta),
    )


def logme(features, labels) -> float:
    """LogME (You et al., ICML 2021): mean over classes of the maximised evidence per sample.

    Each class's one-hot indicator is a regression target over the features; the score is the
    mean of their maximised log evidence (`logme_evidence`) divided by N. Higher means a linear
    model on these features explains the labels better. The value matches the closed-form
    marginal likelihood for both N < D (few-shot) and N > D.

    Args:
        features: Array (N, D), e.g. `kt.features.extract(model, data)` (pooled features).
        labels: Class ids (N,) or one-hot labels (N, C). Classes are `0 .. C-1` with C the
            largest id + 1 (or the one-hot width); classes with no sample are left out of the
            mean.

    Returns:
        The LogME score (a float; comparable between feature sets on the same labels).

    Raises:
        ValueError: for features that are not 2-D or not finite, labels that are not class ids
            or do not match the features' length, a single class, or fewer samples than classes.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> labels = np.arange(40) % 2
    >>> features = np.random.default_rng(0).normal(size=(40, 8)) + labels[:, None]
    >>> round(kt.ranking.logme(features, labels), 3)
    -0.813
    """
    f = _as_matrix("features", features, "features")
    y, num_classes = _class_ids(labels, len(f))
    onehot = np.eye(num_classes)[y]
    onehot = onehot[:, onehot.sum(axis=0) > 0]
    evidence, _, _ = logme_evidence(f, onehot)
    return float(np.mean(evidence) / len(f))


def _probabilities(name: str, value) -> np.ndarray:
    p = _as_matrix(name, value, "source classes")
    if np.any(p < 0) or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError(
            f"`{name}` must hold one probability distribution per row (non-negative, rows "
            f"summing to 1). Received rows summing to {p.sum(axis=1)[:3].round(4).tolist()}... "
            "If these are logits, apply a softmax first (keras.ops.softmax)."
        )
    return p


def leep(source_probabilities, labels) -> float:
    """LEEP (Nguyen et al., ICML 2020): log expected empirical prediction of the source model.

    With θ(x) the source model's class probabilities, the empirical joint is
    P̂(y, z) = (1/N) Σ_{i: yᵢ = y} θ(xᵢ)_z, and LEEP = (1/N) Σᵢ log Σ_z P̂(yᵢ | z) θ(xᵢ)_z.
    It is ≤ 0; higher means the source classes predict the target classes better.

    Args:
        source_probabilities: Array (N, Z): the source model's softmax outputs on the target
            images (rows sum to 1).
        labels: Target class ids (N,) or one-hot (N, C).

    Returns:
        The LEEP score.

    Raises:
        ValueError: for rows that are not probability distributions (logits), labels that do
            not match their length, a single class, or fewer samples than classes.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> labels = np.array([0, 0, 1, 1])
    >>> kt.ranking.leep(np.eye(2)[labels], labels)  # source classes map one to one
    0.0
    """
    theta = _probabilities("source_probabilities", source_probabilities)
    y, num_classes = _class_ids(labels, len(theta))
    n = len(theta)
    joint = np.eye(num_classes)[y].T @ theta / n  # (C, Z)
    marginal = joint.sum(axis=0)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    expected = np.sum(theta * conditional[y], axis=1)
    return float(np.mean(np.log(expected)))


def nce(source_predictions, labels) -> float:
    """NCE (Tran et al., ICCV 2019): negative conditional entropy −H(Y | Z) of the target labels
    given the source model's predicted class Z = argmax of its outputs.

    Args:
        source_predictions: Source class ids (N,), or source scores / probabilities (N, Z)
            whose argmax is taken.
        labels: Target class ids (N,) or one-hot (N, C).

    Returns:
        The NCE score, ≤ 0 (0 when the source prediction determines the target label).

    Raises:
        ValueError: for predictions that are not class ids or a 2-D array, labels that do not
            match their length, a single class, or fewer samples than classes.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> kt.ranking.nce(np.array([3, 3, 7, 7]), np.array([0, 0, 1, 1]))
    0.0
    """
    z = np.asarray(source_predictions)
    if z.ndim == 2:
        z = np.argmax(_as_matrix("source_predictions", z, "source classes"), axis=1)
    elif z.ndim != 1 or (z.size and not np.issubdtype(z.dtype, np.integer)):
        raise ValueError(
            "`source_predictions` must be source class ids (samples,) or scores (samples, "
            f"source classes). Received: shape {z.shape}, dtype {z.dtype}"
        )
    y, _ = _class_ids(labels, len(z))
    n = len(z)
    _, z = np.unique(z, return_inverse=True)
    joint = np.zeros((y.max() + 1, z.max() + 1))
    np.add.at(joint, (y, z), 1.0 / n)
    marginal = joint.sum(axis=0)
    conditional = np.divide(joint, marginal, out=np.ones_like(joint), where=joint > 0)
    return float(np.sum(joint * np.log(conditional)))


# --- rank_backbones -------------------------------------------------------------------------------


def _check_candidate(i: int, candidate, method: str):
    """(source, cut) where source is a registry name or a model; cut None means the default."""
    import keras

    from keras_transfer import backbones, heads

    where = f"candidates[{i}]={candidate!r}"
    if isinstance(candidate, tuple):
        if len(candidate) != 2 or not isinstance(candidate[1], str):
            raise TypeError(
                f"{where}: a pair must be (registry name or model, backbone layer name), e.g. "
                "('mobilenet_v2', 'block_13_expand_relu')."
            )
        source, cut = candidate
    else:
        source, cut = candidate, None
    if isinstance(source, str):
        try:
            backbones.get_backbone(source)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None
    elif not isinstance(source, keras.Model):
        raise TypeError(
            f"{where}: a candidate must be a registry name (kt.list_backbones()), a "
            "(name, layer) pair or a keras.Model."
        )
    if method != "logme":
        if not isinstance(source, keras.Model) or cut is not None:
            raise ValueError(
                f"{where}: method={method!r} scores a source model's own predictions, so each "
                "candidate must be a keras.Model whose 'predictions' are its source task (a "
                "registry name builds a new, untrained head). Pass models, or use "
                "method='logme', which scores features."
            )
        head = heads.head_of(source)
        if head.kind != "multiclass":
            raise ValueError(
                f"{where}: method={method!r} needs a softmax head (class probabilities); this "
                f"model's head is {head.kind!r}. Use method='logme'."
            )
    return source, cut


def _data_shape(data):
    """(height, width, channels) of the images in `data`, entries None when unknown."""
    import tensorflow as tf

    if isinstance(data, tuple) and len(data) == 2:
        x, y = np.asarray(data[0]), np.asarray(data[1])
        if x.ndim != 4:
            raise ValueError(
                "`data` images must be an array (N, height, width, channels). Received: shape "
                f"{x.shape}"
            )
        if len(x) != len(y):
            raise ValueError(
                f"`data` has {len(x)} images but {len(y)} labels: pass one label per image."
            )
        return tuple(int(v) for v in x.shape[1:])
    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        if not (isinstance(spec, tuple) and len(spec) >= 2):
            raise ValueError(
                "`data` must be labelled: a tf.data.Dataset of (images, labels) batches. "
                f"Received elements {spec}."
            )
        shape = spec[0].shape
        return tuple(None if v is None else int(v) for v in shape[-3:])
    raise TypeError(
        "`data` must be an (images, labels) tuple of arrays or a tf.data.Dataset of (images, "
        f"labels) batches. Received: {type(data).__name__}"
    )


def _pool(features: np.ndarray) -> np.ndarray:
    """Global average over every axis between the samples and the channels."""
    if features.ndim > 2:
        return features.mean(axis=tuple(range(1, features.ndim - 1)))
    return features


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype("float64") - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def rank_backbones(
    data,
    candidates: Sequence,
    *,
    method: str = "logme",
    image_size: int | tuple[int, int] | None = None,
    weights: str | None = "imagenet",
    batch_size: int = 64,
) -> list[tuple[object, float]]:
    """Ranks candidate backbones for `data` by a transferability score, best first.

    One inference-mode forward pass per candidate (`kt.features.extract`), then the score; no
    training. Every candidate is checked, and every registry name built, before the first pass.

    Args:
        data: Labelled target data: an `(images, labels)` tuple of arrays or a `tf.data.Dataset`
            of `(images, labels)` batches, raw pixels as the models take them.
        candidates: A list of registry names (`"mobilenet_v2"`: built with
            `kt.build_classifier(name, 2, image_size=..., weights=weights)` and scored on its
            pooled features), `(name, layer)` pairs (the activations at that backbone layer,
            global-average-pooled; a model in place of the name works too), or `keras.Model`s
            built by this library (their pooled features; their source predictions for LEEP
            and NCE).
        method: `"logme"` (features; You et al. 2021), `"leep"` or `"nce"` (source predictions;
            Nguyen et al. 2020, Tran et al. 2019). LEEP and NCE need the source task's outputs,
            so with them every candidate must be a model whose `"predictions"` (a softmax) are
            that task: a registry name would bring a new, untrained head.
        image_size: Input size for registry names; None takes it from the data's images (the
            backbone's default when the data does not say).
        weights: Weights for registry names: `"imagenet"` or None (random initialisation).
        batch_size: Batch size of the forward passes over arrays.

    Returns:
        A list of `(candidate, score)`, candidates as given, sorted by score, best first.

    Raises:
        ValueError: for an unknown method, an empty list, an unknown registry name (close names
            suggested) or layer, unlabelled data, images and labels of different lengths, or
            LEEP/NCE with a candidate that is not a model with a softmax head, all before any
            forward pass; and the score's own errors (one class, fewer samples than classes).
        TypeError: for a candidate of another type.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> x = np.random.default_rng(0).uniform(0, 255, (12, 32, 32, 3)).astype("float32")
    >>> ranked = kt.rank_backbones((x, np.arange(12) % 3),
    ...                            ["mobilenet_v2", ("mobilenet_v2", "block_6_expand_relu")],
    ...                            image_size=32, weights=None)
    >>> [candidate for candidate, _ in ranked]  # doctest: +SKIP
    [('mobilenet_v2', 'block_6_expand_relu'), 'mobilenet_v2']
    """
    import keras

    from keras_transfer import builders, features, heads

    if method not in METHODS:
        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"Unknown `method` {method!r}.{hint} Expected one of {METHODS}.")
    if isinstance(candidates, str | tuple | keras.Model):
        candidates = [candidates]
    candidates = list(candidates) if isinstance(candidates, Sequence) else None
    if not candidates:
        raise ValueError(
            "`candidates` must be a non-empty list of registry names, (name, layer) pairs or "
            "models. Received: an empty list."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1. Received: batch_size={batch_size!r}")
    checked = [_check_candidate(i, c, method) for i, c in enumerate(candidates)]
    height, width, channels = _data_shape(data)
    if image_size is None and height is not None and width is not None:
        image_size = (height, width)
    plans = []
    for i, (source, cut) in enumerate(checked):
        if isinstance(source, str):
            source = builders.build_classifier(
                source,
                2,
                image_size=image_size,
                weights=weights,
                channels=channels if channels in (1, 3) else 3,
            )
        if method == "logme":
            at = heads.POOLING_NAME if cut is None else cut
        else:
            has_logits = any(layer.name == heads.LOGITS_NAME for layer in source.layers)
            source, at = source if has_logits else heads.logits_model(source), heads.LOGITS_NAME
        try:
            features.extractor(source, at)  # an unknown layer fails here, before any pass
        except ValueError as error:
            raise ValueError(f"candidates[{i}]={candidates[i]!r}: {error}") from None
        plans.append((source, at))
    scores = []
    for candidate, (source, at) in zip(candidates, plans, strict=True):
        values, labels = features.extract(source, data, at=at, batch_size=batch_size)
        if method == "logme":
            score = logme(_pool(values).reshape(len(values), -1), labels)
        elif method == "leep":
            score = leep(_softmax(values), labels)
        else:
            score = nce(values, labels)
        scores.append((candidate, float(score)))
    order = sorted(
        range(len(scores)),
        key=lambda j: -scores[j][1] if math.isfinite(scores[j][1]) else math.inf,
    )
    return [scores[j] for j in order]
