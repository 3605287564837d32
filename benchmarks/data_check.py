"""What checking a user's own data costs, against one plain training epoch.

`kt.fit_phases` (and so `kt.fine_tune`) checks labels and pixels against the head
(`kt.datacheck`). On the cached path the check rides along the caching pass (per-batch statistics
of tensors already in memory); on the plain path every batch is checked in the input pipeline as
it is read. This prints, for the same `tf.data` pipeline (N random images, reshuffled, batches of
32) and MobileNetV2 (`weights=None`), median seconds:

  plain epoch         one `fit` epoch of the head phase on the full model
  mapped epoch        the same through an identity `map(num_parallel_calls=AUTOTUNE)`: the
                      pipeline stage the check adds, without the check (it overlaps input and
                      compute, so it alone can make an epoch faster than a bare pipeline)
  checked epoch       the same epoch through `kt.datacheck.validating` (the plain path's cost;
                      compare with the mapped epoch)
  batch stats         the per-batch statistics the cached path adds to its caching pass
  full check pass     `kt.datacheck.check_dataset`, one separate pass (used only to explain an
                      error; on a reshuffling array pipeline it serializes the arrays)

    python benchmarks/data_check.py --images 512 --image-size 96
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    import keras_transfer as kt
    from keras_transfer import datacheck

    rng = np.random.default_rng(0)
    size = args.image_size
    x = rng.uniform(0, 255, (args.images, size, size, 3)).astype("float32")
    y = (np.arange(args.images) % 10).astype("int64")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(args.images, seed=0).batch(32)
    model = kt.build_classifier("mobilenet_v2", 10, image_size=size, weights=None)
    head = kt.head_of(model)
    kt.freeze_backbone(model)
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(ds.take(2), epochs=1, verbose=0)  # trace and warm up

    def timed(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def timed_once(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def batch_stats_only():
        stats = datacheck.DataStats()
        for images, labels in ds:
            stats.update(datacheck.batch_stats(images, labels))

    checked_ds = datacheck.validating(head, ds, "train_data")
    mapped_ds = ds.map(lambda *e: e, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    model.fit(checked_ds.take(2), epochs=1, verbose=0)
    model.fit(mapped_ds.take(2), epochs=1, verbose=0)
    epochs, mapped, checked = [], [], []
    for _ in range(args.repeats):  # interleaved, so load changes hit all alike
        epochs.append(timed_once(lambda: model.fit(ds, epochs=1, verbose=0)))
        mapped.append(timed_once(lambda: model.fit(mapped_ds, epochs=1, verbose=0)))
        checked.append(timed_once(lambda: model.fit(checked_ds, epochs=1, verbose=0)))
    epoch, mapped = statistics.median(epochs), statistics.median(mapped)
    checked = statistics.median(checked)
    check = timed(lambda: datacheck.check_dataset(head, ds))
    stats = timed(batch_stats_only)
    print(f"{args.images} images at {size} px, MobileNetV2 (weights=None), batch 32, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'':16}{'seconds':>9}{'of a plain epoch':>18}")
    rows = (
        ("plain epoch", epoch),
        ("mapped epoch", mapped),
        ("checked epoch", checked),
        ("batch stats", stats),
        ("full check pass", check),
    )
    for name, value in rows:
        print(f"{name:16}{value:9.3f}{100 * value / epoch:17.2f}%")


if __name__ == "__main__":
    main()
