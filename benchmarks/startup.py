"""Start-up time of the `keras-transfer` command line: `--help` and every `SUB --help`.

Runs each command in a fresh subprocess the way the console script does (`from keras_transfer.cli
import main`), takes the median wall time of `--repeats` runs, and reports whether the run imported
TensorFlow and how many lines it printed on stderr (TensorFlow's CUDA/CPU-feature log lines land
there). `--root` measures another checkout, e.g. a `git worktree` of an older commit.

Usage:
    python benchmarks/startup.py
    python benchmarks/startup.py --root /tmp/old_checkout --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Runs `main` as the console script does, then reports on stderr whether TensorFlow got imported.
_CHILD = """
import sys
from keras_transfer.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as exit:
    code = exit.code
sys.stderr.write("\\n__startup__ " + str("tensorflow" in sys.modules) + "\\n")
sys.exit(code or 0)
"""

# Lists every sub-command path (e.g. ["weights", "fetch"]) from the parser the CLI builds.
_LIST_COMMANDS = """
import argparse, json
from keras_transfer.cli import build_parser

def walk(parser, prefix):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + [name]
                yield from walk(sub, prefix + [name])

print(json.dumps(list(walk(build_parser(), []))))
"""


def _env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("KERAS_BACKEND", "tensorflow")
    # Left unset on purpose: TF_CPP_MIN_LOG_LEVEL hides TensorFlow's log lines, which we count.
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def measure(root: Path, argv: list[str], repeats: int) -> dict:
    """Median wall time of `keras-transfer ARGV` over `repeats` fresh processes."""
    times, tf_imported, stderr_lines = [], False, 0
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, *argv],
            env=_env(root),
            cwd=root,  # `-c` puts the working folder first on sys.path
            capture_output=True,
            text=True,
            check=False,
        )
        times.append(time.perf_counter() - start)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        tf_imported = tf_imported or "__startup__ True" in lines
        stderr_lines = max(stderr_lines, sum(not line.startswith("__startup__") for line in lines))
        if result.returncode != 0:
            raise RuntimeError(f"keras-transfer {' '.join(argv)} exited {result.returncode}")
    return {
        "command": "keras-transfer " + " ".join(argv),
        "median_s": round(statistics.median(times), 3),
        "tensorflow_imported": tf_imported,
        "stderr_lines": stderr_lines,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[1],
        help="Checkout to measure (default: this one).",
    )
    parser.add_argument("--repeats", type=int, default=3, help="Runs per command (median).")
    parser.add_argument("--json", action="store_true", help="Print the rows as JSON.")
    args = parser.parse_args(argv)
    listed = subprocess.run(
        [sys.executable, "-c", _LIST_COMMANDS],
        env=_env(args.root),
        cwd=args.root,
        capture_output=True,
        text=True,
        check=True,
    )
    commands = [[]] + json.loads(listed.stdout.strip().splitlines()[-1])
    rows = [measure(args.root, [*command, "--help"], args.repeats) for command in commands]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(row["command"]) for row in rows)
    print(f"{args.root} (median of {args.repeats})")
    print(f"{'command':<{width}}  seconds  TensorFlow imported  stderr lines")
    for row in rows:
        print(
            f"{row['command']:<{width}}  {row['median_s']:7.2f}  "
            f"{'yes' if row['tensorflow_imported'] else 'no':<19}  {row['stderr_lines']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
