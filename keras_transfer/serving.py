"""A TF Serving REST client, and a local development server that speaks the same protocol.

Production serving is TF Serving (`tensorflow/serving`). `serve` exists so that the client, the
exported signatures and the REST formats can be tried end to end on a laptop or in tests, where
TF Serving cannot be installed: it implements the REST predict, model status and model metadata
endpoints over a SavedModel, with TF Serving's request formats and error rules, on top of the
standard library's `http.server.ThreadingHTTPServer`. It bounds what one client can make it do (a
request-body cap answered with HTTP 413 before the body is read, socket timeouts that drop silent
clients, a per-request batch-size limit answered with 400) and warns when bound to a non-loopback
address, but it is not hardened for production traffic: no TLS, no authentication, one thread per
connection.

Example:
>>> from keras_transfer import serving
>>> server = serving.serve("saved_models/flowers", port=0, block=False)  # doctest: +SKIP
>>> client = serving.Client(server.url, "flowers")  # doctest: +SKIP
>>> client.predict_bytes([open("rose.jpg", "rb").read()])  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import sys
import threading
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

_PATH = re.compile(
    r"^/v1/models/(?P<name>[^/:]+)"
    r"(?:/versions/(?P<version>[^/:]+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<rest>/metadata|:predict)?$"
)

DEFAULT_MAX_BODY_BYTES = 64 * 2**20
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_BATCH = 256


class ServingError(RuntimeError):
    """An error answer from a TF Serving REST endpoint (`{"error": ...}`).

    Attributes:
        status: The HTTP status code.
        message: The server's error text.
    """

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


# --- JSON <-> tensors -----------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Arrays and bytes to TF Serving JSON: lists, and `{"b64": ...}` for binary strings."""
    if isinstance(value, (bytes, bytearray)):
        return {"b64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "OSV":
            return [to_json(v) for v in value]
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    """`{"b64": ...}` objects back to bytes, recursively."""
    if isinstance(value, dict):
        if set(value) == {"b64"}:
            return base64.b64decode(value["b64"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


# --- client ---------------------------------------------------------------------------------------


class Client:
    """Builds TF Serving REST requests and parses the answers.

    Args:
        url: The server root, e.g. `"http://localhost:8501"`.
        model_name: The served model name.
        timeout: Seconds to wait for an answer.

    Example:
    >>> client = Client("http://localhost:8501", "flowers")
    >>> client.predict_url(version=2)
    'http://localhost:8501/v1/models/flowers/versions/2:predict'
    """

    def __init__(self, url: str, model_name: str, *, timeout: float = 30.0):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"`url` must start with http:// or https://. Received: url={url!r}")
        if not isinstance(model_name, str) or not re.match(r"^[A-Za-z0-9._-]+$", model_name):
            raise ValueError(
                f"`model_name` must be a plain name such as 'flowers'. Received: {model_name!r}"
            )
        self.url = url.rstrip("/")
        self.model_name = model_name
        self.timeout = timeout

    def model_url(self, version: int | None = None, label: str | None = None) -> str:
        """`/v1/models/NAME[/versions/N | /labels/L]`."""
        if version is not None and label is not None:
            raise ValueError("Pass either `version` or `label`, not both.")
        url = f"{self.url}/v1/models/{self.model_name}"
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"`version` must be a positive int. Received: {version!r}")
            url += f"/versions/{version}"
        elif label is not None:
            if not re.match(r"^[A-Za-z][A-Za-z0-9_-]*$", str(label)):
                raise ValueError(f"`label` must be a plain word. Received: {label!r}")
            url += f"/labels/{label}"
        return url

    def predict_url(self, version: int | None = None, label: str | None = None) -> str:
        return self.model_url(version, label) + ":predict"

    def build_predict_request(
        self,
        instances: Sequence[Any] | None = None,
        *,
        inputs: Any = None,
        signature_name: str | None = None,
    ) -> dict[str, Any]:
        """The JSON body of a predict request, row (`instances`) or columnar (`inputs`) format.

        Bytes values (and object arrays of bytes) become `{"b64": ...}`; numpy arrays become lists.

        Raises:
            ValueError: When both or neither of `instances` and `inputs` are given.
        """
        if (instances is None) == (inputs is None):
            raise ValueError(
                "Pass exactly one of `instances` (row format: one entry per example) or "
                "`inputs` (columnar format: one batch per input name)."
            )
        body: dict[str, Any] = {}
        if signature_name is not None:
            body["signature_name"] = signature_name
        if instances is not None:
            body["instances"] = to_json(list(instances))
        else:
            body["inputs"] = to_json(inputs)
        return body

    def predict(
        self,
        instances: Sequence[Any] | None = None,
        *,
        inputs: Any = None,
        signature_name: str | None = None,
        version: int | None = None,
        label: str | None = None,
    ) -> Any:
        """Sends a predict request; returns `predictions` (row) or `outputs` (columnar).

        Values the server returns as `{"b64": ...}` come back as bytes.

        Raises:
            ServingError: When the server answers with an error.
        """
        body = self.build_predict_request(instances, inputs=inputs, signature_name=signature_name)
        answer = self._send(self.predict_url(version, label), body)
        key = "predictions" if instances is not None else "outputs"
        if key not in answer:
            raise ServingError(200, f"Answer has no {key!r}: {str(answer)[:200]}")
        return _from_json(answer[key])

    def predict_images(self, images: Any, **kwargs: Any) -> Any:
        """Float pixels `(batch, H, W, C)` through `serving_default`, columnar format."""
        return self.predict(inputs={"images": np.asarray(images, np.float32)}, **kwargs)

    def predict_bytes(self, encoded: Sequence[bytes], **kwargs: Any) -> Any:
        """Encoded images through `serve_bytes`, sent as `{"b64": ...}` in columnar format."""
        kwargs.setdefault("signature_name", "serve_bytes")
        return self.predict(inputs={"image_bytes": list(encoded)}, **kwargs)

    def status(self, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        """`GET /v1/models/NAME`: the `model_version_status` answer."""
        return self._send(self.model_url(version, label))

    def metadata(self, version: int | None = None, label: str | None = None) -> dict[str, Any]:
        """`GET /v1/models/NAME/metadata`: the signature definitions."""
        return self._send(self.model_url(version, label) + "/metadata")

    def _send(self, url: str, body: dict | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
        request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text
            raise ServingError(error.code, message) from None


# --- local development server ---------------------------------------------------------------------


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class _Servable:
    """One loaded version: its concrete signatures and their `SignatureDef`s."""

    def __init__(self, path: Path, version: int):
        import tensorflow as tf
        from google.protobuf import json_format
        from tensorflow.core.protobuf import saved_model_pb2

        self.version = version
        self.loaded = tf.saved_model.load(str(path))
        proto = saved_model_pb2.SavedModel.FromString((path / "saved_model.pb").read_bytes())
        self.signature_defs = {
            name: definition
            for name, definition in proto.meta_graphs[0].signature_def.items()
            if name != "__saved_model_init_op"
        }
        self.metadata_json = {
            name: json_format.MessageToDict(definition, preserving_proto_field_name=True)
            for name, definition in self.signature_defs.items()
        }
        self.lock = threading.Lock()

    def run(self, body: Any, max_batch: int | None = None) -> dict[str, Any]:
        import tensorflow as tf

        if not isinstance(body, dict):
            raise _BadRequest("JSON Value: is not an object; expected a JSON object.")
        has_rows, has_columns = "instances" in body, "inputs" in body
        if has_rows == has_columns:
            raise _BadRequest(
                "Missing 'instances' key" if not has_rows else "Both 'instances' and 'inputs' given"
            )
        name = body.get("signature_name") or "serving_default"
        if name not in self.signature_defs:
            raise _BadRequest(f'Serving signature key "{name}" not found.')
        definition = self.signature_defs[name]
        keys = sorted(definition.inputs)
        if has_rows:
            feeds = self._rows_to_columns(body["instances"], keys)
        else:
            feeds = body["inputs"]
            if not isinstance(feeds, dict) or set(feeds) == {"b64"}:
                if len(keys) != 1:
                    raise _BadRequest(f"'inputs' must be an object keyed by {keys}")
                feeds = {keys[0]: feeds}
        missing, extra = set(keys) - set(feeds), set(feeds) - set(keys)
        if missing:
            raise _BadRequest(f"Missing input(s) {sorted(missing)} for signature {name!r}")
        if extra:
            raise _BadRequest(f"Unknown input(s) {sorted(extra)} for signature {name!r}")
        if max_batch is not None:
            batch = max(len(v) if isinstance(v, list) else 1 for v in feeds.values())
            if batch > max_batch:
                raise _BadRequest(
                    f"Batch of {batch} examples exceeds this server's limit of {max_batch} per "
                    "request (`max_batch`, `--max-batch`); split the request."
                )
        try:
            tensors = {
                key: _to_tensor(feeds[key], definition.inputs[key].dtype, key) for key in keys
            }
        except (ValueError, TypeError, OverflowError) as error:
            # Ragged nesting, values out of the dtype's range: the request's fault, not ours.
            raise _BadRequest(
                f"Input values do not form one tensor of the signature's dtype: {error}"
            ) from None
        try:
            with self.lock:
                outputs = self.loaded.signatures[name](**tensors)
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as error:
            raise _BadRequest(_error_text(error)) from None
        outputs = {key: _to_json_output(key, value.numpy()) for key, value in outputs.items()}
        if has_columns:
            return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
        rows = len(next(iter(outputs.values())))
        if len(outputs) == 1:
            return {"predictions": next(iter(outputs.values()))}
        return {"predictions": [{k: v[i] for k, v in outputs.items()} for i in range(rows)]}

    @staticmethod
    def _rows_to_columns(instances: Any, keys: list[str]) -> dict[str, list]:
        if not isinstance(instances, list) or not instances:
            raise _BadRequest("'instances' must be a non-empty list")
        named = all(isinstance(row, dict) and set(row) != {"b64"} for row in instances)
        if not named:
            if len(keys) != 1:
                raise _BadRequest(f"Each instance must be an object with keys {keys}")
            return {keys[0]: instances}
        columns: dict[str, list] = {}
        for row in instances:
            if sorted(row) != sorted(columns or row):
                raise _BadRequest("All instances must have the same keys")
            for key, value in row.items():
                columns.setdefault(key, []).append(value)
        return columns


def _error_text(error: Exception) -> str:
    """The one line of a TensorFlow runtime error that says what was wrong with the input."""
    lines = [line.strip() for line in str(getattr(error, "message", error)).splitlines()]
    noise = ("<", "[[", "Detected at", "File ", "Graph execution error", "{{")
    useful = [line for line in lines if line and not line.startswith(noise)]
    return (useful or ["Invalid argument"])[0][:500]


def _to_tensor(value: Any, dtype_enum: int, key: str) -> Any:
    import tensorflow as tf

    dtype = tf.dtypes.as_dtype(dtype_enum)
    if dtype == tf.string:
        value = _from_json(value)
        array = np.array(_strings(value, key), dtype=object)
        return tf.constant(array.tolist(), dtype=tf.string)
    array = np.asarray(value)
    if array.dtype == object or array.dtype.kind in "USb":
        raise _BadRequest(f"Input {key!r} expects {dtype.name} numbers; received other values")
    if dtype.is_integer and array.dtype.kind == "f":
        raise _BadRequest(f"Input {key!r} expects {dtype.name}; received floating point values")
    return tf.constant(array, dtype=dtype)


def _strings(value: Any, key: str) -> Any:
    if isinstance(value, list):
        return [_strings(v, key) for v in value]
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise _BadRequest(f'Input "{key}" expects strings or {{"b64": ...}} values')


def _to_json_output(key: str, array: np.ndarray) -> Any:
    if array.dtype == object:
        if key.endswith("_bytes"):
            return [to_json(v) for v in array.ravel()] if array.ndim else to_json(array.item())
        decoded = np.vectorize(lambda v: v.decode("utf-8", "replace"), otypes=[object])(array)
        return decoded.tolist()
    return array.tolist()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up or goes silent mid-answer is routine, not a server error.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class LocalServer:
    """A running development server: `url`, `shutdown()`; also a context manager."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread | None):
        self.httpd = httpd
        self.thread = thread
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def _warn_if_exposed(host: str) -> None:
    if not _is_loopback(host):
        warnings.warn(
            f"The development server is bound to {host!r}, which is not a loopback address: "
            "anyone who can reach this machine can query the model, without TLS or "
            "authentication. Bind 127.0.0.1 (the default), or serve production traffic with "
            "TF Serving.",
            UserWarning,
            stacklevel=3,
        )


def _make_handler(
    model_name: str,
    servables: dict[int, _Servable],
    labels: dict[str, int],
    *,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_batch: int | None = DEFAULT_MAX_BATCH,
):
    latest = max(servables)
    socket_timeout = timeout  # a class body cannot read a same-named variable of this function

    class Handler(BaseHTTPRequestHandler):
        server_version = "keras-transfer-dev-server"
        protocol_version = "HTTP/1.1"
        # Applied to each connection's socket by StreamRequestHandler.setup: a client that
        # sends nothing (or stops mid-request) for this long is dropped.
        timeout = socket_timeout

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
            pass

        def _answer(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _route(self) -> tuple[_Servable, str]:
            match = _PATH.match(self.path.split("?", 1)[0])
            if not match:
                raise _BadRequest(f"Malformed request: {self.command} {self.path}", 404)
            name, version, label = match["name"], match["version"], match["label"]
            if name != model_name:
                raise _BadRequest(f"Servable not found for request: Latest({name})", 404)
            if label is not None:
                if label not in labels:
                    raise _BadRequest(f"Unrecognized servable version label: {label}", 404)
                version = str(labels[label])
            if version is None:
                return servables[latest], match["rest"] or ""
            if not version.isdigit() or int(version) not in servables:
                raise _BadRequest(
                    f"Servable not found for request: Specific({name}, {version})", 404
                )
            return servables[int(version)], match["rest"] or ""

        def do_GET(self) -> None:  # noqa: N802 - stdlib name
            try:
                servable, rest = self._route()
                if rest == ":predict":
                    raise _BadRequest("Predict requests must use POST", 405)
                if rest == "/metadata":
                    self._answer(
                        200,
                        {
                            "model_spec": {
                                "name": model_name,
                                "signature_name": "",
                                "version": str(servable.version),
                            },
                            "metadata": {
                                "signature_def": {
                                    "signature_def": servable.metadata_json,
                                }
                            },
                        },
                    )
                    return
                specific = re.search(r"/(versions|labels)/", self.path)
                shown = [servable] if specific else [servables[v] for v in sorted(servables)]
                status = [
                    {
                        "version": str(s.version),
                        "state": "AVAILABLE",
                        "status": {"error_code": "OK", "error_message": ""},
                    }
                    for s in shown
                ]
                self._answer(200, {"model_version_status": status})
            except _BadRequest as error:
                self._answer(error.status, {"error": str(error)})

        def _refuse(self, status: int, message: str) -> None:
            # The body (if any) stays unread, so the connection cannot carry another request.
            self.close_connection = True
            data = json.dumps({"error": message}).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def _body_length(self) -> int | None:
            """The declared body length, or None after answering (and closing) a refusal."""
            if self.headers.get("Transfer-Encoding"):
                self._refuse(411, "Send the body with a Content-Length; chunked is unsupported")
                return None
            text = (self.headers.get("Content-Length") or "0").strip()
            if not text.isdigit():
                self._refuse(400, f"Invalid Content-Length: {text[:40]!r}")
                return None
            length = int(text)
            if length > max_body_bytes:
                self._refuse(
                    413,
                    f"Request body of {length} bytes exceeds this server's limit of "
                    f"{max_body_bytes} bytes (`max_body_bytes`, `--max-body-bytes`).",
                )
                return None
            return length

        def handle_expect_100(self) -> bool:
            # `Expect: 100-continue` (curl, for large bodies): refuse before the body is sent.
            if self.command == "POST" and self._body_length() is None:
                return False
            return super().handle_expect_100()

        def _read_body(self) -> bytes | None:
            """The request body, or None after answering (and closing) when it is refused."""
            length = self._body_length()
            if length is None:
                return None
            try:
                raw = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True  # silent mid-body: drop it, answer nothing
                return None
            if len(raw) < length:
                self.close_connection = True  # the client hung up early
                return None
            return raw

        def do_POST(self) -> None:  # noqa: N802 - stdlib name
            try:
                raw = self._read_body()
                if raw is None:
                    return
                servable, rest = self._route()
                if rest != ":predict":
                    raise _BadRequest(f"Malformed request: POST {self.path}", 404)
                try:
                    body = json.loads(raw.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError) as error:
                    raise _BadRequest(f"JSON Parse error: {error}") from None
                try:
                    answer = servable.run(body, max_batch)
                except RecursionError:
                    raise _BadRequest("Input values are nested too deeply") from None
                self._answer(200, answer)
            except _BadRequest as error:
                self._answer(error.status, {"error": str(error)})
            except Exception as error:  # noqa: BLE001 - a server answers, it does not die
                self._answer(500, {"error": f"{type(error).__name__}: {error}"})

    return Handler


def serve(
    base_path: str | os.PathLike,
    *,
    model_name: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8501,
    versions: Sequence[int] | None = None,
    labels: Mapping[str, int] | None = None,
    block: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    timeout: float | None = DEFAULT_TIMEOUT,
    max_batch: int | None = DEFAULT_MAX_BATCH,
) -> LocalServer:
    """Starts a local development stand-in for TF Serving's REST API over exported versions.

    Endpoints: `POST /v1/models/NAME[/versions/N|/labels/L]:predict` (row `instances` and columnar
    `inputs`, `{"b64": ...}` for bytes), `GET /v1/models/NAME` (status) and
    `GET /v1/models/NAME/metadata`. Bad requests get `{"error": ...}` with HTTP 400, as TF Serving
    does. Production serving is TF Serving itself; this is for development and tests.

    What one client can make the server do is bounded: a body longer than `max_body_bytes` is
    answered with HTTP 413 from its `Content-Length` alone, before any of it is read; a client
    that sends nothing for `timeout` seconds (before, within or between requests) is
    disconnected; a predict request with more than `max_batch` examples is answered with 400.
    Binding a non-loopback `host` emits a `UserWarning`.

    Args:
        base_path: The model folder holding integer version folders, e.g. `"saved_models/flowers"`.
        model_name: The served name; defaults to the folder name.
        host: Interface to bind; loopback by default.
        port: TCP port; 0 picks a free one (see the returned `url`).
        versions: Versions to load; `None` loads the highest, like TF Serving's default policy.
        labels: Version labels, e.g. `{"stable": 1, "canary": 2}`.
        block: Serve until interrupted (True) or return at once with the server running in a
            background thread (False).
        max_body_bytes: Largest request body accepted, in bytes (default 64 MiB).
        timeout: Seconds a connection may stay silent before it is dropped (default 30); None
            waits forever.
        max_batch: Most examples per predict request (default 256); None for no limit.

    Returns:
        The `LocalServer` (after it stops, when `block` is True).

    Raises:
        FileNotFoundError: When `base_path` holds no version folder.
        ValueError: For unknown `versions`, labels pointing at unloaded versions, or a limit
            that is not a positive number.
    """
    from keras_transfer.export import existing_versions, validate_model_name

    _check_positive("max_body_bytes", max_body_bytes, integer=True, optional=False)
    _check_positive("timeout", timeout, integer=False, optional=True)
    _check_positive("max_batch", max_batch, integer=True, optional=True)

    base = Path(base_path)
    found = existing_versions(base)
    if not found:
        raise FileNotFoundError(
            f"No version folders (1, 2, ...) under '{base}'. Export one first with "
            "`keras-transfer export` or `kt.export_for_serving`."
        )
    model_name = validate_model_name(model_name or base.name)
    wanted = [found[-1]] if versions is None else list(versions)
    unknown = [v for v in wanted if v not in found]
    if unknown:
        raise ValueError(f"`versions` {unknown} not found under '{base}'. Available: {found}.")
    labels = dict(labels or {})
    bad = {k: v for k, v in labels.items() if v not in wanted}
    if bad:
        raise ValueError(f"`labels` {bad} point at versions not served ({wanted}).")
    servables = {v: _Servable(base / str(v), v) for v in wanted}
    handler = _make_handler(
        model_name,
        servables,
        labels,
        max_body_bytes=max_body_bytes,
        timeout=timeout,
        max_batch=max_batch,
    )
    httpd = _HTTPServer((host, port), handler)
    _warn_if_exposed(str(httpd.server_address[0]))
    if block:
        server = LocalServer(httpd, None)
        print(f"Serving {model_name!r} versions {wanted} at {server.url} (development server)")
        try:
            httpd.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            httpd.server_close()
        return server
    thread = threading.Thread(target=httpd.serve_forever, name="kt-serve", daemon=True)
    thread.start()
    return LocalServer(httpd, thread)


def _check_positive(name: str, value: Any, *, integer: bool, optional: bool) -> None:
    if value is None and optional:
        return
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        expected = "a positive integer" if integer else "a positive number of seconds"
        raise ValueError(
            f"`{name}` must be {expected}{' or None' if optional else ''}. "
            f"Received: {name}={value!r}"
        )
