"""The in-memory graph (lora_onnx.model.graph): onnx-ir round trips that keep everything, read no tensor
bytes, and the helpers the stages build on (fresh names, the base output's take-over, node making)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import MODELS, make_model, rng_array, run
from onnx import TensorProto, helper

from lora_onnx import LoraConfig, inject
from lora_onnx.kinds.base import NodeMaker
from lora_onnx.model.graph import FreshNames, add_initializer, take_over, to_ir, to_proto, values_by_name
from lora_onnx.model.load import load_model
from lora_onnx.model.module_paths import FOLDED_FROM_KEY, NAME_SCOPES_KEY


def _without_external_payload(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString(deterministic=True)


@pytest.mark.parametrize("name", ["tiny_llama", "convnet", "tiny_bert", "tiny_gpt2"])
def test_round_trip_keeps_the_bundled_exports(name: str) -> None:
    proto = onnx.load(MODELS / name / "model.onnx", load_external_data=False)
    back = to_proto(to_ir(proto))
    # Every node (with its metadata_props), every initializer and every value_info, in order.
    assert [n.SerializeToString() for n in back.graph.node] == [
        n.SerializeToString() for n in proto.graph.node
    ]
    assert [t.SerializeToString() for t in back.graph.initializer] == [
        t.SerializeToString() for t in proto.graph.initializer
    ]
    assert [v.SerializeToString() for v in back.graph.value_info] == [
        v.SerializeToString() for v in proto.graph.value_info
    ]
    assert list(back.graph.input) == list(proto.graph.input)
    assert list(back.graph.output) == list(proto.graph.output)
    assert back.metadata_props == proto.metadata_props


def test_round_trip_keeps_scopes_and_folded_from() -> None:
    node = helper.make_node("MatMul", ["x", "val_3"], ["y"], name="node_linear")
    node.metadata_props.add(key=NAME_SCOPES_KEY, value="['', 'fc', 'linear']")
    model = make_model([node], {"x": (TensorProto.FLOAT, [2, 4])}, ["y"], {"val_3": rng_array((4, 3))})
    info = model.graph.value_info.add()
    info.name = "val_3"
    info.metadata_props.add(key=FOLDED_FROM_KEY, value="['fc.weight']")
    back = to_proto(to_ir(model))
    assert {e.key: e.value for e in back.graph.node[0].metadata_props} == {
        NAME_SCOPES_KEY: "['', 'fc', 'linear']"
    }
    kept = {v.name: {e.key: e.value for e in v.metadata_props} for v in back.graph.value_info}
    assert kept == {"val_3": {FOLDED_FROM_KEY: "['fc.weight']"}}
    feeds = {"x": rng_array((2, 4), seed=1)}
    assert np.array_equal(run(back, feeds)[0], run(model, feeds)[0])


def test_round_trip_reads_no_external_bytes(tmp_path: Path) -> None:
    """An external tensor stays a reference: the data file may even be gone."""
    shutil.copy(MODELS / "tiny_llama" / "model.onnx", tmp_path / "model.onnx")
    proto = onnx.load(tmp_path / "model.onnx", load_external_data=False)
    model = to_ir(proto)
    external = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.ExternalTensor)]
    assert external
    back = to_proto(model)
    refs = {t.name: {e.key: e.value for e in t.external_data} for t in back.graph.initializer}
    assert refs == {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer}


def test_an_injected_model_round_trips_bitwise(tmp_path: Path) -> None:
    out = tmp_path / "lora.onnx"
    inject(MODELS / "tiny_bert" / "model.onnx", LoraConfig(rank=4, init="random", seed=3), output=out)
    proto = onnx.load(out)
    back = to_proto(to_ir(proto))
    feeds = {
        value.name: np.ones([d.dim_value or 2 for d in value.type.tensor_type.shape.dim], np.int64)
        for value in proto.graph.input
    }
    for mine, theirs in zip(run(back, feeds), run(proto, feeds), strict=True):
        assert np.array_equal(mine, theirs)
    assert back.metadata_props == proto.metadata_props


def test_fresh_names_share_one_space_with_values_and_nodes() -> None:
    node = helper.make_node("Relu", ["x"], ["y"], name="act")
    graph = to_ir(
        make_model([node], {"x": (TensorProto.FLOAT, [2])}, ["y"], {"w": np.ones(2, np.float32)})
    ).graph
    names = FreshNames(graph)
    assert [names("y"), names("y"), names("act"), names("w"), names("x"), names("new")] == [
        "y_1",
        "y_2",
        "act_1",
        "w_1",
        "x_1",
        "new",
    ]
    names.reserve("kept")
    assert not names.is_free("kept") and names("kept") == "kept_1"


def test_take_over_keeps_every_reader_and_graph_output() -> None:
    """A branch joins a value a node reads that is also a graph output (the insert stage's case)."""
    nodes = [
        helper.make_node("Relu", ["x"], ["y"], name="relu"),
        helper.make_node("Neg", ["y"], ["z"], name="neg"),
    ]
    model = make_model(nodes, {"x": (TensorProto.FLOAT, [3])}, ["y", "z"], {})
    rewritten = to_ir(model)
    graph = rewritten.graph
    values = values_by_name(graph)
    names = FreshNames(graph)
    add_initializer(graph, helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    values["one"] = graph.initializers["one"]
    base = values["y"]
    base.name = names("y.lora_base")
    values[base.name] = values.pop("y")
    make = NodeMaker(names, values)
    add = make.node("Add", [base.name, "one"], ["y"], names("add"))
    take_over(base, add.outputs[0], keep=[add])
    graph.insert_after(base.producer(), make.nodes)
    assert base.shape is None and add.outputs[0].shape == ir.Shape([3])  # the declared shape moved
    back = to_proto(rewritten)
    assert [o.name for o in back.graph.output] == ["y", "z"]
    assert back.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    y, z = run(back, {"x": x})
    assert np.allclose(y, np.maximum(x, 0) + 1) and np.allclose(z, -(np.maximum(x, 0) + 1))


def test_node_maker_fills_forward_references() -> None:
    """A form names B's input before the stage adds the node writing it."""
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], {"x": (TensorProto.FLOAT, [2])}, ["y"], {}
    )
    graph = to_ir(model).graph
    make = NodeMaker(FreshNames(graph), values_by_name(graph))
    later = make.node("Neg", ["mid"], ["out"], "neg")
    first = make.node("Relu", ["y"], ["mid"], "relu2")
    assert later.inputs[0] is first.outputs[0]


def test_loaded_model_edits_never_touch_the_record() -> None:
    loaded = load_model(MODELS / "tiny_gpt2" / "model.onnx")
    before = loaded.proto.SerializeToString()
    copy = loaded.to_ir()
    copy.graph.remove(list(copy.graph)[-1], safe=False)
    assert loaded.proto.SerializeToString() == before
    assert len(loaded.with_ir(copy).proto.graph.node) == len(loaded.proto.graph.node) - 1
