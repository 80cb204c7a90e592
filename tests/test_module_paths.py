"""Module paths recovered from real exports (dynamo metadata, TorchScript scopes) and from synthetic nodes."""

from __future__ import annotations

import pytest
from builders import MODELS, make_model, rng_array
from onnx import TensorProto, helper

from lora_onnx import find_sites
from lora_onnx.model.graph import nodes_by_name, to_ir, values_by_name
from lora_onnx.model.module_paths import FOLDED_FROM_KEY, NAME_SCOPES_KEY, module_path


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("tiny_llama", {"node_linear": "model.layers.0.self_attn.q_proj", "node_linear_14": "lm_head"}),
        (
            "tiny_bert",
            {
                "/bert/encoder/layer.1/output/dense/MatMul": "bert.encoder.layer.1.output.dense",
                "/classifier/Gemm": "classifier",
            },
        ),
        (
            "tiny_gpt2",
            {
                "/transformer/h.0/attn/c_attn/Gemm": "transformer.h.0.attn.c_attn",
                "/lm_head/MatMul": "lm_head",
            },
        ),
        # pointwise: the exporter fused a BatchNorm into it; its scope names 'bn', its weight 'pointwise'
        (
            "convnet",
            {
                "node_conv2d": "stem",
                "node_Conv_32": "pointwise",
                "node_MatMul_15": "seq_proj",
                "node_linear_1": "head",
            },
        ),
    ],
)
def test_bundled_exports(model: str, expected: dict[str, str]) -> None:
    paths = {site.node: site.module_path for site in find_sites(MODELS / model / "model.onnx").sites}
    assert {node: paths[node] for node in expected} == expected


def _node_values(name: str = "n", scopes: str | None = None, weight: str = "W", folded: str | None = None):
    node = helper.make_node("MatMul", ["x", weight], ["y"], name=name)
    if scopes is not None:
        entry = node.metadata_props.add()
        entry.key, entry.value = NAME_SCOPES_KEY, scopes
    model = make_model([node], {"x": (TensorProto.FLOAT, [2, 4])}, ["y"], {weight: rng_array((4, 4))})
    if folded is not None:
        info = model.graph.value_info.add()
        info.name = weight
        entry = info.metadata_props.add()
        entry.key, entry.value = FOLDED_FROM_KEY, folded
    graph = to_ir(model).graph
    return values_by_name(graph), nodes_by_name(graph)[name]


def test_priority_of_sources() -> None:
    values, node = _node_values(scopes="['', 'enc', 'enc.fc', 'linear']", weight="other.weight")
    assert module_path(node, values["other.weight"]) == "enc.fc"
    values, node = _node_values(name="/enc/fc/MatMul", weight="val_3", folded="['enc.x.weight']")
    assert module_path(node, values["val_3"]) == "enc.fc"
    values, node = _node_values(name="mm", weight="val_3", folded="['enc.x.weight']")
    assert module_path(node, values["val_3"]) == "enc.x"
    values, node = _node_values(name="mm", weight="head.weight")
    assert module_path(node, values["head.weight"]) == "head"
    values, node = _node_values(name="mm", weight="onnx::MatMul_7")
    assert module_path(node, values["onnx::MatMul_7"]) == "mm"
