"""Model soups and WiSE-FT on few-shot Fashion-MNIST: does averaging fine-tuned weights help?

Per experiment seed, on one few-shot training subset (50 labels per class by default):

  θ₀      the linear probe: MobileNetV2 α=1.0 at 96 px with the imported ImageNet weights, the
          head trained 30 epochs at 1e-3 on the frozen backbone (`kt.fine_tune(...,
          finetune_epochs=0)`). There is no zero-shot head here (no CLIP text tower), so this is
          WiSE-FT's θ₀ and the shared start of every ingredient, as in Wortsman et al.'s LP-FT
          initialisation.
  ingredients  6 fine-tuned runs from θ₀, each the top quarter of the backbone (blocks 13-16 and
          Conv_1, BatchNorm frozen) for 30 epochs with warm-up and cosine decay
          (`kt.fine_tune(..., head_epochs=0)`), over a grid like Wortsman et al.'s
          hyperparameter sweep: peak learning rate 3e-5, 1e-4, 3e-4 × two data orders (the
          shuffling seed).
  soups   `kt.soups.uniform_soup` of all 6; `kt.soups.greedy_soup` with the candidates scored on
          a validation split (100 images per class from the training split, disjoint from the
          training subset and from the test images).
  WiSE-FT `kt.soups.interpolate(θ₀, θ₁, α)` for α in 0, 0.25, 0.5, 0.75, 1, with θ₁ the ingredient
          that scored best on the validation split.

Every accuracy is on 2,000 held-out test images (a fixed balanced subset of the official test
split) that no selection step sees. "best ingredient" is the one chosen on validation (what a
user could deploy); "best on test" is the oracle maximum, for reference.

Wortsman et al. (2022), CLIP ViT-B/32 on ImageNet, 72 ingredients: best single 80.39, uniform
soup 79.97, greedy soup 81.03. Here (README, "Evidence: L2-SP and soups"; 3 seeds): best
ingredient 0.836 ± 0.005, uniform soup 0.830 ± 0.004, greedy soup 0.836 ± 0.005 (it kept the best
model alone on two seeds of three): soups did not beat the best ingredient. WiSE-FT rises from θ₀
0.801 to the fine-tuned 0.836 with no interior optimum on average (no distribution shift here).

Run (the full table: 3 experiment seeds, about 70 minutes in one process on 2 CPU cores shared at
load average 13-24; one process per seed with --json, then --merge, runs them side by side):

    python benchmarks/soups.py
    python benchmarks/soups.py --seeds 2 --json s2.json   # ... then --merge s01.json s2.json
    python benchmarks/soups.py --seeds 0 --learning-rates 1e-4 3e-4 --orders 0 1 --test-size 500

Needs `keras-transfer weights fetch` (imported ImageNet MobileNetV2) and the Fashion-MNIST files
(`make assets`). Nothing is downloaded.
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
import tensorflow as tf  # noqa: E402

import keras_transfer as kt  # noqa: E402

IMAGE_SIZE = 96
NUM_CLASSES = 10
WISE_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def resize(x: np.ndarray) -> np.ndarray:
    return tf.image.resize(x.astype("float32"), (IMAGE_SIZE, IMAGE_SIZE)).numpy()


def load(per_class: int, val_per_class: int, test_size: int, seed: int) -> dict:
    """Training subset, a validation split disjoint from it, and the fixed test subset."""
    x_all, y_all = kt.datasets.fashion_mnist(split="train", channels=3)
    train = kt.datasets.few_shot_indices(y_all, per_class, seed=seed)
    rest = np.setdiff1d(np.arange(len(y_all)), train)
    val = rest[kt.datasets.few_shot_indices(y_all[rest], val_per_class, seed=seed + 10_000)]
    x_test, y_test = kt.datasets.fashion_mnist(
        split="test", per_class=test_size // NUM_CLASSES, seed=1234,
        image_size=IMAGE_SIZE, channels=3,
    )  # fmt: skip
    return dict(
        x=resize(x_all[train]), y=y_all[train],
        x_val=resize(x_all[val]), y_val=y_all[val],
        x_test=x_test, y_test=y_test,
    )  # fmt: skip


def accuracy(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    probs = model.predict(x, batch_size=128, verbose=0)
    return float(np.mean(np.argmax(probs, axis=-1) == y))


def classifier() -> keras.Model:
    return kt.build_classifier(
        "mobilenet_v2", NUM_CLASSES, image_size=IMAGE_SIZE, weights="imagenet"
    )


def experiment(seed: int, args) -> dict:
    data = load(args.per_class, args.val_per_class, args.test_size, seed)
    test = (data["x_test"], data["y_test"])
    log = lambda msg: print(f"seed={seed} {msg}  load {os.getloadavg()[0]:.1f}", flush=True)  # noqa: E731

    start = time.perf_counter()
    keras.utils.set_random_seed(seed)
    probe = classifier()
    kt.fine_tune(probe, (data["x"], data["y"]), head_epochs=args.head_epochs,
                 finetune_epochs=0, verbose=0)  # fmt: skip
    theta0 = probe.get_weights()
    result = {"seed": seed, "probe": accuracy(probe, *test), "ingredients": []}
    log(f"θ₀ (linear probe) test {result['probe']:.3f}  {time.perf_counter() - start:.0f} s")

    models = []
    for order in args.orders:
        for rate in args.learning_rates:
            start = time.perf_counter()
            keras.utils.set_random_seed(1000 * seed + order)  # the data order of this run
            model = classifier()
            model.set_weights(theta0)
            kt.fine_tune(model, (data["x"], data["y"]), head_epochs=0,
                         finetune_epochs=args.finetune_epochs, finetune_learning_rate=rate,
                         verbose=0)  # fmt: skip
            models.append(model)
            row = {
                "learning_rate": rate,
                "order": order,
                "val": accuracy(model, data["x_val"], data["y_val"]),
                "test": accuracy(model, *test),
                "seconds": time.perf_counter() - start,
            }
            result["ingredients"].append(row)
            log(f"ingredient lr={rate:g} order={order}: val {row['val']:.3f} "
                f"test {row['test']:.3f}  {row['seconds']:.0f} s")  # fmt: skip

    rows = result["ingredients"]
    best = max(range(len(rows)), key=lambda i: rows[i]["val"])  # first of ties
    result["best_val_index"] = best
    result["best"] = rows[best]["test"]
    result["best_on_test"] = max(r["test"] for r in rows)

    start = time.perf_counter()
    result["uniform"] = accuracy(kt.soups.uniform_soup(models), *test)
    greedy, info = kt.soups.greedy_soup(
        models, (data["x_val"], data["y_val"]), batch_size=128, return_info=True
    )
    result["greedy"] = accuracy(greedy, *test)
    result["greedy_ingredients"] = list(info.ingredients)
    result["greedy_val"] = info.soup_score
    log(f"uniform soup test {result['uniform']:.3f}; greedy soup {list(info.ingredients)} "
        f"test {result['greedy']:.3f}  {time.perf_counter() - start:.0f} s")  # fmt: skip

    result["wise"] = {}
    for alpha in WISE_ALPHAS:
        result["wise"][str(alpha)] = accuracy(kt.soups.interpolate(probe, models[best], alpha),
                                              *test)  # fmt: skip
    log("WiSE-FT " + ", ".join(f"α={a}: {v:.3f}" for a, v in result["wise"].items()))
    return result


def summary(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {std:.3f}"


def format_tables(results: list[dict]) -> str:
    labels = [f"lr {r['learning_rate']:g}, order {r['order']}" for r in results[0]["ingredients"]]
    lines = ["| model | test accuracy |", "|---|---|"]
    lines.append(f"| θ₀: linear probe | {summary([r['probe'] for r in results])} |")
    for i, label in enumerate(labels):
        accs = [r["ingredients"][i]["test"] for r in results]
        lines.append(f"| ingredient {i}: {label} | {summary(accs)} |")
    picked = ", ".join(str(r["best_val_index"]) for r in results)
    lines += [
        f"| best ingredient (on validation: {picked}) | {summary([r['best'] for r in results])} |",
        f"| best ingredient on test (oracle) | {summary([r['best_on_test'] for r in results])} |",
        f"| uniform soup (all {len(labels)}) | {summary([r['uniform'] for r in results])} |",
    ]
    kept = "; ".join(str(r["greedy_ingredients"]) for r in results)
    lines.append(f"| greedy soup (kept {kept}) | {summary([r['greedy'] for r in results])} |")
    lines += ["", "| WiSE-FT α (θ₀ → best ingredient) | test accuracy |", "|---|---|"]
    for alpha in WISE_ALPHAS:
        lines.append(f"| {alpha:g} | {summary([r['wise'][str(alpha)] for r in results])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--test-size", type=int, default=2000)
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[3e-5, 1e-4, 3e-4])
    parser.add_argument("--orders", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--head-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=30)
    parser.add_argument("--json", default=None, help="Also write the raw results here.")
    parser.add_argument(
        "--merge", nargs="+", default=None, help="Print one table from earlier --json files."
    )
    args = parser.parse_args(argv)
    if args.merge:
        results = [r for path in args.merge for r in json.load(open(path))]
    else:
        if len(args.learning_rates) * len(args.orders) < 2:
            parser.error("a soup needs at least 2 ingredients: give more --learning-rates/--orders")
        began = time.perf_counter()
        results = []
        for seed in args.seeds:
            results.append(experiment(seed, args))
            keras.backend.clear_session()
            if args.json:  # after every seed, so a cut-short run still leaves its numbers
                with open(args.json, "w") as f:
                    json.dump(results, f, indent=1)
        load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
        wall = f"wall time {time.perf_counter() - began:.0f} s; load average {load}"
    print()
    print(
        f"Fashion-MNIST, {args.per_class} labels / class, {args.test_size} test images, "
        f"MobileNetV2 {IMAGE_SIZE} px (ImageNet), seeds {[r['seed'] for r in results]}: "
        "mean ± std"
    )
    print(format_tables(results))
    if not args.merge:
        print(f"\n{wall}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
