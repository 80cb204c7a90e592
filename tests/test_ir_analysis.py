"""The read-only analysis on onnx-ir: weights traced through producers, and the shared read-only view."""

from __future__ import annotations

import numpy as np
from builders import make_model, rng_array, run
from onnx import TensorProto, helper

from lora_onnx import find_sites
from lora_onnx.commands.inject import inject
from lora_onnx.kinds.matmul import INFERRED_RANK
from lora_onnx.model.graph import nodes_by_name, to_ir, values_by_name
from lora_onnx.model.load import load_model
from lora_onnx.model.weights import WeightRef, resolve_weight, source_value
from lora_onnx.recipes.config import LoraConfig


def test_resolve_weight_follows_producers_to_the_initializer() -> None:
    nodes = [
        helper.make_node("Transpose", ["W"], ["wt"], name="T", perm=[1, 0]),
        helper.make_node("Cast", ["wt"], ["w16"], name="C", to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["x", "w16"], ["y"], name="mm"),
    ]
    model = make_model(nodes, {"x": (TensorProto.FLOAT16, [2, 4])}, ["y"], {"W": rng_array((3, 4))})
    graph = to_ir(model).graph
    values, mm = values_by_name(graph), nodes_by_name(graph)["mm"]
    ref = resolve_weight(mm.inputs[1])
    assert isinstance(ref, WeightRef)
    assert (ref.initializer, ref.source_shape, ref.node_shape) == ("W", (3, 4), (4, 3))
    assert (ref.source_dtype, ref.node_dtype) == (TensorProto.FLOAT, TensorProto.FLOAT16)
    assert type(ref.node_dtype) is int and type(ref.source_dtype) is int  # plain ints, as records store
    assert ref.chain == ("T", "C") and ref.transposed
    assert source_value(mm.inputs[1]) is values["W"]
    assert resolve_weight(values["x"]) == "input 'x' is a graph input, not a constant weight"
    assert resolve_weight(None) == "input '' is a graph input, not a constant weight"


def test_find_sites_infers_ranks_without_changing_the_shared_view() -> None:
    # The MatMul's data input has no declared shape (as TorchScript exports leave it): shape inference
    # finds it 3-D, so the branch joins before the bias Add; the shared view's graph stays as loaded (the
    # rank is kept in the value's meta, which is never serialised).
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "W"], ["mm"], name="mm_node"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="bias_add"),
    ]
    weights = {"W": rng_array((4, 3)), "b": np.zeros(3, np.float32)}
    loaded = load_model(make_model(nodes, {"x": (TensorProto.FLOAT, [1, 2, 4])}, ["y"], weights))
    view = loaded.ir_model
    assert loaded.ir_model is view
    (site,) = find_sites(loaded, ["matmul"]).sites
    assert (site.output, site.bias_add, site.data_input) == ("mm", "bias_add", "r")
    assert values_by_name(view.graph)["r"].shape is None
    assert values_by_name(view.graph)["r"].meta[INFERRED_RANK] == 3
    assert "r" not in {info.name for info in loaded.proto.graph.value_info}


def test_a_matmul_output_read_inside_a_subgraph_is_where_the_branch_joins() -> None:
    # onnx-ir's uses include readers inside subgraph bodies: the MatMul's output has two readers (the bias
    # Add and the If branch), so the branch joins the MatMul itself and both readers see it.
    then_graph = helper.make_graph(
        [helper.make_node("Identity", ["mm"], ["t"], name="then_id")],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2, 3])],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["e"], name="else_id")],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 3])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="mm_node"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="bias_add"),
        helper.make_node("If", ["flag"], ["z"], name="if", then_branch=then_graph, else_branch=else_graph),
    ]
    inputs = {"x": (TensorProto.FLOAT, [2, 4]), "flag": (TensorProto.BOOL, [])}
    weights = {"W": rng_array((4, 3)), "b": np.zeros(3, np.float32)}
    model = make_model(nodes, inputs, ["z"], weights)
    (site,) = find_sites(model, ["matmul"]).sites
    assert (site.output, site.bias_add) == ("mm", None)
    # in onnxruntime, the If branch reads the MatMul with its LoRA delta (as PyTorch's module output has it)
    result = inject(model, LoraConfig(rank=2, init="random", seed=3))
    (branch,) = result.branches
    a, b = result.model.array(branch.a), result.model.array(branch.b)
    x = rng_array((2, 4))
    expected = x @ weights["W"] + branch.scale * (x @ a) @ b
    (got,) = run(result.model.proto, {"x": x, "flag": np.array(True)})
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.abs(branch.scale * (x @ a) @ b).max() > 1e-3  # the delta is not negligible
