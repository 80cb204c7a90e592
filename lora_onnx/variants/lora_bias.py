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
from collections.abc import Sequence

import numpy as np
import onnx
from onnx_ir import serde

from lora_onnx.errors import FoldError
from lora_onnx.kinds import kind_of
from lora_onnx.model.graph import GraphIndex, values_by_name
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
        self, model: LoadedModel, proto: onnx.ModelProto, records: Sequence[BranchRecord]
    ) -> dict[str, TensorProducer]:
        return fold_lora_biases(model, proto, records)


def lora_bias_refusal(branch: BranchRecord) -> str | None:
    """Why ``branch``'s ``lora_B.bias`` cannot be folded, None when it can (or the branch has none)."""
    if branch.lora_bias and not kind_of(branch.op).bias_input and not branch.base_bias:
        return (
            f"its lora_B.bias has no bias to fold into: {branch.op} node {branch.site!r} has no bias Add, "
            "and folding would have to add one (PEFT refuses this merge too: the base layer has no bias)"
        )
    return None


def _bias_slot(index: GraphIndex, branch: BranchRecord) -> tuple[onnx.NodeProto, int | None]:
    """The node that adds ``branch``'s base bias and the input position of that bias (None: it has none)."""
    node = index.nodes.get(branch.site)
    if node is not None and kind_of(branch.op).bias_input:
        return node, 2 if len(node.input) > 2 and node.input[2] else None
    if node is not None:
        for consumer in index.consumers.get(node.output[0], []):
            if consumer.op_type == "Add" and branch.base_bias in consumer.input:
                return consumer, list(consumer.input).index(branch.base_bias)
    raise FoldError(
        f"the bias of the branch at node {branch.site!r} ({branch.module_path}) is not in the graph as "
        "recorded; was the model edited after lora-onnx rewrote it?"
    )


def _users(index: GraphIndex, name: str) -> set[str]:
    """Nodes reading initializer ``name`` directly or through pass-through chains."""
    users, pending = set(), [name]
    while pending:
        for node in index.consumers.get(pending.pop(), []):
            if node.op_type in PASS_THROUGH_OPS:
                pending.extend(node.output)
            else:
                users.add(node.name)
    return users


def _scaled_lora_bias(model: LoadedModel, branch: BranchRecord) -> np.ndarray:
    return branch.scale * np.asarray(model.array(branch.lora_bias), np.float32)


def fold_lora_biases(
    model: LoadedModel, proto: onnx.ModelProto, branches: Sequence[BranchRecord]
) -> dict[str, TensorProducer]:
    """Edit ``proto`` (the fold's copy, branches already removed) so each branch's base bias includes
    ``s * lora_B.bias``; returns producers for biases changed in place (run at save time)."""
    if not branches:
        return {}
    index = GraphIndex(proto.graph)
    values = values_by_name(serde.deserialize_graph(proto.graph))
    shared: dict[str, list[tuple[onnx.NodeProto, int, BranchRecord, WeightRef]]] = defaultdict(list)
    for branch in branches:
        node, slot = _bias_slot(index, branch)
        if slot is None:  # a Gemm or Conv without a bias: the folded bias becomes its new input
            dtype = index.elem_type(node.input[1]) or onnx.TensorProto.FLOAT
            name = index.unique_name(f"{branch.module_path}.bias")
            proto.graph.initializer.append(make_tensor(name, _scaled_lora_bias(model, branch), dtype))
            if len(node.input) > 2:  # an empty optional input
                node.input[2] = name
            else:
                node.input.append(name)
            continue
        ref = resolve_weight(values.get(node.input[slot]))
        if isinstance(ref, str):
            raise FoldError(
                f"cannot fold the lora_B.bias of node {branch.site!r} ({branch.module_path}): {ref}"
            )
        shared[ref.initializer].append((node, slot, branch, ref))

    producers: dict[str, TensorProducer] = {}
    for source, uses in shared.items():
        deltas = {(branch.lora_bias, branch.scale) for _, _, branch, _ in uses}
        if len(deltas) == 1 and _users(index, source) <= {node.name for node, _, _, _ in uses}:
            producers[source] = _in_place(model, source, uses[0][2])
            continue
        for node, slot, branch, ref in uses:  # shared with other nodes: give this node its own copy
            value = np.asarray(model.array(source), np.float32) + _scaled_lora_bias(model, branch)
            name = index.unique_name(f"{branch.module_path}.bias")
            proto.graph.initializer.append(make_tensor(name, value, ref.node_dtype))
            node.input[slot] = name
    return producers


def _in_place(model: LoadedModel, source: str, branch: BranchRecord) -> TensorProducer:
    dtype = np_dtype(model.initializer(source).data_type)

    def produce() -> np.ndarray:
        return (np.asarray(model.array(source), np.float32) + _scaled_lora_bias(model, branch)).astype(dtype)

    return produce
