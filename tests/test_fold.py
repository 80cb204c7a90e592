"""Folding: merged == injected in onnxruntime, the base's exact node list, and honest refusals."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import conv_reference, make_model, rel_err, rng_array, run
from onnx import TensorProto, helper

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.errors import FoldError
from lora_onnx.model.graph import to_ir
from lora_onnx.model.load import load_model
from lora_onnx.recipes.plan import BranchPlan
from lora_onnx.sites.find import find_sites
from lora_onnx.stages.fold import conv_delta, fold_branches
from lora_onnx.stages.insert import insert_branches

F = TensorProto.FLOAT


def _mixed_model() -> onnx.ModelProto:
    """MatMul + bias, Gemm transB=1 via Transpose chain, fp16 weight via Cast, grouped conv."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["mm"], name="/fc1/MatMul"),
        helper.make_node("Add", ["mm", "b1"], ["h"], name="/fc1/Add"),
        helper.make_node("Transpose", ["W2"], ["W2t"], name="W2_T", perm=[1, 0]),
        helper.make_node("Gemm", ["h", "W2t"], ["g"], name="/fc2/Gemm", transB=1, alpha=0.5),
        helper.make_node("Cast", ["W3"], ["W3f"], name="W3_cast", to=TensorProto.FLOAT),
        helper.make_node("MatMul", ["g", "W3f"], ["y"], name="/fc3/MatMul"),
        helper.make_node("Conv", ["img", "Wc", "bc"], ["c"], name="/conv/Conv", group=2, pads=[1, 1, 1, 1]),
    ]
    inits = {
        "W1": rng_array((8, 16), 1), "b1": rng_array((16,), 2), "W2": rng_array((16, 12), 3),
        "W3": rng_array((12, 6), 4).astype(np.float16), "Wc": rng_array((6, 2, 3, 3), 5),
        "bc": rng_array((6,), 6),
    }  # fmt: skip
    return make_model(nodes, {"x": (F, [3, 8]), "img": (F, [2, 4, 5, 5])}, ["y", "c"], inits)


FEEDS = {"x": rng_array((3, 8), 10), "img": rng_array((2, 4, 5, 5), 11)}


def _materialize(model: lora_onnx.LoadedModel, tmp_path, name: str) -> onnx.ModelProto:
    return onnx.load(lora_onnx.save_model(model, tmp_path / name))


def test_merge_equals_injected_and_restores_the_base_graph(tmp_path) -> None:
    base = _mixed_model()
    injected = lora_onnx.inject(base, LoraConfig(rank=2, alpha=5, init="random", seed=1))
    assert len(injected.branches) == 4
    merged = lora_onnx.merge(injected.model)
    assert len(merged.folded) == 4 and not merged.kept
    proto = _materialize(merged.model, tmp_path, "merged.onnx")
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in proto.graph.node] == [
        (n.name, n.op_type, list(n.input), list(n.output)) for n in base.graph.node
    ]
    assert sorted(t.name for t in proto.graph.initializer) == sorted(t.name for t in base.graph.initializer)
    dtypes = {t.name: t.data_type for t in proto.graph.initializer}
    assert dtypes["W3"] == TensorProto.FLOAT16  # folded in float32, cast back to the source type
    assert not [p for p in proto.metadata_props if p.key == "lora_onnx.model.manifest"]
    want, got = run(injected.model.proto, FEEDS), run(proto, FEEDS)
    assert rel_err(got[0], want[0]) <= 1e-3  # W3 is float16: its fold rounds to fp16
    assert rel_err(got[1], want[1]) <= 1e-4
    assert rel_err(run(base, FEEDS)[1], want[1]) > 1e-3  # the branches really changed something


def test_merge_of_float32_weights_agrees_to_1e4_and_deltas_match_numpy(tmp_path) -> None:
    base = _mixed_model()
    config = LoraConfig(rank=2, init="random", targets=TargetSelector(names=("fc1", "fc2")))
    injected = lora_onnx.inject(base, config)
    merged = _materialize(lora_onnx.merge(injected.model).model, tmp_path, "m.onnx")
    assert rel_err(run(merged, FEEDS)[0], run(injected.model.proto, FEEDS)[0]) <= 1e-4
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in merged.graph.initializer}
    fc2 = next(b for b in injected.branches if b.module_path == "fc2")
    a, b = injected.model.array(fc2.a), injected.model.array(fc2.b)
    # W2 is stored (in, out) for a Gemm transB=1 behind a Transpose: the delta lands un-transposed
    expected = onnx.numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == "W2")) + a @ b
    assert np.allclose(weights["W2"], expected, rtol=1e-6, atol=1e-6)


def test_conv_delta_is_the_grouped_branch() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((4, 3, 3, 3)), rng.standard_normal((6, 2, 1, 1))
    x = rng.standard_normal((1, 6, 7, 7))
    delta = conv_delta(a, b, 0.5, group=2)
    assert delta.shape == (6, 3, 3, 3)
    direct = 0.5 * conv_reference(conv_reference(x, a, group=2), b, group=2)
    assert np.allclose(conv_reference(x, delta, group=2), direct, atol=1e-5)


def _shared_weight_model(second_path: str) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="/fc/MatMul"),
        helper.make_node("MatMul", ["h", "W"], ["y"], name=f"/{second_path}/MatMul"),
    ]
    return make_model(nodes, {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8), 1)})


def test_module_run_twice_shares_one_adapter_and_folds_once(tmp_path) -> None:
    base = _shared_weight_model("fc")
    injected = lora_onnx.inject(base, LoraConfig(rank=2, init="random"))
    assert len(injected.branches) == 2 and len({b.a for b in injected.branches}) == 1
    merged = _materialize(lora_onnx.merge(injected.model).model, tmp_path, "m.onnx")
    feeds = {"x": FEEDS["x"][:2]}
    assert rel_err(run(merged, feeds)[0], run(injected.model.proto, feeds)[0]) <= 1e-4


def test_weight_shared_by_different_modules_is_untied_into_one_copy_each(tmp_path) -> None:
    # Was a refusal ("shared by nodes whose branches differ"); the fold now unties (lora_onnx.stages.untie).
    injected = lora_onnx.inject(_shared_weight_model("other"), LoraConfig(rank=2, init="random"))
    assert len({b.a for b in injected.branches}) == 2
    for partial in (False, True):
        merged = lora_onnx.merge(injected.model, partial=partial)
        assert len(merged.folded) == 2 and not merged.kept and len(merged.notes) == 2
        proto = _materialize(merged.model, tmp_path, f"m{partial}.onnx")
        weights = [node.input[1] for node in proto.graph.node]
        assert len(set(weights)) == 2 and "W" not in weights  # one copy per node, the base tensor dropped
        assert "W" not in {t.name for t in proto.graph.initializer}
        feeds = {"x": FEEDS["x"][:2]}
        assert rel_err(run(proto, feeds)[0], run(injected.model.proto, feeds)[0]) <= 1e-5


def test_weight_shared_with_a_node_without_branch_is_untied(tmp_path) -> None:
    # Was a refusal ("shared with node '/other/MatMul', which has no branch"): the adapted node now gets
    # its own folded copy, the other keeps the base tensor (what the unmerged model computes).
    config = LoraConfig(rank=2, init="random", targets=TargetSelector(names=("fc",)))
    base = _shared_weight_model("other")
    injected = lora_onnx.inject(base, config)
    merged = lora_onnx.merge(injected.model)
    assert len(merged.folded) == 1 and "'/other/MatMul' keeps the base" in merged.notes[0]
    proto = _materialize(merged.model, tmp_path, "m.onnx")
    nodes = {node.name: node for node in proto.graph.node}
    assert nodes["/other/MatMul"].input[1] == "W" and nodes["/fc/MatMul"].input[1] != "W"
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert np.array_equal(stored["W"], rng_array((8, 8), 1))  # the base tensor is untouched
    feeds = {"x": FEEDS["x"][:2]}
    assert rel_err(run(proto, feeds)[0], run(injected.model.proto, feeds)[0]) <= 1e-5
    assert rel_err(run(proto, feeds)[0], run(base, feeds)[0]) > 1e-3  # the fold did change /fc


def test_a_weight_also_read_by_shape_folds(tmp_path) -> None:
    # dynamo's optimize=False exports also feed a conv weight to a Shape node; the fold keeps the shape.
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul"),
        helper.make_node("Shape", ["W"], ["wshape"], name="/fc/Shape"),
        helper.make_node("Size", ["W"], ["wsize"], name="/fc/Size"),
    ]
    base = make_model(nodes, {"x": (F, [3, 8])}, ["y", "wshape", "wsize"], {"W": rng_array((8, 4), 1)})
    injected = lora_onnx.inject(base, LoraConfig(rank=2, init="random"))
    merged = lora_onnx.merge(injected.model)
    assert len(merged.folded) == 1 and not merged.kept
    folded = _materialize(merged.model, tmp_path, "m.onnx")
    feeds = {"x": FEEDS["x"]}
    expected = run(injected.model.proto, feeds)
    actual = run(folded, feeds)
    assert rel_err(actual[0], expected[0]) <= 1e-5
    assert np.array_equal(actual[1], expected[1]) and np.array_equal(actual[2], expected[2])


def test_dense_a_on_a_grouped_conv_is_applied_but_not_folded() -> None:
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="/conv/Conv", group=2)
    model = load_model(make_model([node], {"x": (F, [1, 4, 5, 5])}, ["y"], {"W": rng_array((4, 2, 3, 3))}))
    site = find_sites(model).sites[0]
    # PEFT's conv LoRA: A is a dense conv (group 1) even when the base conv is grouped
    plan = BranchPlan(site, "default", 2, 2.0, 1.0, "conv", "conv.lora_A.weight", "conv.lora_B.weight", 1, 2)
    values = {plan.a_name: rng_array(plan.a_shape, 1), plan.b_name: rng_array(plan.b_shape, 2)}
    injected = insert_branches(model, [plan], values).model
    x = rng_array((1, 4, 5, 5), 3)
    expected = conv_reference(x, model.array("W"), group=2) + conv_reference(
        conv_reference(x, values[plan.a_name]), values[plan.b_name], group=2
    )
    assert rel_err(run(injected.proto, {"x": x})[0], expected) <= 1e-5
    with pytest.raises(FoldError, match=r"conv A is dense .* \(PEFT cannot merge it either\)"):
        fold_branches(injected)


def test_fold_one_adapter_of_two_stacked_on_the_same_node(tmp_path) -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    base = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8), 1)})
    first = lora_onnx.inject(base, LoraConfig(rank=2, init="random"))
    both = lora_onnx.inject(first.model, LoraConfig(rank=2, init="random", adapter_name="b", seed=9))
    feeds = {"x": FEEDS["x"][:2]}
    want = run(both.model.proto, feeds)[0]
    for adapter in ("default", "b"):
        one = lora_onnx.merge(both.model, adapters=[adapter])
        assert [b.adapter for b in one.folded] == [adapter]
        proto = _materialize(one.model, tmp_path, f"{adapter}.onnx")
        assert rel_err(run(proto, feeds)[0], want) <= 1e-5
        rest = lora_onnx.merge(lora_onnx.load_model(tmp_path / f"{adapter}.onnx"))
        final = _materialize(rest.model, tmp_path, f"{adapter}-all.onnx")
        assert len(final.graph.node) == 1 and rel_err(run(final, feeds)[0], want) <= 1e-5


def test_merge_without_branches_is_an_error() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    with pytest.raises(FoldError, match="carries no lora-onnx branches"):
        lora_onnx.merge(make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8))}))


def test_merge_refuses_a_graph_edited_after_injection() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    base = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8))})
    injected = lora_onnx.inject(base, LoraConfig(rank=2))
    proto = onnx.ModelProto()
    proto.CopyFrom(injected.model.proto)
    for n in proto.graph.node:
        if n.op_type == "Add":
            n.name = "renamed_by_another_tool"
    assert list(to_ir(proto).graph)
    with pytest.raises(FoldError, match="not in the graph as recorded"):
        lora_onnx.merge(proto)


def test_merge_leaves_the_base_value_info_and_a_valid_graph(tmp_path) -> None:
    """The fold's onnx-ir edit drops what the branches added, value_info included (a renamed-back base
    output keeps its type), so the merged graph declares exactly the base's intermediate values."""
    base = onnx.shape_inference.infer_shapes(_mixed_model())
    assert base.graph.value_info  # the base declares its intermediates' types
    injected = lora_onnx.inject(base, LoraConfig(rank=2, alpha=5, init="random", seed=1))
    assert any(".lora_" in info.name for info in injected.model.proto.graph.value_info)
    merged = lora_onnx.merge(injected.model)
    proto = _materialize(merged.model, tmp_path, "merged.onnx")
    onnx.checker.check_model(proto, full_check=True)
    assert sorted(info.name for info in proto.graph.value_info) == sorted(
        info.name for info in base.graph.value_info
    )
    kinds = {info.name: info.type for info in base.graph.value_info}
    assert all(info.type == kinds[info.name] for info in proto.graph.value_info)
    assert rel_err(run(proto, FEEDS)[1], run(injected.model.proto, FEEDS)[1]) <= 1e-4


def test_fold_two_adapters_stacked_on_the_same_node_at_once(tmp_path) -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    base = make_model([node], {"x": (F, [2, 8])}, ["y"], {"W": rng_array((8, 8), 1)})
    first = lora_onnx.inject(base, LoraConfig(rank=2, init="random"))
    both = lora_onnx.inject(first.model, LoraConfig(rank=2, init="random", adapter_name="b", seed=9))
    feeds = {"x": FEEDS["x"][:2]}
    want = run(both.model.proto, feeds)[0]
    merged = lora_onnx.merge(both.model)
    assert sorted(b.adapter for b in merged.folded) == ["b", "default"]
    proto = _materialize(merged.model, tmp_path, "both.onnx")
    assert [(n.name, list(n.input), list(n.output)) for n in proto.graph.node] == [
        ("/fc/MatMul", ["x", "W"], ["y"])
    ]
    assert sorted(t.name for t in proto.graph.initializer) == ["W"]
    assert rel_err(run(proto, feeds)[0], want) <= 1e-5
    assert rel_err(run(base, feeds)[0], want) > 1e-3  # both adapters really changed the output
