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
  limit: what caching cannot do without, each stage as plain TensorFlow/Keras: one traced pass of
      the frozen prefix over the training and validation images (`tf.function`, batch dimension
      open), the head fitted on the pooled features, the rest of the backbone on the cut
      activations (`tf.data.Dataset.from_tensor_slices(...).shuffle().batch()` + `fit`, same
      optimizers, schedule and validation). `x limit` is each path's total over the limit's, per
      repeat; kt's fixed costs (data checks, the order-keeping lookup, phase bookkeeping) are
      what lies between the two.

Optimizers, learning rates (with the same warm-up and cosine schedule) and batch size are equal,
so accuracy differences come from caching alone. Each path runs in its own subprocess so its peak
RSS is its own. Uses imported ImageNet weights when `keras-transfer weights fetch` has run, random
weights otherwise (timings are the same; accuracies are then low).

    python benchmarks/fine_tune_speed.py --image-size 96
    python benchmarks/fine_tune_speed.py --image-size 96 --seeds 0 1 2  # mean +- std over seeds
    python benchmarks/fine_tune_speed.py --image-size 160 --head-epochs 5 --finetune-epochs 5
    python benchmarks/fine_tune_speed.py --mixed-precision mixed_float16 --jit-compile  # on a GPU
    # kt against the limit, interleaved (limit, kt, limit, kt, ...), medians of 3 repeats:
    python benchmarks/fine_tune_speed.py --unfreeze block_14_expand --paths limit kt --repeats 3
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
UNFREEZE_BLOCKS = 2  # the default of --unfreeze
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


def unfreeze_spec(text: str):
    """`--unfreeze`: a number of top blocks, or the name of the first layer that trains."""
    return int(text) if text.isdigit() else text


def run_limit(model, x, y, x_test, y_test, args, timer):
    """The limit: one prefix pass, then the head and the suffix fitted as plain tf.data + fit."""
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_transfer import caching, freezing, heads, phases, training

    unfreeze = phases.unfreeze_kwargs(unfreeze_spec(args.unfreeze))
    cut_index = freezing.plan_unfreeze(model, **unfreeze)
    freezing.freeze_backbone(model)
    # The same phase models kt trains (Functional models over the full model's layers).
    split = caching.split_model(model, cut_index)
    suffix, head = split.phase_models
    spec = tf.TensorSpec((None, *x.shape[1:]), tf.float32)
    forward = tf.function(lambda images: split.extractor(images, training=False), autograph=False)
    forward = forward.get_concrete_function(spec)

    def prefix_pass(images):
        batches = tf.data.Dataset.from_tensor_slices(images).batch(BATCH_SIZE)
        outputs = [[t.numpy() for t in forward(b)] for b in batches]
        return [np.concatenate(parts) for parts in zip(*outputs, strict=True)]

    (cut, pooled), (cut_test, pooled_test) = prefix_pass(x), prefix_pass(x_test)

    def batches(features, labels, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((features, labels))
        if shuffle:
            ds = ds.shuffle(len(labels), seed=args.seed, reshuffle_each_iteration=True)
        return ds.batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)

    loss, metrics = heads.default_loss_and_metrics(model)
    head.compile(optimizer=keras.optimizers.Adam(HEAD_LR), loss=loss, metrics=metrics)
    head.fit(
        batches(pooled, y, True),
        validation_data=batches(pooled_test, y_test, False),
        epochs=args.head_epochs,
        verbose=0,
        callbacks=[timer],
    )
    freezing.unfreeze(model, **unfreeze)
    steps = -(-len(y) // BATCH_SIZE)
    schedule = training.finetune_schedule(FINETUNE_LR, steps * args.finetune_epochs, steps)
    _, metrics = heads.default_loss_and_metrics(model)
    suffix.compile(optimizer=keras.optimizers.Adam(schedule), loss=loss, metrics=metrics)
    suffix.fit(
        batches(cut, y, True),
        validation_data=batches(cut_test, y_test, False),
        initial_epoch=args.head_epochs,
        epochs=args.head_epochs + args.finetune_epochs,
        verbose=0,
        callbacks=[timer],
    )


def run_path(args) -> dict:
    import keras
    import numpy as np

    import keras_transfer as kt
    from keras_transfer import freezing, phases, training

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
    start, start_cpu = time.perf_counter(), time.process_time()
    if args.path == "kt":
        history = kt.fine_tune(
            model,
            train,
            test,
            head_epochs=args.head_epochs,
            finetune_epochs=args.finetune_epochs,
            unfreeze=unfreeze_spec(args.unfreeze),
            head_learning_rate=HEAD_LR,
            finetune_learning_rate=FINETUNE_LR,
            callbacks=[timer],
            mixed_precision=args.mixed_precision,
            jit_compile=args.jit_compile or "auto",
            verbose=0,
        )
        cached = history.cached
    elif args.path == "limit":
        run_limit(model, x, y, x_test, y_test, args, timer)
        cached = "limit"
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
        cut = freezing.plan_unfreeze(model, **phases.unfreeze_kwargs(unfreeze_spec(args.unfreeze)))
        for i, op in enumerate(base.operations):
            if isinstance(op, keras.layers.Layer):
                frozen = i <= cut or isinstance(op, keras.layers.BatchNormalization)
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
    cpu_time = time.process_time() - start_cpu
    load = os.getloadavg()
    if args.path == "limit":  # the limit trained phase models; compile the full model to score it
        loss, metrics = kt.heads.default_loss_and_metrics(model)
        model.compile(loss=loss, metrics=metrics)
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
        "cpu_s": cpu_time,  # all threads; steadier than wall time on a busy machine
        "accuracy": accuracy,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "images_per_s": images / total_time,
        "cached": cached,
        "predictions_dtype": str(np.asarray(model.predict(x_test[:2], verbose=0)).dtype),
        "loadavg": load,
    }


PATHS = ("guide", "limit", "kt")
NAMES = {"guide": "keras guide", "limit": "limit", "kt": "kt.fine_tune"}
PARENT_ONLY = ("--seeds", "--paths", "--repeats", "--json")  # options the children do not get


def _row(name, r, limit=None):
    # `x limit`: total time over the limit's in the same repeat; `cpu s`: CPU time of all threads.
    versus = f"{r['total_s'] / limit['total_s']:>9.2f}x" if limit else f"{'':>10}"
    return (
        f"{name:<20}{r['cache_s']:>9.1f}{r['head_s']:>9.1f}{r['finetune_s']:>12.1f}"
        f"{r['total_s']:>9.1f}{r['images_per_s']:>8.0f}{r['accuracy']:>10.3f}"
        f"{r['peak_rss_mb']:>13.0f}{versus}{r['cpu_s']:>8.1f}{r['loadavg'][0]:>8.1f}"
    )


def _mean_std(values):
    import statistics

    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _median_run(repeats: list[dict]) -> dict:
    """The run with the median total time (the lower middle one for an even count)."""
    ordered = sorted(repeats, key=lambda r: r["total_s"])
    return ordered[(len(ordered) - 1) // 2]


def _child_argv(passed: list[str]) -> list[str]:
    out, skipping = [], False
    for arg in passed:
        if arg.startswith("--"):
            skipping = arg.split("=")[0] in PARENT_ONLY
            if skipping:
                continue
        elif skipping:
            continue
        out.append(arg)
    return out


def main(argv=None):
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument(
        "--unfreeze",
        default=str(UNFREEZE_BLOCKS),
        help="What trains in phase 2: a number of top blocks, or the first layer that trains "
        "(e.g. block_14_expand).",
    )
    parser.add_argument("--mixed-precision", choices=["mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--jit-compile", action="store_true")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="Training seeds (weight init, data order, dropout); each runs every path. "
        "With several, prints mean +- std over them.",
    )
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="Runs of each path per seed, interleaved (limit, kt, limit, kt, ...); summaries "
        "use each path's median run.",
    )
    parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="Also write the results to this file.")
    args = parser.parse_args(argv)
    if args.path:
        print("RESULT " + json.dumps(run_path(args)), flush=True)
        return

    passed = _child_argv(list(argv if argv is not None else sys.argv[1:]))
    paths = list(dict.fromkeys(args.paths))
    runs = []  # per seed: {path: [one result per repeat]}
    for seed in args.seeds:
        results = {path: [] for path in paths}
        for _ in range(args.repeats):
            for path in paths:
                command = [sys.executable, __file__, *passed, "--path", path, "--seed", str(seed)]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
                if done.returncode or not lines:
                    sys.exit(f"{path} (seed {seed}) failed:\n{done.stderr[-4000:]}")
                results[path].append(json.loads(lines[-1][len("RESULT ") :]))
        runs.append(results)
    first = runs[0][paths[0]][0]
    extras = ", ".join(filter(None, [args.mixed_precision, "XLA" if args.jit_compile else ""]))
    trains = f"top {args.unfreeze} blocks" if args.unfreeze.isdigit() else f"from {args.unfreeze}"
    print(
        f"\nMobileNetV2 alpha={args.alpha} ({first['weights']} weights), {args.image_size} px, "
        f"{TRAIN_IMAGES} Fashion-MNIST train images, {args.head_epochs}+{args.finetune_epochs} "
        f"epochs, batch {BATCH_SIZE}, {trains} unfrozen, seeds {args.seeds}, "
        f"{args.repeats} repeat(s)" + (f", {extras}" if extras else "")
    )
    header = (
        f"{'path':<20}{'cache s':>9}{'head s':>9}{'finetune s':>12}{'total s':>9}"
        f"{'img/s':>8}{'test acc':>10}{'peak RSS MB':>13}{'x limit':>10}{'cpu s':>8}{'load 1m':>8}"
    )
    print(header)
    print("-" * len(header))
    medians = []  # per seed: {path: median run}
    for seed, results in zip(args.seeds, runs, strict=True):
        for repeat in range(args.repeats):
            limit = results["limit"][repeat] if "limit" in results else None
            for path in paths:
                label = NAMES[path]
                if len(args.seeds) > 1:
                    label += f" s{seed}"
                if args.repeats > 1:
                    label += f" r{repeat + 1}"
                print(_row(label, results[path][repeat], limit))
        median = {path: _median_run(results[path]) for path in paths}
        medians.append(median)
        if args.repeats > 1:
            limit = median.get("limit")
            for path in paths:
                label = f"{NAMES[path]} median" + (f" s{seed}" if len(args.seeds) > 1 else "")
                print(_row(label, median[path], limit))
        if "guide" in median and "kt" in median:
            guide, kt_ = median["guide"], median["kt"]
            head_ratio = guide["head_s"] / (kt_["head_s"] + kt_["cache_s"])
            print(
                f"  seed {seed}: speed-up guide/kt: head phase (incl. caching pass) "
                f"{head_ratio:.1f}x, fine-tune phase {guide['finetune_s'] / kt_['finetune_s']:.1f}x"
                f", whole run {guide['total_s'] / kt_['total_s']:.1f}x; accuracy kt - guide "
                f"{100 * (kt_['accuracy'] - guide['accuracy']):+.1f} points; kt path "
                f"{kt_['cached']}"
            )
        if "limit" in results and "kt" in results:
            paired = [
                k["total_s"] / lim["total_s"]
                for k, lim in zip(results["kt"], results["limit"], strict=True)
            ]
            cpu = [
                k["cpu_s"] / lim["cpu_s"]
                for k, lim in zip(results["kt"], results["limit"], strict=True)
            ]
            medians_ratio = median["kt"]["total_s"] / median["limit"]["total_s"]
            loads = [r["loadavg"][0] for rs in results.values() for r in rs]
            print(
                f"  seed {seed}: fine_tune / limit per repeat "
                + ", ".join(f"{r:.2f}x" for r in paired)
                + f"; median of the paired ratios {statistics.median(paired):.2f}x, ratio of "
                f"the medians {medians_ratio:.2f}x; CPU time median {statistics.median(cpu):.2f}x; "
                f"1-min load average {min(loads):.1f} to "
                f"{max(loads):.1f} on {os.cpu_count()} CPUs"
            )
    if len(medians) > 1 or args.repeats == 1:
        print(f"over {len(medians)} seed(s), mean +- std of each seed's median run:")
        for path in paths:
            total = _mean_std([m[path]["total_s"] for m in medians])
            acc = _mean_std([m[path]["accuracy"] for m in medians])
            print(
                f"  {NAMES[path]:<13} total {total[0]:.1f} +- {total[1]:.1f} s, "
                f"test acc {acc[0]:.3f} +- {acc[1]:.3f}"
            )
        if "guide" in paths and "kt" in paths:
            ratios = [m["guide"]["total_s"] / m["kt"]["total_s"] for m in medians]
            gaps = [100 * (m["kt"]["accuracy"] - m["guide"]["accuracy"]) for m in medians]
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
