"""Read tensors from torch pickle files (`.pth`, `.ckpt`, `.pt`, `.bin`) without running code or torch.

A pickle can name any Python callable and make the loader call it. This reader's `find_class`
hands out only its own inert stand-ins: the few names a tensor needs (`torch._utils.
_rebuild_tensor_v2`, storage types, `collections.OrderedDict`) map to functions defined here,
and every other name becomes an empty placeholder class that records its name and does nothing.
No module is imported and no function named by the file is called.

Both torch formats are read: the zip archive (`torch.save` since 1.6: `*/data.pkl` + one raw
file per storage) and the legacy stream (magic number, protocol, system info, the object pickle,
the storage keys, then each storage as an int64 element count and raw bytes). Tensor bytes are
little-endian; tensors come back as numpy arrays (bfloat16 as float32, exact) with the dtype the
file declared in `dtypes`.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from mlx_sd.errors import MlxSdError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}
TORCH_DTYPES = {"float32": "float32", "float": "float32", "float64": "float64", "double": "float64",
                "float16": "float16", "half": "float16", "bfloat16": "bfloat16", "int64": "int64", "long": "int64",
                "int32": "int32", "int": "int32", "int16": "int16", "int8": "int8", "uint8": "uint8", "bool": "bool"}


class PickleReadError(MlxSdError, ValueError):
    pass


class _StorageType:
    def __init__(self, dtype: str):
        self.dtype = dtype


class _Storage:
    def __init__(self, dtype: str, key: str, numel: int | None):
        self.dtype, self.key, self.numel = dtype, key, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)


class Opaque:
    """Stand-in for any object the file names that is not a tensor; it keeps what it was given."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f"<not loaded: {self.qualname}>"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_):
    if not isinstance(storage, _Storage):
        raise PickleReadError("a tensor refers to something that is not a storage")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
    return data


def _rebuild_from_type_v2(func, _new_type, args, _state):
    return func(*args)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self.storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in TORCH_DTYPES:
            return _StorageType(TORCH_DTYPES[name])
        return type(name, (Opaque,), {"qualname": f"{module}.{name}"})

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise PickleReadError(f"unsupported persistent id {pid!r:.80}")
        storage_type, key = pid[1], str(pid[2])
        numel = pid[4] if len(pid) > 4 else None
        if len(pid) > 5 and pid[5] is not None:
            raise PickleReadError("storage views (torch < 0.4 files) are not supported")
        if not isinstance(storage_type, _StorageType):
            raise PickleReadError(f"storage {key} has an unknown type {storage_type!r}")
        if key not in self.storages:
            self.storages[key] = _Storage(storage_type.dtype, key, numel)
        return self.storages[key]


def _np_dtype(dtype: str) -> np.dtype:
    return np.dtype("<u2") if dtype == "bfloat16" else np.dtype(dtype).newbyteorder("<")


def _materialise(obj, dtypes: dict, path: str = ""):
    if isinstance(obj, _TensorRef):
        s = obj.storage
        item = s.data.itemsize
        if obj.size and s.data.size < obj.offset + 1 + sum((n - 1) * st for n, st in zip(obj.size, obj.stride)):
            raise PickleReadError(f"tensor {path}: its storage {s.key} is too short for shape {obj.size}")
        arr = np.lib.stride_tricks.as_strided(s.data[obj.offset:], obj.size, [st * item for st in obj.stride])
        arr = np.array(arr)
        if s.dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        dtypes[path] = s.dtype
        return arr
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v, dtypes, f"{path}.{k}" if path else str(k))) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, dtypes, f"{path}.{i}" if path else str(i)) for i, v in enumerate(obj))
    return obj


def _read_zip(path: Path) -> tuple[object, dict[str, _Storage]]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise PickleReadError("zip archive without data.pkl: not a torch.save file")
        prefix = pkl[: -len("data.pkl")]
        if f"{prefix}byteorder" in names and z.read(f"{prefix}byteorder").strip() != b"little":
            raise PickleReadError("big-endian torch files are not supported")
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(io.BytesIO(z.read(pkl)), storages).load()
        for key, s in storages.items():
            raw = z.read(f"{prefix}data/{key}")
            s.data = np.frombuffer(raw, _np_dtype(s.dtype))
    return obj, storages


def _read_legacy(path: Path) -> tuple[object, dict[str, _Storage]]:
    with open(path, "rb") as f:
        safe = _Unpickler(f, {})
        if safe.load() != LEGACY_MAGIC:
            raise PickleReadError("not a torch.save file (wrong magic number)")
        _Unpickler(f, {}).load()  # protocol version
        _Unpickler(f, {}).load()  # system info (endianness, type sizes)
        storages: dict[str, _Storage] = {}
        obj = _Unpickler(f, storages).load()
        keys = _Unpickler(f, {}).load()
        for key in keys:
            s = storages[str(key)]
            (count,) = struct.unpack("<q", f.read(8))
            dt = _np_dtype(s.dtype)
            raw = f.read(count * dt.itemsize)
            if len(raw) != count * dt.itemsize:
                raise PickleReadError(f"storage {key}: the file ends early (truncated download?)")
            s.data = np.frombuffer(raw, dt)
    return obj, storages


def read_torch_file(path: str | Path) -> tuple[object, dict[str, str]]:
    """The object `torch.save` wrote, tensors as numpy arrays, plus {dotted path: declared dtype}.

    Raises PickleReadError (naming the file) for anything that is not a readable torch file.
    """
    path = Path(path)
    try:
        obj, _ = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
        dtypes: dict[str, str] = {}
        return _materialise(obj, dtypes), dtypes
    except PickleReadError as e:
        raise PickleReadError(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, struct.error, ValueError, zipfile.BadZipFile) as e:
        raise PickleReadError(f"{path}: not a readable torch checkpoint ({type(e).__name__}: {e})") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors of a state-dict file (a flat dict, or one under 'state_dict') and their declared dtypes.

    Entries that are not tensors (step counters, callbacks) are left out.
    """
    obj, dtypes = read_torch_file(path)
    prefix = ""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj, prefix = obj["state_dict"], "state_dict."
    if not isinstance(obj, dict):
        raise PickleReadError(f"{path}: expected a state dict (or {{'state_dict': ...}}), found {type(obj).__name__}")
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
    return tensors, {k: dtypes[prefix + k] for k in tensors}
