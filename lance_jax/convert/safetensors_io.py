"""safetensors reading and writing without torch: bf16 through ml_dtypes, one tensor in memory at a time."""
from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def safetensors_header(path: str) -> dict[str, dict]:
    """{key: {'dtype', 'shape', 'data_offsets'}} of a .safetensors file (metadata entry removed)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > os.path.getsize(path):
            raise ValueError(f"{path}: corrupt safetensors header length {n}")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def read_tensors(path: str, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) from a .safetensors file, memory-mapped, in file order."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    wanted = header.keys() if keys is None else keys
    for key in wanted:
        info = header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        begin, end = info["data_offsets"]
        yield key, data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (any dtype of _ST_DTYPES, bf16 included) as .safetensors, atomically (tmp + rename)."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, offset = {}, 0
    for key, arr in tensors.items():
        arr_dtype = np.dtype(arr.dtype)
        if arr_dtype not in names:
            raise ValueError(f"tensor {key}: dtype {arr_dtype} cannot be stored in safetensors")
        nbytes = arr.size * arr_dtype.itemsize
        header[key] = {"dtype": names[arr_dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
    os.replace(tmp, path)
