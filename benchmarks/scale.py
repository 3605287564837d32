"""Fine-tuning at scale: Fashion-MNIST train subsets up to all 60,000 images, cached and plain.

For each size N (a fixed, seeded subset of the 60,000 training images), from arrays and from a
folder of PNG files (written once, to `--folder-root`): MobileNetV2 with the imported ImageNet
weights at 96 px (`channels=1`: greyscale replicated to RGB inside the model), `kt.fine_tune` with
3 + 3 epochs and the top 2 blocks unfrozen, batch 32, no validation data. Each run is its own
process, so its peak RSS (`ru_maxrss`, read when `fine_tune` returns, before scoring) is its own.
Scored on 2,000 held-out test images.

The 28 px images are resized to 96 px in the input pipeline, per batch, so no N x 96 x 96 copy of
the data exists: from arrays, `kt.data.from_arrays(x28, y).map(resize)`; from the folder,
`kt.data.from_folder(..., image_size=96, cache=False)` decodes and resizes as it reads (its default
`cache=True` would keep every decoded 96 px image in memory: 2.2 GB at 60,000).

Rows: `plain` (`cache=False`, only up to `--plain-max` images: it runs the whole model every
epoch), `cached` (activations in memory), and `spilled` (at `--spill-size` only: a
`cache_budget_bytes` of `--spill-budget`, so the activations stream to disk). The bound is the
plain peak + the in-memory cache (`history.cache_info`) + 10%.

    python benchmarks/scale.py --sizes 1000 4000 --plain-max 4000 --json docs/results/scale.json
    python benchmarks/scale.py --sizes 60000 --paths arrays --plain-max 0
    python benchmarks/scale.py --throughput --sizes 60000   # input pipeline + corrupt-file scan
    python benchmarks/scale.py --workers 2 --sizes 4000     # 2 workers on loopback, cached arrays
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

IMAGE_SIZE = 96
BATCH_SIZE = 32
TEST_IMAGES = 2000
SEED = 0


def _rss_mb() -> float:
    """Current resident set size of this process, in MB (from /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _subset(n: int):
    """The first `n` images of a seeded permutation of the training set (28 px, uint8)."""
    import numpy as np

    from keras_transfer import datasets

    x, y = datasets.fashion_mnist(split="train")
    order = np.random.default_rng(SEED).permutation(len(x))[:n]
    return x[order], y[order]


def _test_set():
    import numpy as np

    from keras_transfer import datasets

    x, y = datasets.fashion_mnist(split="test")
    order = np.random.default_rng(SEED + 1).permutation(len(x))[:TEST_IMAGES]
    return x[order], y[order]


def _resize(images, *rest):
    import tensorflow as tf

    return (tf.image.resize(images, (IMAGE_SIZE, IMAGE_SIZE)), *rest)


def write_folder(root: pathlib.Path, n: int) -> pathlib.Path:
    """`root/<n>/<class>/<i>.png` for the first `n` images; the full set once, subsets as links."""
    import tensorflow as tf

    full = root / "60000"
    if not (full / "done").exists():
        x, y = _subset(60000)
        for c in range(10):
            (full / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i, (image, label) in enumerate(zip(x, y, strict=True)):
            data = tf.io.encode_png(image).numpy()
            (full / f"class_{label}" / f"{i:05d}.png").write_bytes(data)
        (full / "done").write_text(str(len(x)))
    folder = root / str(n)
    if n != 60000 and not (folder / "done").exists():
        _, y = _subset(60000)
        for c in range(10):
            (folder / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"class_{y[i]}/{i:05d}.png"
            if not (folder / name).exists():
                os.link(full / name, folder / name)
        (folder / "done").write_text(str(n))
    return folder  # `done` sits beside the class folders, which the scan ignores


def _pipeline(source: str, n: int, folder_root: str):
    import keras_transfer as kt

    if source == "arrays":
        x, y = _subset(n)
        ds = kt.data.from_arrays(x, y, batch_size=BATCH_SIZE, seed=SEED)
        return ds.map(_resize), len(x)
    folder = write_folder(pathlib.Path(folder_root), n)
    ds = kt.data.from_folder(
        folder, image_size=IMAGE_SIZE, channels=1, batch_size=BATCH_SIZE, seed=SEED, cache=False
    )
    return ds, n


def run(source: str, path: str, n: int, folder_root: str, spill_budget: int) -> dict:
    """One fine-tuning run in this process; returns its figures."""
    import keras
    import numpy as np

    import keras_transfer as kt

    # Under TF_CONFIG (see `--workers`), one worker of a MultiWorkerMirroredStrategy cluster,
    # which must exist before any other TensorFlow op runs.
    strategy = kt.make_strategy("multi_worker" if os.environ.get("TF_CONFIG") else "default")
    keras.utils.set_random_seed(SEED)
    ds, n = _pipeline(source, n, folder_root)
    with strategy.scope():
        model = kt.build_classifier("mobilenet_v2", 10, image_size=IMAGE_SIZE, channels=1)
    rss_before = _rss_mb()
    options = {
        "plain": {"cache": False},
        "cached": {"cache": True},
        "spilled": {"cache": True, "cache_budget_bytes": spill_budget},
    }[path]
    start = time.perf_counter()
    history = kt.fine_tune(
        model,
        ds,
        head_epochs=3,
        finetune_epochs=3,
        unfreeze=2,
        strategy=strategy,
        verbose=0,
        **options,
    )
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # before scoring
    x_test, y_test = _test_set()
    test = kt.data.from_arrays(x_test, y_test, batch_size=100, shuffle=False).map(_resize)
    if strategy.num_replicas_in_sync > 1:  # `predict` would shard the test set over the workers
        probabilities = np.concatenate([model(x, training=False).numpy() for x, _ in test])
    else:
        probabilities = model.predict(test, verbose=0)
    caches = [c for cs in getattr(history, "cache_info", {}).values() for c in cs]
    return {
        "source": source,
        "path": path,
        "images": n,
        "seconds": seconds,
        "ms_per_image": 1000 * seconds / n,
        "peak_mb": peak_mb,
        "rss_before_mb": rss_before,
        "cache_mb": sum(c["bytes"] for c in caches if c["path"] is None) / 2**20,
        "spilled_mb": sum(c["bytes"] for c in caches if c["path"] is not None) / 2**20,
        "cached": history.cached,
        "accuracy": float(np.mean(probabilities.argmax(-1) == y_test)),
        "loadavg": os.getloadavg(),
        "workers": strategy.num_replicas_in_sync,
        "worker": kt.distribute.worker_id(strategy),
    }


def _child(args, source: str, path: str, n: int) -> dict:
    command = [sys.executable, __file__, "--worker", source, path, str(n)]
    command += ["--folder-root", args.folder_root, "--spill-budget", str(args.spill_budget)]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"source": source, "path": path, "images": n, "error": done.stderr[-1500:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result


def multi_worker(args, n: int, workers: int) -> list[dict]:
    """The cached arrays run as `workers` processes of one MultiWorkerMirroredStrategy cluster on
    loopback (TF_CONFIG with one localhost port each); returns each worker's figures."""
    import socket

    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    cluster = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    command = [sys.executable, __file__, "--worker", "arrays", "cached", str(n)]
    command += ["--folder-root", args.folder_root]
    processes = []
    start = time.perf_counter()
    for index in range(workers):
        config = {"cluster": {"worker": cluster}, "task": {"type": "worker", "index": index}}
        env = dict(os.environ, TF_CONFIG=json.dumps(config))
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )
    results = []
    for process in processes:
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            results.append({"images": n, "error": stderr.decode()[-1500:]})
            continue
        results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        results[-1]["process_seconds"] = time.perf_counter() - start
    return results


def throughput(folder_root: str, n: int, rounds: int = 9) -> dict:
    """Images/s and CPU time per image of `kt.data.from_folder` against bare `tf.data` pipelines
    that list, read and decode the same files, and the time of the up-front corrupt-file scan, on
    the `n`-image PNG folder.

    The bare pipelines: `decode` (list_files, read, decode_png: uint8 at the files' 28 px),
    `decode + resize 96` (with the cast and per-image resize that `from_folder` does), and
    `decode + resize 96 + labels` (the same, fed `(path, label)` pairs as `from_folder` is: the
    labels are part of its output; carrying them measured 0-9% of the CPU per image).

    The pipelines take turns, one full pass each per round, in an order that rotates and reverses
    every round; each reports its median over `rounds`, and the ratios are medians of the
    per-round ratios (neighbouring passes share the load). Wall time on a shared machine moves
    by 2-4x between passes; the CPU time the process spends per image (`time.process_time`, all
    threads) is the work done, and moves far less.
    """
    import statistics

    import numpy as np
    import tensorflow as tf

    import keras_transfer as kt
    from keras_transfer import data

    folder = write_folder(pathlib.Path(folder_root), n)
    load_start = os.getloadavg()
    start = time.perf_counter()
    paths, labels, _ = data.scan_image_folder(folder)
    scan = time.perf_counter() - start
    start = time.perf_counter()
    data.undecodable(paths)
    check = time.perf_counter() - start
    sample = paths[:: max(1, len(paths) // 1000)]
    start = time.perf_counter()
    for path in sample:  # the scan before it went parallel: one eager decode per file
        tf.io.decode_image(tf.io.read_file(path), expand_animations=False)
    serial = (time.perf_counter() - start) / len(sample) * len(paths)
    size = (IMAGE_SIZE, IMAGE_SIZE)

    def decode(path):
        return tf.io.decode_png(tf.io.read_file(path), channels=1)

    def bare(resize=False, with_labels=False):
        def load(path, *label):
            image = decode(path)
            image = tf.image.resize(tf.cast(image, tf.float32), size) if resize else image
            return (image, *label)

        if with_labels:
            files = tf.data.Dataset.from_tensor_slices((paths, np.array(labels, "int32")))
        else:
            files = tf.data.Dataset.list_files(str(folder / "*" / "*.png"), shuffle=False)
        ds = files.map(load, num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)

    def from_folder(size):
        return kt.data.from_folder(folder, image_size=size, channels=1, cache=False, shuffle=False)

    pipelines = {
        "bare decode": bare(),
        "bare decode + resize 96": bare(resize=True),
        "bare decode + resize 96 + labels": bare(resize=True, with_labels=True),
        "from_folder 28 px": from_folder(28),
        "from_folder 96 px": from_folder(IMAGE_SIZE),
    }
    rates = {name: [] for name in pipelines}
    cpu_us = {name: [] for name in pipelines}
    for ds in pipelines.values():
        for _ in ds.take(1):  # warm each pipeline before timing
            pass
    names = list(pipelines)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order[::-1] if r % 2 else order:
            start, cpu, count = time.perf_counter(), time.process_time(), 0
            for batch in pipelines[name]:
                count += len(batch[0] if isinstance(batch, tuple) else batch)
            rates[name].append(count / (time.perf_counter() - start))
            cpu_us[name].append(1e6 * (time.process_time() - cpu) / count)

    def ratio(name, base):  # >1: from_folder faster (wall) or costlier (CPU)
        walls = [a / b for a, b in zip(rates[name], rates[base], strict=True)]
        cpus = [a / b for a, b in zip(cpu_us[name], cpu_us[base], strict=True)]
        return {"images_per_s": statistics.median(walls), "cpu_per_image": statistics.median(cpus)}

    medians = {name: statistics.median(r) for name, r in rates.items()}
    return {
        "images": len(paths),
        "rounds": rounds,
        "scan_seconds": scan,
        "decode_check_seconds": check,
        "serial_check_seconds_estimated": serial,
        "from_folder_96px_epoch_seconds": len(paths) / medians["from_folder 96 px"],
        "images_per_s_median": medians,
        "cpu_us_per_image_median": {k: statistics.median(v) for k, v in cpu_us.items()},
        "ratios_median": {
            "from_folder 28 px / bare decode": ratio("from_folder 28 px", "bare decode"),
            "from_folder 96 px / bare decode + resize 96": ratio(
                "from_folder 96 px", "bare decode + resize 96"
            ),
            "from_folder 96 px / bare decode + resize 96 + labels": ratio(
                "from_folder 96 px", "bare decode + resize 96 + labels"
            ),
        },
        "images_per_s_rounds": {k: np.round(v).tolist() for k, v in rates.items()},
        "cpu_us_per_image_rounds": {k: np.round(v, 1).tolist() for k, v in cpu_us.items()},
        "loadavg_start": load_start,
        "loadavg": os.getloadavg(),
    }


def table(results: list[dict]) -> str:
    lines = [
        "| N | source | path | time | ms/image | peak RSS | in-memory cache | bound | within "
        "| test acc | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain = {(r["source"], r["images"]): r for r in results if r.get("path") == "plain"}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['images']:,} | {r['source']} | {r['path']} | failed |" + " |" * 7)
            continue
        base = plain.get((r["source"], r["images"]))
        bound = within = ""
        if base is not None and r["path"] != "plain" and "peak_mb" in base:
            limit = (base["peak_mb"] + r["cache_mb"]) * 1.10
            bound = f"{limit:,.0f} MB"
            ratio = r["peak_mb"] / base["peak_mb"]
            within = f"{'yes' if r['peak_mb'] <= limit else 'NO'} ({ratio:.2f}x plain)"
        cache = f"{r['cache_mb']:.1f} MB" + (
            f" (+{r['spilled_mb']:.1f} MB on disk)" if r["spilled_mb"] else ""
        )
        load = "/".join(f"{v:.1f}" for v in r["loadavg"])
        lines.append(
            f"| {r['images']:,} | {r['source']} | {r['path']} | {r['seconds']:.1f} s "
            f"| {r['ms_per_image']:.2f} | {r['peak_mb']:,.0f} MB | {cache} | {bound} | {within} "
            f"| {r['accuracy']:.3f} | {load} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000, 60000])
    parser.add_argument("--paths", nargs="+", default=["arrays", "folder"])
    parser.add_argument("--plain-max", type=int, default=4000, help="largest N run plainly")
    parser.add_argument("--spill-size", type=int, default=4000, help="N of the spilled run")
    parser.add_argument("--spill-budget", type=int, default=1 << 20, help="bytes kept in memory")
    parser.add_argument(
        "--folder-root", default=os.path.join(tempfile.gettempdir(), "kt_scale_fashion_png")
    )
    parser.add_argument("--throughput", action="store_true", help="input pipeline figures only")
    parser.add_argument("--rounds", type=int, default=9, help="passes per pipeline (--throughput)")
    parser.add_argument(
        "--workers", type=int, default=0, help="run the cached arrays case as this many workers"
    )
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        source, path, n = args.worker
        print(json.dumps(run(source, path, int(n), args.folder_root, args.spill_budget)))
        return
    if args.workers:
        results = [r for n in args.sizes for r in multi_worker(args, n, args.workers)]
        for r in results:
            print(json.dumps(r))
    elif args.throughput:
        results = [throughput(args.folder_root, n, args.rounds) for n in args.sizes]
        for r in results:
            print(json.dumps(r))
    else:
        results = []
        for n in args.sizes:
            for source in args.paths:
                paths = (["plain"] if n <= args.plain_max else []) + ["cached"]
                paths += ["spilled"] if n == args.spill_size else []
                for path in paths:
                    results.append(_child(args, source, path, n))
                    print(json.dumps(results[-1]), flush=True)
        print(
            f"\nFashion-MNIST at {IMAGE_SIZE} px, MobileNetV2 (ImageNet), 3 + 3 epochs, top 2 "
            f"blocks, batch {BATCH_SIZE}; {TEST_IMAGES} test images; 2 shared CPU cores\n"
        )
        print(table(results))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
