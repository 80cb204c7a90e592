"""What the read-only analysis asks of an onnx-ir value: is it a constant, and its shape and type.

Constants are the graph's initializers (also those an IR < 4 model lists as graph inputs: they are the
model's weights). Shapes and types come from the tensor's metadata (``const_value.shape`` / ``.dtype``),
never from its bytes, so external tensors stay unread.
"""

from __future__ import annotations

import onnx_ir as ir


def name_of(value: ir.Value | None) -> str:
    """The value's name; "" for an absent optional input (ONNX's empty name)."""
    return (value.name or "") if value is not None else ""


def is_constant(value: ir.Value | None) -> bool:
    """A value with a value at load time: an initializer."""
    return value is not None and value.is_initializer()


def constant_shape(value: ir.Value) -> tuple[int, ...]:
    """The dims of an initializer, from its tensor's metadata."""
    tensor = value.const_value
    shape = tensor.shape if tensor is not None else value.shape
    return tuple(int(dim) for dim in shape) if shape is not None else ()  # type: ignore[arg-type]


def constant_dtype(value: ir.Value) -> int:
    """The ONNX element type of an initializer (a plain int, as TensorProto.data_type is)."""
    tensor = value.const_value
    if tensor is not None:
        return int(tensor.dtype)
    return int(value.dtype) if value.dtype is not None else 0


def inputs_of(node: ir.Node, count: int) -> list[ir.Value | None]:
    """The node's first ``count`` inputs, None for absent ones (missing trailing inputs included)."""
    inputs = list(node.inputs)[:count]
    return inputs + [None] * (count - len(inputs))
