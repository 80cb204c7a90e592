"""``Gather`` on a constant 2-D table along axis 0: an embedding lookup (op key ``gather``).

Only PEFT adapters reach it (``lora_embedding_A/B``); fresh recipes (``--ops``) cannot. The branch's A
is a (vocab, r) table looked up by the same ids, its B the dense (r, dim).
"""

from __future__ import annotations

import onnx_ir as ir

from lora_onnx.kinds.base import FLOAT_TYPES, register
from lora_onnx.kinds.dense import DenseKind
from lora_onnx.kinds.site import Site
from lora_onnx.model.graph import attribute_values
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.values import name_of
from lora_onnx.model.weights import resolve_weight, source_value


class GatherKind(DenseKind):
    op_type = "Gather"
    key = "gather"
    peft_role = "embedding"
    slottable = False
    weight_input = 0
    a_op = "Gather"
    #: An embedding table must equal its parameter exactly (no per-channel fold factor applies).
    exact_parameter = True

    def site(self, node: ir.Node) -> Site | str:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return "has no weight input"
        weight = resolve_weight(node.inputs[0])
        if isinstance(weight, str):
            return weight
        if weight.node_dtype not in FLOAT_TYPES:
            return f"table {weight.initializer!r} holds integers: an embedding table is float"
        shape = weight.node_shape
        if len(shape) != 2 or 0 in shape:
            return (
                f"table {weight.initializer!r} has shape {list(shape)}; an embedding is a non-empty 2-D table"
            )
        axis = int(attribute_values(node).get("axis", 0))  # type: ignore[call-overload]
        if axis not in (0, -2):
            return f"gathers along axis {axis}; an embedding lookup gathers rows (axis 0)"
        path = module_path(node, source_value(node.inputs[0]))
        return Site(
            node.name,
            self.op_type,
            path,
            name_of(node.inputs[1]),
            name_of(node.outputs[0]),
            weight,
            "vocab,dim",
            shape[0],
            shape[1],
        )

    def peft_base_shape(self, site: Site) -> tuple[int, ...]:
        return (site.in_features, site.out_features)


GATHER = register(GatherKind())
