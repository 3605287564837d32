"""Runs a small resumable `kt.fine_tune` for tests/test_resume.py (killed and restarted there).

Usage: python tests/resume_worker.py CHECKPOINT_DIR OUTPUT_NPZ [SLEEP_SECONDS]

Prints `STEP <phase> <iterations>` after every optimizer step (flushed), so the parent can kill
the process at a chosen step of a chosen phase, and writes the final weights and the number of
optimizer steps applied by this process to OUTPUT_NPZ when training ends.
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


class Progress(keras.callbacks.Callback):
    def __init__(self, sleep: float):
        super().__init__()
        self.sleep = sleep
        self.applied = 0

    def on_train_batch_end(self, batch, logs=None):
        self.applied += 1
        phase = "head" if self.model.get_layer("mobilenet_v2").trainable is False else "finetune"
        print(f"STEP {phase} {int(self.model.optimizer.iterations)}", flush=True)
        time.sleep(self.sleep)


def main() -> None:
    checkpoint_dir, output = sys.argv[1], sys.argv[2]
    sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (EXAMPLES, 32, 32, 3)).astype("float32")
    y = np.arange(EXAMPLES) % 3
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
