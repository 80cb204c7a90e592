"""``MatMul`` with a constant weight as its second input: ``y = x @ W``, W stored (in, out)."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from lora_onnx.kinds.base import float_weight, register
from lora_onnx.kinds.dense import DenseKind
from lora_onnx.kinds.site import Site
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.values import constant_shape, is_constant, name_of
from lora_onnx.model.weights import WeightRef, resolve_weight, source_value

WEIGHT_FIRST = "the weight is the first input (W @ x); a LoRA branch needs x @ W with W as the second input"


def join_after_bias(node: ir.Node, out_features: int) -> tuple[str, str | None]:
    """The join value and the node's bias Add (its lone reader ``Add(mm, bias)``, constant (out,) bias).

    The branch joins after the bias Add for a 2-D (or unknown-rank) data input, where onnxruntime fuses
    MatMul + bias into a Gemm. For N-d inputs it fuses the bias with what follows instead (BiasGelu,
    SkipLayerNormalization's bias), so the branch joins before the bias Add and leaves that pair
    adjacent; the bias Add is still reported (a PEFT ``lora_B.bias`` folds into it).
    """
    output = node.outputs[0]
    uses = list(output.uses())
    if output.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add":
        return name_of(output), None
    add = uses[0].node
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    bias = resolve_weight(other)
    if isinstance(bias, str) or bias.node_shape != (out_features,) or other is output:
        return name_of(output), None
    if data_rank(node.inputs[0]) not in (2, None):
        return name_of(output), add.name
    return name_of(add.outputs[0]), add.name


def dense_weight(node: ir.Node) -> WeightRef | str:
    """The non-empty 2-D float weight a MatMul / Gemm node reads as its second input, or why it has none."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return "has no weight input"
    weight = float_weight(node, WEIGHT_FIRST)
    if isinstance(weight, str):
        return weight
    shape = weight.node_shape
    if len(shape) != 2:
        return f"weight {weight.initializer!r} has shape {list(shape)}; only 2-D weights take a dense branch"
    if 0 in shape:
        return f"weight {weight.initializer!r} is empty (shape {list(shape)})"
    return weight


#: ``ir.Value.meta`` key of a rank onnx shape inference found for a value the graph does not annotate
#: (:func:`lora_onnx.sites.find.find_sites` records it; meta is not serialised, the graph is unchanged).
INFERRED_RANK = "lora_onnx.inferred_rank"


def data_rank(value: ir.Value | None) -> int | None:
    """The rank the graph declares for ``value`` (its type's shape) or shape inference found for it, None
    when unknown."""
    if value is None:
        return None
    if value.shape is None:
        return value.meta.get(INFERRED_RANK)
    return len(value.shape)


class MatMulKind(DenseKind):
    op_type = "MatMul"
    key = "matmul"
    integer_twins = ("MatMulInteger", "QLinearMatMul")
    wants_data_rank = True
    bias_after = True
    linear = True

    def site(self, node: ir.Node) -> Site | str:
        weight = dense_weight(node)
        if isinstance(weight, str):
            return weight
        shape = weight.node_shape
        path = module_path(node, source_value(node.inputs[1]))
        output, bias_add = join_after_bias(node, out_features=shape[1])
        return Site(
            node.name, self.op_type, path, name_of(node.inputs[0]), output, weight, "in,out", shape[0],
            shape[1], bias_add=bias_add,
        )  # fmt: skip

    def output_width(self, node: ir.Node) -> int | None:
        value = node.inputs[1] if len(node.inputs) > 1 else None
        weight = constant_shape(value) if value is not None and is_constant(value) else None
        return int(weight[-1]) if weight else None

    def batched_input(self, shapes: Sequence[tuple[int, ...]]) -> bool:
        return all(len(s) == 3 for s in shapes)


MATMUL = register(MatMulKind())
