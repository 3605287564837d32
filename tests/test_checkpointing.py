"""kt.checkpointing: resume after a hard kill (SIGKILL mid-phase, restart, compare), atomic writes.

The worker (tests/resume_worker.py) trains 2 + 2 epochs of 5 batches (10 optimizer steps a phase)
with a checkpoint after every step, printing `STEP <phase> <iterations>` after each one. The
parent kills it at a random step of a chosen phase, restarts it on the same checkpoint folder, and
checks that each phase ends after exactly as many optimizer steps as an uninterrupted run, that
each restart continues at the step after the last checkpoint (none applied twice, none skipped),
and that the final weights match the uninterrupted run's.
"""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from keras_transfer import checkpointing

WORKER = Path(__file__).with_name("resume_worker.py")
STEPS_PER_PHASE = 10


def _run(checkpoint_dir, output, kill_at=None, sleep=0.0, mode="two"):
    """Runs the worker; kills it with SIGKILL once it prints `STEP phase n` for kill_at=(phase, n).

    Returns the `(phase, iterations)` steps it printed and whether it was killed.
    """
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(checkpoint_dir), str(output), str(sleep), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    steps, killed = [], False
    try:
        for line in process.stdout:
            if not line.startswith("STEP "):
                continue
            _, phase, iterations = line.split()
            steps.append((phase, int(iterations)))
            if kill_at is not None and (phase, int(iterations)) == kill_at:
                os.kill(process.pid, signal.SIGKILL)
                killed = True
                break
        process.wait(timeout=300)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
    if not killed:
        assert process.returncode == 0, f"worker failed with exit code {process.returncode}"
    else:
        assert process.returncode == -signal.SIGKILL
    return steps, killed


def _next_step(checkpoint_dir, phases=checkpointing.PHASES, steps_per_phase=STEPS_PER_PHASE):
    """The (phase, iteration) a restart must apply first, from what the kill left on disk."""
    names = sorted(p.name for p in checkpoint_dir.iterdir()) if checkpoint_dir.exists() else []
    # At most the temporary file of a write the kill cut short besides the checkpoint.
    files = (checkpointing.CHECKPOINT_FILE, checkpointing.PHASE_START_FILE)
    assert all(n.endswith(".tmp") for n in names if n not in files), names
    found = checkpointing.read_checkpoint(checkpoint_dir)
    if found is None:  # killed before its first checkpoint: starts over
        return (phases[0], 1)
    state = found[0]
    if state["done"] or state["iterations"] == steps_per_phase:
        return (phases[phases.index(state["phase"]) + 1], 1)
    return (state["phase"], state["iterations"] + 1)


def _weights(path):
    with np.load(path) as data:
        return [data[f"w{i}"] for i in range(len(data.files) - 1)], int(data["applied"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    steps, _ = _run(root / "ckpt", root / "out.npz")
    weights, applied = _weights(root / "out.npz")
    assert applied == 2 * STEPS_PER_PHASE
    assert steps == [(p, i) for p in checkpointing.PHASES for i in range(1, 11)]
    return weights


def _kill_and_resume(tmp_path, seed, uninterrupted):
    rng = random.Random(seed)
    kills = [("head", rng.randint(1, STEPS_PER_PHASE - 1)), ("finetune", rng.randint(1, 9))]
    checkpoint_dir, output = tmp_path / "ckpt", tmp_path / "out.npz"
    seen, expected_next = [], []
    for kill_at in kills:
        steps, killed = _run(checkpoint_dir, output, kill_at=kill_at, sleep=0.05)
        assert killed, f"the run ended before step {kill_at}"
        seen.append(steps)
        expected_next.append(_next_step(checkpoint_dir))
    steps, killed = _run(checkpoint_dir, output)
    assert not killed
    seen.append(steps)
    # Each restart applies exactly the step after the last checkpointed one: none twice, none
    # skipped (checkpoint_every=1; a step killed before its checkpoint was written is redone).
    for steps, expected in zip(seen[1:], expected_next, strict=True):
        assert steps[0] == expected, (steps[:3], expected)
    assert {p.name for p in checkpoint_dir.iterdir()} == {
        checkpointing.CHECKPOINT_FILE,
        checkpointing.PHASE_START_FILE,
    }
    final = seen[-1]
    assert final[-1] == ("finetune", STEPS_PER_PHASE)  # total optimizer steps as uninterrupted
    weights, _ = _weights(output)
    assert len(weights) == len(uninterrupted)
    for got, want in zip(weights, uninterrupted, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    return kills


def test_resume_after_sigkill_in_both_phases(tmp_path, uninterrupted):
    _kill_and_resume(tmp_path, seed=1, uninterrupted=uninterrupted)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [2, 3])
def test_resume_after_sigkill_more_seeds(tmp_path, uninterrupted, seed):
    _kill_and_resume(tmp_path, seed=seed, uninterrupted=uninterrupted)


def test_checkpoint_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_every"):
        checkpointing.check_arguments(tmp_path, 0, 0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        checkpointing.check_arguments(tmp_path / "file", 10, 0)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A write that fails half-way leaves the previous checkpoint whole and no temporary file."""
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    checkpointing.write_checkpoint(tmp_path, _state(model, batch=1), model, None)

    def fail_half_way(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(checkpointing.np, "savez", fail_half_way)
    with pytest.raises(OSError, match="disk full"):
        checkpointing.write_checkpoint(tmp_path, _state(model, batch=2), model, None)
    assert [p.name for p in tmp_path.iterdir()] == [checkpointing.CHECKPOINT_FILE]
    state, arrays, _ = checkpointing.read_checkpoint(tmp_path)
    assert state["batch"] == 1
    assert len(arrays) == len(model.variables)


def _state(model, batch):
    return {
        "phase": "head",
        "epoch": 0,
        "batch": batch,
        "done": False,
        "model_variables": len(model.variables),
        "optimizer_variables": 0,
    }


def _tiny_run(checkpoint_dir, **kwargs):
    import keras_transfer as kt

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 255, (12, 32, 32, 3)).astype("float32")
    model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
    kwargs = {"head_epochs": 1, "finetune_epochs": 1, "batch_size": 4, "verbose": 0, **kwargs}
    history = kt.fine_tune(model, (x, np.arange(12) % 3), checkpoint_dir=checkpoint_dir, **kwargs)
    return model, history


def test_finished_run_resumes_to_nothing(tmp_path):
    model, history = _tiny_run(tmp_path)
    assert history.phases == {"head": (0, 1), "finetune": (1, 2)}
    state = checkpointing.read_checkpoint(tmp_path)[0]
    assert (state["phase"], state["done"], state["iterations"]) == ("finetune", True, 3)
    again, history = _tiny_run(tmp_path)
    assert history.epoch == []
    for got, want in zip(again.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_resume_with_other_data_is_refused_before_restoring(tmp_path):
    _tiny_run(tmp_path, finetune_epochs=0)
    path = tmp_path / checkpointing.CHECKPOINT_FILE
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    state = json.loads(str(arrays["state"]))
    arrays["state"] = np.array(json.dumps(dict(state, done=False, epoch=0, batch=1)))
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="would not line up"):
        _tiny_run(tmp_path, finetune_epochs=0, batch_size=3)


def test_reshuffling_dataset_gets_a_warning(caplog):
    import keras_transfer as kt

    x, y = np.zeros((8, 4, 4, 3)), np.arange(8) % 2
    with caplog.at_level("WARNING", logger="keras_transfer.checkpointing"):
        checkpointing._warn_if_reshuffling(kt.data.from_arrays(x, y, batch_size=4, shuffle=False))
        assert not caplog.records
        checkpointing._warn_if_reshuffling(kt.data.from_arrays(x, y, batch_size=4, shuffle=True))
    assert "reshuffles on each iteration" in caplog.text


THREE_PHASES, THREE_STEPS = ("head", "top2", "top4"), 5  # tests/resume_worker.py, three-mirrored


@pytest.mark.slow
def test_three_phases_under_mirrored_strategy_resume_after_sigkill_in_later_phases(tmp_path):
    """`fit_phases` with three phases over 2 logical CPUs, killed in phase 2 and in phase 3.

    (A kill in the head phase goes through the same code as the two-phase test above.)
    """
    steps, _ = _run(tmp_path / "ref_ckpt", tmp_path / "ref.npz", mode="three-mirrored")
    assert steps == [(p, i) for p in THREE_PHASES for i in range(1, THREE_STEPS + 1)]
    uninterrupted, applied = _weights(tmp_path / "ref.npz")
    assert applied == 3 * THREE_STEPS
    checkpoint_dir, output = tmp_path / "ckpt", tmp_path / "out.npz"
    seen, expected_next = [], []
    for kill_at in [("top2", 2), ("top4", 3)]:
        steps, killed = _run(checkpoint_dir, output, kill_at, sleep=0.05, mode="three-mirrored")
        assert killed, f"the run ended before step {kill_at}"
        seen.append(steps)
        expected_next.append(_next_step(checkpoint_dir, THREE_PHASES, THREE_STEPS))
    steps, killed = _run(checkpoint_dir, output, mode="three-mirrored")
    assert not killed
    seen.append(steps)
    for steps, expected in zip(seen[1:], expected_next, strict=True):
        assert steps[0] == expected, (steps[:3], expected)
    assert seen[-1][-1] == ("top4", THREE_STEPS)
    weights, _ = _weights(output)
    for got, want in zip(weights, uninterrupted, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_resumed_phase_begins_from_its_start_weights_for_its_hooks(tmp_path, images):
    """on_phase_begin (and so L2-SP's anchor) sees the phase's starting weights on resume."""
    import keras

    import keras_transfer as kt

    x, y = images
    phases = [kt.Phase("head", 1), kt.Phase("top", 2, trainable=2, learning_rate=1e-4)]
    seen = {}

    def record(model, phase):
        seen.setdefault(phase.name, []).append([np.array(w) for w in model.weights])

    def run():
        keras.utils.set_random_seed(0)
        model = kt.build_classifier("mobilenet_v2", 3, image_size=32, weights=None, alpha=0.35)
        kt.fit_phases(
            model,
            phases,
            (x, y),
            batch_size=8,
            on_phase_begin=record,
            verbose=0,
            checkpoint=kt.CheckpointOptions(tmp_path, every=1),
        )
        return model

    run()
    # Pretend the run was killed one batch into the second epoch of "top".
    path = tmp_path / checkpointing.CHECKPOINT_FILE
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    state = json.loads(str(arrays["state"]))
    arrays["state"] = np.array(json.dumps(dict(state, done=False, epoch=2, batch=1)))
    np.savez(path, **arrays)
    run()
    first, resumed = seen["top"]
    assert len(seen["head"]) == 1  # the finished head phase is skipped on resume
    for a, b in zip(first, resumed, strict=True):
        np.testing.assert_array_equal(a, b)
