"""Site discovery: which nodes take a branch, with which shapes and layouts, and why others are skipped."""

from __future__ import annotations

import numpy as np
import pytest
from builders import make_model, rng_array
from onnx import TensorProto, helper

from lora_onnx import LoraConfig, find_sites
from lora_onnx.graph import GraphIndex
from lora_onnx.load import load_model
from lora_onnx.plan import plan_branches

F = TensorProto.FLOAT


def _scan(nodes, inputs, outputs, inits):
    return find_sites(make_model(nodes, inputs, outputs, inits))


def test_matmul_site_records_layout_features_and_join_after_bias() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"], name="/enc/q/MatMul"),
        helper.make_node("Add", ["b", "mm"], ["q"], name="/enc/q/Add"),
        helper.make_node("MatMul", ["q", "W2"], ["r"], name="/enc/o/MatMul"),
        helper.make_node("Add", ["r", "x"], ["y"], name="residual"),  # not a bias: joins before it
    ]
    scan = _scan(
        nodes,
        {"x": (F, [2, 5, 8])},
        ["y"],
        {"W": rng_array((8, 8)), "b": rng_array((8,)), "W2": rng_array((8, 8))},
    )
    q, o = scan.sites
    assert (q.op, q.layout, q.in_features, q.out_features) == ("MatMul", "in,out", 8, 8)
    # a 3-D input: the branch joins before the bias Add (onnxruntime fuses the bias with what follows)
    assert (q.output, q.bias_add, q.module_path) == ("mm", "/enc/q/Add", "enc.q")
    assert (o.output, o.bias_add) == ("r", None)


def test_skips_name_their_reason() -> None:
    nodes = [
        helper.make_node("MatMul", ["W", "x"], ["a"], name="weight_first"),
        helper.make_node("MatMul", ["x", "x2"], ["b"], name="activation_weight"),
        helper.make_node("MatMul", ["x3", "W3"], ["c"], name="batched_weight"),
        helper.make_node("Transpose", ["W4"], ["W4t"], name="t", perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x3", "W4t"], ["d"], name="odd_transpose"),
        helper.make_node("MatMul", ["x", "Wg"], ["e"], name="initializer_listed_as_input"),
    ]
    inputs = {"x": (F, [4, 4]), "x2": (F, [4, 4]), "x3": (F, [2, 4, 4]), "Wg": (F, [4, 4])}
    inits = {
        "W": rng_array((4, 4)),
        "W3": rng_array((2, 4, 4)),
        "W4": rng_array((2, 4, 4)),
        "Wg": rng_array((4, 4)),
    }
    scan = _scan(nodes, inputs, ["a", "b", "c", "d", "e"], inits)
    reasons = {s.node: s.reason for s in scan.skipped}
    # an initializer also listed as a graph input (IR < 4, keep_initializers_as_inputs) is still a weight
    assert [site.node for site in scan.sites] == ["initializer_listed_as_input"]
    assert "weight is the first input" in reasons["weight_first"]
    assert "not a constant" in reasons["activation_weight"]
    assert "only 2-D weights" in reasons["batched_weight"]
    assert "perm [0, 2, 1]; only 2-D swaps are traced" in reasons["odd_transpose"]


def test_conv_site_captures_every_attribute_and_grouped_features() -> None:
    node = helper.make_node(
        "Conv",
        ["x", "W"],
        ["y"],
        name="/dw/Conv",
        group=4,
        strides=[2, 1],
        dilations=[1, 2],
        pads=[1, 2, 1, 2],
    )
    scan = _scan([node], {"x": (F, [1, 8, 9, 9])}, ["y"], {"W": rng_array((12, 2, 3, 3))})
    site = scan.sites[0]
    assert (site.in_features, site.out_features, site.group) == (8, 12, 4)
    assert site.conv.kernel_shape == (3, 3) and site.conv.strides == (2, 1) and site.conv.dilations == (1, 2)
    assert site.conv.pads == (1, 2, 1, 2) and site.conv.auto_pad == "NOTSET"
    assert site.layout == "out,in/group,k1,k2"


@pytest.mark.parametrize(
    ("op", "shape", "rank", "a_shape", "b_shape"),
    [
        ("matmul", (16, 32), 4, (16, 4), (4, 32)),  # Lorax dense A {r, in}, B {out, r}, stored transposed
        ("gemm_t", (32, 16), 4, (16, 4), (4, 32)),
        ("conv2d", (8, 3, 5, 5), 4, (4, 3, 5, 5), (8, 4, 1, 1)),  # Lorax conv A {k,k,in,r}, B {1,1,r,out}
        (
            "conv_g",
            (8, 2, 3, 3),
            4,
            (4, 2, 3, 3),
            (8, 2, 1, 1),
        ),  # grouped (g=2): A (r, in/g, k), B (out, r/g)
    ],
)
def test_ab_shapes_follow_the_weight_metadata(op, shape, rank, a_shape, b_shape) -> None:
    if op == "matmul":
        node, x = helper.make_node("MatMul", ["x", "W"], ["y"], name="n"), [2, 16]
    elif op == "gemm_t":
        node, x = helper.make_node("Gemm", ["x", "W"], ["y"], name="n", transB=1), [2, 16]
    else:
        group = 2 if op == "conv_g" else 1
        node, x = (
            helper.make_node("Conv", ["x", "W"], ["y"], name="n", group=group),
            [1, shape[1] * group, 6, 6],
        )
    model = load_model(make_model([node], {"x": (F, x)}, ["y"], {"W": rng_array(shape)}))
    scan = find_sites(model)
    plan = plan_branches(scan, LoraConfig(rank=rank), GraphIndex(model.proto.graph))
    assert (plan.branches[0].a_shape, plan.branches[0].b_shape) == (a_shape, b_shape)


def test_depthwise_conv_needs_a_rank_multiple_of_its_group() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="/dw/Conv", group=8)
    model = load_model(make_model([node], {"x": (F, [1, 8, 5, 5])}, ["y"], {"W": rng_array((8, 1, 3, 3))}))
    scan = find_sites(model)
    plan = plan_branches(scan, LoraConfig(rank=4), GraphIndex(model.proto.graph))
    assert not plan.branches and "rank 4 is not a multiple of the conv's group 8" in plan.skipped[0].reason
    ok = plan_branches(scan, LoraConfig(rank=16), GraphIndex(model.proto.graph))
    assert ok.branches[0].a_shape == (16, 1, 3, 3) and ok.branches[0].b_shape == (8, 2, 1, 1)


def test_one_initializer_feeding_several_nodes_gives_several_sites() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name="b"),
    ]
    scan = _scan(nodes, {"x": (F, [2, 4])}, ["y"], {"W": rng_array((4, 4))})
    assert [s.node for s in scan.sites] == ["a", "b"] and {s.weight.initializer for s in scan.sites} == {"W"}


def test_nodes_inside_subgraphs_are_reported() -> None:
    inner = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"], name="inner_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("z", F, [2, 4])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z2"], name="id")],
        "else",
        [],
        [helper.make_tensor_value_info("z2", F, [2, 4])],
    )
    node = helper.make_node("If", ["cond"], ["y"], name="branchy", then_branch=inner, else_branch=other)
    model = make_model(
        [node], {"x": (F, [2, 4]), "cond": (TensorProto.BOOL, [])}, ["y"], {"W": rng_array((4, 4))}
    )
    scan = find_sites(model)
    assert scan.skipped[0].node == "inner_mm" and "subgraph of If 'branchy'" in scan.skipped[0].reason


def test_ops_filter_limits_the_scan() -> None:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
        helper.make_node("Gemm", ["h", "W"], ["y"], name="gemm"),
    ]
    model = make_model(nodes, {"x": (F, [2, 4])}, ["y"], {"W": rng_array((4, 4))})
    assert [s.op for s in find_sites(model, {"gemm"}).sites] == ["Gemm"]
    assert np.array_equal(np.array([s.op for s in find_sites(model).sites]), np.array(["MatMul", "Gemm"]))
