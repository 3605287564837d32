"""Fusion of two extractors vs each alone, on few-shot Fashion-MNIST (linear probe).

Only MobileNetV2 (alpha 1.0) has ImageNet weights offline, so the two extractors fused are:

  - MobileNetV2 ImageNet at 96 px and MobileNetV2 ImageNet at 160 px: one network seeing the
    28 px images upsampled to two scales (multi-scale fusion); the 160 px branch's receptive
    fields cover less of the garment, so its features differ from the 96 px ones;
  - a control: MobileNetV2 ImageNet at 96 px fused with a randomly initialised MobileNetV2 at
    96 px. It adds as many feature dimensions as the 160 px branch with no pretrained knowledge,
    so it tells a gain from fusing knowledge apart from a gain from a wider probe.

All three branches live in one `kt.build_fusion_classifier` model (28 px greyscale in, each
branch resizing to its own size inside the graph with its own preprocessing), so one
`kt.features.extract(model, at="pooling")` pass gives the concatenated pooled features; each
configuration is a slice of them (checked equal to the branch built alone with
`kt.build_classifier` on a few images). The probe is what the fused model's head-only phase is:
a linear softmax classifier on the (standardised) pooled features, here scikit-learn's
logistic regression (defaults, max_iter=2000). For each seed, 50 images per class are drawn
from the training split and the 20-per-class set is the first 20 of each class among them;
the same 2,000 balanced test images serve every run.

Run (about 3,500 images through three MobileNetV2 branches: a few minutes on 2 free cores):

    nice -n 10 python benchmarks/fusion.py                      # 20 and 50 per class, 3 seeds
    nice -n 10 python benchmarks/fusion.py --per-class 20 --seeds 0 --test 500

Needs `keras-transfer weights fetch` (imported ImageNet MobileNetV2) and the Fashion-MNIST files
(`make assets`); scikit-learn is a dev dependency. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_transfer as kt  # noqa: E402
from keras_transfer import datasets  # noqa: E402

NUM_CLASSES = 10
# Branch name in the fused model -> (label, options for build_fusion_classifier).
BRANCHES = {
    "mobilenet_v2": ("MobileNetV2 ImageNet 96 px", {"image_size": 96}),
    "mobilenet_v2_2": ("MobileNetV2 ImageNet 160 px", {"image_size": 160}),
    "mobilenet_v2_3": ("MobileNetV2 random init 96 px", {"image_size": 96, "weights": None}),
}
CONFIGS = {
    "96 px alone": ["mobilenet_v2"],
    "160 px alone": ["mobilenet_v2_2"],
    "fusion 96 + 160 px": ["mobilenet_v2", "mobilenet_v2_2"],
    "random 96 px alone": ["mobilenet_v2_3"],
    "control: fusion 96 px + random": ["mobilenet_v2", "mobilenet_v2_3"],
}


def build_fused() -> keras.Model:
    keras.utils.set_random_seed(0)  # the random branch's initialisation
    return kt.build_fusion_classifier(
        [("mobilenet_v2", options) for _, options in BRANCHES.values()],
        NUM_CLASSES,
        image_size=28,
        channels=1,
        weights="imagenet",
    )


def check_slices_equal_each_alone(fused: keras.Model, x: np.ndarray, columns: dict) -> float:
    """Largest |difference| between a fused branch's slice and that branch's weights run alone."""
    pooled = kt.features.extract(fused, x)
    worst = 0.0
    for name, (_, options) in BRANCHES.items():
        alone = kt.build_classifier(
            "mobilenet_v2", NUM_CLASSES, weights=None, channels=1, image_size=options["image_size"]
        )
        kt.find_backbone(alone).set_weights(kt.find_backbone(fused, name).get_weights())
        mode = fused.get_layer(f"{name}_preprocessing").mode
        alone.get_layer("preprocessing").mode = mode
        resized = keras.ops.image.resize(x, (options["image_size"],) * 2)
        got = kt.features.extract(alone, np.asarray(resized))
        start, stop = columns[name]
        worst = max(worst, float(np.abs(pooled[:, start:stop] - got).max()))
    return worst


def probe(train_x, train_y, test_x, test_y) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(train_x), train_y)
    return float(classifier.score(scaler.transform(test_x), test_y))


def first_per_class(y: np.ndarray, n: int) -> np.ndarray:
    return np.concatenate([np.flatnonzero(y == c)[:n] for c in range(NUM_CLASSES)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test", type=int, default=2000, help="balanced test images")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    pool = max(args.per_class)

    started = time.perf_counter()
    fused = build_fused()
    widths = {name: fused.get_layer(f"{name}_pooling").output.shape[-1] for name in BRANCHES}
    columns, start = {}, 0
    for name, width in widths.items():
        columns[name] = (start, start + width)
        start += width
    test_x, test_y = datasets.fashion_mnist(
        split="test", per_class=args.test // NUM_CLASSES, seed=1234
    )
    train = {s: datasets.fashion_mnist(split="train", per_class=pool, seed=s) for s in args.seeds}
    images = np.concatenate([test_x, *(x for x, _ in train.values())]).astype("float32")
    difference = check_slices_equal_each_alone(fused, images[:16], columns)
    print(f"fused slices vs each branch alone: max |difference| {difference:.2e}")
    t0 = time.perf_counter()
    features = kt.features.extract(fused, images, batch_size=100)
    extract_s = time.perf_counter() - t0
    print(
        f"extracted {features.shape} in {extract_s:.0f} s (loadavg "
        f"{tuple(round(v, 1) for v in os.getloadavg())})"
    )
    test_features, offset, train_features = features[: len(test_x)], len(test_x), {}
    for s, (x, _) in train.items():
        train_features[s] = features[offset : offset + len(x)]
        offset += len(x)

    def select(block: np.ndarray, config: str) -> np.ndarray:
        return np.concatenate([block[:, slice(*columns[n])] for n in CONFIGS[config]], axis=1)

    results = {c: {k: [] for k in args.per_class} for c in CONFIGS}
    for s, (_, y) in train.items():
        for k in args.per_class:
            rows = first_per_class(y, k)
            for config in CONFIGS:
                accuracy = probe(
                    select(train_features[s], config)[rows],
                    y[rows],
                    select(test_features, config),
                    test_y,
                )
                results[config][k].append(accuracy)
                print(f"seed {s} {k}/class {config}: {accuracy:.3f}", flush=True)

    def cell(values: list[float]) -> str:
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {std:.3f}"

    header = " | ".join(f"{k} per class" for k in args.per_class)
    print(f"\n| features (linear probe) | dims | {header} |")
    print("|---|---|" + "---|" * len(args.per_class))
    for config, by_k in results.items():
        dims = sum(widths[n] for n in CONFIGS[config])
        cells = " | ".join(cell(by_k[k]) for k in args.per_class)
        print(f"| {config} | {dims} | {cells} |")
    print(
        f"\n{len(args.seeds)} seeds, {len(test_y)} test images; total "
        f"{time.perf_counter() - started:.0f} s, loadavg {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "slice_difference": difference}, f, indent=2)


if __name__ == "__main__":
    main()
