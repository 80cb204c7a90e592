"""Quantized weight formats: what a DequantizeLinear or MatMulNBits node does to its weight, from metadata,
and row readers that dequantize a weight block by block for a streamed fold.

Two formats hold the weights of quantized ONNX models:

- QDQ: an integer (or float8) initializer ``q`` feeds ``DequantizeLinear(q, scale, zero_point)``, whose
  float output ``(q - zero_point) * scale`` feeds the MatMul / Gemm / Conv. The scale is a scalar
  (per tensor), a 1-D tensor along ``axis`` (per channel), or, from opset 21, a tensor of ``q``'s rank
  whose ``axis`` dimension is ``ceil(dim / block_size)`` (blocked).
- onnxruntime's ``com.microsoft.MatMulNBits``: ``Y = A @ dequant(B)^T (+ bias)`` with ``B`` uint8
  ``(N, ceil(K / block_size), block_size * bits / 8)``, codes packed low bits first along K, per-block
  ``scales`` ``(N * n_blocks)`` in A's type and optional ``zero_points`` (packed uint8 like B, one row
  of ``ceil(n_blocks * bits / 8)`` bytes per output, or unpacked in A's type; default ``2^(bits-1)``).

This module reads no bytes to describe a node (shapes, types and attributes only); the row readers read
one block of rows at a time, as :mod:`lora_onnx.model.streaming` expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.model.graph import attribute_values
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.streaming import RowSource, tensor_rows
from lora_onnx.model.tensors import external_ref, shape_of
from lora_onnx.model.values import constant_dtype, constant_shape, inputs_of, is_constant, name_of

DEQUANTIZE_OPS = ("DequantizeLinear",)
#: DequantizeLinear exists in the ONNX domain and, for older opsets, in onnxruntime's contrib domain.
DEQUANTIZE_DOMAINS = ("", "ai.onnx", "com.microsoft")
NBITS_OP, NBITS_DOMAIN = "MatMulNBits", "com.microsoft"

_T = onnx.TensorProto
#: Element types stored several to a byte (low bits first), with their width in bits and signedness.
PACKED_TYPES = {
    getattr(_T, name): (bits, signed)
    for name, bits, signed in (("INT4", 4, True), ("UINT4", 4, False), ("INT2", 2, True), ("UINT2", 2, False))
    if hasattr(_T, name)
}


@dataclass(frozen=True)
class DequantizeStep:
    """A ``DequantizeLinear`` on a weight's way to its node: ``(q - zero_point) * scale``.

    ``axis`` is normalized (non-negative); ``block_size`` is 0 unless the quantization is blocked.
    ``dtype`` is the ONNX element type of the output (the scale's, or ``output_dtype``).
    """

    node: str
    quantized: str
    scale: str
    zero_point: str | None
    axis: int
    block_size: int
    dtype: int


def dequantize_step(node: ir.Node) -> DequantizeStep | str:
    """Describe a DequantizeLinear node whose scale and zero point are constants, else say why not."""
    if node.domain not in DEQUANTIZE_DOMAINS:
        return f"DequantizeLinear {node.name!r} is in the unknown domain {node.domain!r}"
    source, scale, zero_point = inputs_of(node, 3)
    for role, value in (("scale", scale), ("zero point", zero_point)):
        if (role == "scale" or value is not None) and not is_constant(value):
            where = f"the {role} {name_of(value)!r} of DequantizeLinear {node.name!r}"
            return f"{where} is not a constant initializer"
    assert scale is not None
    attrs = attribute_values(node)
    dtype = int(attrs.get("output_dtype", 0) or constant_dtype(scale))  # type: ignore[call-overload]
    rank = len(constant_shape(source)) if source is not None and is_constant(source) else 0
    axis = int(attrs.get("axis", 1))  # type: ignore[call-overload]
    return DequantizeStep(
        node=node.name or "",
        quantized=name_of(source),
        scale=name_of(scale),
        zero_point=name_of(zero_point) or None,
        axis=axis + rank if axis < 0 else axis,
        block_size=int(attrs.get("block_size", 0)),  # type: ignore[call-overload]
        dtype=dtype,
    )


@dataclass(frozen=True)
class NBitsNode:
    """A MatMulNBits node's attributes and inputs (empty strings for absent optional inputs)."""

    node: str
    k: int
    n: int
    bits: int
    block_size: int
    b: str
    scales: str
    zero_points: str
    g_idx: str
    bias: str

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.k / self.block_size)

    @property
    def b_shape(self) -> tuple[int, int, int]:
        return (self.n, self.n_blocks, self.block_size * self.bits // 8)


def nbits_node(node: ir.Node) -> NBitsNode | str:
    """Describe a MatMulNBits node from its attributes and metadata, or say why it cannot take a branch."""
    attrs = attribute_values(node)
    missing = [key for key in ("K", "N", "block_size") if key not in attrs]
    if missing:
        return f"MatMulNBits {node.name!r} lacks the attribute(s) {', '.join(missing)}"
    values = inputs_of(node, 6)
    inputs = [name_of(value) for value in values]
    info = NBitsNode(
        node=node.name or "",
        k=int(attrs["K"]),  # type: ignore[call-overload]
        n=int(attrs["N"]),  # type: ignore[call-overload]
        bits=int(attrs.get("bits", 4)),  # type: ignore[call-overload]
        block_size=int(attrs["block_size"]),  # type: ignore[call-overload]
        b=inputs[1],
        scales=inputs[2],
        zero_points=inputs[3],
        g_idx=inputs[4],
        bias=inputs[5],
    )
    if info.bits not in (2, 4, 8) or info.block_size < 1 or info.block_size * info.bits % 8:
        return (
            f"MatMulNBits {node.name!r} has bits={info.bits}, block_size={info.block_size}; "
            "expected bits 2, 4 or 8 and whole bytes per block"
        )
    for role, value in (("B", values[1]), ("scales", values[2])):
        if not is_constant(value):
            where = f"the {role} input {name_of(value)!r} of MatMulNBits {node.name!r}"
            return f"{where} is not a constant initializer"
    assert values[1] is not None
    b_shape = constant_shape(values[1])
    if b_shape != info.b_shape:
        return (
            f"B {info.b!r} of MatMulNBits {node.name!r} has shape {list(b_shape)}, but K={info.k}, "
            f"N={info.n}, bits={info.bits}, block_size={info.block_size} need {list(info.b_shape)}"
        )
    return info


# ---- unpacking -------------------------------------------------------------------------------------


def unpack_codes(packed: np.ndarray, bits: int) -> np.ndarray:
    """Codes packed ``8 // bits`` to a byte, low bits first: ``(..., m)`` -> ``(..., m * 8 // bits)``."""
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    parts = [(packed >> (j * bits)) & mask for j in range(per_byte)]
    return np.stack(parts, axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _signed(codes: np.ndarray, bits: int) -> np.ndarray:
    values = codes.astype(np.int16)
    return np.where(values >= 1 << (bits - 1), values - (1 << bits), values)


class PackedRows:
    """Rows of an external INT4 / UINT4 / INT2 / UINT2 tensor, unpacked to float32 codes."""

    def __init__(self, path: Path, offset: int, shape: tuple[int, ...], bits: int, signed: bool) -> None:
        self.path, self.offset, self.shape, self.bits, self.signed = path, offset, shape, bits, signed
        self.row_elems = math.prod(shape[1:])

    def read_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        per_byte = 8 // self.bits
        e0, e1 = r0 * self.row_elems, r1 * self.row_elems
        b0, b1 = e0 // per_byte, -(-e1 // per_byte)
        with open(self.path, "rb") as file:
            file.seek(self.offset + b0)
            raw = np.frombuffer(file.read(b1 - b0), np.uint8)
        codes = unpack_codes(raw, self.bits)[e0 - b0 * per_byte : e1 - b0 * per_byte]
        values = _signed(codes, self.bits) if self.signed else codes
        np.copyto(out.reshape(-1), values, casting="unsafe")


def code_rows(model: LoadedModel, name: str) -> RowSource:
    """Rows of a quantized initializer as float32 codes (packed sub-byte types unpacked)."""
    tensor = model.initializer(name)
    ref = external_ref(tensor)
    if tensor.data_type in PACKED_TYPES and ref is not None and model.base_dir is not None:
        bits, signed = PACKED_TYPES[tensor.data_type]
        return PackedRows(model.base_dir / ref.location, ref.offset, shape_of(tensor), bits, signed)
    return tensor_rows(model, name)


def constant(model: LoadedModel, name: str) -> np.ndarray:
    """A small constant (scale, zero point) as float32."""
    tensor = model.initializer(name)
    if external_ref(tensor) is None and name not in model.overrides:
        return onnx.numpy_helper.to_array(tensor).astype(np.float32)
    if tensor.data_type in PACKED_TYPES:
        rows = code_rows(model, name)
        shape = shape_of(tensor) or (1,)
        out = np.empty(shape, np.float32)
        rows.read_rows(0, shape[0], out, np.empty(out.size, np.float32))
        return out.reshape(shape_of(tensor))
    return np.asarray(model.array(name), dtype=np.float32)


# ---- QDQ -------------------------------------------------------------------------------------------


class QdqRows:
    """Rows of ``DequantizeLinear(q, scale, zero_point)`` in float32, block by block."""

    def __init__(self, model: LoadedModel, step: DequantizeStep) -> None:
        self.codes = code_rows(model, step.quantized)
        self.shape = self.codes.shape
        self.step = step
        self.scale = constant(model, step.scale)
        self.zero = constant(model, step.zero_point) if step.zero_point else None

    def _broadcast(self, values: np.ndarray, r0: int, r1: int) -> np.ndarray:
        """``values`` (a scale or zero point) for rows r0:r1, broadcastable against them."""
        rank, axis, block = len(self.shape), self.step.axis, self.step.block_size
        if values.size == 1 and not block:
            return values.reshape(())
        if block:
            if axis == 0:
                return values[np.arange(r0, r1) // block]
            expanded = np.repeat(values[r0:r1], block, axis=axis)
            return np.take(expanded, np.arange(self.shape[axis]), axis=axis)
        shape = [1] * rank
        shape[axis] = values.size
        full = values.reshape(shape)
        return full[r0:r1] if axis == 0 else full

    def read_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        self.codes.read_rows(r0, r1, out, scratch)
        if self.zero is not None:
            out -= self._broadcast(self.zero, r0, r1)
        out *= self._broadcast(self.scale, r0, r1)


# ---- MatMulNBits -----------------------------------------------------------------------------------


class NBitsRows:
    """Rows of the float ``(K, N)`` MatMul weight equal to a MatMulNBits node's dequantized B."""

    def __init__(self, model: LoadedModel, info: NBitsNode) -> None:
        self.model, self.info = model, info
        self.shape = (info.k, info.n)
        n, blocks = info.n, info.n_blocks
        self.scales = constant(model, info.scales).reshape(n, blocks)
        self.zero = self._zero_points(model).reshape(n, -1)[:, :blocks]

    def _zero_points(self, model: LoadedModel) -> np.ndarray:
        info = self.info
        if not info.zero_points:
            return np.full((info.n, 1), float(1 << (info.bits - 1)), np.float32).repeat(info.n_blocks, 1)
        tensor = model.initializer(info.zero_points)
        if tensor.data_type == _T.UINT8:
            packed = np.asarray(model.array(info.zero_points), np.uint8).reshape(info.n, -1)
            return unpack_codes(packed, info.bits).astype(np.float32)
        return constant(model, info.zero_points)

    def read_rows(self, r0: int, r1: int, out: np.ndarray, scratch: np.ndarray) -> None:
        info = self.info
        kb0, kb1 = r0 // info.block_size, -(-r1 // info.block_size)
        # A block of K is a strided slice of B (every row of N): map it for this read only, so B's
        # pages do not stay counted against the process for the whole save.
        packed = np.array(self.model.array(info.b)[:, kb0:kb1], np.uint8)
        codes = unpack_codes(packed, info.bits).astype(np.float32)
        codes -= self.zero[:, kb0:kb1, None]
        codes *= self.scales[:, kb0:kb1, None]
        first = r0 - kb0 * info.block_size
        weight_nk = codes.reshape(info.n, -1)[:, first : first + (r1 - r0)]
        np.copyto(out, weight_nk.T)
