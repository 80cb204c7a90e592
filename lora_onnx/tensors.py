"""Tensor metadata and on-demand reads.

Shapes and types come from ``TensorProto.dims`` / ``data_type``; bytes are read only when a stage really
needs a value (folding, DoRA norms), one tensor at a time and memory-mapped from external data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes live: a file relative to the model's folder, offset and length."""

    location: str
    offset: int = 0
    length: int | None = None


def external_ref(tensor: onnx.TensorProto) -> ExternalRef | None:
    """The external-data reference of ``tensor``, or None when its bytes are stored inline."""
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    fields = {entry.key: entry.value for entry in tensor.external_data}
    length = fields.get("length")
    return ExternalRef(fields["location"], int(fields.get("offset", 0)), int(length) if length else None)


def set_external_ref(tensor: onnx.TensorProto, ref: ExternalRef) -> None:
    """Point ``tensor`` at external bytes (dropping any inline payload)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": ref.location, "offset": str(ref.offset)}
    if ref.length is not None:
        entries["length"] = str(ref.length)
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def shape_of(tensor: onnx.TensorProto) -> tuple[int, ...]:
    """The tensor's shape from its metadata (never its bytes)."""
    return tuple(int(d) for d in tensor.dims)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def np_dtype(onnx_type: int) -> np.dtype:
    """The numpy dtype for an ONNX element type (bfloat16 and float8 via ml_dtypes, as onnx maps them)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def type_name(onnx_type: int) -> str:
    return onnx.TensorProto.DataType.Name(onnx_type).lower()


def nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor's values occupy, from metadata."""
    return numel(shape_of(tensor)) * np_dtype(tensor.data_type).itemsize


def read_array(tensor: onnx.TensorProto, base_dir: Path | None) -> np.ndarray:
    """The tensor's values; external data is memory-mapped read-only, so only touched pages load."""
    ref = external_ref(tensor)
    if ref is None:
        return numpy_helper.to_array(tensor)
    if base_dir is None:
        raise ValueError(f"tensor {tensor.name!r} is external but no base folder is known")
    dtype = np_dtype(tensor.data_type)
    shape = shape_of(tensor)
    if numel(shape) == 0:
        return np.zeros(shape, dtype)
    return np.memmap(base_dir / ref.location, dtype=dtype, mode="r", offset=ref.offset, shape=shape)


def make_tensor(name: str, values: np.ndarray, onnx_type: int | None = None) -> onnx.TensorProto:
    """An inline initializer holding ``values`` (cast to ``onnx_type`` when given)."""
    if onnx_type is not None:
        values = np.asarray(values).astype(np_dtype(onnx_type), copy=False)
    return numpy_helper.from_array(np.ascontiguousarray(values), name)


def make_deferred(name: str, shape: tuple[int, ...], onnx_type: int) -> onnx.TensorProto:
    """An initializer with metadata only; its value comes from a :class:`~lora_onnx.load.LoadedModel`
    override, produced when the model is saved (see :mod:`lora_onnx.save`)."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx_type
    tensor.dims.extend(shape)
    return tensor
