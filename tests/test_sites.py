"""Site discovery: which nodes take a branch, with which shapes and layouts, and why others are skipped."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import make_model, rng_array
from onnx import TensorProto, helper, numpy_helper

import lora_onnx
from lora_onnx import LoraConfig, find_sites
from lora_onnx.errors import LoraOnnxError
from lora_onnx.model.graph import FreshNames, to_ir
from lora_onnx.model.load import load_model
from lora_onnx.recipes.plan import plan_branches

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
    plan = plan_branches(scan, LoraConfig(rank=rank), FreshNames(model.ir_model.graph))
    assert (plan.branches[0].a_shape, plan.branches[0].b_shape) == (a_shape, b_shape)


def test_depthwise_conv_needs_a_rank_multiple_of_its_group() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="/dw/Conv", group=8)
    model = load_model(make_model([node], {"x": (F, [1, 8, 5, 5])}, ["y"], {"W": rng_array((8, 1, 3, 3))}))
    scan = find_sites(model)
    plan = plan_branches(scan, LoraConfig(rank=4), FreshNames(model.ir_model.graph))
    assert not plan.branches and "rank 4 is not a multiple of the conv's group 8" in plan.skipped[0].reason
    ok = plan_branches(scan, LoraConfig(rank=16), FreshNames(model.ir_model.graph))
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


I32 = TensorProto.INT32


def _skip_reason(scan, node: str) -> str:
    return next(s.reason for s in scan.skipped if s.node == node)


def test_integer_matmul_and_gemm_are_no_float_sites() -> None:
    # Integer MatMul / Gemm: a branch's random init would truncate to zeros and prove nothing.
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="int_mm"),
        helper.make_node("Gemm", ["h", "G"], ["y"], name="int_gemm"),
        helper.make_node("Cast", ["y"], ["yf"], to=F, name="to_float"),
        helper.make_node("MatMul", ["yf", "Wf"], ["z"], name="float_mm"),
    ]
    weights = {
        "W": np.arange(16, dtype=np.int32).reshape(4, 4),
        "G": np.ones((4, 4), np.int32),
        "Wf": rng_array((4, 4)),
    }
    scan = _scan(nodes, {"x": (I32, [2, 4])}, ["z"], weights)
    assert [s.node for s in scan.sites] == ["float_mm"]
    for node in ("int_mm", "int_gemm"):
        reason = _skip_reason(scan, node)
        assert "int32" in reason and "float" in reason, reason


def test_integer_weight_cast_to_float_is_still_a_site() -> None:
    # An int8 store cast to float before the MatMul computes in float: a site, dtype float.
    nodes = [
        helper.make_node("Cast", ["Wq"], ["W"], to=F, name="cast_w"),
        helper.make_node("MatMul", ["x", "W"], ["y"], name="mm"),
    ]
    weights = {"Wq": np.ones((4, 4), np.int8)}
    scan = _scan(nodes, {"x": (F, [2, 4])}, ["y"], weights)
    assert [s.node for s in scan.sites] == ["mm"] and scan.sites[0].dtype == F


def test_matmul_integer_and_qlinear_ops_are_listed_as_skipped() -> None:
    nodes = [
        helper.make_node("MatMulInteger", ["x", "W", "xz", "wz"], ["h"], name="mmi"),
        helper.make_node("Cast", ["h"], ["y"], to=F, name="to_float"),
    ]
    weights = {"W": np.ones((4, 4), np.int8), "xz": np.array(0, np.uint8), "wz": np.array(0, np.int8)}
    model = make_model(nodes, {"x": (TensorProto.UINT8, [2, 4])}, ["y"], weights)
    scan = find_sites(model)
    assert not scan.sites and "MatMulInteger computes in integers" in _skip_reason(scan, "mmi")
    # Only listed when MatMul sites are asked for.
    assert not find_sites(model, ops=("conv",)).skipped


def test_matmuls_in_loop_and_scan_bodies_are_skipped_with_where_they_are() -> None:
    loop_body = helper.make_graph(
        [
            helper.make_node("MatMul", ["carry", "W"], ["next"], name="loop_mm"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="cond_id"),
        ],
        "loop_body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("carry", F, [2, 4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("next", F, [2, 4]),
        ],
    )
    scan_body = helper.make_graph(
        [helper.make_node("MatMul", ["row", "W"], ["out_row"], name="scan_mm")],
        "scan_body",
        [helper.make_tensor_value_info("row", F, [1, 4])],
        [helper.make_tensor_value_info("out_row", F, [1, 4])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="main_mm"),
        helper.make_node("Loop", ["trips", "cond", "h"], ["looped"], name="the_loop", body=loop_body),
        helper.make_node("Scan", ["looped"], ["y"], name="the_scan", body=scan_body, num_scan_inputs=1),
    ]
    weights = {"W": rng_array((4, 4)), "trips": np.array(2, np.int64), "cond": np.array(True)}
    scan = _scan(nodes, {"x": (F, [2, 4])}, ["y"], weights)
    assert [s.node for s in scan.sites] == ["main_mm"]
    assert "inside the body subgraph of Loop 'the_loop'" in _skip_reason(scan, "loop_mm")
    assert "inside the body subgraph of Scan 'the_scan'" in _skip_reason(scan, "scan_mm")
    assert "not rewritten" in _skip_reason(scan, "scan_mm")
    # inspect lists them too (table and JSON come from the same records).
    inspection = lora_onnx.inspect_model(
        make_model(nodes, {"x": (F, [2, 4])}, ["y"], weights), LoraConfig(rank=2)
    )
    assert {"loop_mm", "scan_mm"} <= {s["node"] for s in inspection.to_json()["skipped"]}


def test_nested_subgraphs_name_the_whole_way_in() -> None:
    inner_then = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["z"], name="deep_mm")],
        "inner_then",
        [],
        [helper.make_tensor_value_info("z", F, [2, 4])],
    )
    inner_else = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["z2"], name="id2")], "inner_else", [],
        [helper.make_tensor_value_info("z2", F, [2, 4])],
    )  # fmt: skip
    inner_if = helper.make_node(
        "If", ["cond"], ["w"], name="inner_if", then_branch=inner_then, else_branch=inner_else
    )
    outer_then = helper.make_graph(
        [inner_if], "outer_then", [], [helper.make_tensor_value_info("w", F, [2, 4])]
    )
    outer_else = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["w2"], name="id3")], "outer_else", [],
        [helper.make_tensor_value_info("w2", F, [2, 4])],
    )  # fmt: skip
    node = helper.make_node(
        "If", ["cond"], ["y"], name="outer_if", then_branch=outer_then, else_branch=outer_else
    )
    model = make_model(
        [node], {"x": (F, [2, 4]), "cond": (TensorProto.BOOL, [])}, ["y"], {"W": rng_array((4, 4))}
    )
    reason = _skip_reason(find_sites(model), "deep_mm")
    assert "then_branch subgraph of If 'inner_if'" in reason and "If 'outer_if'" in reason


def _function_model() -> onnx.ModelProto:
    function = helper.make_function(
        "local", "Proj", ["a", "w"], ["b"],
        [helper.make_node("MatMul", ["a", "w"], ["b"], name="fn_mm")],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("Proj", ["x", "W"], ["h"], name="call_1", domain="local"),
            helper.make_node("MatMul", ["h", "W"], ["y"], name="main_mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", F, [2, 4])],
        [helper.make_tensor_value_info("y", F, [2, 4])],
        [numpy_helper.from_array(rng_array((4, 4)), "W")],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[function],
    )
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_matmuls_inside_model_local_functions_are_skipped_with_the_fix() -> None:
    model = _function_model()
    scan = find_sites(model)
    assert [s.node for s in scan.sites] == ["main_mm"]
    reason = _skip_reason(scan, "fn_mm")
    assert "inside model-local function local.Proj, called by node 'call_1'" in reason
    assert "inline_local_functions" in reason
    # And inject reports it instead of dropping it: the result's scan carries the skip.
    result = lora_onnx.inject(model, LoraConfig(rank=2))
    assert [b.site for b in result.branches] == ["main_mm"]
    assert "fn_mm" in {s.node for s in result.scan.skipped}


def test_rank_bounds_are_per_group_for_a_grouped_conv() -> None:
    from lora_onnx.recipes.plan import rank_bounds

    nodes = [helper.make_node("Conv", ["x", "W"], ["y"], name="/g/Conv", group=4, pads=[1, 1, 1, 1])]
    model = make_model(nodes, {"x": (F, [1, 16, 5, 5])}, ["y"], {"W": rng_array((32, 4, 3, 3))})
    scan = find_sites(model)
    # Per group: W_g is (out/g = 8, in/g * k = 4 * 9 = 36): min 8, max 36; four groups.
    assert rank_bounds(scan.sites[0]) == (32, 144)
    assert not plan_branches(scan, LoraConfig(rank=32), FreshNames(to_ir(model).graph)).warnings
    warned = plan_branches(scan, LoraConfig(rank=40), FreshNames(to_ir(model).graph)).warnings
    assert len(warned) == 1 and "g (rank 40, min 32)" in warned[0] and "--rank-pattern g=32" in warned[0]
    refused = r"rank 148 exceeds both in and out features \(per group for a grouped conv\) of 1 site\(s\): g "
    refused += r"\(min 32, max 144\)"
    with pytest.raises(LoraOnnxError, match=refused):
        plan_branches(scan, LoraConfig(rank=148), FreshNames(to_ir(model).graph))


def test_toy_sites_keep_the_default_rank_with_a_warning() -> None:
    # A 4 -> 3 layer with PEFT's default rank 8: above max(in, out), yet only warned (toy models work).
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")], {"x": (F, [2, 4])}, ["y"],
        {"W": rng_array((4, 3))},
    )  # fmt: skip
    scan = find_sites(model)
    warned = plan_branches(scan, LoraConfig(), FreshNames(to_ir(model).graph)).warnings
    assert len(warned) == 1 and "fc (rank 8, min 3)" in warned[0]
    with pytest.raises(LoraOnnxError, match=r"rank 9 exceeds both in and out features of 1 site\(s\): fc"):
        plan_branches(scan, LoraConfig(rank=9), FreshNames(to_ir(model).graph))
