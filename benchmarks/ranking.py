"""Ranking backbones before training: do LogME, LEEP and NCE predict fine-tuned accuracy?

Target task: Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), `--per-class`
labelled training images each, 96 px greyscale; accuracy on held-out test images of those
classes. Candidates (7):

  1-4. the imported ImageNet MobileNetV2 (alpha 1.0) at four depths: its pooled output
       (`out_relu`) and cut at `block_13_expand_relu`, `block_6_expand_relu`,
       `block_3_expand_relu` (`(model, layer)` candidates of `kt.rank_backbones`);
  5-6. random initialisations (weights=None) of two families, MobileNetV2 and MobileNetV3-Small;
  7.   MobileNetV2 ImageNet already fine-tuned (`kt.fine_tune`) on the *other* task, Fashion-MNIST
       classes 0-4 (T-shirt, trouser, pullover, dress, coat), on disjoint images.

Scores come from `kt.rank_backbones` (one inference pass per candidate). LogME scores pooled
features, so every candidate gets one. LEEP and NCE score a source model's own predictions:
  - the full ImageNet model: its real 1000-way ImageNet classifier (the imported top layer,
    copied into the `logits` layer of a `kt.build_classifier(..., 1000)` model);
  - the classes-0-4 model: its own 5-way head;
  - the random models: their own (random) 1000-way heads, as built;
  - the three cut models have no source classifier at that depth: LEEP and NCE are not defined
    for them and are left out (no head is made up). Their Kendall tau is over the 4 others;
    LogME's tau is reported over all 7 and over the same 4.

Ground truth, the same recipe for every candidate: a new Dropout(0.2) + Dense head on the
pooled features at the candidate's depth; (1) a linear probe: the head alone, Adam 1e-3,
`--head-epochs` on the frozen features; then (2) the whole candidate below the head unfrozen
(BatchNorm kept in inference mode), Adam `--finetune-lr`, `--finetune-epochs`, batch 32. The
ground truth is the test accuracy after (2); Kendall tau against the accuracy after (1) is
printed too.

Run (the README table: 191 s on 2 CPU cores at load average ~2, 23 minutes at load average 22):

    python benchmarks/ranking.py --json ranking.json
    python benchmarks/ranking.py --report ranking.json   # the tables again, from the file
    python benchmarks/ranking.py --per-class 20 --test-size 250 --finetune-epochs 1  # quick look

Needs the imported ImageNet MobileNetV2 (`keras-transfer weights fetch`: the top layer too) and
the Fashion-MNIST files (`make assets`). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_transfer as kt  # noqa: E402
from keras_transfer import datasets  # noqa: E402

SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
CUTS = ("block_13_expand_relu", "block_6_expand_relu", "block_3_expand_relu")


def subset(split, classes, per_class, seed, image_size):
    """Balanced images of `classes` (relabelled 0..len-1), resized to `image_size`."""
    import tensorflow as tf

    x_all, y_all = datasets.fashion_mnist(split=split)
    rng = np.random.default_rng(seed)
    idx = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(y_all == c))[:per_class] for c in classes])
    )
    x = tf.image.resize(x_all[idx].astype("float32"), (image_size, image_size)).numpy()
    y = np.searchsorted(np.array(classes), y_all[idx])
    return x, y


def imagenet_source_model(image_size: int) -> keras.Model:
    """MobileNetV2 ImageNet with its real 1000-way classifier, in the library's head contract."""
    model = kt.build_classifier(
        "mobilenet_v2", 1000, image_size=image_size, channels=1, weights="imagenet"
    )
    top = keras.applications.MobileNetV2(
        include_top=True, weights="imagenet", input_shape=(image_size, image_size, 3)
    )
    model.get_layer("logits").set_weights(top.get_layer("predictions").get_weights())
    # The convolutional weights must be the very ones the top layer was trained on.
    ours = kt.find_backbone(model).get_weights()
    theirs = top.get_weights()[: len(ours)]
    if not all(np.array_equal(a, b) for a, b in zip(ours, theirs, strict=True)):
        raise RuntimeError("The ImageNet top and no-top weight files do not match.")
    return model


def check_imagenet_head(model: keras.Model) -> str:
    """Top-1 ImageNet class of scikit-learn's real photos (a sanity check of the imported head)."""
    import tensorflow as tf
    from sklearn.datasets import load_sample_image

    size = model.input_shape[1]
    out = []
    for name in ("china.jpg", "flower.jpg"):
        grey = tf.image.rgb_to_grayscale(load_sample_image(name).astype("float32"))
        image = tf.image.resize(grey, (size, size)).numpy()[None]
        probs = model.predict(image, verbose=0)[0]
        out.append(f"{name}: class {int(np.argmax(probs))} p={probs.max():.2f}")
    return "; ".join(out)


def fine_tuned_source(x, y, image_size, seed) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = kt.build_classifier(
        "mobilenet_v2", len(SOURCE_CLASSES), image_size=image_size, channels=1, weights="imagenet"
    )
    kt.fine_tune(model, (x, y), verbose=0)
    return model


def ground_truth(model, at, x, y, x_test, y_test, args, seed) -> tuple[float, float]:
    """(probe accuracy, fine-tuned accuracy) of a new head on `model` at `at` (see docstring)."""
    keras.utils.set_random_seed(seed)
    body = kt.features.extractor(model, at)  # called with training=False: BatchNorm inference
    inputs = keras.Input(model.input_shape[1:], name="images")
    features = body(inputs)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pooling")(features)
    head_in = keras.Input(features.shape[1:])
    h = keras.layers.Dropout(0.2)(head_in)
    h = keras.layers.Dense(len(TARGET_CLASSES), name="logits")(h)
    head = keras.Model(head_in, keras.layers.Activation("softmax", name="predictions")(h))
    full = keras.Model(inputs, head(features))
    feature_model = keras.Model(inputs, features)
    # (1) linear probe: the head on frozen features, computed once (no augmentation anywhere).
    f_train = feature_model.predict(x, batch_size=64, verbose=0)
    head.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    head.fit(f_train, y, batch_size=32, epochs=args.head_epochs, shuffle=True, verbose=0)
    probe = float(np.mean(np.argmax(full.predict(x_test, batch_size=128, verbose=0), -1) == y_test))
    # (2) everything below the head trains too, BatchNorm frozen.
    body.trainable = True
    kt.freezing.freeze_batchnorm(body)
    full.compile(keras.optimizers.Adam(args.finetune_lr), "sparse_categorical_crossentropy")
    if args.finetune_epochs:
        full.fit(x, y, batch_size=32, epochs=args.finetune_epochs, shuffle=True, verbose=0)
    tuned = float(np.mean(np.argmax(full.predict(x_test, batch_size=128, verbose=0), -1) == y_test))
    return probe, tuned


def kendall(scores: dict, truth: dict, names: list[str]) -> tuple[float, float]:
    """(Kendall tau-b, weighted tau) between a score and the ground truth over `names`."""
    from scipy.stats import kendalltau, weightedtau

    a = [scores[n] for n in names]
    b = [truth[n] for n in names]
    return float(kendalltau(a, b).statistic), float(weightedtau(a, b).statistic)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=50, help="Target labels per class.")
    parser.add_argument("--source-per-class", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=1000, help="Target test images.")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="Also write the raw results here.")
    parser.add_argument("--report", default=None, help="Print the tables of an earlier --json.")
    args = parser.parse_args(argv)
    if args.report:
        with open(args.report) as f:
            print(report(json.load(f)))
        return 0
    size, seed = args.image_size, args.seed
    wall = time.perf_counter()

    x, y = subset("train", TARGET_CLASSES, args.per_class, seed, size)
    x_test, y_test = subset(
        "test", TARGET_CLASSES, args.test_size // len(TARGET_CLASSES), 1234, size
    )
    x_src, y_src = subset("train", SOURCE_CLASSES, args.source_per_class, seed + 1, size)

    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    imagenet = imagenet_source_model(size)
    print("ImageNet head sanity check:", check_imagenet_head(imagenet), flush=True)
    random_v2 = kt.build_classifier("mobilenet_v2", 1000, image_size=size, channels=1, weights=None)
    random_v3 = kt.build_classifier(
        "mobilenet_v3_small", 1000, image_size=size, channels=1, weights=None
    )
    fmnist04 = fine_tuned_source(x_src, y_src, size, seed)
    prepare_seconds = time.perf_counter() - start
    print(f"candidates built, source task fine-tuned: {prepare_seconds:.0f} s", flush=True)

    names = [
        "MobileNetV2 ImageNet, pooled (out_relu)",
        *[f"MobileNetV2 ImageNet, cut at {c}" for c in CUTS],
        "MobileNetV2 random init",
        "MobileNetV3-Small random init",
        "MobileNetV2 ImageNet fine-tuned on classes 0-4",
    ]
    feature_candidates = [imagenet, *[(imagenet, c) for c in CUTS], random_v2, random_v3, fmnist04]
    head_candidates = {0: imagenet, 4: random_v2, 5: random_v3, 6: fmnist04}

    scores: dict[str, dict[str, float]] = {m: {} for m in ("logme", "leep", "nce")}
    score_seconds = {}
    for method in ("logme", "leep", "nce"):
        if method == "logme":
            index, candidates = list(range(len(names))), feature_candidates
        else:
            index, candidates = list(head_candidates), list(head_candidates.values())
        start = time.perf_counter()
        ranked = kt.rank_backbones((x, y), candidates, method=method)
        score_seconds[method] = time.perf_counter() - start
        for candidate, score in ranked:
            i = index[next(j for j, c in enumerate(candidates) if c is candidate)]
            scores[method][names[i]] = score
        print(f"{method}: {score_seconds[method]:.1f} s", flush=True)

    probe, truth, fit_seconds = {}, {}, {}
    for name, candidate in zip(names, feature_candidates, strict=True):
        model, at = candidate if isinstance(candidate, tuple) else (candidate, "pooling")
        saved = model.get_weights()  # the cut candidates share the ImageNet model's weights
        start = time.perf_counter()
        probe[name], truth[name] = ground_truth(model, at, x, y, x_test, y_test, args, seed)
        fit_seconds[name] = time.perf_counter() - start
        model.set_weights(saved)
        print(
            f"{name:<48} probe {probe[name]:.3f}  fine-tuned {truth[name]:.3f}  "
            f"{fit_seconds[name]:.0f} s  load {os.getloadavg()[0]:.2f}",
            flush=True,
        )

    results = {
        "args": vars(args),
        "scores": scores,
        "probe": probe,
        "truth": truth,
        "score_seconds": score_seconds,
        "fit_seconds": fit_seconds,
        "prepare_seconds": prepare_seconds,
        "total_seconds": time.perf_counter() - wall,
        "load_average": os.getloadavg()[0],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print()
    print(report(results))
    return 0


def report(results: dict) -> str:
    """The markdown tables and timings of one run (also from its --json file)."""
    args, scores, probe, truth = (results[k] for k in ("args", "scores", "probe", "truth"))
    score_seconds, fit_seconds = results["score_seconds"], results["fit_seconds"]
    names = list(truth)
    head_names = [n for n in names if n in scores["leep"]]
    out = [
        f"Fashion-MNIST classes 5-9, {args['per_class']} labelled / class, "
        f"{args['test_size']} test images, {args['image_size']} px; ground truth: probe "
        f"{args['head_epochs']} epochs, then the whole candidate {args['finetune_epochs']} epochs "
        f"at {args['finetune_lr']:g}; seed {args['seed']}",
        "",
        "| candidate | LogME | LEEP | NCE | probe acc. | fine-tuned acc. (ground truth) |",
        "|---|---|---|---|---|---|",
    ]
    for name in sorted(names, key=lambda n: -truth[n]):
        cells = [f"{scores['logme'][name]:.3f}"]
        for m in ("leep", "nce"):
            cells.append(f"{scores[m][name]:.3f}" if name in scores[m] else "n/a (no source head)")
        out.append(
            f"| {name} | " + " | ".join(cells) + f" | {probe[name]:.3f} | {truth[name]:.3f} |"
        )
    out += [
        "",
        "| score | candidates | Kendall τ (fine-tuned) | weighted τ (fine-tuned) "
        "| Kendall τ (probe) | scoring time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for method, over in (
        ("logme", names),
        ("logme", head_names),
        ("leep", head_names),
        ("nce", head_names),
    ):
        tau, wtau = kendall(scores[method], truth, over)
        tau_probe, _ = kendall(scores[method], probe, over)
        out.append(
            f"| {method} | {len(over)} | {tau:.2f} | {wtau:.2f} | {tau_probe:.2f} "
            f"| {score_seconds[method]:.1f} |"
        )
    total_fit = sum(fit_seconds.values())
    total_score = sum(score_seconds.values())
    tail = (
        f"Scoring all candidates (LogME + LEEP + NCE): {total_score:.0f} s; fine-tuning all "
        f"{len(names)} for the ground truth: {total_fit:.0f} s ({total_fit / total_score:.0f}x); "
        f"LogME alone {score_seconds['logme']:.0f} s ({total_fit / score_seconds['logme']:.0f}x). "
        f"Preparing the candidates (incl. the classes-0-4 fine-tune): "
        f"{results['prepare_seconds']:.0f} s."
    )
    if "total_seconds" in results:
        tail += (
            f" Total {results['total_seconds']:.0f} s, load average {results['load_average']:.2f}."
        )
    return "\n".join([*out, "", tail])


if __name__ == "__main__":
    raise SystemExit(main())
