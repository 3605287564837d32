"""Runs a small resumable `kt.fine_tune` for tests/test_resume.py (killed and restarted there).

Usage: python tests/resume_worker.py CHECKPOINT_DIR OUTPUT_NPZ [SLEEP_SECONDS] [MODE]

Prints `STEP <phase> <iterations>` after every optimizer step (flushed), so the parent can kill
the process at a chosen step of a chosen phase, and writes the final weights and the number of
optimizer steps applied by this process to OUTPUT_NPZ when training ends.

MODE `two` (default) is `kt.fine_tune`'s head + finetune phases on the default strategy; MODE
`three-mirrored` is `kt.fit_phases` with three phases (head, top 2 blocks, top 4 blocks) under
`MirroredStrategy` over 2 logical CPUs.
"""

import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_transfer as kt  # noqa: E402

HEAD_EPOCHS, FINETUNE_EPOCHS, EXAMPLES, BATCH = 2, 2, 40, 8  # 5 steps an epoch, 20 in all
THREE_PHASES = (("head", None), ("top2", 2), ("top4", 4))


class Progress(keras.callbacks.Callback):
    def __init__(self, sleep: float, phase: str | None = None):
        super().__init__()
        self.sleep = sleep
        self.phase = phase
        self.applied = 0

    def on_train_batch_end(self, batch, logs=None):
        self.applied += 1
        phase = self.phase or (
            "head" if self.model.get_layer("mobilenet_v2").trainable is False else "finetune"
        )
        print(f"STEP {phase} {int(np.asarray(self.model.optimizer.iterations))}", flush=True)
        time.sleep(self.sleep)


def three_phases_mirrored(checkpoint_dir: str, sleep: float, x, y):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    progress = [Progress(sleep, name) for name, _ in THREE_PHASES]
    phases = [
        kt.Phase(
            name,
            1,  # 5 steps a phase keeps the subprocess runs short
            trainable=blocks,
            learning_rate=1e-3 if i == 0 else 1e-4,
            callbacks=[progress[i]],
        )
        for i, (name, blocks) in enumerate(THREE_PHASES)
    ]
    kt.fit_phases(
        model,
        phases,
        (x, y),
        batch_size=BATCH // strategy.num_replicas_in_sync,
        strategy=strategy,
        checkpoint=kt.CheckpointOptions(checkpoint_dir, every=1),
        verbose=0,
    )
    return model, sum(p.applied for p in progress)


def main() -> None:
    checkpoint_dir, output = sys.argv[1], sys.argv[2]
    sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    mode = sys.argv[4] if len(sys.argv) > 4 else "two"
    if mode == "three-mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (EXAMPLES, 32, 32, 3)).astype("float32")
    y = np.arange(EXAMPLES) % 3
    if mode == "three-mirrored":
        model, applied = three_phases_mirrored(checkpoint_dir, sleep, x, y)
        np.savez(
            output, applied=applied, **{f"w{i}": np.asarray(v) for i, v in enumerate(model.weights)}
        )
        print("DONE", flush=True)
        return
    model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    progress = Progress(sleep)
    kt.fine_tune(
        model,
        (x, y),
        head_epochs=HEAD_EPOCHS,
        finetune_epochs=FINETUNE_EPOCHS,
        unfreeze=2,
        batch_size=BATCH,
        callbacks=[progress],
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=1,
        verbose=0,
    )
    np.savez(
        output,
        applied=progress.applied,
        **{f"w{i}": np.asarray(v) for i, v in enumerate(model.weights)},
    )
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
