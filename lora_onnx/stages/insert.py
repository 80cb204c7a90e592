"""Insert planned branches into a copy of the graph.

For each site the base output ``y`` is renamed ``y.lora_base`` and a branch re-creates ``y``:

    dense:  y = y.lora_base + MatMul(Mul(MatMul(x', A), s), B)        x' = x, or x^T for Gemm transA=1
    conv:   y = y.lora_base + ConvB(Mul(ConvA(x), s))
    gather: y = y.lora_base + MatMul(Mul(Gather(A, ids), s), B)       (embedding lookups, PEFT import)

so every consumer and graph output keeps its name. The scale multiplies the rank-r intermediate, the
cheapest place for it. New nodes go right after the node producing ``y``, which keeps the graph sorted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from lora_onnx.errors import LoraOnnxError
from lora_onnx.kinds import kind_of
from lora_onnx.kinds.base import BranchNames, NodeMaker
from lora_onnx.model.graph import GraphIndex, rename_output, splice_nodes
from lora_onnx.model.load import LoadedModel, TensorProducer
from lora_onnx.model.manifest import BranchRecord, read_branches, write_branches
from lora_onnx.model.tensors import make_deferred, make_tensor, np_dtype
from lora_onnx.recipes.plan import BranchPlan
from lora_onnx.sites.find import (
    source_layout,
)
from lora_onnx.stages.branch_metadata import stamp_branches
from lora_onnx.stages.contract import Stage, StageResult, require_free, require_opset


@dataclass(frozen=True)
class _Built:
    nodes: list[onnx.NodeProto]
    record: BranchRecord
    producer: str


def insert_branches(
    model: LoadedModel,
    plans: Sequence[BranchPlan],
    values: Mapping[str, np.ndarray | TensorProducer],
    *,
    zero_init: bool = False,
) -> StageResult:
    """A copy of ``model`` with one branch per plan (the result's ``records``); ``values`` maps every A/B
    tensor name to its array, or to a producer of it: such a tensor is *deferred* (metadata only until
    the model is saved)."""
    return InsertBranches(plans, values, zero_init=zero_init)(model)


class InsertBranches(Stage):
    """The core rewrite: one branch beside each planned site (see the module doc)."""

    name = "insert branches"

    def __init__(
        self,
        plans: Sequence[BranchPlan],
        values: Mapping[str, np.ndarray | TensorProducer],
        *,
        zero_init: bool = False,
    ) -> None:
        self.plans, self.values, self.zero_init = tuple(plans), values, zero_init

    def requires(self, model: LoadedModel) -> None:
        require_opset(model, "branches")
        nodes = {node.name for node in model.proto.graph.node}
        for plan in self.plans:
            if plan.site.node not in nodes:
                raise LoraOnnxError(
                    f"{model.name} has no node {plan.site.node!r} ({plan.site.module_path}); the plan was "
                    "made for another model"
                )
            for name in (plan.a_name, plan.b_name):
                if name not in self.values:
                    raise LoraOnnxError(
                        f"no value for tensor {name!r} of the branch at {plan.site.module_path}"
                    )
        require_free(model, {name for plan in self.plans for name in (plan.a_name, plan.b_name)}, self.name)

    def call(self, model: LoadedModel) -> StageResult:
        plans, values = self.plans, self.values
        proto = onnx.ModelProto()
        proto.CopyFrom(model.proto)
        graph = proto.graph
        index = GraphIndex(graph)
        for plan in plans:
            index.reserve(plan.a_name)
            index.reserve(plan.b_name)
        built = [_build(index, plan, self.zero_init) for plan in plans]

        after: dict[str, list[onnx.NodeProto]] = {}
        for item in built:
            rename_output(index.nodes[item.producer], item.record.join, item.record.base_join)
            after.setdefault(item.producer, []).extend(item.nodes)
        splice_nodes(graph, after=after)

        added: set[str] = set()
        deferred: dict[str, TensorProducer] = {}
        for plan, item in zip(plans, built, strict=True):
            for name, shape in ((plan.a_name, plan.a_shape), (plan.b_name, plan.b_shape)):
                if name in added:
                    continue
                value = values[name]
                if callable(value):
                    graph.initializer.append(make_deferred(name, shape, plan.site.dtype))
                    deferred[name] = value
                else:
                    graph.initializer.append(make_tensor(name, value, plan.site.dtype))
                added.add(name)
            scale = np.array(plan.scale * item.record.gemm_alpha, dtype=np_dtype(plan.site.dtype))
            graph.initializer.append(make_tensor(item.record.scale_tensor, scale))
        records = tuple(item.record for item in built)
        stamp_branches(graph, records)
        write_branches(proto, read_branches(proto) + records)
        return StageResult(model.with_proto(proto, deferred), records, modified=bool(records))


def _build(index: GraphIndex, plan: BranchPlan, zero_init: bool) -> _Built:
    site = plan.site
    stem = plan.stem
    join = site.output
    base_join = index.unique_name(f"{join}.lora_base")
    scale_name = index.unique_name(f"{stem}.lora_scale")
    a_out = index.unique_name(f"{stem}.lora_A.output")
    scaled = index.unique_name(f"{stem}.lora_scaled")
    b_out = index.unique_name(f"{stem}.lora_B.output")
    nodes: list[onnx.NodeProto] = []
    data = site.data_input
    if site.gemm is not None and site.gemm.trans_a:
        data_t = index.unique_name(f"{stem}.lora_input_t")
        nodes.append(
            helper.make_node(
                "Transpose",
                [site.data_input],
                [data_t],
                index.unique_name(f"{stem}.lora_input_T"),
                perm=[1, 0],
            )
        )
        data = data_t
    kind = kind_of(site.op)
    names = BranchNames(
        stem, a_out, scaled, b_out, index.unique_name(f"{stem}.lora_A"), index.unique_name(f"{stem}.lora_B")
    )
    built: list[onnx.NodeProto] = []
    kind.form.build(
        NodeMaker(index, built), site, data, plan.a_name, plan.b_name, names, kind.a_op, plan.a_group,
        plan.b_group,
    )  # fmt: skip
    a_node, b_node = built
    nodes.append(a_node)
    nodes.append(
        helper.make_node("Mul", [a_out, scale_name], [scaled], index.unique_name(f"{stem}.lora_scale_mul"))
    )
    nodes.append(b_node)
    nodes.append(helper.make_node("Add", [base_join, b_out], [join], index.unique_name(f"{stem}.lora_add")))
    producer = index.producer[join].name
    record = BranchRecord(
        adapter=plan.adapter,
        site=site.node,
        op=site.op,
        module_path=site.module_path,
        kind=plan.kind,
        weight=site.weight.initializer,
        source_layout=source_layout(site),
        rank=plan.rank,
        alpha=plan.alpha,
        scale=plan.scale,
        a=plan.a_name,
        b=plan.b_name,
        scale_tensor=scale_name,
        join=join,
        base_join=base_join,
        nodes=tuple(node.name for node in nodes),
        a_group=plan.a_group,
        b_group=plan.b_group,
        base_group=site.group,
        gemm_alpha=site.gemm.alpha if site.gemm else 1.0,
        zero_init=zero_init,
    )
    return _Built(nodes, record, producer)
