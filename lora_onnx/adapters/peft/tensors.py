"""Read ``adapter_model.safetensors`` lazily, and write one, without torch (the safetensors library's
numpy side; bfloat16 through ml_dtypes, which onnx already needs).

Opening reads the header only: keys, dtypes and shapes are checked before any tensor is, and each
tensor is read when asked for (and refused, naming its key, when it holds a NaN or Inf).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

from lora_onnx.common.finite import require_finite_tensor
from lora_onnx.errors import AdapterError

WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
#: LoRA tensors are floats; anything else in an adapter file is a mistake worth naming.
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
INT_DTYPES = ("I64", "I32", "I16", "I8", "U8")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry in a safetensors header."""

    key: str
    dtype: str
    shape: tuple[int, ...]


class SafetensorsFile:
    """A safetensors file opened for lazy reads: :attr:`tensors` from the header, :meth:`read` per tensor."""

    def __init__(self, path: Path, *, scalar_suffixes: tuple[str, ...] = ()) -> None:
        # kohya's per-module ``.alpha`` scalars may be saved as integers (diffusers' kohya converter does)
        self.scalar_suffixes = scalar_suffixes
        self.path = path
        try:
            with safe_open(str(path), framework="numpy") as handle:
                self.metadata: Mapping[str, str] = dict(handle.metadata() or {})
                self.tensors = {key: self._info(key, handle.get_slice(key)) for key in handle.keys()}  # noqa: SIM118
        except OSError as exc:
            raise AdapterError(f"{path}: cannot read ({exc.strerror or exc})") from exc
        except SafetensorError as exc:
            # e.g. "incomplete metadata, file not fully covered" for a truncated file
            raise AdapterError(f"{path}: not a safetensors file, or truncated ({exc})") from exc

    def _info(self, key: str, view: object) -> TensorInfo:
        dtype = str(view.get_dtype())  # type: ignore[attr-defined]
        if dtype not in FLOAT_DTYPES and not (key.endswith(self.scalar_suffixes) and dtype in INT_DTYPES):
            raise AdapterError(
                f"{self.path}: tensor {key!r} has dtype {dtype}; LoRA tensors must be F32, F16, BF16 or F64"
            )
        return TensorInfo(key, dtype, tuple(int(d) for d in view.get_shape()))  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def read(self, key: str) -> np.ndarray:
        """The tensor's values; a NaN or Inf among them is an :class:`AdapterError` naming the key."""
        try:
            with safe_open(str(self.path), framework="numpy") as handle:
                value = handle.get_tensor(key)
        except OSError as exc:
            raise AdapterError(f"{self.path}: cannot read ({exc.strerror or exc})") from exc
        except SafetensorError as exc:  # the file changed since its header was read
            raise AdapterError(f"{self.path}: cannot read key {key!r} ({exc})") from exc
        require_finite_tensor(value, key, str(self.path))
        return value


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


def encode_safetensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes of a safetensors file holding ``tensors``."""
    arrays = {key: np.ascontiguousarray(value) for key, value in tensors.items()}
    return safetensors.numpy.save(arrays, metadata=dict(metadata) if metadata else None)
