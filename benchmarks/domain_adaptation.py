"""Unsupervised domain adaptation, Fashion-MNIST -> Fashion-MNIST-M: does adapting help?

Source: labelled Fashion-MNIST (grey repeated as RGB). Target: `kt.datasets.fashion_mnist_m`, its
training split unlabelled (other examples than the source's), its test split labelled for scoring
only. One small CNN (`kt.build_small_cnn`, 28 px) per method and seed, every method of a seed from
the same initial weights and for the same number of epochs (an epoch: one pass over the 10 x
`--per-class` images of a domain), side by side:

  source only        trained on the source (Adam 1e-3);
  importance-weighted  the same with `kt.importance_weights` (a domain classifier on the
                     source-only model's pooled features) as per-sample weights;
  DANN               `kt.adapt(method="dann")` with Ganin et al.'s recipe (JMLR 2016, §5.2.2):
                     SGD with momentum 0.9, μ0 = 0.01 annealed as μ0 / (1 + 10 p)^0.75, λ rising
                     as 2 / (1 + exp(-10 p)) - 1 to 1, a domain head of one 100-unit layer (their
                     digits setting); `--dann-recipe adam` trains it like the others instead;
  Deep CORAL, MMD    `kt.adapt(method="coral" | "mmd")`, Adam 1e-3, trade-offs 10 and 1, on the
                     pooled features;
  Deep CORAL (conv)  the same on the last conv block's map (`features_layer="relu_2"`, 7 x 7 x
                     128 = 6,272 features; the loss goes through the batch Gram matrices, so no
                     6,272² covariance is formed), trade-off 1000 (the loss is divided by 4 d²);
  oracle             trained on the target's training labels (the ceiling, not a method).

Every trained model is scored twice on the target test split: as trained, and after AdaBN (Li et
al., 2016: `kt.adaptation.recalibrate_batchnorm` re-estimates each BatchNorm layer's moving
statistics on the target's unlabelled training images; no gradient step, no labels). "source only
+ AdaBN" is the AdaBN method itself; "MMD + AdaBN" etc. combine the two. The share of the gap
closed is always read against the plain source-only and plain oracle means.

No setting was chosen on the target test split: DANN's are the paper's, MMD's trade-off is DAN's
and TLlib's default 1, Deep CORAL's 10 is this benchmark's earlier default (its paper sets λ so
that the two losses end up comparable, and ‖C_S − C_T‖²_F / 4d² is small), and AdaBN has no
setting. The conv-features CORAL's layer and trade-off were chosen on seed 0 among layers
relu_1 / max_pool_1 / relu_2 / pooling and trade-offs 300-10,000 by accuracy on a labelled
*validation* split of the target (1,000 Fashion-MNIST-M test-split images disjoint from the 1,000
scored; printed as "val + AdaBN"), a common protocol in domain-adaptation papers, though not a
label-free one. The target test labels are only ever used to score.

For each: target-test accuracy (mean ± std over seeds) without and with AdaBN, source-test
accuracy (as trained), and the proxy A-distance, MMD² and CORAL distance between the two test
splits in that model's own `pooling` features as trained ("before" is the source-only row).

Run (defaults: 300 images per class, 3 seeds, 10 epochs; 10-20 minutes on 2 shared CPU cores):

    python benchmarks/domain_adaptation.py
    python benchmarks/domain_adaptation.py --per-class 100 --seeds 0 --methods source_only dann
    # one process per seed, then one table:
    for s in 0 1 2; do python benchmarks/domain_adaptation.py --seeds $s --json da$s.json & done
    wait; python benchmarks/domain_adaptation.py --merge da0.json da1.json da2.json

Needs the Fashion-MNIST files (`make assets`) and scikit-learn (its sample photos make the target
and it fits the domain classifiers). Nothing is downloaded.
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

METHODS = {
    "source_only": "source only",
    "importance_weighted": "importance-weighted source",
    "dann": "DANN",
    "coral": "Deep CORAL",
    "mmd": "MMD",
    "coral_conv": "Deep CORAL, conv features",
    "oracle": "train on target (oracle)",
}
ADAPT = {"dann", "coral", "mmd", "coral_conv"}
FEATURES_LAYER = {"coral_conv": "relu_2"}  # None: the pooled features
MEASURES = ("proxy_a_distance", "mmd", "coral")


def load(per_class: int, test_per_class: int, seed: int) -> dict[str, np.ndarray]:
    """The benchmark's arrays for one seed: source and target training examples differ."""
    x_s, y_s = kt.datasets.fashion_mnist(split="train", per_class=per_class, seed=seed, channels=3)
    x_t, y_t = kt.datasets.fashion_mnist_m("train", per_class=per_class, seed=seed + 1000)
    # Fixed test subsets (the same garments in both domains) so seeds vary training only.
    xs_test, ys_test = kt.datasets.fashion_mnist(
        split="test", per_class=test_per_class, seed=1234, channels=3
    )
    xt_all, yt_all = kt.datasets.fashion_mnist_m("test", seed=1234)
    scored = kt.datasets.few_shot_indices(yt_all, test_per_class, 1234)
    # A labelled target validation split for choosing settings, disjoint from the scored images.
    rest = np.setdiff1d(np.arange(len(yt_all)), scored)
    held = rest[kt.datasets.few_shot_indices(yt_all[rest], test_per_class, 4321)]
    return dict(
        x_s=x_s, y_s=y_s, x_t=x_t, y_t=y_t,
        xs_test=xs_test, ys_test=ys_test, xt_test=xt_all[scored], yt_test=yt_all[scored],
        xt_val=xt_all[held], yt_val=yt_all[held],
    )  # fmt: skip


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.argmax(model.predict(x, batch_size=256, verbose=0), -1) == y))


def fresh_cnn(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)  # every method of a seed starts from the same weights
    return kt.build_small_cnn(10, image_size=28, channels=3)


def train_plain(x, y, args, seed: int, sample_weight=None) -> keras.Model:
    model = fresh_cnn(seed)
    model.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(
        x, y, sample_weight=sample_weight, batch_size=args.batch_size, epochs=args.epochs, verbose=0
    )
    return model


def run_seed(args, seed: int) -> dict[str, dict]:
    d = load(args.per_class, args.test_per_class, seed)
    results, source_only = {}, None
    for method in args.methods:
        start = time.perf_counter()
        info = {}
        if method == "source_only" or (method == "importance_weighted" and source_only is None):
            source_only = train_plain(d["x_s"], d["y_s"], args, seed)
        if method == "source_only":
            model = source_only
        elif method == "importance_weighted":
            weights = kt.importance_weights(d["x_s"], d["x_t"], model=source_only, seed=seed)
            info = dict(weight_min=float(weights.min()), weight_max=float(weights.max()))
            model = train_plain(d["x_s"], d["y_s"], args, seed, sample_weight=weights)
        elif method == "oracle":
            model = train_plain(d["x_t"], d["y_t"], args, seed)
        else:
            model = fresh_cnn(seed)
            options = dict(learning_rate=args.learning_rate)
            if method == "dann" and args.dann_recipe == "ganin":
                options = dict(
                    learning_rate=0.01,
                    optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                    callbacks=[kt.adaptation.AnnealedLearningRate()],
                    domain_units=(100,),
                )
            kt.adapt(
                model,
                (d["x_s"], d["y_s"]),
                d["x_t"],
                method="coral" if method == "coral_conv" else method,
                features_layer=FEATURES_LAYER.get(method),
                epochs=args.epochs,
                batch_size=args.batch_size,
                trade_off=args.trade_off[method],
                seed=seed,
                verbose=0,
                **options,
            )
        seconds = time.perf_counter() - start
        found = kt.domain_discrepancy(
            d["xs_test"], d["xt_test"], model=model, n_boot=args.n_boot, seed=seed
        )
        results[method] = dict(
            target_accuracy=accuracy(model, d["xt_test"], d["yt_test"]),
            source_accuracy=accuracy(model, d["xs_test"], d["ys_test"]),
            seconds=seconds,
            **{name: float(found[name].value) for name in MEASURES},
            **info,
        )
        if method == "source_only" and "importance_weighted" in args.methods:
            model = keras.models.clone_model(model)  # the weights are still needed unchanged
            model.set_weights(source_only.get_weights())
        # AdaBN last: it specialises the model to the target (the rows above are as trained).
        kt.adaptation.recalibrate_batchnorm(model, d["x_t"])
        results[method]["adabn_target_accuracy"] = accuracy(model, d["xt_test"], d["yt_test"])
        results[method]["adabn_validation_accuracy"] = accuracy(model, d["xt_val"], d["yt_val"])
        r = results[method]
        print(
            f"  seed {seed} {METHODS[method]:<27} target {r['target_accuracy']:.3f} "
            f"(+AdaBN {r['adabn_target_accuracy']:.3f}, val "
            f"{r['adabn_validation_accuracy']:.3f}) source {r['source_accuracy']:.3f} "
            f"PAD {r['proxy_a_distance']:.2f} MMD² {r['mmd']:.4f} ({seconds:.0f} s)",
            flush=True,
        )
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(runs: dict[int, dict[str, dict]], methods: list[str]) -> list[str]:
    seeds = sorted(runs)
    low = statistics.fmean(runs[s]["source_only"]["target_accuracy"] for s in seeds)
    high = (
        statistics.fmean(runs[s]["oracle"]["target_accuracy"] for s in seeds)
        if "oracle" in methods
        else None
    )
    header = (
        f"{'method':<28}{'target acc':>15}{'gap':>6}{'+ AdaBN':>16}{'gap':>6}{'source acc':>12}"
        f"{'val + AdaBN':>13}{'PAD':>7}{'MMD²':>9}{'CORAL':>10}{'s/run':>7}"
    )
    lines = [header, "-" * len(header)]

    def gap(value: float) -> str:
        known = high is not None and high > low
        return f"{(value - low) / (high - low):>6.0%}" if known else " " * 6

    for method in methods:
        target, spread = mean_std([runs[s][method]["target_accuracy"] for s in seeds])
        adabn, adabn_spread = mean_std([runs[s][method]["adabn_target_accuracy"] for s in seeds])
        keys = runs[seeds[0]][method]
        row = {k: statistics.fmean(runs[s][method][k] for s in seeds) for k in keys}
        lines.append(
            f"{METHODS[method]:<28}{target:>8.3f} ± {spread:.3f}{gap(target)}"
            f"{adabn:>9.3f} ± {adabn_spread:.3f}{gap(adabn)}{row['source_accuracy']:>12.3f}"
            f"{row.get('adabn_validation_accuracy', float('nan')):>13.3f}"
            f"{row['proxy_a_distance']:>7.2f}{row['mmd']:>9.4f}{row['coral']:>10.2e}"
            f"{row['seconds']:>7.0f}"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=300, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=100, help="test images per class")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--n-boot", type=int, default=5, help="bootstrap replicates")
    parser.add_argument(
        "--methods", nargs="+", choices=list(METHODS), default=list(METHODS), metavar="METHOD"
    )
    parser.add_argument(
        "--dann-recipe",
        choices=("ganin", "adam"),
        default="ganin",
        help="DANN's optimizer: Ganin et al.'s annealed SGD (default) or Adam like the others",
    )
    parser.add_argument("--dann-trade-off", type=float, default=1.0)
    parser.add_argument("--coral-trade-off", type=float, default=10.0)
    parser.add_argument("--mmd-trade-off", type=float, default=1.0)
    parser.add_argument("--coral-conv-trade-off", type=float, default=1000.0)
    parser.add_argument("--json", help="also write the per-seed results to this file")
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: print the table of runs saved with --json (e.g. one process per "
        "seed, run side by side)",
    )
    args = parser.parse_args(argv)
    if args.merge:
        runs, methods, seconds = {}, None, 0.0
        for path in args.merge:
            with open(path) as f:
                saved = json.load(f)
            runs.update({int(seed): r for seed, r in saved["runs"].items()})
            methods = methods or saved["args"]["methods"]
            seconds = max(seconds, saved.get("seconds", 0.0))
        print("\n".join(table(runs, methods)))
        print(
            f"\nseeds {sorted(runs)} from {len(args.merge)} file(s); the longest took "
            f"{seconds:.0f} s"
        )
        return 0
    args.methods = [m for m in METHODS if m in args.methods]  # the table's order
    if "source_only" not in args.methods:
        args.methods.insert(0, "source_only")  # the baseline every row is read against
    args.trade_off = {m: getattr(args, f"{m}_trade_off") for m in ADAPT}
    print(
        f"Fashion-MNIST -> Fashion-MNIST-M, small CNN at 28 px: {args.per_class} images per "
        f"class per domain, {args.test_per_class} test per class, {args.epochs} epochs, "
        f"seeds {args.seeds}, trade-offs {args.trade_off}, DANN recipe {args.dann_recipe}; "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    start = time.perf_counter()
    runs = {seed: run_seed(args, seed) for seed in args.seeds}
    print()
    print("\n".join(table(runs, args.methods)))
    print(
        f"\ntarget accuracy: mean ± std over {len(args.seeds)} seed(s) on "
        f"{10 * args.test_per_class} Fashion-MNIST-M test images; PAD/MMD²/CORAL: between the "
        f"test splits in each model's pooled features (as trained); gap: share of the source "
        f"only -> oracle gap closed (plain means); + AdaBN: after kt.adaptation."
        f"recalibrate_batchnorm on the unlabelled target training images; "
        f"{time.perf_counter() - start:.0f} s in all, load {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            saved = {"args": vars(args), "runs": runs, "seconds": time.perf_counter() - start}
            json.dump(saved, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
