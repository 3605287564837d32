"""Knowledge distillation on few-shot Fashion-MNIST: does a teacher help a small student?

Teacher: MobileNetV2 alpha 1.0 with the imported ImageNet weights, fine-tuned with `kt.fine_tune`
(its defaults) on the labelled images (one teacher per seed, on that seed's images). Student,
from random initialisation, trained three ways with the same optimizer (Adam), learning rate,
batch size and number of epochs:

  (a) on the labels alone (`compile` + `fit`, sparse cross-entropy);
  (b) distilled from the teacher, `kt.distill(..., temperature=4, alpha=0.1)` on the same images;
  (c) distilled with alpha=0 (the teacher's soft targets only, no labels at all) on the labelled
      images plus `--unlabelled` extra training images per class, for about the same number of
      update steps as (a) and (b) (fewer passes over a larger set).

The student: `--student small_cnn` (the default) is `kt.build_small_cnn` (3 conv stages,
32-64-128, 95k parameters) taking the teacher's 96 px input and downsampling it to
Fashion-MNIST's own 28 px inside the model. `--student mobilenet_v2` is MobileNetV2 alpha 0.35
(423k parameters) at 96 px, the issue's student; there are no alpha 0.35 ImageNet weights
offline, so it starts from random weights too. The builder keeps a backbone's BatchNorm in
inference mode (right for a pretrained backbone, fatal from scratch: nothing normalises), so its
BatchNorm layers are made trainable with momentum 0.9 (MobileNetV2's 0.999 does not settle in a
few hundred steps: ../shared/notes/offline-assets.md). With that it does learn (labels only,
30 epochs: 0.655 on seed 0; a 3-epoch probe on 20 images per class had scored chance, 0.100),
at 4 to 7 minutes per run on 2 shared CPU cores against 1 to 2 for the small CNN; the README
has both.

Run (the README table: 3 seeds, 26 minutes on 2 shared CPU cores at load average 13-24):

    python benchmarks/distillation.py --json distillation.json
    python benchmarks/distillation.py --student mobilenet_v2 --variants a b --seeds 0 --json s0.json
    python benchmarks/distillation.py --merge s0.json s1.json s2.json   # one table from several
    python benchmarks/distillation.py --seeds 0 --per-class 20 --epochs 3   # a quick look

Needs the imported ImageNet MobileNetV2 (`keras-transfer weights fetch`) and the Fashion-MNIST
files (`make assets`). Nothing is downloaded.
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
VARIANTS = {
    "a": "student, labels only",
    "b": "student distilled (T=4, alpha=0.1)",
    "c": "distilled, alpha=0, + unlabelled images",
}


def split_train(per_class: int, unlabelled: int, seed: int, image_size: int):
    """Disjoint labelled and unlabelled subsets of the training split, balanced per class."""
    x_all, y_all = datasets.fashion_mnist(split="train")
    rng = np.random.default_rng(seed)
    labelled, extra = [], []
    for c in range(NUM_CLASSES):
        idx = rng.permutation(np.flatnonzero(y_all == c))
        labelled.append(idx[:per_class])
        extra.append(idx[per_class : per_class + unlabelled])
    labelled, extra = np.sort(np.concatenate(labelled)), np.sort(np.concatenate(extra))
    return resize(x_all[labelled], image_size), y_all[labelled], resize(x_all[extra], image_size)


def resize(x: np.ndarray, image_size: int) -> np.ndarray:
    import tensorflow as tf

    if len(x) == 0:
        return np.zeros((0, image_size, image_size, 1), "float32")
    x = x[..., None] if x.ndim == 3 else x
    return tf.image.resize(x.astype("float32"), (image_size, image_size)).numpy()


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    probs = model.predict(x, batch_size=128, verbose=0)
    return float(np.mean(np.argmax(probs, axis=-1) == y))


def build_student(kind: str, image_size: int) -> keras.Model:
    if kind == "small_cnn":
        # Takes the teacher's 96 px input (the Distiller feeds both the same batches) and
        # downsamples it to Fashion-MNIST's own 28 px inside the model (Resizing runs in
        # training and inference alike), then the builder's default flip + shift augmentation.
        layers = [keras.layers.Resizing(28, 28), *kt.builders.small_cnn_augmentation()]
        return kt.build_small_cnn(
            NUM_CLASSES, image_size=image_size, channels=1, augmentation=layers
        )
    model = kt.build_classifier(
        "mobilenet_v2", NUM_CLASSES, image_size=image_size, channels=1, weights=None, alpha=0.35
    )
    # From scratch the whole backbone trains, BatchNorm included (see the module docstring).
    for layer in kt.find_backbone(model).layers:
        layer.trainable = True
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    return model


def train_student(teacher, student, x, y, x_extra, variant, args):
    if variant == "a":  # labels alone: a plain compile + fit with the same optimizer settings
        student.compile(
            optimizer=keras.optimizers.Adam(args.lr),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        student.fit(x, y, batch_size=32, epochs=args.epochs, shuffle=True, verbose=0)
        return
    common = dict(temperature=args.temperature, learning_rate=args.lr, batch_size=32, verbose=0)
    if variant == "b":
        kt.distill(teacher, student, (x, y), epochs=args.epochs, alpha=args.alpha, **common)
    else:  # the teacher alone (alpha=0) on the labelled images plus the unlabelled ones,
        # for about as many update steps as (a) and (b) take (fewer passes over more images)
        images = np.concatenate([x, x_extra])
        epochs = max(1, round(args.epochs * len(x) / len(images)))
        kt.distill(teacher, student, images, epochs=epochs, alpha=0.0, **common)


def format_table(rows: list[dict], variants: list[str]) -> str:
    lines = [
        "| model | parameters | test accuracy (mean ± std) | seconds per run |",
        "|---|---|---|---|",
    ]

    def cell(selected):
        accs = [r["accuracy"] for r in selected]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        secs = statistics.mean(r["seconds"] for r in selected)
        return f"{statistics.mean(accs):.3f} ± {std:.3f}", f"{secs:.0f}"

    teachers = [r for r in rows if r["variant"] == "teacher"]
    if teachers:
        acc, secs = cell(teachers)
        lines.append(
            f"| teacher: MobileNetV2 1.0, ImageNet, kt.fine_tune | {teachers[0]['params']:,} "
            f"| {acc} | {secs} |"
        )
    for v in variants:
        selected = [r for r in rows if r["variant"] == v]
        if selected:
            acc, secs = cell(selected)
            lines.append(f"| ({v}) {VARIANTS[v]} | {selected[0]['params']:,} | {acc} | {secs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=50, help="Labelled images per class.")
    parser.add_argument("--unlabelled", type=int, default=150, help="Extra per class for (c).")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--epochs", type=int, default=30, help="Student epochs, every variant.")
    parser.add_argument("--lr", type=float, default=1e-3, help="Student learning rate (Adam).")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--student", choices=["mobilenet_v2", "small_cnn"], default="small_cnn")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=sorted(VARIANTS))
    parser.add_argument(
        "--fine-tune-args", default="{}", help="JSON overrides for the teacher's kt.fine_tune."
    )
    parser.add_argument("--json", default=None, help="Also write the raw results here.")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Print one table from the --json files of earlier runs (e.g. one per seed).",
    )
    args = parser.parse_args(argv)
    overrides = json.loads(args.fine_tune_args)
    if args.merge:
        rows = [row for path in args.merge for row in json.load(open(path))]
        seeds = sorted({row["seed"] for row in rows})
        variants = sorted({row["variant"] for row in rows} - {"teacher"})
        students = sorted({row["student"] for row in rows if row["variant"] != "teacher"})
        print(f"student {', '.join(students)}, seeds {seeds}: mean ± std test accuracy")
        print(format_table(rows, variants))
        return 0

    x_test, y_test = datasets.fashion_mnist(
        split="test", per_class=args.test_size // NUM_CLASSES, seed=1234
    )
    x_test = resize(x_test, args.image_size)
    rows: list[dict] = []
    wall = time.perf_counter()

    def record(seed, variant, model, acc, seconds):
        rows.append(
            {
                "seed": seed,
                "variant": variant,
                "accuracy": acc,
                "seconds": seconds,
                "params": int(model.count_params()),
                "student": args.student,
                "per_class": args.per_class,
                "epochs": args.epochs,
            }
        )
        print(
            f"seed={seed} {variant:<8} accuracy {acc:.3f}  {seconds:6.1f} s  "
            f"load {os.getloadavg()[0]:.2f}",
            flush=True,
        )
        if args.json:  # after every run, so a cut-short run still leaves its numbers
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    for seed in args.seeds:
        unlabelled = args.unlabelled if "c" in args.variants else 0
        x, y, x_extra = split_train(args.per_class, unlabelled, seed, args.image_size)
        keras.utils.set_random_seed(seed)
        start = time.perf_counter()
        teacher = kt.build_classifier(
            "mobilenet_v2", NUM_CLASSES, image_size=args.image_size, channels=1, weights="imagenet"
        )
        kt.fine_tune(teacher, (x, y), verbose=0, **overrides)
        record(
            seed, "teacher", teacher, accuracy(teacher, x_test, y_test), time.perf_counter() - start
        )
        for variant in args.variants:
            keras.utils.set_random_seed(seed)  # the same student initialisation for every variant
            student = build_student(args.student, args.image_size)
            start = time.perf_counter()
            train_student(teacher, student, x, y, x_extra, variant, args)
            seconds = time.perf_counter() - start
            record(seed, variant, student, accuracy(student, x_test, y_test), seconds)
    print()
    print(
        f"Fashion-MNIST, {args.per_class} labelled / class (+{args.unlabelled} unlabelled / class "
        f"for (c)), {args.test_size} test images, {args.image_size} px, student {args.student} "
        f"(random init), {args.epochs} epochs Adam {args.lr:g}, seeds {args.seeds}; "
        f"total {time.perf_counter() - wall:.0f} s, load average {os.getloadavg()[0]:.2f}"
    )
    print(format_table(rows, args.variants))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
