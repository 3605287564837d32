"""Instance-based transfer: weight source samples by how much they look like the target.

`importance_weights(source, target)` estimates the density ratio p_target(x) / p_source(x) at
each source sample from a domain classifier on features:

    w(x) = p(target | x) / p(source | x) × (n_s / n_t)

(Bayes' rule; the factor undoes the classifier's prior from the domain sizes). The weights are
clipped and normalised to mean 1, ready for `kt.data.from_arrays(..., sample_weight=w)` and so
for `kt.fine_tune` / `kt.fit_phases`, which pass them on to the loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from keras_transfer import discrepancy
from keras_transfer._validate import check_int, is_number

#: Inverse regularisation strengths tried by the domain classifier (chosen by cross-validated
#: log-loss: the ratio needs calibrated probabilities, not just a good decision boundary).
C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
FOLDS = 5


def _check_clip(clip) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        low, high = clip
    except (TypeError, ValueError):
        low = high = None
    ok = all(is_number(v) and np.isfinite(v) for v in (low, high))
    if not ok or not 0.0 <= low <= 1.0 <= high or low == high:
        raise ValueError(
            "`clip` must be None or a (low, high) pair with 0 <= low <= 1 <= high and low < "
            "high (weights average 1, so the bounds must allow it), e.g. (0.1, 10.0). "
            f"Received: clip={clip!r}"
        )
    return float(low), float(high)


def normalise_weights(ratio, clip: tuple[float, float] | None = (0.1, 10.0)) -> np.ndarray:
    """Scales `ratio` to mean 1 within `clip`: `clip(s × ratio)`, `s` chosen so the mean is 1.

    Clipping and normalising are one step rather than two in a row (normalise-then-clip would
    break the mean, clip-then-normalise the bounds): the scale `s` is found by bisection, so
    the weights lie within `clip` and average exactly 1 (to float precision) at once. Their
    order is the order of `ratio`.

    Args:
        ratio: Non-negative finite values, `(N,)`, not all zero.
        clip: `(low, high)` with 0 <= low <= 1 <= high, or None to only normalise.

    Returns:
        Float64 weights `(N,)` with mean 1, each within `clip`.

    Raises:
        ValueError: for a bad `clip`, or ratios that are negative, non-finite or all zero.

    Example:
    >>> normalise_weights([1.0, 1.0, 100.0], clip=(0.5, 2.0)).round(3).tolist()
    [0.5, 0.5, 2.0]
    """
    clip = _check_clip(clip)
    r = np.asarray(ratio, dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.isfinite(r).all() or (r < 0).any() or not (r > 0).any():
        raise ValueError(
            "`ratio` must hold non-negative finite values, not all zero. Received: "
            f"{r.size} values, min {r.min() if r.size else None}, max "
            f"{r.max() if r.size else None}"
        )
    scaled = r / r.mean()
    if clip is None:
        return scaled
    low, high = clip

    def mean_at(log_s: float) -> float:
        return float(np.clip(np.exp(log_s) * scaled, low, high).mean())

    # mean_at is continuous and non-decreasing in s, from `low` (s -> 0) towards `high`
    # (s -> inf, when every ratio is positive): bracket the scale that gives 1, then bisect.
    lo, hi = -1.0, 1.0
    while mean_at(lo) > 1.0 and lo > -800:
        lo *= 2.0
    while mean_at(hi) < 1.0 and hi < 800:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mean_at(mid) < 1.0:
            lo = mid
        else:
            hi = mid
    w = np.clip(np.exp(0.5 * (lo + hi)) * scaled, low, high)
    # The bisection leaves the mean within ~1e-12 of 1; the few unclipped weights absorb the
    # rest so the mean is 1 to float precision.
    free = (w > low) & (w < high)
    if free.any():
        w[free] += (len(w) - w.sum()) / free.sum()
        w = np.clip(w, low, high)
    return w


def importance_weights_from_features(
    fs,
    ft,
    *,
    clip: tuple[float, float] | None = (0.1, 10.0),
    seed: int = 0,
    folds: int = FOLDS,
) -> np.ndarray:
    """Importance weights of source samples from features, `p_target(x) / p_source(x)`.

    A logistic-regression domain classifier (standardised features; source 0, target 1) is
    fit with its C chosen from `C_GRID` by stratified cross-validated log-loss; each sample's
    probability p(target | x) comes from the fold that did not train on it (out-of-fold), so a
    classifier that memorises samples does not push their weights to the bounds. The ratio
    p(target | x) / p(source | x) × (n_s / n_t) is then clipped and normalised to mean 1 by
    `normalise_weights` (one step: the weights lie within `clip` and average exactly 1).

    Args:
        fs: Source features, `(N_s, D)`, N_s >= 2.
        ft: Target features, `(N_t, D)`, N_t >= 2, same D.
        clip: `(low, high)` bounds on the weights with 0 <= low <= 1 <= high, or None.
        seed: Seed of the folds.
        folds: Cross-validation folds, >= 2 and at most the smaller domain's size.

    Returns:
        Float64 weights `(N_s,)`, one per source sample in order, with mean 1.

    Raises:
        ValueError: for features of different widths, non-finite values, too few samples for
            `folds`, or a bad `clip`.

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> fs = np.r_[rng.normal(0, 1, (80, 2)), rng.normal(3, 1, (20, 2))]
    >>> w = importance_weights_from_features(fs, rng.normal(3, 1, (100, 2)))
    >>> bool(w[80:].mean() > w[:80].mean())
    True
    """
    clip = _check_clip(clip)
    seed = check_int("seed", seed, minimum=0)
    folds = check_int("folds", folds, minimum=2, hint="Use e.g. folds=5")
    fs, ft = discrepancy.check_features(fs, ft)
    smaller = min(len(fs), len(ft))
    if folds > smaller:
        raise ValueError(
            f"`folds`={folds} is more than the smaller domain's {smaller} samples; each fold "
            f"needs samples of both domains. Use folds <= {smaller} or pass more samples."
        )
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([fs, ft])
    y = np.r_[np.zeros(len(fs)), np.ones(len(ft))]
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)

    def classifier(c: float):
        return make_pipeline(
            StandardScaler(),
            # A large intercept_scaling all but lifts liblinear's penalty off the intercept,
            # which must carry the domains' size ratio.
            LogisticRegression(C=c, solver="liblinear", intercept_scaling=100.0, max_iter=1000),
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        best, best_loss = None, np.inf
        for c in C_GRID:
            p = cross_val_predict(classifier(c), x, y, cv=cv, method="predict_proba")[:, 1]
            p = np.clip(p, 1e-7, 1 - 1e-7)
            loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
            if loss < best_loss:
                best, best_loss = p, loss
    p_target = best[: len(fs)]
    ratio = p_target / (1.0 - p_target) * (len(fs) / len(ft))
    return normalise_weights(ratio, clip)


def importance_weights(
    source,
    target,
    *,
    model=None,
    backbone: str = "mobilenet_v2",
    weights: str | None = "imagenet",
    at: str = "pooling",
    clip: tuple[float, float] | None = (0.1, 10.0),
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 64,
    seed: int = 0,
) -> np.ndarray:
    """Per-source-sample weights that make the source look like the target, mean 1.

    Features of both domains are extracted once (`kt.features.extract`, as in
    `kt.domain_discrepancy`), then `importance_weights_from_features` estimates the density
    ratio p_target(x) / p_source(x) at each source sample with a domain classifier, and
    scales it to mean 1 within `clip` (clipping and normalising as one step, so both hold).
    Every argument is checked before any model is built or run.

    Args:
        source: Source images: an array `(N, H, W[, C])` of pixels in [0, 255], an
            `(images, labels)` tuple or a `tf.data.Dataset` in a fixed order (the weights
            follow it); or source features `(N, D)`, used as is.
        target: Target data in the same form (its labels, if any, are ignored).
        model: A model from `kt.build_classifier` to extract with, or None to build `backbone`.
        backbone: Registry name of the backbone built when `model` is None.
        weights: Its weights: `"imagenet"`, None or a weights file.
        at: Where to take the features (see `kt.features.extract`).
        clip: `(low, high)` bounds on the weights with 0 <= low <= 1 <= high, or None.
        image_size: Resize both domains' images to this size first, or None.
        batch_size: Images per forward pass.
        seed: Seed of the domain classifier's cross-validation folds.

    Returns:
        Float64 weights `(N_s,)`, one per source sample in order, mean 1, within `clip`.

    Raises:
        ValueError: for empty data, images of different sizes (without `image_size`) or
            channel counts, features of different widths, or a bad `clip`.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> rng = np.random.default_rng(0)
    >>> x_source = rng.uniform(0, 255, (20, 32, 32, 3))
    >>> w = kt.importance_weights(x_source, rng.uniform(0, 255, (20, 32, 32, 3)), model=model)
    >>> round(float(w.mean()), 6)
    1.0
    """
    clip = _check_clip(clip)
    seed = check_int("seed", seed, minimum=0)
    features = discrepancy.prepare_domains(
        source,
        target,
        model=model,
        backbone=backbone,
        weights=weights,
        at=at,
        image_size=image_size,
        batch_size=batch_size,
        min_samples=FOLDS,
    )
    fs, ft = features()
    return importance_weights_from_features(fs, ft, clip=clip, seed=seed)


def effective_sample_size(w: Sequence[float] | np.ndarray) -> float:
    """Kish's effective sample size (Σw)² / Σw²: how many equally weighted samples `w` is worth.

    Example:
    >>> effective_sample_size([1.0, 1.0, 1.0, 1.0])
    4.0
    """
    w = np.asarray(w, dtype=np.float64)
    return float(w.sum() ** 2 / np.sum(w * w))
