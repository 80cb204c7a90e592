"""Inputs for validation runs: generated from the model's input types and shapes, or loaded from .npz.

Symbolic dimensions take ``--dim NAME=V`` values, else a default by name (batch-like 2, anything else
8). Integer inputs are small non-negative values so token ids and indices stay in range; masks are ones,
token types zeros and position ids ``0..n-1``, which is what every exporter's sample input looks like; a
mixed-batch model's ``lora_adapter_index`` is 0 (its first adapter) on every row. Given the model's
graph, decoder inputs (a KV cache, its masks and positions, ids below the embedding table's rows) get
consistent values: see :mod:`lora_onnx.proofs.decoder_inputs`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lora_onnx.common.constants import ADAPTER_INDEX
from lora_onnx.common.finite import MAX_SEED, check_seed  # noqa: F401  (re-exported for callers)
from lora_onnx.errors import LoraOnnxError
from lora_onnx.proofs.decoder_inputs import decoder_layout, decoder_sizes, decoder_value

if TYPE_CHECKING:
    import onnx

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}
_BATCH = re.compile(r"batch|^n$|^b$|^N$", re.IGNORECASE)
_MAX_TOKEN = 16
DEFAULT_BATCH, DEFAULT_OTHER = 2, 8


@dataclass(frozen=True)
class InputSpec:
    """One graph input as onnxruntime reports it: ``dims`` holds ints, dim names, or None."""

    name: str
    type: str
    dims: tuple[int | str | None, ...]


def parse_dims(items: Sequence[str]) -> dict[str, int]:
    """``["batch=4", "seq=16"]`` -> ``{"batch": 4, "seq": 16}`` (values positive whole numbers)."""
    dims = {}
    for item in items:
        name, sep, value = item.partition("=")
        value = value.strip()
        if not sep or not name.strip() or not value.isascii() or not value.isdigit() or int(value) < 1:
            raise LoraOnnxError(f"--dim takes NAME=VALUE with a positive whole number, got {item!r}")
        dims[name.strip()] = int(value)
    return dims


def symbolic_dims(specs: Sequence[InputSpec]) -> list[str]:
    """The symbolic dim names of ``specs``, in first-seen order."""
    return list(dict.fromkeys(d for spec in specs for d in spec.dims if isinstance(d, str)))


def check_dims(specs: Sequence[InputSpec], dims: Mapping[str, int]) -> None:
    """Refuse a ``--dim`` name that is no symbolic dim of any input: a typo would be ignored silently."""
    known = symbolic_dims(specs)
    unknown = [name for name in dims if name not in known]
    if unknown:
        listing = ", ".join(known) if known else "none: every input dim is fixed"
        raise LoraOnnxError(
            f"--dim {unknown[0]}: no input of the model has a symbolic dim {unknown[0]!r} "
            f"(its symbolic dims: {listing})"
        )


def concrete_shape(spec: InputSpec, dims: Mapping[str, int]) -> tuple[int, ...]:
    shape = []
    for axis, dim in enumerate(spec.dims):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in dims:
            shape.append(dims[dim])
        elif (isinstance(dim, str) and _BATCH.search(dim)) or (axis == 0 and not isinstance(dim, int)):
            shape.append(DEFAULT_BATCH)
        else:
            shape.append(DEFAULT_OTHER)
    return tuple(shape)


def make_inputs(
    specs: Sequence[InputSpec],
    dims: Mapping[str, int] | None = None,
    seed: int = 0,
    *,
    strict: bool = False,
    graph: onnx.GraphProto | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic inputs for ``specs`` (see the module doc).

    With ``strict`` (the user's ``--dim``), every name in ``dims`` must be a symbolic dim of ``specs``.
    ``graph`` (the model's) lets decoder inputs and token ids follow the model (embedding rows, heads).
    """
    if strict:
        check_dims(specs, dims or {})
    layout = decoder_layout(specs, graph)
    dims = decoder_sizes(layout, dims or {})
    rng = np.random.default_rng(check_seed(seed))
    feeds = {}
    for spec in specs:
        if spec.type not in _ORT_TYPES:
            raise LoraOnnxError(
                f"input {spec.name!r} has type {spec.type}; pass its values with --inputs FILE.npz"
            )
        dtype = np.dtype(_ORT_TYPES[spec.type])
        shape = concrete_shape(spec, dims)
        name = spec.name.lower()
        if spec.name == ADAPTER_INDEX:
            feeds[spec.name] = np.zeros(shape, dtype)  # adapter 0 on every row: valid whatever the count
        elif dtype == np.bool_ or "mask" in name:
            feeds[spec.name] = np.ones(shape, dtype)
        elif (value := decoder_value(spec, shape, dtype, layout, dims, rng, _MAX_TOKEN)) is not None:
            feeds[spec.name] = value
        elif np.issubdtype(dtype, np.integer):
            if "type" in name:
                feeds[spec.name] = np.zeros(shape, dtype)
            elif "position" in name and shape:
                feeds[spec.name] = np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
            else:
                feeds[spec.name] = rng.integers(0, _MAX_TOKEN, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def load_inputs(path: str | Path, specs: Sequence[InputSpec]) -> dict[str, np.ndarray]:
    """Inputs from an .npz whose array names are the graph's input names."""
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise LoraOnnxError(f"--inputs {path}: cannot read it as .npz ({exc})") from exc
    feeds = {}
    for spec in specs:
        if spec.name not in arrays:
            raise LoraOnnxError(
                f"--inputs {path} has no array {spec.name!r} (has: {', '.join(arrays) or 'none'})"
            )
        expected = _ORT_TYPES.get(spec.type)
        value = arrays[spec.name]
        if expected is not None and value.dtype != np.dtype(expected):
            raise LoraOnnxError(
                f"--inputs {path}: {spec.name!r} is {value.dtype}, the model expects {spec.type}"
            )
        feeds[spec.name] = value
    return feeds
