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


# --- export / verify / serve ----------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------

_COMMANDS: list = []  # (name, add_fn) pairs, filled in as sub-commands are implemented.


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
