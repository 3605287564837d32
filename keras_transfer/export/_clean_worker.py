"""Clean-process verifier for `keras_transfer.export.verify_export`.

Runs as a standalone script (`python -I -S _clean_worker.py manifest.json`), never as part of the
package: it blocks `keras`, `keras_transfer` and `tf_keras` before importing TensorFlow, so the
SavedModel is loaded exactly as TF Serving would load it, with nothing but TensorFlow. It writes a
JSON report to the manifest's `result` path and exits 1 on any failure.
"""

import importlib.abc
import importlib.machinery
import json
import os
import sys

BLOCKED = ("keras", "keras_transfer", "tf_keras")


class _Refuse(importlib.abc.Loader):
    def create_module(self, spec):
        raise ImportError(
            f"{spec.name} is blocked in the clean verification process", name=spec.name
        )

    def exec_module(self, module):
        raise ImportError(f"{module.__name__} is blocked in the clean verification process")


class _Blocker(importlib.abc.MetaPathFinder):
    # A spec whose loader refuses (instead of None) lets TensorFlow's own `find_spec` probing
    # for keras succeed while any actual import fails.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, _Refuse())
        return None


def install_blocker():
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]
    sys.meta_path.insert(0, _Blocker())
    for directory in os.environ.get("KT_SITE_DIRS", "").split(os.pathsep):
        if directory and directory not in sys.path:
            sys.path.append(directory)


def keras_blocked():
    blocked = []
    for name in BLOCKED[:2]:
        try:
            __import__(name)
        except ImportError:
            blocked.append(name)
    return blocked == list(BLOCKED[:2])


def main(manifest_path):
    install_blocker()
    import base64

    import numpy as np
    import tensorflow as tf

    manifest = json.load(open(manifest_path))
    failures = []
    report = {"keras_blocked": keras_blocked(), "cases": [], "failures": failures}
    if not report["keras_blocked"]:
        failures.append("keras or keras_transfer could be imported in the clean process")
    loaded = tf.saved_model.load(manifest["saved_model"])
    signatures = loaded.signatures

    # What TF Serving exposes: signature names, input keys, output keys, method names.
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(manifest["saved_model"], "saved_model.pb"), "rb") as handle:
        proto.ParseFromString(handle.read())
    defs = proto.meta_graphs[0].signature_def
    for name, inputs in manifest["signatures"].items():
        if name not in defs:
            failures.append(f"signature {name!r} missing; found {sorted(defs)}")
            continue
        if sorted(defs[name].inputs) != sorted(inputs):
            failures.append(f"{name}: inputs {sorted(defs[name].inputs)}, expected {inputs}")
        if sorted(defs[name].outputs) != sorted(manifest["outputs"]):
            failures.append(
                f"{name}: outputs {sorted(defs[name].outputs)}, expected {manifest['outputs']}"
            )
        if defs[name].method_name != "tensorflow/serving/predict":
            failures.append(f"{name}: method {defs[name].method_name!r}")

    arrays = np.load(manifest["arrays"], allow_pickle=False)
    for index, case in enumerate(manifest["cases"]):
        label = f"{case['name']} ({case['signature']})"
        value = arrays[f"c{index}_in"]
        if case["input_b64"]:
            value = [base64.b64decode(str(v)) for v in value]
        entry = {"name": case["name"], "signature": case["signature"], "status": "ok"}
        report["cases"].append(entry)
        try:
            outputs = signatures[case["signature"]](**{case["input_key"]: tf.constant(value)})
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            hits = [line for line in lines if case["error"] and case["error"] in line]
            message = (hits or lines or ["?"])[0][:300]
            if case["error"] and case["error"] in str(error):
                entry["status"] = "refused as expected"
                entry["error"] = message
            else:
                entry["status"] = "error"
                failures.append(f"{label}: unexpected error {message}")
            continue
        if case["error"]:
            entry["status"] = "no error"
            failures.append(f"{label}: expected an error containing {case['error']!r}")
            continue
        worst = 0.0
        for name in case["outputs"]:
            want = arrays[f"c{index}_out_{name}"]
            got = outputs[name].numpy()
            if got.dtype == object:
                got = np.array([v.decode("utf-8") for v in got.ravel()]).reshape(got.shape)
            if got.shape != want.shape:
                failures.append(f"{label}: {name} shape {got.shape}, expected {want.shape}")
            elif want.dtype.kind == "f":
                diff = float(np.max(np.abs(got.astype(np.float64) - want))) if want.size else 0.0
                worst = max(worst, diff)
                if not diff <= manifest["atol"]:
                    failures.append(f"{label}: {name} differs by {diff:.3g} > {manifest['atol']}")
            elif not np.array_equal(got, want):
                failures.append(f"{label}: {name} {got.tolist()} != expected {want.tolist()}")
        entry["max_abs_diff"] = worst

    warmup = manifest.get("warmup")
    if warmup and os.path.exists(warmup):
        # Replays the warm-up records the way TF Serving does at load time.
        try:
            from tensorflow_serving.apis import prediction_log_pb2
        except ImportError:
            report["warmup"] = "skipped: tensorflow-serving-api not installed"
        else:
            count = 0
            for record in tf.data.TFRecordDataset(warmup):
                log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
                request = log.predict_log.request
                inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
                try:
                    signatures[request.model_spec.signature_name or "serving_default"](
                        **{k: tf.constant(v) for k, v in inputs.items()}
                    )
                except Exception as error:  # noqa: BLE001 - any failure is a verification failure
                    failures.append(f"warm-up request {count} failed: {error}")
                count += 1
            report["warmup"] = f"{count} requests replayed"
            if count == 0 or count > 1000:
                failures.append(f"warm-up file holds {count} records; TF Serving wants 1-1000")

    with open(manifest["result"], "w") as handle:
        json.dump(report, handle, indent=2)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
