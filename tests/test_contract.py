"""lora_onnx.stages.contract: every stage checks what it needs, returns one result record, and checks
the graph it made is sorted and closed."""

from __future__ import annotations

import onnx
import pytest
from builders import make_model, rng_array
from onnx import TensorProto, helper

from lora_onnx import LoraConfig, find_sites
from lora_onnx.errors import LoraOnnxError
from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import LoadedModel, load_model
from lora_onnx.recipes.init import initial_values
from lora_onnx.recipes.plan import plan_branches
from lora_onnx.stages.contract import Stage, StageError, StageResult, check_graph
from lora_onnx.stages.fold import FoldResult, fold_branches
from lora_onnx.stages.insert import insert_branches

F = TensorProto.FLOAT


def _mlp() -> LoadedModel:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="/fc1/MatMul"),
        helper.make_node("Relu", ["h"], ["r"], name="/act/Relu"),
        helper.make_node("MatMul", ["r", "W2"], ["y"], name="/fc2/MatMul"),
    ]
    inits = {"W1": rng_array((4, 6), 1), "W2": rng_array((6, 3), 2)}
    return load_model(make_model(nodes, {"x": (F, ["batch", 4])}, ["y"], inits))


def _planned(model: LoadedModel):
    plan = plan_branches(
        find_sites(model), LoraConfig(rank=2, init="random"), FreshNames(model.ir_model.graph)
    )
    values = {}
    for branch in plan.branches:
        values[branch.a_name], values[branch.b_name] = initial_values(branch, "random", 0)
    return plan.branches, values


def test_insert_returns_one_record_with_the_model_and_its_branches() -> None:
    model = _mlp()
    plans, values = _planned(model)
    result = insert_branches(model, plans, values)
    assert isinstance(result, StageResult) and result.modified
    assert [r.site for r in result.records] == ["/fc1/MatMul", "/fc2/MatMul"]
    check_graph(result.model, "test")  # what ensures checked
    folded = fold_branches(result.model)
    assert isinstance(folded, FoldResult) and folded.folded == folded.records and len(folded.records) == 2


def test_requires_refuses_before_any_work() -> None:
    model = _mlp()
    plans, values = _planned(model)
    with pytest.raises(LoraOnnxError, match="no value for tensor"):
        insert_branches(model, plans, {})
    taken = insert_branches(model, plans, values).model
    with pytest.raises(LoraOnnxError, match="already has value"):
        insert_branches(taken, plans, values)  # the same tensor names again
    old = onnx.ModelProto()
    old.CopyFrom(model.proto)
    old.opset_import[0].version = 6
    with pytest.raises(LoraOnnxError, match="opset 6; branches need opset 7"):
        insert_branches(model.with_proto(old), plans, values)


def test_ensures_catches_a_stage_that_leaves_the_graph_unsorted() -> None:
    class Reverse(Stage):
        name = "reverse the nodes"

        def call(self, model: LoadedModel) -> StageResult:
            proto = onnx.ModelProto()
            proto.CopyFrom(model.proto)
            nodes = list(proto.graph.node)[::-1]
            del proto.graph.node[:]
            proto.graph.node.extend(nodes)
            return StageResult(model.with_proto(proto))

    with pytest.raises(
        StageError, match=r"internal error in reverse the nodes: node '/fc2/MatMul'.*reads 'r'"
    ):
        Reverse()(_mlp())


def test_ensures_catches_an_output_nothing_produces() -> None:
    class DropLast(Stage):
        name = "drop the last node"

        def call(self, model: LoadedModel) -> StageResult:
            proto = onnx.ModelProto()
            proto.CopyFrom(model.proto)
            proto.graph.node.pop()
            return StageResult(model.with_proto(proto))

    with pytest.raises(StageError, match=r"graph output\(s\) 'y' are not produced"):
        DropLast()(_mlp())
