"""Transfer versus scratch on few-shot Fashion-MNIST: does `kt.fine_tune` earn its defaults?

Side by side, on the same few-shot training subsets and the same held-out test images:

  (a) `kt.fine_tune` with its defaults on `kt.build_classifier` with imported ImageNet weights;
  (b) the Keras guide recipe ("Transfer learning & fine-tuning", keras.io): frozen base called
      with `training=False`, flip/rotation augmentation, head fit 20 epochs at Adam's default
      rate, then the whole base unfrozen at 1e-5 for 10 epochs;
  (c) a linear probe: logistic regression (scikit-learn defaults) on frozen pooled features;
  (d) a small CNN trained from scratch on the 28 px images (`kt.build_small_cnn`).

Run (the full table: roughly an hour on 2 shared CPU cores; docs/benchmarks.md has results):

    python benchmarks/transfer_vs_scratch.py                       # 10/20/50 per class, 3 seeds
    python benchmarks/transfer_vs_scratch.py --per-class 10 --seeds 0 --methods a c

Needs `keras-transfer weights fetch` (imported ImageNet MobileNetV2) and the Fashion-MNIST files
(`make assets`); scikit-learn is a dev dependency. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_transfer as kt  # noqa: E402
from keras_transfer import datasets  # noqa: E402

IMAGE_SIZE = 96
NUM_CLASSES = 10
METHODS = {
    "a": "kt.fine_tune defaults (ImageNet)",
    "b": "Keras guide recipe (ImageNet)",
    "c": "linear probe (ImageNet features)",
    "d": "small CNN from scratch",
}


def load_test(n: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
    """A balanced, fixed subset of the official test split: `n // 10` images per class."""
    return datasets.fashion_mnist(split="test", per_class=n // NUM_CLASSES, seed=seed)


def resize(x: np.ndarray) -> np.ndarray:
    import tensorflow as tf

    return tf.image.resize(x.astype("float32"), (IMAGE_SIZE, IMAGE_SIZE)).numpy()


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    probs = model.predict(x, batch_size=128, verbose=0)
    return float(np.mean(np.argmax(probs, axis=-1) == y))


def imagenet_classifier(augmentation=None) -> keras.Model:
    return kt.build_classifier(
        "mobilenet_v2",
        NUM_CLASSES,
        image_size=IMAGE_SIZE,
        channels=1,
        weights="imagenet",
        augmentation=augmentation,
    )


def run_finetune_defaults(x, y, x_test, y_test, seed, overrides):
    keras.utils.set_random_seed(seed)
    model = imagenet_classifier()
    kt.fine_tune(model, (x, y), verbose=0, **overrides)
    return accuracy(model, x_test, y_test)


def run_guide_recipe(x, y, x_test, y_test, seed, overrides):
    """keras.io/guides/transfer_learning, end-to-end example, on our in-graph preprocessing."""
    keras.utils.set_random_seed(seed)
    model = imagenet_classifier(
        augmentation=[keras.layers.RandomFlip("horizontal"), keras.layers.RandomRotation(0.1)]
    )
    base = kt.find_backbone(model)
    base.trainable = False
    model.compile(
        optimizer=keras.optimizers.Adam(),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=32, epochs=20, shuffle=True, verbose=0)
    base.trainable = True
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    model.fit(x, y, batch_size=32, epochs=10, shuffle=True, verbose=0)
    return accuracy(model, x_test, y_test)


def run_linear_probe(x, y, x_test, y_test, seed, overrides):
    from sklearn.linear_model import LogisticRegression

    keras.utils.set_random_seed(seed)
    model = imagenet_classifier()
    features = keras.Model(model.input, model.get_layer("pooling").output)
    f_train = features.predict(x, batch_size=128, verbose=0)
    f_test = features.predict(x_test, batch_size=128, verbose=0)
    probe = LogisticRegression(max_iter=3000).fit(f_train, y)
    return float(np.mean(probe.predict(f_test) == y_test))


def run_scratch_cnn(x28, y, x28_test, y_test, seed, overrides):
    keras.utils.set_random_seed(seed)
    model = kt.build_small_cnn(NUM_CLASSES, image_size=28)  # Fashion-MNIST's own size
    steps_per_epoch = math.ceil(len(x28) / 32)
    epochs = math.ceil(600 / steps_per_epoch)  # the same ~600 updates at every label count
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    model.fit(x28, y, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    return accuracy(model, x28_test, y_test)


RUNNERS = {
    "a": run_finetune_defaults,
    "b": run_guide_recipe,
    "c": run_linear_probe,
    "d": run_scratch_cnn,
}


def format_table(results: dict, per_class: list[int], methods: list[str]) -> str:
    header = "| labelled / class | " + " | ".join(f"({m}) {METHODS[m]}" for m in methods) + " |"
    lines = [header, "|" + "---|" * (len(methods) + 1)]
    for n in per_class:
        cells = []
        for m in methods:
            runs = results.get((n, m), [])
            if not runs:
                cells.append("-")
                continue
            accs = [r["accuracy"] for r in runs]
            secs = [r["seconds"] for r in runs]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            cells.append(f"{statistics.mean(accs):.3f} ± {std:.3f} ({statistics.mean(secs):.0f} s)")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=sorted(METHODS))
    parser.add_argument(
        "--fine-tune-args",
        default="{}",
        help="JSON overrides for (a), e.g. '{\"head_epochs\": 30}' (for tuning the defaults).",
    )
    parser.add_argument("--json", default=None, help="Also write the raw results here.")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Print one table from the --json files of earlier runs (e.g. one per label count).",
    )
    args = parser.parse_args(argv)
    overrides = json.loads(args.fine_tune_args)
    if args.merge:
        raw = [row for path in args.merge for row in json.load(open(path))]
        results: dict = {}
        for row in raw:
            results.setdefault((row["per_class"], row["method"]), []).append(row)
        per_class = sorted({row["per_class"] for row in raw})
        methods = sorted({row["method"] for row in raw})
        seeds = sorted({row["seed"] for row in raw})
        print(
            f"Fashion-MNIST, {args.test_size} test images, MobileNetV2 {IMAGE_SIZE} px, "
            f"seeds {seeds}: mean ± std accuracy (mean wall time per run)"
        )
        print(format_table(results, per_class, methods))
        return 0

    x28_test, y_test = load_test(args.test_size)
    x_test = resize(x28_test)
    results: dict = {}
    raw = []
    for n in args.per_class:
        for seed in args.seeds:
            x28, y = datasets.fashion_mnist(split="train", per_class=n, seed=seed)
            x = resize(x28)
            for m in args.methods:
                start = time.perf_counter()
                if m == "d":
                    acc = RUNNERS[m](x28, y, x28_test, y_test, seed, overrides)
                else:
                    acc = RUNNERS[m](x, y, x_test, y_test, seed, overrides)
                seconds = time.perf_counter() - start
                results.setdefault((n, m), []).append({"accuracy": acc, "seconds": seconds})
                raw.append(
                    {"per_class": n, "seed": seed, "method": m, "accuracy": acc, "seconds": seconds}
                )
                print(
                    f"per_class={n:<3} seed={seed} ({m}) {METHODS[m]:<34} "
                    f"accuracy {acc:.3f}  {seconds:6.1f} s",
                    flush=True,
                )
                keras.backend.clear_session()
                if args.json:  # after every run, so a cut-short run still leaves its numbers
                    with open(args.json, "w") as f:
                        json.dump(raw, f, indent=1)
    print()
    print(
        f"Fashion-MNIST, {args.test_size} test images, MobileNetV2 {IMAGE_SIZE} px, "
        f"seeds {args.seeds}: mean ± std accuracy (mean wall time per run)"
    )
    print(format_table(results, args.per_class, args.methods))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
