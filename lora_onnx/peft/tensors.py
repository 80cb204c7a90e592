"""Read ``adapter_model.safetensors`` lazily, and write one, without torch.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range) and
the raw bytes. Reading parses the header only; each tensor is memory-mapped when asked for, so checking
shapes costs nothing and bfloat16 adapters work (numpy has no bfloat16; ml_dtypes, which onnx already
needs, provides it).
"""

from __future__ import annotations

import json
import math
import os
import struct
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

from lora_onnx.errors import AdapterError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
_MAX_HEADER = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


class SafetensorsFile:
    """A safetensors file opened for lazy reads: :attr:`tensors` from the header, :meth:`read` per tensor."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            size = path.stat().st_size
            with open(path, "rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    raise AdapterError(f"{path}: not a safetensors file (shorter than its header)")
                (header_len,) = struct.unpack("<Q", prefix)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise AdapterError(f"{path}: not a safetensors file, or truncated (bad header length)")
                header = json.loads(handle.read(header_len))
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read ({exc.strerror})") from exc
        except (UnicodeDecodeError, ValueError) as exc:
            raise AdapterError(f"{path}: not a safetensors file (unreadable header: {exc})") from exc
        if not isinstance(header, dict):
            raise AdapterError(f"{path}: not a safetensors file (the header is not an object)")
        self.metadata: Mapping[str, str] = header.pop("__metadata__", None) or {}
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for key, entry in header.items():
            info = self._entry(key, entry, data_start)
            if info.offset + info.length > size:
                raise AdapterError(
                    f"{path} is truncated: tensor {key!r} needs bytes up to {info.offset + info.length} "
                    f"but the file has {size}"
                )
            self.tensors[key] = info

    def _entry(self, key: str, entry: object, data_start: int) -> TensorInfo:
        try:
            dtype = str(entry["dtype"])  # type: ignore[index]
            shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
            begin, end = (int(v) for v in entry["data_offsets"])  # type: ignore[index]
        except (KeyError, TypeError, ValueError) as exc:
            raise AdapterError(f"{self.path}: malformed header entry for tensor {key!r}") from exc
        if dtype not in _DTYPES:
            raise AdapterError(
                f"{self.path}: tensor {key!r} has dtype {dtype}; LoRA tensors must be F32, F16, BF16 or F64"
            )
        if end - begin != math.prod(shape) * _DTYPES[dtype].itemsize or begin < 0:
            raise AdapterError(
                f"{self.path}: tensor {key!r}: its byte range does not match shape {list(shape)}"
            )
        return TensorInfo(key, dtype, shape, data_start + begin, end - begin)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def read(self, key: str) -> np.ndarray:
        """The tensor's values (memory-mapped, read-only)."""
        info = self.tensors[key]
        dtype = _DTYPES[info.dtype]
        if info.length == 0:
            return np.zeros(info.shape, dtype)
        return np.memmap(self.path, dtype=dtype, mode="r", offset=info.offset, shape=info.shape)


def open_adapter_weights(folder: Path) -> SafetensorsFile:
    """``folder/adapter_model.safetensors``; a pickled ``adapter_model.bin`` alone is refused with the fix."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / PICKLE_NAME).is_file():
            raise AdapterError(
                f"{folder} has its adapter weights only in {PICKLE_NAME} (a pickle, which lora-onnx does "
                f"not load); convert them to {WEIGHTS_NAME}: load the adapter with PEFT and "
                "save_pretrained() it again (safetensors is the default), or "
                "safetensors.torch.save_file(torch.load(...), ...)"
            )
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    return SafetensorsFile(path)


def dtype_name(dtype: np.dtype) -> str:
    """The safetensors name of a numpy dtype (F32, F16, BF16, F64)."""
    try:
        return _NAMES[np.dtype(dtype)]
    except KeyError as exc:
        raise AdapterError(f"cannot write dtype {dtype} to safetensors; expected a float type") from exc


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (in key order)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        blob = array.tobytes()
        header[key] = {
            "dtype": dtype_name(array.dtype),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    temp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        temp.write_bytes(data)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
