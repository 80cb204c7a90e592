"""Insert a planned PEFT adapter: the core's branches, plus DoRA's rescaling and ``lora_B.bias``.

The core (:func:`lora_onnx.stages.insert.insert_branches`) adds ``y = y.lora_base + B(s * A(x))`` per
site. Two PEFT features extend a branch afterwards, in place:

- ``lora_B.bias``: ``B(s * A(x)) + s * bias``; a conv B takes ``s * bias`` as its own bias input, a dense
  branch adds it after B. ``s * bias`` is computed in the graph from the stored (unscaled) PEFT tensor.
- DoRA, ``y = f * (x W + s * B(A(x))) + bias`` with ``f = m / norm``: the branch's sum
  ``y.lora_base + branch`` already includes the base bias, so it becomes ``f * sum + (1 - f) * bias``
  (``f * sum`` without a bias), which reads no activation twice. ``f`` and ``(1 - f) * bias`` depend on
  constants only, so onnxruntime folds them when the session starts.

The branch's last node still produces the joined value, so folding and stacking work as for any branch.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import helper

from lora_onnx.adapters.peft.planning import PeftBranchExtras, PeftPlan
from lora_onnx.kinds import form_of
from lora_onnx.model.graph import GraphIndex, splice_nodes
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord, read_branches, write_branches, write_peft_config
from lora_onnx.model.tensors import make_tensor, np_dtype
from lora_onnx.sites.folded_weights import mark_scaled
from lora_onnx.stages.branch_metadata import stamp_branches
from lora_onnx.stages.contract import Stage, StageResult
from lora_onnx.stages.insert import insert_branches


def insert_peft_branches(model: LoadedModel, peft: PeftPlan) -> StageResult:
    """A copy of ``model`` with ``peft``'s branches; records carry the PEFT fields (see BranchRecord)."""
    return InsertPeftBranches(peft)(model)


class InsertPeftBranches(Stage):
    """The core's branches for a PEFT adapter, extended by DoRA's rescaling and ``lora_B.bias``."""

    name = "insert PEFT branches"

    def __init__(self, peft: PeftPlan) -> None:
        self.peft = peft

    def call(self, model: LoadedModel) -> StageResult:
        return _insert_peft_branches(model, self.peft)


def _insert_peft_branches(model: LoadedModel, peft: PeftPlan) -> StageResult:
    plans = peft.plan.branches
    inserted = insert_branches(model, plans, peft.values)
    rewritten, records = inserted.model, inserted.records
    proto = onnx.ModelProto()
    proto.CopyFrom(rewritten.proto)
    graph = proto.graph
    index = GraphIndex(graph)
    nodes = {node.name: node for node in graph.node}
    before: dict[str, list[onnx.NodeProto]] = {}
    after: dict[str, list[onnx.NodeProto]] = {}
    added: set[str] = {t.name for t in graph.initializer}
    updated = []
    for plan, record in zip(plans, records, strict=True):
        extras = peft.extras.get(plan.site.node, PeftBranchExtras(plan.site.module_path))
        dtype = plan.site.dtype
        for name in (extras.magnitude, extras.weight_norm, extras.lora_bias):
            if name and name not in added:
                graph.initializer.append(make_tensor(name, peft.values[name], dtype))
                added.add(name)
        new_nodes: tuple[str, ...] = ()
        extra_tensors: tuple[str, ...] = ()
        if extras.lora_bias:
            new_nodes = _add_lora_bias(index, nodes, record, extras, before, after)
        if extras.magnitude:
            built = _add_dora(index, nodes, record, extras, len(plan.site.kernel), dtype, graph)
            after.setdefault(record.nodes[-1], []).extend(built[0])
            extra_tensors = built[1]
        last = record.nodes[-1]
        if extras.magnitude:
            order = (*record.nodes, *(node.name for node in after[last]))
        else:
            order = (*record.nodes[:-1], *new_nodes, last)
        updated.append(
            dataclasses.replace(
                record,
                peft_path=extras.adapter_path,
                magnitude=extras.magnitude,
                weight_norm=extras.weight_norm,
                lora_bias=extras.lora_bias,
                base_bias=extras.base_bias,
                extra_tensors=extra_tensors,
                nodes=order,
            )
        )
    splice_nodes(graph, before=before, after=after)
    stamp_branches(graph, updated)
    kept = read_branches(proto)[: -len(records) or None]
    write_branches(proto, (*kept, *updated))
    if peft.config is not None:
        write_peft_config(proto, plans[0].adapter, dict(peft.config.raw))
    if peft.scaled:
        mark_scaled(proto, plans[0].adapter, peft.scaled)
    return StageResult(rewritten.with_proto(proto), tuple(updated), warnings=peft.plan.warnings)


def _add_lora_bias(
    index: GraphIndex,
    nodes: dict[str, onnx.NodeProto],
    record: BranchRecord,
    extras: PeftBranchExtras,
    before: dict[str, list[onnx.NodeProto]],
    after: dict[str, list[onnx.NodeProto]],
) -> tuple[str, ...]:
    """``s * lora_B.bias`` into the branch: the conv B's bias input, or an Add after a dense B."""
    b_node, join = nodes[record.nodes[-2]], nodes[record.nodes[-1]]
    stem = record.a.rsplit(".lora_", 1)[0]
    scaled = index.unique_name(f"{stem}.lora_B.bias_scaled")
    mul = helper.make_node(
        "Mul", [extras.lora_bias, record.scale_tensor], [scaled], index.unique_name(f"{stem}.lora_bias_mul")
    )
    before.setdefault(b_node.name, []).append(mul)
    if form_of(record.kind).b_takes_bias:  # a conv B's own bias input
        b_node.input.append(scaled)
        return (mul.name,)
    biased = index.unique_name(f"{stem}.lora_B.output_biased")
    add = helper.make_node(
        "Add", [b_node.output[0], scaled], [biased], index.unique_name(f"{stem}.lora_bias_add")
    )
    after.setdefault(b_node.name, []).append(add)
    join.input[list(join.input).index(b_node.output[0])] = biased
    return mul.name, add.name


def _add_dora(
    index: GraphIndex,
    nodes: dict[str, onnx.NodeProto],
    record: BranchRecord,
    extras: PeftBranchExtras,
    spatial: int,
    dtype: int,
    graph: onnx.GraphProto,
) -> tuple[list[onnx.NodeProto], tuple[str, ...]]:
    """Rescale the branch's sum by ``f = m / norm`` and restore ``(1 - f) * bias``; returns the new
    nodes (the last produces the joined value) and the constants added. ``spatial``: a conv's spatial
    rank (its bias is reshaped to broadcast like the output), 0 for dense and embedding branches."""
    join = nodes[record.nodes[-1]]
    stem = record.a.rsplit(".lora_", 1)[0]
    joined = join.output[0]
    summed = index.unique_name(f"{stem}.lora_dora_input")
    join.output[0] = summed

    def node(op: str, inputs: list[str], output: str, name: str) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], index.unique_name(f"{stem}.{name}"))

    factor = index.unique_name(f"{stem}.lora_dora_factor")
    built = [node("Div", [extras.magnitude, extras.weight_norm], factor, "lora_dora_div")]
    # An N-d MatMul's branch joins before its bias Add (lora_onnx.sites.find): then the sum holds no bias, and
    # the bias Add after it already adds the bias unscaled.
    bias_in_sum = extras.base_bias and not any(
        joined in other.input and extras.base_bias in other.input for other in graph.node
    )
    if not bias_in_sum:
        built.append(node("Mul", [summed, factor], joined, "lora_dora_mul"))
        return built, ()
    one = index.unique_name(f"{stem}.lora_dora_one")
    graph.initializer.append(make_tensor(one, np.array(1.0, np_dtype(dtype))))
    constants: tuple[str, ...] = (one,)
    scaled = index.unique_name(f"{stem}.lora_dora_scaled")
    rest = index.unique_name(f"{stem}.lora_dora_rest")
    bias_term = index.unique_name(f"{stem}.lora_dora_bias")
    bias = extras.base_bias
    built += [
        node("Mul", [summed, factor], scaled, "lora_dora_mul"),
        node("Sub", [one, factor], rest, "lora_dora_sub"),
    ]
    if spatial:  # a conv bias is (out,); the factor is (1, out, 1, ...) like the output
        shape = index.unique_name(f"{stem}.lora_dora_bias_shape")
        graph.initializer.append(make_tensor(shape, np.array([1, -1, *([1] * spatial)], np.int64)))
        constants += (shape,)
        reshaped = index.unique_name(f"{stem}.lora_dora_bias_reshaped")
        built.append(node("Reshape", [bias, shape], reshaped, "lora_dora_reshape"))
        bias = reshaped
    built += [
        node("Mul", [rest, bias], bias_term, "lora_dora_bias_mul"),
        node("Add", [scaled, bias_term], joined, "lora_dora_add"),
    ]
    return built, constants
