"""How far apart two domains are: proxy A-distance, multi-kernel MMD² and CORAL, with intervals.

The three measures are plain functions on feature arrays `(N, D)` of a source and a target
domain; `domain_discrepancy` takes images of both domains, extracts their features once
(`kt.features.extract`) and returns each measure with a bootstrap 90% interval.

- `proxy_a_distance`: 2(1 − 2ε) for the lowest held-out error ε of a linear domain classifier
  (Ben-David et al. 2010; Ganin et al., JMLR 2016, §3.2). 0: indistinguishable, 2: separable.
- `mmd`: the unbiased estimate of the squared maximum mean discrepancy under an equal-weight
  mix of Gaussian kernels (Gretton et al. 2012; Long et al. 2015, DAN). About 0 for one
  distribution (it can dip slightly below 0), larger the further apart.
- `coral`: ‖C_s − C_t‖²_F / (4d²), the distance between the two domains' feature covariances
  (Sun & Saenko 2016).

Only NumPy is imported with this module; scikit-learn and TensorFlow load when a function
needs them.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from keras_transfer._validate import check_int, image_hw, is_number

METHODS = ("proxy_a_distance", "mmd", "coral")
#: Bandwidth multipliers of the median pairwise distance: 2^k for k in -3..1.
DEFAULT_KERNELS = (0.125, 0.25, 0.5, 1.0, 2.0)
#: Inverse regularisation strengths tried by the proxy A-distance's domain classifier.
PAD_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)
CONFIDENCE = 0.9
_RANGES = {"proxy_a_distance": (0.0, 2.0), "mmd": (-1.0, 2.0), "coral": (0.0, np.inf)}


class Estimate(NamedTuple):
    """A measured value and its bootstrap 90% interval `[low, high]`."""

    value: float
    low: float
    high: float


# ---------------------------------------------------------------------------------------------
# Argument checks


def check_features(fs, ft, *, names: tuple[str, str] = ("fs", "ft")) -> tuple[np.ndarray, ...]:
    """`(fs, ft)` as float64 `(N, D)` arrays of one width, or a `ValueError` naming the problem.

    Args:
        fs: Source features, `(N_s, D)`.
        ft: Target features, `(N_t, D)`.
        names: The arguments' names for the messages.

    Returns:
        The two arrays as float64.

    Raises:
        ValueError: for arrays that are not 2-D, hold fewer than 2 rows, non-finite or
            non-numeric values, or differ in width.
        TypeError: for something that is not an array.
    """
    out = []
    for name, f in zip(names, (fs, ft), strict=True):
        try:
            a = np.asarray(f)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"`{name}` must be a numeric array of features (N, D). Received: {error}"
            ) from error
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise TypeError(
                f"`{name}` must be a numeric array of features (N, D). Received: dtype {a.dtype}"
            )
        if a.ndim != 2:
            raise ValueError(
                f"`{name}` must be a 2-D array of features (N samples, D features). Received: "
                f"shape {a.shape}. Flatten or pool feature maps first (kt.features.extract("
                "model, images, at='pooling'))."
            )
        if len(a) < 2:
            raise ValueError(
                f"`{name}` holds {len(a)} sample(s); a discrepancy needs at least 2 per domain. "
                f"Received: shape {a.shape}"
            )
        if not np.isfinite(a).all():
            bad = np.flatnonzero(~np.isfinite(a).all(axis=1))
            raise ValueError(
                f"`{name}` holds NaN or inf in {len(bad)} row(s), e.g. row {int(bad[0])}. "
                "Drop or repair those samples."
            )
        out.append(a.astype(np.float64, copy=False))
    if out[0].shape[1] != out[1].shape[1]:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must have the same feature width. Received: "
            f"{names[0]}.shape={out[0].shape}, {names[1]}.shape={out[1].shape}. Extract both "
            "domains' features with the same model at the same point."
        )
    return out[0], out[1]


def check_methods(methods) -> tuple[str, ...]:
    """`methods` as a tuple of known names (a single name is accepted), or a `ValueError`."""
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError:
        raise TypeError(
            f"`methods` must be a name or a sequence of names from {list(METHODS)}. "
            f"Received: methods={methods!r}"
        ) from None
    if not methods:
        raise ValueError(f"`methods` must name at least one of {list(METHODS)}. Received: ()")
    for method in methods:
        if method not in METHODS:
            close = difflib.get_close_matches(str(method), METHODS, n=2, cutoff=0.4)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown discrepancy method {method!r}.{hint} Use one of {list(METHODS)}. "
                f"Received: methods={methods!r}"
            )
    if len(set(methods)) != len(methods):
        raise ValueError(f"`methods` names a method twice. Received: methods={methods!r}")
    return methods


def _check_kernels(kernels) -> tuple[float, ...]:
    if kernels is None:
        return DEFAULT_KERNELS
    try:
        values = tuple(kernels)
    except TypeError:
        values = ()
    if not values or not all(is_number(k) and np.isfinite(k) and k > 0 for k in values):
        raise ValueError(
            "`kernels` must be a non-empty sequence of positive bandwidth multipliers (of the "
            "median pairwise distance), e.g. (0.5, 1.0, 2.0), or None for 2^k, k in -3..1. "
            f"Received: kernels={kernels!r}"
        )
    return tuple(float(k) for k in values)


def _check_seed(seed) -> int:
    return check_int("seed", seed, minimum=0, hint="Pass a non-negative int, e.g. seed=0")


# ---------------------------------------------------------------------------------------------
# The measures. Each has a private form that takes resampling indices, so the bootstrap
# reuses one kernel matrix and keeps copies of one sample apart from each other where an
# estimator needs distinct samples.


def _squared_distances(z: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", z, z)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (z @ z.T)
    np.maximum(d2, 0.0, out=d2)
    np.fill_diagonal(d2, 0.0)
    return d2


def _median_from_squared(d2: np.ndarray) -> float:
    upper = np.sqrt(d2[np.triu_indices(len(d2), k=1)])
    median = float(np.median(upper)) if upper.size else 0.0
    if median > 0:
        return median
    positive = upper[upper > 0]
    return float(positive.mean()) if positive.size else 1.0


def median_distance(z) -> float:
    """The median Euclidean distance between distinct rows of `z` (the median heuristic).

    Falls back to the mean of the non-zero distances when more than half are zero, and to
    1.0 when every row is the same.
    """
    return _median_from_squared(_squared_distances(np.asarray(z, dtype=np.float64)))


def _kernel_matrix(z: np.ndarray, kernels: Sequence[float], bandwidth: float | None):
    d2 = _squared_distances(z)
    if bandwidth is None:
        bandwidth = _median_from_squared(d2)
    k = np.zeros_like(d2)
    for multiplier in kernels:
        sigma = multiplier * bandwidth
        k += np.exp(-d2 / (2.0 * sigma * sigma))
    k /= len(kernels)
    return k


def _mmd_from_kernel(k: np.ndarray, i: np.ndarray, j: np.ndarray) -> float:
    """Unbiased MMD² from pooled kernel matrix `k`: source rows `i`, target rows `j`.

    Within a domain, pairs of the same original sample (i = i', including copies drawn by the
    bootstrap) are left out, as the unbiased estimator leaves out the diagonal.
    """
    kss = k[np.ix_(i, i)]
    ktt = k[np.ix_(j, j)]
    kst = k[np.ix_(i, j)]
    ms = i[:, None] != i[None, :]
    mt = j[:, None] != j[None, :]
    return float(kss[ms].mean() + ktt[mt].mean() - 2.0 * kst.mean())


def mmd(
    fs,
    ft,
    *,
    kernels: Sequence[float] | None = None,
    bandwidth: float | None = None,
) -> float:
    """Multi-kernel Gaussian MMD² between two feature samples (the unbiased estimator).

    The kernel is the mean of Gaussians k_σ(x, y) = exp(−‖x − y‖² / (2σ²)) (DAN's convex
    combination with equal weights), one per bandwidth σ = multiplier × `bandwidth`; by default
    the multipliers are 2^k for k in −3..1 and `bandwidth` is the median distance between the
    pooled samples. The unbiased estimator leaves out each sample's kernel with itself, so for
    one distribution it averages 0 and can come out slightly negative; its values lie in
    [−1, 2]. Cost O((N_s + N_t)² · D) time and O((N_s + N_t)²) memory.

    Args:
        fs: Source features, `(N_s, D)`, N_s >= 2.
        ft: Target features, `(N_t, D)`, N_t >= 2, same D.
        kernels: Bandwidth multipliers (positive floats), or None for (1/8, 1/4, 1/2, 1, 2).
        bandwidth: The distance the multipliers scale (a positive float), or None for the
            median pairwise distance of the pooled samples.

    Returns:
        MMD², a float.

    Raises:
        ValueError: for feature arrays of different widths, non-finite values, fewer than two
            samples, or bad `kernels` / `bandwidth`.

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> round(mmd(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 2.0), 2) > 0.1
    True
    """
    fs, ft = check_features(fs, ft)
    kernels = _check_kernels(kernels)
    bandwidth = _check_bandwidth(bandwidth)
    k = _kernel_matrix(np.concatenate([fs, ft]), kernels, bandwidth)
    return _mmd_from_kernel(k, np.arange(len(fs)), len(fs) + np.arange(len(ft)))


def _check_bandwidth(bandwidth) -> float | None:
    if bandwidth is None:
        return None
    if not is_number(bandwidth) or not np.isfinite(bandwidth) or bandwidth <= 0:
        raise ValueError(
            "`bandwidth` must be a positive float (a distance between features) or None for the "
            f"median pairwise distance. Received: bandwidth={bandwidth!r}"
        )
    return float(bandwidth)


def _covariance(f: np.ndarray) -> np.ndarray:
    centred = f - f.mean(axis=0, keepdims=True)  # over samples, not over features
    return centred.T @ centred / (len(f) - 1)


def coral(fs, ft) -> float:
    """CORAL distance ‖C_s − C_t‖²_F / (4d²) between two feature samples (Sun & Saenko 2016).

    C_s and C_t are the unbiased covariance matrices of the features, centred over the samples
    (axis 0), and d is the feature width.

    Args:
        fs: Source features, `(N_s, D)`, N_s >= 2.
        ft: Target features, `(N_t, D)`, N_t >= 2, same D.

    Returns:
        The CORAL distance, a float >= 0.

    Raises:
        ValueError: for feature arrays of different widths, non-finite values or fewer than two
            samples.

    Example:
    >>> import numpy as np
    >>> coral(np.array([[0.0], [2.0]]), np.array([[0.0], [0.0]]))  # (2 - 0)² / 4
    1.0
    """
    fs, ft = check_features(fs, ft)
    return _coral(fs, ft)


def _coral(fs: np.ndarray, ft: np.ndarray) -> float:
    d = fs.shape[1]
    diff = _covariance(fs) - _covariance(ft)
    return float(np.sum(diff * diff) / (4.0 * d * d))


def _halves(groups: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Rows split in two halves by group (copies of one sample stay on one side)."""
    unique = rng.permutation(np.unique(groups))
    train_groups = unique[: len(unique) // 2]
    in_train = np.isin(groups, train_groups)
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def _pad(fs: np.ndarray, ft: np.ndarray, gs: np.ndarray, gt: np.ndarray, seed: int) -> float:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    # Stratified: each domain is halved on its own.
    s_train, s_test = _halves(gs, rng)
    t_train, t_test = _halves(gt, rng)
    x_train = np.concatenate([fs[s_train], ft[t_train]])
    y_train = np.r_[np.zeros(len(s_train)), np.ones(len(t_train))]
    x_test = np.concatenate([fs[s_test], ft[t_test]])
    y_test = np.r_[np.zeros(len(s_test)), np.ones(len(t_test))]
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    best = 0.5
    for c in PAD_C_GRID:
        # liblinear: ~100x faster than lbfgs on a few hundred samples.
        classifier = LogisticRegression(
            C=c, class_weight="balanced", solver="liblinear", max_iter=1000
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            classifier.fit(x_train, y_train)
        wrong = classifier.predict(x_test) != y_test
        # Balanced error: a classifier that always says "source" scores 0.5, whatever the sizes.
        error = 0.5 * (wrong[y_test == 0].mean() + wrong[y_test == 1].mean())
        best = min(best, float(error))
    return float(np.clip(2.0 * (1.0 - 2.0 * best), 0.0, 2.0))


def proxy_a_distance(fs, ft, *, seed: int = 0) -> float:
    """Proxy A-distance 2(1 − 2ε) between two feature samples, in [0, 2].

    Source samples are labelled 0 and target samples 1; each domain is split in half (seeded),
    a linear domain classifier (scikit-learn `LogisticRegression` on standardised features)
    is fit on one half for each C in `PAD_C_GRID`, and ε is the lowest error on the held-out
    half. The error is balanced (the mean of the two domains' error rates), so unequal domain
    sizes do not read as a distance; for equal sizes it is the plain error. The result is
    clipped to [0, 2]: 0 when no linear classifier tells the domains apart, 2 when one
    separates them perfectly.

    Args:
        fs: Source features, `(N_s, D)`, N_s >= 2.
        ft: Target features, `(N_t, D)`, N_t >= 2, same D.
        seed: Seed of the split (a non-negative int).

    Returns:
        The proxy A-distance, a float in [0, 2].

    Raises:
        ValueError: for feature arrays of different widths, non-finite values, fewer than two
            samples, or a bad `seed`.

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> proxy_a_distance(rng.normal(size=(100, 4)), rng.normal(size=(100, 4)) + 10.0)
    2.0
    """
    fs, ft = check_features(fs, ft)
    seed = _check_seed(seed)
    return _pad(fs, ft, np.arange(len(fs)), np.arange(len(ft)), seed)


def measure_features(
    fs,
    ft,
    *,
    methods: str | Sequence[str] = METHODS,
    n_boot: int = 20,
    seed: int = 0,
    kernels: Sequence[float] | None = None,
) -> dict[str, Estimate]:
    """Each discrepancy of `methods` between two feature samples, with a bootstrap interval.

    The value is measured on the samples as given. The interval `[low, high]` is the spread of
    `n_boot` bootstrap replicates (each domain resampled with replacement on its own; one set
    of replicates serves every method): their 5th to 95th percentiles, shifted so that their
    median falls on the value, and kept within the measure's range. The shift matters for
    CORAL and the proxy A-distance, which resampling inflates (a resample has fewer distinct
    samples, so noisier covariances and an easier split): their raw percentiles can lie wholly
    above the value. Within a replicate the MMD leaves out pairs of copies of one sample and
    the proxy A-distance keeps the copies of one sample on one side of its split. The MMD's
    bandwidth is fixed from the full samples.

    Args:
        fs: Source features, `(N_s, D)`, N_s >= 2.
        ft: Target features, `(N_t, D)`, N_t >= 2, same D.
        methods: Names from `METHODS` (or one name).
        n_boot: Bootstrap replicates, >= 1.
        seed: Seed of the resampling and of the proxy A-distance's splits.
        kernels: MMD bandwidth multipliers (see `mmd`).

    Returns:
        `{method: Estimate(value, low, high)}` in the order of `methods`.

    Raises:
        ValueError: for unknown methods (with close names), `n_boot` < 1, or bad features.

    Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> out = measure_features(rng.normal(size=(50, 3)), rng.normal(size=(50, 3)), n_boot=5)
    >>> sorted(out)
    ['coral', 'mmd', 'proxy_a_distance']
    """
    methods = check_methods(methods)
    n_boot = check_int("n_boot", n_boot, minimum=1, hint="Use e.g. n_boot=20 replicates")
    seed = _check_seed(seed)
    kernels = _check_kernels(kernels)
    fs, ft = check_features(fs, ft)
    return _measure(fs, ft, methods, n_boot, seed, kernels)


def _measure(fs, ft, methods, n_boot, seed, kernels) -> dict[str, Estimate]:
    ns, nt = len(fs), len(ft)
    k = _kernel_matrix(np.concatenate([fs, ft]), kernels, None) if "mmd" in methods else None
    rng = np.random.default_rng(seed)

    def one(method: str, i: np.ndarray, j: np.ndarray, split_seed: int) -> float:
        if method == "mmd":
            return _mmd_from_kernel(k, i, ns + j)
        if method == "coral":
            return _coral(fs[i], ft[j])
        return _pad(fs[i], ft[j], i, j, split_seed)

    full_i, full_j = np.arange(ns), np.arange(nt)
    values = {m: one(m, full_i, full_j, seed) for m in methods}
    replicates: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(n_boot):
        i = np.sort(rng.integers(0, ns, ns))
        j = np.sort(rng.integers(0, nt, nt))
        split_seed = int(rng.integers(0, 2**31 - 1))
        for m in methods:
            replicates[m].append(one(m, i, j, split_seed))
    tail = 100.0 * (1.0 - CONFIDENCE) / 2.0
    out = {}
    for m in methods:
        low, median, high = np.percentile(replicates[m], [tail, 50.0, 100.0 - tail])
        # Resampling with replacement inflates the biased measures (CORAL, the proxy
        # A-distance): the replicates sit above the value. The interval is their spread,
        # centred by the median on the value, and kept in the measure's range.
        shift = median - values[m]
        lowest, highest = _RANGES[m]
        low, high = max(low - shift, lowest), min(high - shift, highest)
        out[m] = Estimate(float(values[m]), float(low), float(high))
    return out


# ---------------------------------------------------------------------------------------------
# Images -> features


def _describe(name: str, data) -> dict[str, Any]:
    """What `data` is, checked without running anything: kind, length, image shape."""
    import tensorflow as tf

    if isinstance(data, tf.data.Dataset):
        spec = data.element_spec
        images = spec[0] if isinstance(spec, tuple) else spec
        if isinstance(images, tuple | dict) or not hasattr(images, "shape"):
            raise TypeError(
                f"`{name}` must be a dataset of images or of (images, labels). Received: a "
                f"dataset with element_spec {spec!r}. Map it to images, e.g. "
                "ds.map(lambda e: e['image'])."
            )
        shape = tuple(images.shape) if images.shape.rank is not None else ()
        if len(shape) not in (3, 4):
            raise ValueError(
                f"`{name}` must yield images (H, W, C) or batches (B, H, W, C). Received: "
                f"element shape {shape}"
            )
        cardinality = int(data.cardinality())
        if cardinality == 0:
            raise ValueError(f"`{name}` is an empty dataset: there are no images to measure.")
        return {"kind": "images", "n": None, "hwc": shape[-3:], "data": data}
    if isinstance(data, tuple) and len(data) == 2:
        data = data[0]  # (images, labels): the labels play no part
    try:
        array = np.asarray(data)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`{name}` holds images of mixed sizes or is not an array: {error}. Pass an array "
            "(N, H, W, C) of one size, a tf.data.Dataset, or a feature array (N, D)."
        ) from error
    if array.dtype == object or not np.issubdtype(array.dtype, np.number):
        raise TypeError(
            f"`{name}` must be a numeric array of images (N, H, W[, C]) or features (N, D), or "
            f"a tf.data.Dataset. Received: {type(data).__name__} of dtype {array.dtype}"
        )
    if array.ndim not in (2, 3, 4):
        raise ValueError(
            f"`{name}` must be images (N, H, W) / (N, H, W, C) or features (N, D). Received: "
            f"shape {array.shape}"
        )
    if len(array) == 0:
        raise ValueError(f"`{name}` is empty (shape {array.shape}): there is nothing to measure.")
    if array.ndim == 2:
        return {"kind": "features", "n": len(array), "data": array}
    if array.ndim == 3:
        array = array[..., None]
    if array.shape[-1] not in (1, 3):
        raise ValueError(
            f"`{name}` images must have 1 or 3 channels. Received: shape {array.shape}"
        )
    return {"kind": "images", "n": len(array), "hwc": array.shape[1:], "data": array}


def prepare_domains(
    source,
    target,
    *,
    model=None,
    backbone: str = "mobilenet_v2",
    weights: str | None = "imagenet",
    at: str = "pooling",
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 64,
    min_samples: int = 2,
) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """Checks two domains' data and returns a function that yields their features.

    Everything is checked here, before any model is built or run; calling the returned
    function does the work (`kt.features.extract` once per domain). Used by
    `domain_discrepancy` and `kt.weighting.importance_weights`.

    Args:
        source: Source images: an array `(N, H, W[, C])`, an `(images, labels)` tuple or a
            `tf.data.Dataset` of images or `(images, labels)`; or features `(N, D)`.
        target: Target data, in the same form as `source` (both images or both features).
        model: A model from `kt.build_classifier` / `kt.build_regressor` to extract with, or
            None to build `backbone`.
        backbone: Registry name of the backbone built when `model` is None.
        weights: Its weights: `"imagenet"`, None (random) or a weights file.
        at: Where to take the features (see `kt.features.extract`).
        image_size: Resize both domains' images to this size (int or `(height, width)`)
            first; None keeps them as they are (they must then be of one size).
        batch_size: Images per forward pass.
        min_samples: Fewest samples each domain must hold (checked here for arrays; a
            dataset's size is known only once read).

    Returns:
        A function of no arguments returning `(source_features, target_features)`.

    Raises:
        ValueError / TypeError: for empty data, features mixed with images, features of
            different widths, images of different sizes (without `image_size`) or channel
            counts, images that do not fit `model`, or a bad argument.
    """
    domains = [_describe("source", source), _describe("target", target)]
    for name, d in zip(("source", "target"), domains, strict=True):
        if d["n"] is not None and d["n"] < min_samples:
            raise ValueError(
                f"`{name}` holds {d['n']} sample(s); this needs at least {min_samples} per "
                "domain. Pass more samples."
            )
    kinds = {d["kind"] for d in domains}
    if kinds == {"features"}:
        fs, ft = check_features(domains[0]["data"], domains[1]["data"], names=("source", "target"))
        return lambda: (fs, ft)
    if len(kinds) > 1:
        raise ValueError(
            "`source` and `target` must both be images or both be feature arrays (N, D). "
            f"Received: source as {domains[0]['kind']}, target as {domains[1]['kind']}."
        )
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if not isinstance(at, str):
        raise TypeError(f"`at` must be a point name such as 'pooling'. Received: at={at!r}")
    size = image_hw(image_size) if image_size is not None else None
    (hs, ws, cs), (ht, wt, ct) = domains[0]["hwc"], domains[1]["hwc"]
    if cs != ct:
        raise ValueError(
            f"`source` and `target` images have different channel counts: source {cs}, target "
            f"{ct}. Convert the greyscale domain to RGB first, e.g. np.repeat(x, 3, axis=-1) "
            "or tf.image.grayscale_to_rgb."
        )
    if cs not in (1, 3):
        raise ValueError(f"Images must have 1 or 3 channels. Received: {cs} channels")
    if size is None and ((hs, ws) != (ht, wt) or None in (hs, ws)):
        raise ValueError(
            f"`source` and `target` images must be of one known size to share a model. "
            f"Received: source {hs}x{ws}, target {ht}x{wt}. Pass image_size=(height, width) "
            "to resize both."
        )
    size = size or (hs, ws)
    if model is None:
        from keras_transfer import backbones

        spec = backbones.get_backbone(backbone)
        if weights is not None and weights != "imagenet" and not os.path.isfile(weights):
            raise ValueError(
                "`weights` must be 'imagenet', None (random) or the path of a weights file. "
                f"Received: weights={weights!r}, which is not a file."
            )
        if min(size) < spec.min_size:
            raise ValueError(
                f"Backbone {spec.name!r} needs images of at least {spec.min_size}x"
                f"{spec.min_size}. Received: {size[0]}x{size[1]}. Pass image_size="
                f"{spec.min_size} or larger to resize."
            )
    else:
        shape = tuple(model.inputs[0].shape[1:])
        if len(shape) != 3:
            raise ValueError(
                f"`model` must take images (H, W, C). Received: a model with input shape {shape}"
            )
        if shape[2] is not None and shape[2] != cs:
            raise ValueError(
                f"`model` takes {shape[2]}-channel images but the domains have {cs}. Convert "
                "the images, or build the model with channels="
                f"{cs}."
            )
        if None not in shape[:2] and tuple(shape[:2]) != tuple(size):
            raise ValueError(
                f"`model` takes {shape[0]}x{shape[1]} images; the domains' are {size[0]}x"
                f"{size[1]}. Pass image_size=({shape[0]}, {shape[1]}) to resize them."
            )

    def run() -> tuple[np.ndarray, np.ndarray]:
        from keras_transfer import features as feature_module

        network = model
        if network is None:
            from keras_transfer.builders import build_classifier

            network = build_classifier(
                backbone, 2, image_size=size, weights=weights, channels=cs, dropout=0.0
            )
        out = []
        for d in domains:
            data = _resized(d["data"], size, d["hwc"][:2], batch_size)
            f = feature_module.extract(network, data, at=at, batch_size=batch_size)
            f = f[0] if isinstance(f, tuple) else f
            out.append(f.reshape(len(f), -1))
        return out[0], out[1]

    return run


def _resized(data, size, current, batch_size: int):
    """`data` with images resized to `size` (unchanged when already that size)."""
    if tuple(current) == tuple(size):
        return data
    import tensorflow as tf

    def resize(images, *rest):
        images = tf.image.resize(tf.cast(images, tf.float32), size)
        return (images, *rest) if rest else images

    if isinstance(data, tf.data.Dataset):
        return data.map(resize)
    return tf.data.Dataset.from_tensor_slices(data).batch(batch_size).map(resize)


def domain_discrepancy(
    source,
    target,
    *,
    model=None,
    backbone: str = "mobilenet_v2",
    weights: str | None = "imagenet",
    at: str = "pooling",
    methods: str | Sequence[str] = METHODS,
    n_boot: int = 20,
    seed: int = 0,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 64,
    kernels: Sequence[float] | None = None,
) -> dict[str, Estimate]:
    """How far apart two image domains are, in a model's feature space, with 90% intervals.

    Features are extracted once per domain with `kt.features.extract` (the model's own
    preprocessing, inference mode) from `model`, or from `backbone` built at the images' size
    with `weights`; then each measure of `methods` is computed with a bootstrap interval (see
    `measure_features`). Every argument is checked before any model is built or run.

    Args:
        source: Source images: an array `(N, H, W[, C])` of pixels in [0, 255], an
            `(images, labels)` tuple, or a `tf.data.Dataset` of images or `(images, labels)`
            (labels are ignored). A 2-D array `(N, D)` is taken as features and used as is.
        target: Target data, in the same form as `source`.
        model: A model from `kt.build_classifier` to extract with, or None to build `backbone`.
        backbone: Registry name of the backbone built when `model` is None.
        weights: Its weights: `"imagenet"` (a random network measures little), None or a
            weights file.
        at: Where to take the features: `"pooling"`, `"logits"`, `"backbone"` or a backbone
            layer name (feature maps are flattened).
        methods: Names from `"proxy_a_distance"`, `"mmd"`, `"coral"`, or one of them.
        n_boot: Bootstrap replicates for the intervals, >= 1.
        seed: Seed of the bootstrap and the proxy A-distance's splits.
        image_size: Resize both domains' images to this size first, or None to keep them (they
            must then be of one size, and of the model's when `model` is given).
        batch_size: Images per forward pass.
        kernels: MMD bandwidth multipliers of the median distance; None for 2^k, k in -3..1.

    Returns:
        `{method: Estimate(value, low, high)}` in the order of `methods`.

    Raises:
        ValueError: for an unknown method (with close names), `n_boot` < 1, empty data, images
            of different sizes (without `image_size`) or channel counts, feature arrays of
            different widths, or an unknown backbone.
        TypeError: for data that is neither arrays nor a dataset.

    Example:
    >>> import numpy as np, keras_transfer as kt
    >>> model = kt.build_classifier("mobilenet_v2", 2, image_size=32, weights=None, alpha=0.35)
    >>> rng = np.random.default_rng(0)
    >>> dark, bright = rng.uniform(0, 60, (16, 32, 32, 3)), rng.uniform(190, 255, (16, 32, 32, 3))
    >>> # A random network's pooled features are tiny; an early block still tells these apart.
    >>> out = kt.domain_discrepancy(dark, bright, model=model, at="block_5_add", n_boot=3)
    >>> out["proxy_a_distance"].value
    2.0
    """
    methods = check_methods(methods)
    n_boot = check_int("n_boot", n_boot, minimum=1, hint="Use e.g. n_boot=20 replicates")
    seed = _check_seed(seed)
    kernels = _check_kernels(kernels)
    features = prepare_domains(
        source,
        target,
        model=model,
        backbone=backbone,
        weights=weights,
        at=at,
        image_size=image_size,
        batch_size=batch_size,
    )
    fs, ft = features()
    fs, ft = check_features(fs, ft, names=("source features", "target features"))
    return _measure(fs, ft, methods, n_boot, seed, kernels)
