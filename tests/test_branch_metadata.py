"""Branch nodes carry their base node's exporter scope and a tag naming their branch; merges remove them."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import MODELS, make_model, rng_array, write_adapter
from onnx import TensorProto, helper

import lora_onnx
from lora_onnx.model.load import load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.recipes.config import LoraConfig
from lora_onnx.sites.targets import TargetSelector
from lora_onnx.stages.branch_metadata import BRANCH_KEY, SCOPE_KEYS, SHARED, branch_tag

LLAMA = MODELS / "tiny_llama" / "model.onnx"
SCOPES = "pkg.torch.onnx.name_scopes"
PROJ = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")


@pytest.fixture(scope="module")
def base() -> onnx.ModelProto:
    return load_model(LLAMA).proto


def _meta(node: onnx.NodeProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in node.metadata_props}


def _added(proto: onnx.ModelProto, base: onnx.ModelProto) -> list[onnx.NodeProto]:
    names = {node.name for node in base.graph.node}
    return [node for node in proto.graph.node if node.name not in names]


def _check_branch_nodes(proto: onnx.ModelProto, base: onnx.ModelProto) -> int:
    """Every added node: in a branch, tagged with it, carrying its base node's scope. Returns the count."""
    base_nodes = {node.name: node for node in base.graph.node}
    owner = {name: branch for branch in read_branches(proto) for name in branch.nodes}
    added = [node for node in _added(proto, base) if _meta(node).get(BRANCH_KEY) != SHARED]
    assert added
    for node in added:
        branch = owner[node.name]  # every added non-shared node belongs to a recorded branch
        meta, scope = _meta(node), _meta(base_nodes[branch.site])
        assert meta[BRANCH_KEY] == branch_tag(branch) == f"{branch.adapter}@{branch.site}"
        assert SCOPES in scope  # the bundled model is a dynamo export: the base really has scopes
        for key in SCOPE_KEYS:
            assert meta.get(key) == scope.get(key), (node.name, key)
        assert "pkg.torch.onnx.stack_trace" not in meta  # the base node's own op, not the branch's
    return len(added)


def _check_merged(merged: onnx.ModelProto, base: onnx.ModelProto) -> None:
    assert not [node.name for node in merged.graph.node if BRANCH_KEY in _meta(node)]
    assert [node.name for node in merged.graph.node] == [node.name for node in base.graph.node]


def _adapter(folder: Path, base: onnx.ModelProto, seed: int, **config: object) -> Path:
    model = load_model(LLAMA)
    weights = {site.module_path: site.weight.initializer for site in lora_onnx.find_sites(model).sites}
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for path in PROJ:
        fan_in, fan_out = model.array(weights[path]).shape
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_A.weight"] = rng.standard_normal((2, fan_in)).astype(np.float32)
        tensors[f"{key}.lora_B.weight"] = rng.standard_normal((fan_out, 2)).astype(np.float32)
        if config.get("use_dora"):
            tensors[f"{key}.lora_magnitude_vector"] = (rng.random(fan_out) + 1).astype(np.float32)
        if config.get("lora_bias"):
            tensors[f"{key}.lora_B.bias"] = rng.standard_normal(fan_out).astype(np.float32)
    return write_adapter(folder, tensors, target_modules=["q_proj", "down_proj"], **config)


def test_inject_tags_every_branch_node_and_merge_removes_them(base: onnx.ModelProto) -> None:
    injected = lora_onnx.inject(LLAMA, LoraConfig(rank=2, init="random"))
    assert _check_branch_nodes(injected.model.proto, base) >= 4 * len(injected.branches)
    # a second adapter stacked on the same sites: its nodes carry their own tag, the first keep theirs
    stacked = lora_onnx.inject(injected.model, LoraConfig(rank=2, init="random", adapter_name="second"))
    _check_branch_nodes(stacked.model.proto, base)
    tags = {_meta(node)[BRANCH_KEY].split("@")[0] for node in _added(stacked.model.proto, base)}
    assert tags == {"default", "second"}
    _check_merged(lora_onnx.merge(stacked.model).model.proto, base)


def test_slots_tag_their_nodes_and_a_merge_with_a_file_removes_them(base: onnx.ModelProto, tmp_path) -> None:
    file = tmp_path / "a.onnx_adapter"
    config = LoraConfig(rank=2, targets=TargetSelector(names=("q_proj", "down_proj")))
    slotted = lora_onnx.inject_slots(LLAMA, config, strength_input=True, adapter_output=file)
    _check_branch_nodes(slotted.model.proto, base)
    _check_merged(lora_onnx.merge(slotted.model, adapter_file=file).model.proto, base)


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}, {"lora_bias": True}])
def test_peft_branches_incl_dora_and_bias_nodes_are_tagged(base, tmp_path, variant) -> None:
    applied = lora_onnx.apply_peft(LLAMA, _adapter(tmp_path / "a", base, 1, **variant))
    count = _check_branch_nodes(applied.model.proto, base)
    assert count >= (4 if not variant else 6) * len(applied.branches)  # DoRA / bias add their own nodes
    if variant.get("lora_bias"):
        return  # tiny_llama's Linears have no bias, so (as in PEFT) a lora_B.bias branch cannot be merged
    _check_merged(lora_onnx.merge(applied.model).model.proto, base)


def test_mixed_branches_and_their_shared_index_nodes(base: onnx.ModelProto, tmp_path) -> None:
    adapters = [_adapter(tmp_path / "a", base, 1), _adapter(tmp_path / "b", base, 2)]
    mixed = lora_onnx.inject_mixed(LLAMA, adapters)
    _check_branch_nodes(mixed.model.proto, base)
    shared = [node for node in _added(mixed.model.proto, base) if _meta(node).get(BRANCH_KEY) == SHARED]
    assert shared  # the adapter-index nodes, used by every mixed branch
    # their scope is what the two sites (layers 0 and 1) have in common: the decoder model
    for node in shared:
        assert ast.literal_eval(_meta(node)[SCOPES]) == ["", "model"]
        assert _meta(node)["namespace"].split("/")[-1].startswith("model: ")
    _check_merged(lora_onnx.merge(mixed.model, adapter_index=1).model.proto, base)


def test_models_without_exporter_scopes_get_the_tag_alone() -> None:
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="/fc/MatMul")
    model = make_model([node], {"x": (TensorProto.FLOAT, [2, 8])}, ["y"], {"W": rng_array((8, 8))})
    injected = lora_onnx.inject(model, LoraConfig(rank=2))
    added = _added(injected.model.proto, model)
    assert added and all(_meta(n) == {BRANCH_KEY: "default@/fc/MatMul"} for n in added)
