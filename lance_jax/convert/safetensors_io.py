"""safetensors reading and writing without torch: bf16 through ml_dtypes, one tensor in memory at a time.

Reading memory-maps the file; writing takes the tensor list up front (the header needs every shape)
and asks for each tensor's bytes only when it is its turn, so a multi-GB file is written with one
tensor in memory.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Iterator, Sequence

import ml_dtypes
import numpy as np

ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in ST_DTYPES.items()}


def st_dtype_name(dtype) -> str:
    """safetensors dtype string ('F32', 'BF16', ...) of a NumPy dtype."""
    dtype = np.dtype(dtype)
    if dtype not in _ST_NAMES:
        raise ValueError(f"dtype {dtype} cannot be stored in safetensors")
    return _ST_NAMES[dtype]


def safetensors_header(path: str) -> dict[str, dict]:
    """{key: {'dtype', 'shape', 'data_offsets'}} of a .safetensors file (metadata entry removed)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise ValueError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ValueError(f"{path}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, info in header.items():
        begin, end = info["data_offsets"]
        if info["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: tensor {key} has unsupported dtype {info['dtype']}")
        expected = int(np.prod(info["shape"], dtype=np.int64)) * np.dtype(ST_DTYPES[info["dtype"]]).itemsize
        if end > data_size or end - begin != expected:
            raise ValueError(f"{path}: tensor {key} lies outside the file or has the wrong size (truncated file?)")
    return header


def read_tensors(path: str, keys: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (key, array) from a .safetensors file, memory-mapped, in file order (or `keys` order)."""
    header = safetensors_header(path)
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for key in header.keys() if keys is None else keys:
        info = header[key]
        begin, end = info["data_offsets"]
        yield key, data[begin:end].view(ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors_streaming(path: str, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                                produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write `entries` (key, shape, dtype) in order, calling `produce(key)` for each tensor's data.

    Atomic: written to `path + '.tmp'` and renamed, so a failure never leaves a half-written file.
    """
    header, offset = {}, 0
    for key, shape, dtype in entries:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[key] = {"dtype": st_dtype_name(dtype), "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data section starts 8-byte aligned
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, shape, dtype in entries:
                arr = np.asarray(produce(key))
                if arr.shape != tuple(shape) or arr.dtype != np.dtype(dtype):
                    raise ValueError(f"{key}: produced {arr.shape} {arr.dtype}, header says {tuple(shape)} {np.dtype(dtype)}")
                f.write(np.ascontiguousarray(arr).tobytes())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Write in-memory tensors (any dtype of ST_DTYPES, bf16 included) as .safetensors, atomically."""
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    write_safetensors_streaming(path, entries, tensors.__getitem__, metadata)
