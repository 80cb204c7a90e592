"""Tensor metadata and on-demand reads.

Shapes and types come from ``TensorProto.dims`` / ``data_type``; bytes are read only when a stage really
needs a value (folding, DoRA norms), one tensor at a time and memory-mapped from external data.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from lora_onnx.errors import ModelLoadError

#: The external_data keys onnxruntime accepts; it refuses any other key, and a key given twice.
EXTERNAL_KEYS = ("location", "offset", "length", "checksum")
_BYTE_COUNT = re.compile(r"[0-9]+")  # ASCII digits only: onnxruntime refuses "+8", " 8", "-8", "0x8"

#: Bits per element of the packed sub-byte types (two 4-bit values per byte, etc.), where onnx has them.
SUB_BYTE_BITS = {
    getattr(onnx.TensorProto, name): bits
    for name, bits in (
        ("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(onnx.TensorProto, name)
}  # fmt: skip


@dataclass(frozen=True)
class ExternalRef:
    """Where an external tensor's bytes live: a file relative to the model's folder, offset and length."""

    location: str
    offset: int = 0
    length: int | None = None


def external_ref(tensor: onnx.TensorProto) -> ExternalRef | None:
    """The external-data reference of ``tensor``, or None when its bytes are stored inline.

    The entries are checked as onnxruntime checks them (known keys, each once, a non-empty relative
    ``location`` inside the folder, whole-number ``offset`` / ``length``); anything else raises
    :class:`ModelLoadError` naming the tensor.
    """
    if tensor.data_location != onnx.TensorProto.EXTERNAL:
        return None
    what = f"initializer {tensor.name!r}"
    fields: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_KEYS:
            raise ModelLoadError(
                f"{what} has an unknown external_data key {entry.key!r} (onnxruntime accepts only "
                f"{', '.join(EXTERNAL_KEYS)})"
            )
        if entry.key in fields:
            raise ModelLoadError(f"{what} gives its external_data key {entry.key!r} twice")
        fields[entry.key] = entry.value
    location = fields.get("location")
    if location is None:
        raise ModelLoadError(f"{what} is stored as external data but has no 'location' entry")
    check_location(location, what)
    where = f"{what} (in {location!r})"
    offset = _byte_count(fields.get("offset", "0"), "offset", where)
    length = _byte_count(fields["length"], "length", where) if "length" in fields else None
    return ExternalRef(location, offset, length)


def check_location(location: str, what: str) -> None:
    """Refuse a location that is empty, has a NUL byte, is absolute or climbs out with ``..``."""
    if not location:
        raise ModelLoadError(f"{what} has an empty external data location (it names the model's folder)")
    if "\0" in location:
        raise ModelLoadError(f"{what} has an external data location with a NUL byte: {location!r}")
    parts = Path(location).parts
    if Path(location).is_absolute() or ".." in parts:
        raise ModelLoadError(
            f"{what} refers to {location!r} outside the model's folder; onnxruntime refuses such locations"
        )


def _byte_count(value: str, key: str, where: str) -> int:
    if not _BYTE_COUNT.fullmatch(value):
        raise ModelLoadError(f"{where}: external_data {key} {value!r} is not a whole number of bytes")
    return int(value)


def data_file(base_dir: Path, location: str, what: str, model_file: Path | None = None) -> Path:
    """The regular file ``location`` names inside ``base_dir``, with every symbolic link resolved.

    Symbolic links are followed as onnxruntime (1.32) follows them: the resolved file must lie in the
    model's folder or, when ``model_file`` is itself a link, in the folder of the file it resolves to (a
    Hugging Face cache snapshot links both the model and its data into ``blobs/``). A link leading
    anywhere else is refused like ``..``. Raises :class:`ModelLoadError` naming ``what`` and the file.
    """
    check_location(location, what)
    file = base_dir / location
    try:
        roots = [base_dir.resolve(strict=True)]
        if model_file is not None:
            roots.append(model_file.resolve(strict=True).parent)
        target = file.resolve(strict=True)
        info = os.stat(target)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symbolic link loop
        raise ModelLoadError(f"external data file {file} for {what} is missing") from exc
    if not any(target.is_relative_to(root) for root in roots):
        raise ModelLoadError(
            f"{what}: its external data file {file} is a symbolic link (or in a linked folder) leading "
            f"outside the model's folder, to {target}; onnxruntime refuses such files: copy the data into "
            "the folder (e.g. cp -L)"
        )
    if stat.S_ISDIR(info.st_mode):
        raise ModelLoadError(f"{what}: its external data location {location!r} is a folder, not a data file")
    if not stat.S_ISREG(info.st_mode):
        raise ModelLoadError(f"{what}: its external data file {file} is not a regular file")
    return target


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
    """Bytes the tensor's values occupy, from metadata (packed sub-byte types round up to whole bytes)."""
    count = numel(shape_of(tensor))
    bits = SUB_BYTE_BITS.get(tensor.data_type)
    if bits is not None:
        return -(-count * bits // 8)
    return count * np_dtype(tensor.data_type).itemsize


def read_array(tensor: onnx.TensorProto, base_dir: Path | None, model_file: Path | None = None) -> np.ndarray:
    """The tensor's values; external data is memory-mapped read-only, so only touched pages load.

    The data file is checked again here (inside the folder, see :func:`data_file`, and long enough): it
    may have changed since the model was loaded. Raises :class:`ModelLoadError` naming the tensor and file.
    """
    ref = external_ref(tensor)
    if ref is None:
        return numpy_helper.to_array(tensor)
    what = f"initializer {tensor.name!r}"
    if base_dir is None:
        raise ModelLoadError(f"{what} is stored as external data but no base folder is known")
    file = data_file(base_dir, ref.location, what, model_file)
    dtype = np_dtype(tensor.data_type)
    shape = shape_of(tensor)
    size = nbytes(tensor)
    if file.stat().st_size < ref.offset + size:
        raise ModelLoadError(
            f"external data file {base_dir / ref.location} is truncated: {what} needs bytes "
            f"{ref.offset}..{ref.offset + size} but the file has {file.stat().st_size}"
        )
    if numel(shape) == 0:
        return np.zeros(shape, dtype)
    if tensor.data_type in SUB_BYTE_BITS:
        # packed: numpy_helper unpacks the bytes as onnx stores them
        with open(file, "rb") as handle:
            handle.seek(ref.offset)
            packed = onnx.TensorProto()
            packed.CopyFrom(tensor)
            del packed.external_data[:]
            packed.data_location = onnx.TensorProto.DEFAULT
            packed.raw_data = handle.read(size)
        return numpy_helper.to_array(packed)
    return np.memmap(file, dtype=dtype, mode="r", offset=ref.offset, shape=shape)


def make_tensor(name: str, values: np.ndarray, onnx_type: int | None = None) -> onnx.TensorProto:
    """An inline initializer holding ``values`` (cast to ``onnx_type`` when given)."""
    if onnx_type is not None:
        values = np.asarray(values).astype(np_dtype(onnx_type), copy=False)
    return numpy_helper.from_array(np.ascontiguousarray(values), name)


def make_deferred(name: str, shape: tuple[int, ...], onnx_type: int) -> onnx.TensorProto:
    """An initializer with metadata only; its value comes from a :class:`~lora_onnx.model.load.LoadedModel`
    override, produced when the model is saved (see :mod:`lora_onnx.model.save`)."""
    tensor = onnx.TensorProto()
    tensor.name = name
    tensor.data_type = onnx_type
    tensor.dims.extend(shape)
    return tensor


def scale_into_b(b: np.ndarray, factor: float) -> np.ndarray:
    """``factor * B``, computed in float32 and rounded once to B's own type (fp16 adapters stay fp16).

    The one place a LoRA scale (or a strength) is folded into B: slot forms, adapter files, mixed stacks.
    A factor of exactly 1 returns B's values untouched (no float32 round trip for wider types).
    """
    b = np.asarray(b)
    if factor == 1.0:
        return b
    return (np.float32(factor) * b.astype(np.float32)).astype(b.dtype)
