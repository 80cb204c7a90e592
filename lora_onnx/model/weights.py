"""Follow a node's weight input back to the initializer that stores it.

Exporters put small layout or type changes between a parameter and the node that uses it: Identity,
Transpose (perm [1, 0]) and Cast (fp16 storage, fp32 compute). Quantized (QDQ) models add a
DequantizeLinear with constant scale / zero point (see :mod:`lora_onnx.model.dequantize`). The branch attaches
to the node; folding edits the source initializer, undoing the chain's layout change, so both need the
chain spelled out.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from lora_onnx.model.dequantize import DEQUANTIZE_OPS, dequantize_step
from lora_onnx.model.graph import attribute_values
from lora_onnx.model.values import constant_dtype, constant_shape, is_constant, name_of

#: Ops a weight may pass through on its way to the node, in any order and number.
PASS_THROUGH_OPS = ("Identity", "Transpose", "Cast")


@dataclass(frozen=True)
class WeightRef:
    """A node's weight traced to its source initializer.

    ``transposed`` says the chain swaps the axes of the 2-D source, so the node sees ``source.T``;
    ``node_dtype`` is the element type the node computes in (after any Cast or DequantizeLinear), which
    the LoRA tensors take. ``dequantize`` names the chain's DequantizeLinear node, if any: the source is
    then a quantized tensor of the float weight's shape.
    """

    initializer: str
    source_shape: tuple[int, ...]
    source_dtype: int
    node_shape: tuple[int, ...]
    node_dtype: int
    chain: tuple[str, ...] = ()
    transposed: bool = False
    dequantize: str | None = None


def resolve_weight(value: ir.Value | None) -> WeightRef | str:
    """Trace ``value`` (a node's input) to its initializer through its producers; on failure return the
    reason it cannot be a LoRA weight."""
    label = name_of(value)
    chain: list[str] = []
    perms: list[tuple[str, list[int] | None]] = []
    cast_to: int | None = None
    dequantize: str | None = None
    current = value
    while not is_constant(current):
        producer = current.producer() if current is not None else None
        if producer is None:
            return f"input {label!r} is a graph input, not a constant weight"
        op = producer.op_type
        if op in DEQUANTIZE_OPS and dequantize is None:
            step = dequantize_step(producer)
            if isinstance(step, str):
                return step
            # The node computes in the dequantized type unless a Cast nearer the node changed it.
            cast_to = step.dtype if cast_to is None else cast_to
            dequantize = producer.name
            chain.append(producer.name)
            current = producer.inputs[0] if producer.inputs else None
            continue
        if op not in PASS_THROUGH_OPS:
            return f"input {label!r} is not a constant weight: {op} {producer.name!r} computes it at run time"
        if op == "Transpose":
            perm = attribute_values(producer).get("perm")
            perms.append((producer.name, list(perm) if perm is not None else None))  # type: ignore[call-overload]
        elif op == "Cast" and cast_to is None:
            cast_to = int(attribute_values(producer)["to"])  # type: ignore[call-overload]
        chain.append(producer.name)
        current = producer.inputs[0] if producer.inputs else None
    assert current is not None
    name = name_of(current)
    source_shape = constant_shape(current)
    source_dtype = constant_dtype(current)
    for node, perm in perms:
        if len(source_shape) != 2 or perm not in (None, [1, 0]):
            where = f"weight {name!r} {list(source_shape)} passes Transpose {node!r}"
            return f"{where} with perm {perm}; only 2-D swaps are traced"
    transposed = len(perms) % 2 == 1
    return WeightRef(
        initializer=name,
        source_shape=source_shape,
        source_dtype=source_dtype,
        node_shape=source_shape[::-1] if transposed else source_shape,
        node_dtype=cast_to if cast_to is not None else source_dtype,
        chain=tuple(reversed(chain)),
        transposed=transposed,
        dequantize=dequantize,
    )


def source_value(value: ir.Value | None) -> ir.Value | None:
    """The initializer a traced weight (see :func:`resolve_weight`) comes from: its value in the graph,
    whose metadata may name the parameter (``folded_from``); None when ``value`` is no constant's."""
    while value is not None and not is_constant(value):
        producer = value.producer()
        value = producer.inputs[0] if producer is not None and producer.inputs else None
    return value
