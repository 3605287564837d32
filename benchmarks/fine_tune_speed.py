"""Fine-tuning speed: the Keras-guide recipe against `kt.fine_tune`, same model, data and epochs.

Both paths train MobileNetV2 on 512 Fashion-MNIST training images (greyscale, resized, replicated
to RGB inside the model) and are scored on 250 test images:

  guide: the Keras "Transfer learning & fine-tuning" recipe: a frozen base called with
      `training=False` inside the full model, head epochs, then the top blocks unfrozen (the same
      unfreeze point as `kt.fine_tune`, BatchNorm kept frozen), recompile, fine-tune epochs. Every
      epoch runs the whole model.
  kt: `kt.fine_tune` with caching: one forward pass fills the caches at the unfreeze cut and at the
      pooling output; phase 1 trains the head on pooled features, phase 2 the top blocks on the
      cut activations.

Optimizers, learning rates (with the same warm-up and cosine schedule) and batch size are equal,
so accuracy differences come from caching alone. Each path runs in its own subprocess so its peak
RSS is its own. Uses imported ImageNet weights when `keras-transfer weights fetch` has run, random
weights otherwise (timings are the same; accuracies are then low).

    python benchmarks/fine_tune_speed.py --image-size 96
    python benchmarks/fine_tune_speed.py --image-size 96 --seeds 0 1 2  # mean +- std over seeds
    python benchmarks/fine_tune_speed.py --image-size 160 --head-epochs 5 --finetune-epochs 5
    python benchmarks/fine_tune_speed.py --mixed-precision mixed_float16 --jit-compile  # on a GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

TRAIN_IMAGES = 512
TEST_PER_CLASS = 25
BATCH_SIZE = 32
UNFREEZE_BLOCKS = 2
HEAD_LR, FINETUNE_LR = 1e-3, 1e-4


class PhaseTimer:
    """Wall time of every `fit` call (a Keras callback; made lazily so imports stay late)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_train_begin(self, logs=None):
                self._start = time.perf_counter()

            def on_train_end(self, logs=None):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def load_data(image_size: int):
    import numpy as np

    from keras_transfer import datasets

    x, y = datasets.fashion_mnist(split="train", per_class=52, seed=0, image_size=image_size)
    keep = np.random.default_rng(0).permutation(len(x))[:TRAIN_IMAGES]
    x_test, y_test = datasets.fashion_mnist(
        split="test", per_class=TEST_PER_CLASS, seed=0, image_size=image_size
    )
    return (x[keep], y[keep].astype("int32")), (x_test, y_test.astype("int32"))


def weights_for(image_size: int, alpha: float):
    from keras_transfer.weights import imported_weights_available

    try:
        available = imported_weights_available("mobilenet_v2", alpha, image_size)
    except ValueError:
        available = False
    return "imagenet" if available else None


def run_path(args) -> dict:
    import keras
    import numpy as np

    import keras_transfer as kt
    from keras_transfer import training

    keras.utils.set_random_seed(args.seed)
    (x, y), (x_test, y_test) = load_data(args.image_size)
    weights = weights_for(args.image_size, args.alpha)
    train = kt.data.from_arrays(x, y, batch_size=BATCH_SIZE, seed=args.seed)
    test = kt.data.from_arrays(x_test, y_test, batch_size=BATCH_SIZE, shuffle=False)
    model = kt.build_classifier(
        "mobilenet_v2",
        10,
        image_size=args.image_size,
        weights=weights,
        alpha=args.alpha,
        channels=1,
        dtype=args.mixed_precision,
    )
    timer = PhaseTimer()
    start = time.perf_counter()
    if args.path == "kt":
        history = kt.fine_tune(
            model,
            train,
            test,
            head_epochs=args.head_epochs,
            finetune_epochs=args.finetune_epochs,
            unfreeze=UNFREEZE_BLOCKS,
            head_learning_rate=HEAD_LR,
            finetune_learning_rate=FINETUNE_LR,
            callbacks=[timer],
            mixed_precision=args.mixed_precision,
            jit_compile=args.jit_compile or "auto",
            verbose=0,
        )
        cached = history.cached
    else:
        # The guide: the model already calls its base with training=False; freeze, fit the head.
        base = kt.find_backbone(model)
        base.trainable = False
        loss, metrics = "sparse_categorical_crossentropy", ["sparse_categorical_accuracy"]
        jit = args.jit_compile or "auto"
        model.compile(
            optimizer=keras.optimizers.Adam(HEAD_LR), loss=loss, metrics=metrics, jit_compile=jit
        )
        model.fit(
            train, validation_data=test, epochs=args.head_epochs, verbose=0, callbacks=[timer]
        )
        # Unfreeze the top blocks by hand at the same point; BatchNorm stays frozen; recompile.
        base.trainable = True
        cut = kt.unfreeze_points(base)[UNFREEZE_BLOCKS - 1]
        names = [op.name for op in base.operations]
        for i, op in enumerate(base.operations):
            if isinstance(op, keras.layers.Layer):
                frozen = i <= names.index(cut) or isinstance(op, keras.layers.BatchNormalization)
                op.trainable = not frozen
        steps = len(train)
        schedule = training.finetune_schedule(FINETUNE_LR, steps * args.finetune_epochs, steps)
        model.compile(
            optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=metrics, jit_compile=jit
        )
        total = args.head_epochs + args.finetune_epochs
        model.fit(
            train,
            validation_data=test,
            initial_epoch=args.head_epochs,
            epochs=total,
            verbose=0,
            callbacks=[timer],
        )
        cached = None
    total_time = time.perf_counter() - start
    accuracy = float(model.evaluate(test, verbose=0)[1])
    images = TRAIN_IMAGES * (args.head_epochs + args.finetune_epochs)
    return {
        "path": args.path,
        "seed": args.seed,
        "weights": weights or "random",
        "head_s": timer.times[0],
        "finetune_s": timer.times[1],
        "cache_s": total_time - sum(timer.times),
        "total_s": total_time,
        "accuracy": accuracy,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "images_per_s": images / total_time,
        "cached": cached,
        "predictions_dtype": str(np.asarray(model.predict(x_test[:2], verbose=0)).dtype),
    }


def _row(name, r):
    return (
        f"{name:<14}{r['cache_s']:>9.1f}{r['head_s']:>9.1f}{r['finetune_s']:>12.1f}"
        f"{r['total_s']:>9.1f}{r['images_per_s']:>8.0f}{r['accuracy']:>10.3f}"
        f"{r['peak_rss_mb']:>13.0f}"
    )


def _mean_std(values):
    import statistics

    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--mixed-precision", choices=["mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="Training seeds (weight init, data order, dropout); each runs both paths. "
        "With several, prints mean +- std over them.",
    )
    parser.add_argument("--path", choices=["guide", "kt"], help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)
    if args.path:
        print("RESULT " + json.dumps(run_path(args)), flush=True)
        return

    passed = list(argv if argv is not None else sys.argv[1:])
    if "--seeds" in passed:  # the children get one --seed each
        i = passed.index("--seeds") + 1
        while i < len(passed) and not passed[i].startswith("--"):
            i += 1
        passed = passed[: passed.index("--seeds")] + passed[i:]
    runs = []
    for seed in args.seeds:
        results = {}
        for path in ("guide", "kt"):
            command = [sys.executable, __file__, *passed, "--path", path, "--seed", str(seed)]
            done = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{path} (seed {seed}) failed:\n{done.stderr[-4000:]}")
            results[path] = json.loads(lines[-1][len("RESULT ") :])
        runs.append(results)
    guide = runs[0]["guide"]
    extras = ", ".join(filter(None, [args.mixed_precision, "XLA" if args.jit_compile else ""]))
    print(
        f"\nMobileNetV2 alpha={args.alpha} ({guide['weights']} weights), {args.image_size} px, "
        f"{TRAIN_IMAGES} Fashion-MNIST train images, {args.head_epochs}+{args.finetune_epochs} "
        f"epochs, batch {BATCH_SIZE}, top {UNFREEZE_BLOCKS} blocks unfrozen, seeds {args.seeds}"
        + (f", {extras}" if extras else "")
    )
    header = (
        f"{'path':<14}{'cache s':>9}{'head s':>9}{'finetune s':>12}{'total s':>9}"
        f"{'img/s':>8}{'test acc':>10}{'peak RSS MB':>13}"
    )
    print(header)
    print("-" * len(header))
    for seed, results in zip(args.seeds, runs, strict=True):
        for name, r in (("keras guide", results["guide"]), ("kt.fine_tune", results["kt"])):
            label = f"{name} s{seed}" if len(args.seeds) > 1 else name
            print(_row(label, r))
        guide, kt_ = results["guide"], results["kt"]
        head_ratio = guide["head_s"] / (kt_["head_s"] + kt_["cache_s"])
        print(
            f"  seed {seed}: speed-up guide/kt: head phase (incl. caching pass) {head_ratio:.1f}x, "
            f"fine-tune phase {guide['finetune_s'] / kt_['finetune_s']:.1f}x, whole run "
            f"{guide['total_s'] / kt_['total_s']:.1f}x; accuracy kt - guide "
            f"{100 * (kt_['accuracy'] - guide['accuracy']):+.1f} points; kt path {kt_['cached']}"
        )
    ratios = [r["guide"]["total_s"] / r["kt"]["total_s"] for r in runs]
    gaps = [100 * (r["kt"]["accuracy"] - r["guide"]["accuracy"]) for r in runs]
    print(f"over {len(runs)} seed(s), mean +- std:")
    for name, key in (("keras guide", "guide"), ("kt.fine_tune", "kt")):
        total = _mean_std([r[key]["total_s"] for r in runs])
        acc = _mean_std([r[key]["accuracy"] for r in runs])
        print(
            f"  {name:<13} total {total[0]:.1f} +- {total[1]:.1f} s, "
            f"test acc {acc[0]:.3f} +- {acc[1]:.3f}"
        )
    (ratio, ratio_std), (gap, gap_std) = _mean_std(ratios), _mean_std(gaps)
    print(
        f"  whole run speed-up {ratio:.1f}x +- {ratio_std:.1f}; "
        f"accuracy kt - guide {gap:+.1f} +- {gap_std:.1f} points"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)


if __name__ == "__main__":
    main()
