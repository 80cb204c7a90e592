"""Follow a node's weight input back to the initializer that stores it.

Exporters put small layout or type changes between a parameter and the node that uses it: Identity,
Transpose (perm [1, 0]) and Cast (fp16 storage, fp32 compute). Quantized (QDQ) models add a
DequantizeLinear with constant scale / zero point (see :mod:`lora_onnx.model.dequantize`). The branch attaches
to the node; folding edits the source initializer, undoing the chain's layout change, so both need the
chain spelled out.
"""

from __future__ import annotations

from dataclasses import dataclass

from lora_onnx.model.dequantize import DEQUANTIZE_OPS, dequantize_step
from lora_onnx.model.graph import GraphIndex
from lora_onnx.model.tensors import shape_of

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


def resolve_weight(index: GraphIndex, value: str) -> WeightRef | str:
    """Trace ``value`` to its initializer; on failure return the reason it cannot be a LoRA weight."""
    chain: list[str] = []
    perms: list[tuple[str, list[int] | None]] = []
    cast_to: int | None = None
    dequantize: str | None = None
    name = value
    while not index.is_constant(name):
        producer = index.producer.get(name)
        if producer is None:
            return f"input {value!r} is a graph input, not a constant weight"
        op = producer.op_type
        if op in DEQUANTIZE_OPS and dequantize is None:
            step = dequantize_step(index, producer)
            if isinstance(step, str):
                return step
            # The node computes in the dequantized type unless a Cast nearer the node changed it.
            cast_to = step.dtype if cast_to is None else cast_to
            dequantize = producer.name
            chain.append(producer.name)
            name = producer.input[0]
            continue
        if op not in PASS_THROUGH_OPS:
            return f"input {value!r} is not a constant weight: {op} {producer.name!r} computes it at run time"
        if op == "Transpose":
            perm = index.attributes(producer).get("perm")
            perms.append((producer.name, list(perm) if perm is not None else None))  # type: ignore[call-overload]
        elif op == "Cast" and cast_to is None:
            cast_to = int(index.attributes(producer)["to"])  # type: ignore[call-overload]
        chain.append(producer.name)
        name = producer.input[0]
    tensor = index.initializers[name]
    source_shape = shape_of(tensor)
    for node, perm in perms:
        if len(source_shape) != 2 or perm not in (None, [1, 0]):
            where = f"weight {name!r} {list(source_shape)} passes Transpose {node!r}"
            return f"{where} with perm {perm}; only 2-D swaps are traced"
    transposed = len(perms) % 2 == 1
    return WeightRef(
        initializer=name,
        source_shape=source_shape,
        source_dtype=tensor.data_type,
        node_shape=source_shape[::-1] if transposed else source_shape,
        node_dtype=cast_to if cast_to is not None else tensor.data_type,
        chain=tuple(reversed(chain)),
        transposed=transposed,
        dequantize=dequantize,
    )
