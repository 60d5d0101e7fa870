"""Read a PyTorch zip checkpoint (`torch.save`, format >= 1.6) without torch and without arbitrary unpickling.

A torch zip checkpoint is a zip archive `<name>/data.pkl` (the pickled object tree) plus one blob per
storage, `<name>/data/<key>`. Tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, hooks[, metadata])`, with the storage a persistent id
`('storage', <torch.XStorage class>, key, location, numel)`.

`read_pth` unpickles `data.pkl` with a restricted `pickle.Unpickler`: `find_class` resolves only the
handful of names a state dict needs, to local NumPy stand-ins (never to torch or to anything
importable), and raises `UnsafePickleError` for every other global, so a malicious file cannot run code.
"""
from __future__ import annotations

import collections
import os
import io
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np

# torch storage classes (legacy typed names, still what torch.save writes) -> element dtype.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "UntypedStorage": np.uint8,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The checkpoint's pickle references a global outside the state-dict allow-list."""


class _StorageType:
    """Stand-in for a `torch.XStorage` class: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"negative tensor stride {stride}")
    if not size:
        return storage[storage_offset].copy()
    extent = storage_offset + (1 + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else 0)
    if extent > storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size}, stride {stride}, offset {storage_offset} overruns its "
                                     f"storage of {storage.size} elements")
    if not all(size):
        return np.zeros(size, storage.dtype)
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[storage_offset:], size, tuple(s * item for s in stride),
                                           writeable=False)
    return np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file)
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafePickleError(f"refusing to unpickle global {module}.{name}: not a state-dict tensor type "
                                f"(allowed: {sorted('.'.join(k) for k in _ALLOWED)} and torch.*Storage)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafePickleError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise UnsafePickleError(f"persistent id with non-storage type {storage_type!r}")
        return self._load_storage(str(key), storage_type.dtype, int(numel))


def read_pth(path: str) -> dict[str, np.ndarray]:
    """{key: NumPy array} of a torch zip checkpoint holding a (possibly nested under e.g. 'state_dict')
    flat dict of tensors. Raises UnsafePickleError for anything that is not plain tensor data."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a torch zip checkpoint (legacy non-zip torch.save files are not supported)")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path}: expected one '<name>/data.pkl' in the archive, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder {byteorder!r}")
        storages: dict[str, np.ndarray] = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                blob_name = f"{prefix}data/{key}"
                if blob_name not in names:
                    raise ValueError(f"{path}: storage blob {blob_name} missing")
                blob = zf.read(blob_name)
                arr = np.frombuffer(blob, dtype, count=len(blob) // dtype.itemsize)
                storages[key] = arr.byteswap() if byteorder != sys.byteorder and dtype.itemsize > 1 else arr
            arr = storages[key]
            if arr.size < numel:
                raise ValueError(f"{path}: storage {key} has {arr.size} elements, pickle says {numel}")
            return arr

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items()):
        raise ValueError(f"{path}: not a flat state dict of tensors")
    return dict(obj)


def write_pth(path: str, tensors: dict[str, np.ndarray]) -> None:
    """Write a flat state dict with `torch.save` (the reference loader's format). Needs the optional
    torch extra; written to `path + '.tmp'` and renamed, so a failure leaves no partial file."""
    try:
        import torch
    except ImportError:
        raise ImportError("writing a .pth needs PyTorch: pip install 'lance-jax[torch]' "
                          "(or convert the VAE to .safetensors)") from None
    state = collections.OrderedDict()
    for key, value in tensors.items():
        value = np.ascontiguousarray(value)
        if value.dtype == ml_dtypes.bfloat16:
            state[key] = torch.from_numpy(value.view(np.int16).copy()).view(torch.bfloat16)
        else:
            state[key] = torch.from_numpy(value.copy())
    tmp = path + ".tmp"
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
