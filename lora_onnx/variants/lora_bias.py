"""lora_bias branches (PEFT ``lora_bias``): a constant branch whose B adds a bias, ``s * lora_B.bias``.

The fold adds the weight's delta as for any constant branch and folds the bias into the base node's
bias: ``b' = b + s * lora_B.bias`` (PEFT's merge).

Where a Linear's or Conv's bias lives depends on the export: the constant input of a MatMul's bias Add,
a Gemm's C, a Conv's B. Exporters deduplicate equal biases (all-zero ones above all) into one initializer
shared by several nodes, sometimes through Identity nodes; such a bias is copied first, so the folded node
gets its own initializer and no other node changes. A Gemm or Conv without a bias gets one as a new input
(no node is added). A MatMul without a bias Add is refused: the fold would have to add a node, and the
merged model would no longer have the base's node list (PEFT refuses this merge too: "the base layer has
no bias").
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.errors import FoldError
from lora_onnx.kinds import kind_of
from lora_onnx.model.graph import FreshNames, add_initializer, nodes_by_name, values_by_name
from lora_onnx.model.load import LoadedModel, TensorProducer
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.tensors import make_tensor, np_dtype
from lora_onnx.model.weights import PASS_THROUGH_OPS, WeightRef, resolve_weight
from lora_onnx.variants.base import register
from lora_onnx.variants.constant import ConstantBranch


@register
class LoraBiasBranch(ConstantBranch):
    """A constant branch with a ``lora_B.bias`` (see the module doc)."""

    name = "lora_bias"

    def matches(self, record: BranchRecord) -> bool:
        return record.variant == self.recorded_as and bool(record.lora_bias)

    def fold_refusal(self, record: BranchRecord) -> str | None:
        return super().fold_refusal(record) or lora_bias_refusal(record)

    def fold_beside_weight(
        self, model: LoadedModel, graph: ir.Graph, records: Sequence[BranchRecord]
    ) -> dict[str, TensorProducer]:
        return fold_lora_biases(model, graph, records)


def lora_bias_refusal(branch: BranchRecord) -> str | None:
    """Why ``branch``'s ``lora_B.bias`` cannot be folded, None when it can (or the branch has none)."""
    if branch.lora_bias and not kind_of(branch.op).bias_input and not branch.base_bias:
        return (
            f"its lora_B.bias has no bias to fold into: {branch.op} node {branch.site!r} has no bias Add, "
            "and folding would have to add one (PEFT refuses this merge too: the base layer has no bias)"
        )
    return None


def _bias_slot(nodes: Mapping[str, ir.Node], branch: BranchRecord) -> tuple[ir.Node, int | None]:
    """The node that adds ``branch``'s base bias and the input position of that bias (None: it has none)."""
    node = nodes.get(branch.site)
    if node is not None and kind_of(branch.op).bias_input:
        return node, 2 if len(node.inputs) > 2 and node.inputs[2] is not None else None
    if node is not None:
        for use in node.outputs[0].uses():
            consumer = use.node
            inputs = [value.name if value is not None else "" for value in consumer.inputs]
            if consumer.op_type == "Add" and branch.base_bias in inputs:
                return consumer, inputs.index(branch.base_bias)
    raise FoldError(
        f"the bias of the branch at node {branch.site!r} ({branch.module_path}) is not in the graph as "
        "recorded; was the model edited after lora-onnx rewrote it?"
    )


def _users(value: ir.Value) -> set[str | None]:
    """Nodes reading ``value`` directly or through pass-through chains."""
    users, pending = set(), [value]
    while pending:
        for use in pending.pop().uses():
            if use.node.op_type in PASS_THROUGH_OPS:
                pending.extend(use.node.outputs)
            else:
                users.add(use.node.name)
    return users


def _scaled_lora_bias(model: LoadedModel, branch: BranchRecord) -> np.ndarray:
    return branch.scale * np.asarray(model.array(branch.lora_bias), np.float32)


def fold_lora_biases(
    model: LoadedModel, graph: ir.Graph, branches: Sequence[BranchRecord]
) -> dict[str, TensorProducer]:
    """Edit ``graph`` (the fold's onnx-ir copy, branches already removed) so each branch's base bias
    includes ``s * lora_B.bias``; returns producers for biases changed in place (run at save time)."""
    if not branches:
        return {}
    source = values_by_name(model.ir_model.graph)  # the fold's input: bias inputs are traced there
    names = FreshNames(graph)
    nodes = nodes_by_name(graph)
    shared: dict[str, list[tuple[ir.Node, int, BranchRecord, WeightRef]]] = defaultdict(list)
    for branch in branches:
        node, slot = _bias_slot(nodes, branch)
        if slot is None:  # a Gemm or Conv without a bias: the folded bias becomes its new input
            weight = node.inputs[1]
            dtype = (weight.dtype if weight is not None else None) or onnx.TensorProto.FLOAT
            name = names(f"{branch.module_path}.bias")
            bias = add_initializer(graph, make_tensor(name, _scaled_lora_bias(model, branch), int(dtype)))
            if len(node.inputs) <= 2:
                node.resize_inputs(3)
            node.replace_input_with(2, bias)  # in place of an empty optional input, or a new one
            continue
        bias_input = node.inputs[slot]
        assert bias_input is not None and bias_input.name is not None
        ref = resolve_weight(source.get(bias_input.name))
        if isinstance(ref, str):
            raise FoldError(
                f"cannot fold the lora_B.bias of node {branch.site!r} ({branch.module_path}): {ref}"
            )
        shared[ref.initializer].append((node, slot, branch, ref))

    producers: dict[str, TensorProducer] = {}
    for source, uses in shared.items():
        deltas = {(branch.lora_bias, branch.scale) for _, _, branch, _ in uses}
        if len(deltas) == 1 and _users(graph.initializers[source]) <= {node.name for node, _, _, _ in uses}:
            producers[source] = _in_place(model, source, uses[0][2])
            continue
        for node, slot, branch, ref in uses:  # shared with other nodes: give this node its own copy
            value = np.asarray(model.array(source), np.float32) + _scaled_lora_bias(model, branch)
            name = names(f"{branch.module_path}.bias")
            node.replace_input_with(slot, add_initializer(graph, make_tensor(name, value, ref.node_dtype)))
    return producers


def _in_place(model: LoadedModel, source: str, branch: BranchRecord) -> TensorProducer:
    dtype = np_dtype(model.initializer(source).data_type)

    def produce() -> np.ndarray:
        return (np.asarray(model.array(source), np.float32) + _scaled_lora_bias(model, branch)).astype(dtype)

    return produce
