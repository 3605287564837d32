"""Export and clean-process verify time for MobileNetV2 at 224 px (random weights).

Run: `KERAS_BACKEND=tensorflow .venv/bin/python benchmarks/export_time.py`
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def main() -> None:
    from keras_transfer.builders import build_classifier
    from keras_transfer.export import export_for_serving, verify_export

    model = build_classifier("mobilenet_v2", 5, image_size=224, weights=None)
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        path = export_for_serving(model, Path(work) / "mobilenet_v2", labels=list("abcde"))
        exported = time.perf_counter() - start
        start = time.perf_counter()
        report = verify_export(path, model)
        verified = time.perf_counter() - start
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
    print(f"export (SavedModel + .keras + warm-up): {exported:.1f} s, {size:.1f} MiB")
    print(f"verify (clean process, {len(report['cases'])} cases): {verified:.1f} s")


if __name__ == "__main__":
    main()
