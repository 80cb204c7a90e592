"""Read and write adapter files: tensor name -> array, in three formats.

- ``.onnx_adapter``: onnxruntime's FlatBuffers format (``onnxruntime.AdapterFormat``), loadable with
  ``onnxruntime.LoraAdapter`` and activated per run with ``RunOptions.add_active_adapter``. It stores an
  adapter version and a model version (integers) besides the tensors; every tensor needs at least one
  dim (onnxruntime refuses scalars on read).
- ``.safetensors``: the Hugging Face format, with string metadata.
- ``.npz``: numpy's archive, for anything else that feeds graph inputs by name.

Writes are atomic (temporary file + rename) and never replace an input; unreadable files, and tensors
with NaN / Inf, raise :class:`~lora_onnx.errors.AdapterError` naming the file (and the tensor).
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_onnx.common.atomic import check_outputs, write_file
from lora_onnx.common.constants import ADAPTER_FORMATS
from lora_onnx.common.finite import require_finite_tensors
from lora_onnx.errors import AdapterError

#: Format name -> file suffix.
FORMATS = ADAPTER_FORMATS


@dataclass(frozen=True)
class AdapterFile:
    """An adapter file's tensors (and, for ``.onnx_adapter``, its versions; safetensors: metadata)."""

    path: Path
    format: str
    tensors: Mapping[str, np.ndarray]
    adapter_version: int | None = None
    model_version: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


def format_for(path: str | os.PathLike, format: str | None = None) -> str:
    """``format`` if given, else the format the suffix of ``path`` names."""
    if format is not None:
        if format not in FORMATS:
            raise AdapterError(f"unknown adapter format {format!r}; use one of {', '.join(FORMATS)}")
        return format
    suffix = Path(path).suffix.lower()
    for name, ending in FORMATS.items():
        if suffix == ending:
            return name
    raise AdapterError(
        f"{path}: cannot tell the adapter format from the suffix {suffix or '(none)'!r}; use "
        f"{', '.join(FORMATS.values())} or pass --format"
    )


def _sniff(path: Path) -> str | None:
    """The format of an existing file from its first bytes, for files with an unusual suffix."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK"):
        return "npz"
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    return None


def read_adapter_file(path: str | os.PathLike, format: str | None = None) -> AdapterFile:
    """The tensors of an adapter file (format from ``format``, else the suffix, else the content).

    A tensor with a NaN or Inf is refused (:class:`AdapterError` naming it), as is a file that does not
    read; nothing else is raised.
    """
    adapter = _read(path, format)
    require_finite_tensors(adapter.tensors, str(adapter.path))
    return adapter


def _read(path: str | os.PathLike, format: str | None) -> AdapterFile:
    file = Path(path)
    if not file.is_file():
        raise AdapterError(f"{file}: no such adapter file")
    try:
        kind = format_for(file, format)
    except AdapterError:
        kind = _sniff(file) or format_for(file, format)
    try:
        if kind == "onnx_adapter":
            import onnxruntime as ort  # only .onnx_adapter files need it

            adapter = ort.AdapterFormat.read_adapter(str(file))
            # get_parameters() returns views into the reader's buffer: copy them out.
            tensors = {name: np.array(value.numpy()) for name, value in adapter.get_parameters().items()}
            return AdapterFile(
                file, kind, tensors, adapter.get_adapter_version(), adapter.get_model_version()
            )
        if kind == "safetensors":
            from safetensors import safe_open

            with safe_open(str(file), "np") as handle:
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
                metadata = dict(handle.metadata() or {})
            return AdapterFile(file, kind, tensors, metadata=metadata)
        _check_npz_sizes(file)
        with np.load(file, allow_pickle=False) as archive:
            tensors = {name: archive[name] for name in archive.files}
        return AdapterFile(file, kind, tensors)
    except AdapterError:
        raise
    except Exception as exc:  # onnxruntime, safetensors and numpy each raise their own types
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise AdapterError(f"{file}: not a readable {kind} adapter file ({first[:200]})") from exc


#: Deflate expands at most ~1032x; a member claiming more than that of its stored bytes is lying.
_DEFLATE_MAX_RATIO = 1032


def _check_npz_sizes(file: Path) -> None:
    """Refuse members whose .npy header claims more data than the member can hold, before numpy
    allocates it (numpy sizes its buffer from the header, so 100 bytes could ask for terabytes)."""
    on_disk = file.stat().st_size
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            limit = min(
                info.file_size,
                on_disk * (1 if info.compress_type == zipfile.ZIP_STORED else _DEFLATE_MAX_RATIO),
            )
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                read_header = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(member)
                needed = math.prod(shape) * dtype.itemsize
                room = max(limit - member.tell(), 0)
                if needed > room:
                    raise AdapterError(
                        f"{file}: member {info.filename!r} claims shape {shape} of {dtype} "
                        f"({needed:,} bytes) but holds at most {room:,}; the file is damaged"
                    )


def write_adapter_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    format: str | None = None,
    *,
    adapter_version: int = 1,
    model_version: int = 1,
    metadata: Mapping[str, str] | None = None,
    protect: Iterable[Path] = (),
) -> Path:
    """Write ``tensors`` atomically; returns the path. ``protect`` lists inputs that must not be replaced."""
    output = Path(path)
    kind = format_for(output, format)
    check_outputs([output], protect)
    # np.require keeps 0-d arrays 0-d (ascontiguousarray would silently make them 1-d)
    arrays = {name: np.require(value, requirements="C") for name, value in tensors.items()}
    if kind == "onnx_adapter":
        scalars = [name for name, value in arrays.items() if value.ndim == 0]
        if scalars:
            raise AdapterError(
                f"{scalars[0]!r} is a scalar; .onnx_adapter files need tensors of 1 dim or more"
            )
        for name, value in arrays.items():
            # onnxruntime writes bool tensors it cannot read back, and takes no bfloat16 from numpy
            if value.dtype.kind not in "fiu" or value.dtype.name == "bfloat16":
                raise AdapterError(
                    f"tensor {name!r} has dtype {value.dtype.name}, which .onnx_adapter files cannot hold "
                    "(onnxruntime reads float and integer tensors); write .safetensors or .npz instead"
                )

    def produce(temp: Path) -> None:
        if kind == "onnx_adapter":
            import onnxruntime as ort

            writer = ort.AdapterFormat()
            writer.set_adapter_version(adapter_version)
            writer.set_model_version(model_version)
            writer.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in arrays.items()})
            writer.export_adapter(str(temp.resolve()))
        elif kind == "safetensors":
            from safetensors.numpy import save_file

            save_file(arrays, str(temp), metadata=dict(metadata or {}) or None)
        else:
            with open(temp, "xb") as handle:
                np.savez(handle, **arrays)  # type: ignore[arg-type]

    write_file(output, produce)
    return output
