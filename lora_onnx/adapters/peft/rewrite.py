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
import onnx_ir as ir

from lora_onnx.adapters.peft.planning import PeftBranchExtras, PeftPlan
from lora_onnx.kinds import form_of
from lora_onnx.kinds.base import NodeMaker
from lora_onnx.model.graph import (
    FreshNames,
    add_initializer,
    nodes_by_name,
    take_over,
    values_by_name,
)
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
    extended = rewritten.to_ir()
    graph = extended.graph
    make = NodeMaker(FreshNames(graph), values_by_name(graph))
    nodes = nodes_by_name(graph)
    updated = []
    for plan, record in zip(plans, records, strict=True):
        extras = peft.extras.get(plan.site.node, PeftBranchExtras(plan.site.module_path))
        dtype = plan.site.dtype
        for name in (extras.magnitude, extras.weight_norm, extras.lora_bias):
            if name and name not in graph.initializers:
                make.values[name] = add_initializer(graph, make_tensor(name, peft.values[name], dtype))
        new_nodes: tuple[str, ...] = ()
        extra_tensors: tuple[str, ...] = ()
        if extras.lora_bias:
            new_nodes = _add_lora_bias(graph, make, nodes, record, extras)
        if extras.magnitude:
            built, extra_tensors = _add_dora(graph, make, nodes, record, extras, len(plan.site.kernel), dtype)
            order = (*record.nodes, *(node.name for node in built))
        else:
            order = (*record.nodes[:-1], *new_nodes, record.nodes[-1])
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
    stamp_branches(graph, updated)
    kept = read_branches(extended)[: -len(records) or None]
    write_branches(extended, (*kept, *updated))
    if peft.config is not None:
        write_peft_config(extended, plans[0].adapter, dict(peft.config.raw))
    if peft.scaled:
        mark_scaled(extended, plans[0].adapter, peft.scaled)
    return StageResult(rewritten.with_ir(extended), tuple(updated), warnings=peft.plan.warnings)


def _add_lora_bias(
    graph: ir.Graph,
    make: NodeMaker,
    nodes: dict[str, ir.Node],
    record: BranchRecord,
    extras: PeftBranchExtras,
) -> tuple[str, ...]:
    """``s * lora_B.bias`` into the branch: the conv B's bias input, or an Add after a dense B."""
    b_node, join = nodes[record.nodes[-2]], nodes[record.nodes[-1]]
    stem = record.a.rsplit(".lora_", 1)[0]
    scaled = make.name(f"{stem}.lora_B.bias_scaled")
    mul_name = make.name(f"{stem}.lora_bias_mul")
    graph.insert_before(b_node, make.node("Mul", [extras.lora_bias, record.scale_tensor], [scaled], mul_name))
    if form_of(record.kind).b_takes_bias:  # a conv B's own bias input
        position = len(b_node.inputs)
        b_node.resize_inputs(position + 1)
        b_node.replace_input_with(position, make.values[scaled])
        return (mul_name,)
    b_out = b_node.outputs[0]
    assert b_out.name is not None
    biased = make.name(f"{stem}.lora_B.output_biased")
    add_name = make.name(f"{stem}.lora_bias_add")
    graph.insert_after(b_node, make.node("Add", [b_out.name, scaled], [biased], add_name))
    join.replace_input_with(join.inputs.index(b_out), make.values[biased])
    return mul_name, add_name


def _add_dora(
    graph: ir.Graph,
    make: NodeMaker,
    nodes: dict[str, ir.Node],
    record: BranchRecord,
    extras: PeftBranchExtras,
    spatial: int,
    dtype: int,
) -> tuple[list[ir.Node], tuple[str, ...]]:
    """Rescale the branch's sum by ``f = m / norm`` and restore ``(1 - f) * bias``; returns the new
    nodes, put right after the branch's join (the last produces the joined value), and the constants
    added. ``spatial``: a conv's spatial rank (its bias is reshaped to broadcast like the output), 0 for
    dense and embedding branches."""
    join = nodes[record.nodes[-1]]
    stem = record.a.rsplit(".lora_", 1)[0]
    sum_value = join.outputs[0]
    joined = sum_value.name
    assert joined is not None
    # An N-d MatMul's branch joins before its bias Add (lora_onnx.sites.find): then the sum holds no bias, and
    # the bias Add after it already adds the bias unscaled.
    base_bias = make.values.get(extras.base_bias) if extras.base_bias else None
    bias_in_sum = extras.base_bias and not any(
        base_bias is not None and base_bias in use.node.inputs for use in sum_value.uses()
    )
    # The join's output is renamed; the last DoRA node produces the joined value for every reader.
    summed = make.name(f"{stem}.lora_dora_input")
    sum_value.name = summed
    make.values[summed] = make.values.pop(joined)
    first = len(make.nodes)

    def node(op: str, inputs: list[str], output: str, name: str) -> None:
        make.node(op, inputs, [output], make.name(f"{stem}.{name}"))

    def constant(wanted: str, value: np.ndarray) -> str:
        name = make.name(f"{stem}.{wanted}")
        make.values[name] = add_initializer(graph, make_tensor(name, value))
        return name

    factor = make.name(f"{stem}.lora_dora_factor")
    node("Div", [extras.magnitude, extras.weight_norm], factor, "lora_dora_div")
    constants: tuple[str, ...] = ()
    if not bias_in_sum:
        node("Mul", [summed, factor], joined, "lora_dora_mul")
    else:
        one = constant("lora_dora_one", np.array(1.0, np_dtype(dtype)))
        constants += (one,)
        scaled = make.name(f"{stem}.lora_dora_scaled")
        rest = make.name(f"{stem}.lora_dora_rest")
        bias_term = make.name(f"{stem}.lora_dora_bias")
        bias = extras.base_bias
        node("Mul", [summed, factor], scaled, "lora_dora_mul")
        node("Sub", [one, factor], rest, "lora_dora_sub")
        if spatial:  # a conv bias is (out,); the factor is (1, out, 1, ...) like the output
            shape = constant("lora_dora_bias_shape", np.array([1, -1, *([1] * spatial)], np.int64))
            constants += (shape,)
            reshaped = make.name(f"{stem}.lora_dora_bias_reshaped")
            node("Reshape", [bias, shape], reshaped, "lora_dora_reshape")
            bias = reshaped
        node("Mul", [rest, bias], bias_term, "lora_dora_bias_mul")
        node("Add", [scaled, bias_term], joined, "lora_dora_add")
    built = make.nodes[first:]
    take_over(sum_value, built[-1].outputs[0], keep=built)
    graph.insert_after(join, built)
    return built, constants
