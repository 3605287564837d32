"""Peak memory of cached against plain fine-tuning on a reshuffling array pipeline.

Each path runs in its own process (peak RSS from `resource.getrusage`): N random images at 64 px,
`tf.data.Dataset.from_tensor_slices((x, y)).shuffle(N).batch(32)`, MobileNetV2 (`weights=None`),
`kt.fine_tune(head_epochs=1, finetune_epochs=1, unfreeze=2)`. Prints both peaks, the cache size
and the bound the tests hold (cached <= plain + cache + 10%).

    python benchmarks/cache_memory.py --images 4096
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def run(cache: bool, images: int) -> dict:
    import numpy as np
    import tensorflow as tf

    import keras_transfer as kt

    x = np.random.default_rng(0).uniform(0, 255, (images, 64, 64, 3)).astype("float32")
    ds = tf.data.Dataset.from_tensor_slices((x, np.arange(images) % 10)).shuffle(images).batch(32)
    model = kt.build_classifier("mobilenet_v2", 10, image_size=64, weights=None)
    start = time.perf_counter()
    history = kt.fine_tune(
        model, ds, head_epochs=1, finetune_epochs=1, unfreeze=2, cache=cache, verbose=0
    )
    return {
        "seconds": time.perf_counter() - start,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cache_mb": sum(c["bytes"] for cs in history.cache_info.values() for c in cs) / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--worker", choices=["cached", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run(args.worker == "cached", args.images)))
        return
    results = {}
    for path in ("plain", "cached"):
        done = subprocess.run(
            [sys.executable, __file__, "--images", str(args.images), "--worker", path],
            capture_output=True,
            text=True,
            check=True,
        )
        results[path] = json.loads(done.stdout.strip().splitlines()[-1])
    bound = (results["plain"]["peak_mb"] + results["cached"]["cache_mb"]) * 1.10
    print(f"{args.images} images at 64 px, MobileNetV2 (weights=None), 1 + 1 epochs, top 2 blocks")
    print(f"{'path':8}{'seconds':>9}{'peak RSS MB':>13}{'cache MB':>10}")
    for path, r in results.items():
        print(f"{path:8}{r['seconds']:9.1f}{r['peak_mb']:13.0f}{r['cache_mb']:10.1f}")
    print(
        f"bound (plain + cache + 10%): {bound:.0f} MB; cached within it: "
        f"{results['cached']['peak_mb'] <= bound}"
    )


if __name__ == "__main__":
    main()
