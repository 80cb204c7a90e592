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

import numpy as np
import onnx_ir as ir

from lora_onnx.errors import LoraOnnxError
from lora_onnx.kinds import kind_of
from lora_onnx.kinds.base import BranchNames, NodeMaker
from lora_onnx.model.graph import FreshNames, add_initializer, take_over, values_by_name
from lora_onnx.model.load import LoadedModel, TensorProducer
from lora_onnx.model.manifest import BranchRecord, read_branches, write_branches
from lora_onnx.model.tensors import make_deferred, make_tensor, np_dtype
from lora_onnx.recipes.plan import BranchPlan
from lora_onnx.sites.find import source_layout
from lora_onnx.stages.branch_metadata import stamp_branches
from lora_onnx.stages.contract import Stage, StageResult, require_free, require_opset


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
        rewritten = model.to_ir()
        graph = rewritten.graph
        names = FreshNames(graph)
        for plan in plans:
            names.reserve(plan.a_name)
            names.reserve(plan.b_name)
        known = values_by_name(graph)
        deferred: dict[str, TensorProducer] = {}
        for plan in plans:
            for name, shape in ((plan.a_name, plan.a_shape), (plan.b_name, plan.b_shape)):
                if name in known:
                    continue  # a pair shared by several sites is added once
                value = values[name]
                if callable(value):
                    known[name] = add_initializer(graph, make_deferred(name, shape, plan.site.dtype))
                    deferred[name] = value
                else:
                    known[name] = add_initializer(graph, make_tensor(name, value, plan.site.dtype))
        records = tuple(_insert(graph, names, known, plan, self.zero_init) for plan in plans)
        stamp_branches(graph, records)
        write_branches(rewritten, read_branches(rewritten) + records)
        return StageResult(model.with_ir(rewritten, deferred), records, modified=bool(records))


def _insert(
    graph: ir.Graph, names: FreshNames, values: dict[str, ir.Value], plan: BranchPlan, zero_init: bool
) -> BranchRecord:
    """Add ``plan``'s branch right after the node producing the site's output, which then feeds it."""
    site = plan.site
    stem = plan.stem
    join = site.output
    base = values[join]
    producer = base.producer()
    assert producer is not None, f"{join!r} is no node output"
    base_join = names(f"{join}.lora_base")
    scale_name = names(f"{stem}.lora_scale")
    a_out = names(f"{stem}.lora_A.output")
    scaled = names(f"{stem}.lora_scaled")
    b_out = names(f"{stem}.lora_B.output")
    scale = np.array(plan.scale * (site.gemm.alpha if site.gemm else 1.0), dtype=np_dtype(plan.site.dtype))
    values[scale_name] = add_initializer(graph, make_tensor(scale_name, scale))
    make = NodeMaker(names, values)
    data = site.data_input
    if site.gemm is not None and site.gemm.trans_a:
        data_t = names(f"{stem}.lora_input_t")
        make.node("Transpose", [site.data_input], [data_t], names(f"{stem}.lora_input_T"), perm=[1, 0])
        data = data_t
    kind = kind_of(site.op)
    a_node, b_node = names(f"{stem}.lora_A"), names(f"{stem}.lora_B")
    branch = BranchNames(stem, a_out, scaled, b_out, a_node, b_node)
    form = NodeMaker(names, values)
    kind.form.build(form, site, data, plan.a_name, plan.b_name, branch, kind.a_op, plan.a_group, plan.b_group)
    first, second = form.nodes
    make.nodes.append(first)
    make.node("Mul", [a_out, scale_name], [scaled], names(f"{stem}.lora_scale_mul"))
    make.nodes.append(second)
    # The base output is renamed and the branch's Add takes its name, so every reader keeps its input.
    base.name = base_join
    values[base_join] = values.pop(join)
    add = make.node("Add", [base_join, b_out], [join], names(f"{stem}.lora_add"))
    take_over(base, add.outputs[0], keep=[add])
    graph.insert_after(producer, make.nodes)
    return BranchRecord(
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
        nodes=tuple(node.name for node in make.nodes),
        a_group=plan.a_group,
        b_group=plan.b_group,
        base_group=site.group,
        gemm_alpha=site.gemm.alpha if site.gemm else 1.0,
        zero_init=zero_init,
    )
