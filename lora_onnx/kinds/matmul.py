"""``MatMul`` with a constant weight as its second input: ``y = x @ W``, W stored (in, out)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import onnx

from lora_onnx.kinds.base import float_weight, register
from lora_onnx.kinds.dense import DenseKind
from lora_onnx.kinds.site import Site
from lora_onnx.model.graph import GraphIndex
from lora_onnx.model.module_paths import module_path
from lora_onnx.model.weights import WeightRef, resolve_weight

WEIGHT_FIRST = "the weight is the first input (W @ x); a LoRA branch needs x @ W with W as the second input"


def join_after_bias(index: GraphIndex, node: onnx.NodeProto, out_features: int) -> tuple[str, str | None]:
    """The join value and the node's bias Add (its lone consumer ``Add(mm, bias)``, constant (out,) bias).

    The branch joins after the bias Add for a 2-D (or unknown-rank) data input, where onnxruntime fuses
    MatMul + bias into a Gemm. For N-d inputs it fuses the bias with what follows instead (BiasGelu,
    SkipLayerNormalization's bias), so the branch joins before the bias Add and leaves that pair
    adjacent; the bias Add is still reported (a PEFT ``lora_B.bias`` folds into it).
    """
    output = node.output[0]
    consumers = index.consumers.get(output, [])
    if output in index.graph_outputs or len(consumers) != 1 or consumers[0].op_type != "Add":
        return output, None
    add = consumers[0]
    other = add.input[1] if add.input[0] == output else add.input[0]
    bias = resolve_weight(index, other)
    if isinstance(bias, str) or bias.node_shape != (out_features,) or other == output:
        return output, None
    if data_rank(index, node.input[0]) not in (2, None):
        return output, add.name
    return add.output[0], add.name


def dense_weight(index: GraphIndex, node: onnx.NodeProto) -> WeightRef | str:
    """The non-empty 2-D float weight a MatMul / Gemm node reads as its second input, or why it has none."""
    if len(node.input) < 2 or not node.input[1]:
        return "has no weight input"
    weight = float_weight(index, node, WEIGHT_FIRST)
    if isinstance(weight, str):
        return weight
    shape = weight.node_shape
    if len(shape) != 2:
        return f"weight {weight.initializer!r} has shape {list(shape)}; only 2-D weights take a dense branch"
    if 0 in shape:
        return f"weight {weight.initializer!r} is empty (shape {list(shape)})"
    return weight


def data_rank(index: GraphIndex, value: str) -> int | None:
    info = index.value_info.get(value)
    if info is None or not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
        return None
    return len(info.type.tensor_type.shape.dim)


class MatMulKind(DenseKind):
    op_type = "MatMul"
    key = "matmul"
    integer_twins = ("MatMulInteger", "QLinearMatMul")
    wants_data_rank = True
    bias_after = True
    linear = True

    def site(self, index: GraphIndex, node: onnx.NodeProto) -> Site | str:
        weight = dense_weight(index, node)
        if isinstance(weight, str):
            return weight
        shape = weight.node_shape
        path = module_path(index, node, weight.initializer)
        output, bias_add = join_after_bias(index, node, out_features=shape[1])
        return Site(
            node.name, self.op_type, path, node.input[0], output, weight, "in,out", shape[0], shape[1],
            bias_add=bias_add,
        )  # fmt: skip

    def output_width(self, node: onnx.NodeProto, dims: Mapping[str, Sequence[int]]) -> int | None:
        weight = dims.get(node.input[1]) if len(node.input) > 1 else None
        return int(weight[-1]) if weight else None

    def batched_input(self, shapes: Sequence[tuple[int, ...]]) -> bool:
        return all(len(s) == 3 for s in shapes)


MATMUL = register(MatMulKind())
