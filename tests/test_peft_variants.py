"""DoRA and lora_bias on tiny inline models: applied and merged outputs against numpy written from PEFT's
formulas (float64), fold edge cases (shared biases, nodes without a bias), and old manifests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.errors import FoldError
from lora_onnx.model.manifest import BranchRecord, read_branches, read_peft_config
from tests.builders import conv_reference, make_model, rel_err, rng_array, run, write_adapter

F = TensorProto.FLOAT
IN, OUT, R = 8, 6, 2
X = rng_array((3, IN), 100)
IMG = rng_array((2, 4, 5, 5), 101)


def _model() -> onnx.ModelProto:
    """Linear modules exported every way a bias can appear, and convs with and without a bias."""
    nodes = [
        helper.make_node("Identity", ["b_shared"], ["b_id"], name="dedup_identity"),
        helper.make_node("MatMul", ["x", "W_lin"], ["mm1"], name="/m/lin/MatMul"),
        helper.make_node("Add", ["b_id", "mm1"], ["lin"], name="/m/lin/Add"),
        helper.make_node("MatMul", ["x", "W_other"], ["mm2"], name="/m/other/MatMul"),
        helper.make_node("Add", ["mm2", "b_shared"], ["other"], name="/m/other/Add"),
        helper.make_node("Gemm", ["x", "W_gemm", "C_gemm"], ["gemm"], name="/m/gemm/Gemm", transB=1),
        helper.make_node("Gemm", ["x", "W_nob"], ["nob"], name="/m/nob/Gemm", transB=1),
        helper.make_node("MatMul", ["x", "W_plain"], ["plain"], name="/m/plain/MatMul"),
        helper.make_node("Transpose", ["W_tr"], ["W_tr_t"], name="/m/tr/Transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["x", "W_tr_t"], ["tr"], name="/m/tr/MatMul"),
        helper.make_node("Conv", ["img", "W_conv"], ["conv"], name="/m/conv/Conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "Conv", ["img", "W_convb", "b_convb"], ["convb"], name="/m/convb/Conv", strides=[2, 2]
        ),
    ]
    inits = {
        "b_shared": rng_array((OUT,), 1), "W_lin": rng_array((IN, OUT), 2),
        "W_other": rng_array((IN, OUT), 3), "W_gemm": rng_array((OUT, IN), 4), "C_gemm": rng_array((OUT,), 5),
        "W_nob": rng_array((OUT, IN), 6),
        "W_plain": rng_array((IN, OUT), 7), "W_conv": rng_array((OUT, 4, 3, 3), 8),
        "W_convb": rng_array((OUT, 4, 3, 3), 9), "b_convb": rng_array((OUT,), 10),
        "W_tr": rng_array((OUT, IN), 11),
    }  # fmt: skip
    outputs = ["lin", "other", "gemm", "nob", "plain", "conv", "convb", "tr"]
    return make_model(nodes, {"x": (F, [3, IN]), "img": (F, [2, 4, 5, 5])}, outputs, inits)


MODEL = _model()
INITS = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in MODEL.graph.initializer}
FEEDS = {"x": X, "img": IMG}
#: module -> (weight in PyTorch's (out, in[, k, k]) layout, bias or None, conv attrs or None)
MODULES = {
    "m.lin": (INITS["W_lin"].T, INITS["b_shared"], None),
    "m.gemm": (INITS["W_gemm"], INITS["C_gemm"], None),
    "m.nob": (INITS["W_nob"], None, None),
    "m.plain": (INITS["W_plain"].T, None, None),
    "m.conv": (INITS["W_conv"], None, {"pads": [1, 1, 1, 1]}),
    "m.convb": (INITS["W_convb"], INITS["b_convb"], {"strides": [2, 2]}),
    "m.tr": (INITS["W_tr"], None, None),  # stored (out, in), transposed by a node on its way to the MatMul
}
OUTPUT_OF = {"m.lin": 0, "m.gemm": 2, "m.nob": 3, "m.plain": 4, "m.conv": 5, "m.convb": 6, "m.tr": 7}


def _tensors(module: str, seed: int, dora: bool, lora_bias: bool) -> dict[str, np.ndarray]:
    weight = MODULES[module][0]
    conv = weight.ndim == 4
    a = rng_array((R, 4, 3, 3) if conv else (R, IN), seed)
    b = rng_array((OUT, R, 1, 1) if conv else (OUT, R), seed + 1)
    out = {f"base_model.model.{module}.lora_A.weight": a, f"base_model.model.{module}.lora_B.weight": b}
    if dora:
        magnitude = (0.5 + np.random.default_rng(seed).random(OUT)).astype(np.float32)
        out[f"base_model.model.{module}.lora_magnitude_vector"] = magnitude.reshape(
            (1, OUT, 1, 1) if conv else OUT
        )
    if lora_bias:
        out[f"base_model.model.{module}.lora_B.bias"] = rng_array((OUT,), seed + 2)
    return out


def _peft_reference(module: str, tensors: dict[str, np.ndarray], scale: float) -> np.ndarray:
    """PEFT's forward for one module, in float64."""
    weight, bias, conv = MODULES[module]
    key = f"base_model.model.{module}"
    a, b = (
        tensors[f"{key}.lora_A.weight"].astype(np.float64),
        tensors[f"{key}.lora_B.weight"].astype(np.float64),
    )
    if conv is None:
        base = X @ weight.T
        lora = (X @ a.T) @ b.T
        delta = b @ a
    else:
        base = conv_reference(IMG, weight, **conv)
        lora = conv_reference(conv_reference(IMG, a, **conv), b)
        delta = (b.reshape(OUT, R) @ a.reshape(R, -1)).reshape(weight.shape)
    magnitude = tensors.get(f"{key}.lora_magnitude_vector")
    lora_bias = tensors.get(f"{key}.lora_B.bias")
    channel = (1, OUT, 1, 1) if conv is not None else (OUT,)
    bias_term = 0.0 if bias is None else bias.reshape(channel)
    if magnitude is not None:
        combined = (weight + scale * delta).reshape(OUT, -1)
        factor = magnitude.astype(np.float64).reshape(channel) / np.linalg.norm(combined, axis=1).reshape(
            channel
        )
        return factor * (base + scale * lora) + bias_term
    extra = 0.0 if lora_bias is None else scale * lora_bias.reshape(channel)
    return base + scale * lora + bias_term + extra


def _apply(tmp_path: Path, modules: list[str], *, dora: bool = False, lora_bias: bool = False):
    tensors: dict[str, np.ndarray] = {}
    for seed, module in enumerate(modules):
        tensors |= _tensors(module, 20 + 10 * seed, dora, lora_bias)
    folder = write_adapter(
        tmp_path / "adapter", tensors, r=R, lora_alpha=3, use_dora=dora, lora_bias=lora_bias
    )
    return tensors, lora_onnx.apply_peft(MODEL, folder)


def _check_outputs(outputs: list[np.ndarray], tensors: dict[str, np.ndarray], modules: list[str]) -> None:
    for module in modules:
        assert rel_err(outputs[OUTPUT_OF[module]], _peft_reference(module, tensors, 1.5)) <= 1e-5, module


DORA_MODULES = ["m.lin", "m.gemm", "m.nob", "m.plain", "m.conv", "m.convb", "m.tr"]


def test_dora_applied_and_merged_match_peft(tmp_path: Path) -> None:
    tensors, result = _apply(tmp_path, DORA_MODULES, dora=True)
    assert all(b.magnitude and b.weight_norm for b in result.branches)
    _check_outputs(run(result.model.proto, FEEDS), tensors, DORA_MODULES)
    assert read_peft_config(result.model.proto, "default")["use_dora"] is True
    merged = lora_onnx.merge(result.model)
    assert len(merged.folded) == len(DORA_MODULES)
    assert read_peft_config(merged.model.proto, "default") is None  # no branch left: the config goes too
    proto = _saved(merged.model, tmp_path / "merged.onnx")
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in MODEL.graph.node]
    assert sorted(t.name for t in proto.graph.initializer) == sorted(INITS)
    _check_outputs(run(proto, FEEDS), tensors, DORA_MODULES)


LORA_BIAS_MODULES = ["m.lin", "m.gemm", "m.nob", "m.conv", "m.convb"]


def test_lora_bias_applied_and_merged_match_peft_and_unshare_a_shared_bias(tmp_path: Path) -> None:
    tensors, result = _apply(tmp_path, LORA_BIAS_MODULES, lora_bias=True)
    _check_outputs(run(result.model.proto, FEEDS), tensors, LORA_BIAS_MODULES)
    proto = _saved(lora_onnx.merge(result.model).model, tmp_path / "merged.onnx")
    outputs = run(proto, FEEDS)
    _check_outputs(outputs, tensors, LORA_BIAS_MODULES)
    assert rel_err(outputs[1], X @ INITS["W_other"] + INITS["b_shared"]) <= 1e-6  # the bias sharer is intact
    assert [n.op_type for n in proto.graph.node] == [n.op_type for n in MODEL.graph.node]
    nodes = {n.name: n for n in proto.graph.node}
    # m.lin read the shared bias through Identity: it now has its own copy; m.other still reads the original
    assert (
        nodes["/m/lin/Add"].input[0] not in ("b_id", "b_shared")
        and nodes["/m/other/Add"].input[1] == "b_shared"
    )
    values = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    np.testing.assert_array_equal(values["b_shared"], INITS["b_shared"].astype(np.float32))
    # a Gemm and a Conv without a bias get one as a new input, no new node
    assert len(nodes["/m/nob/Gemm"].input) == 3 and len(nodes["/m/conv/Conv"].input) == 3


def test_lora_bias_on_a_matmul_without_a_bias_applies_but_refuses_to_merge(tmp_path: Path) -> None:
    tensors, result = _apply(tmp_path, ["m.plain"], lora_bias=True)
    _check_outputs(run(result.model.proto, FEEDS), tensors, ["m.plain"])
    with pytest.raises(FoldError, match=r"no bias Add.*PEFT refuses this merge too"):
        lora_onnx.merge(result.model)
    kept = lora_onnx.merge(result.model, partial=True)
    assert not kept.folded and "no bias Add" in kept.kept[0].reason
    with pytest.raises(FoldError, match="apply the adapter without merging"):
        lora_onnx.apply_peft(MODEL, tmp_path / "adapter", merge=True)


def test_dora_refuses_to_fold_with_another_branch_on_its_weight(tmp_path: Path) -> None:
    fresh = LoraConfig(
        rank=2, init="random", targets=TargetSelector(names=("m.plain",)), adapter_name="fresh"
    )
    first = lora_onnx.inject(MODEL, fresh).model
    tensors = _tensors("m.plain", 5, dora=True, lora_bias=False)
    folder = write_adapter(tmp_path / "a", tensors, r=R, lora_alpha=3, use_dora=True)
    both = lora_onnx.apply_peft(first, folder, adapter_name="dora").model
    with pytest.raises(FoldError, match="DoRA rescales the whole weight"):
        lora_onnx.merge(both)
    assert len(lora_onnx.merge(both, adapters=["fresh"], partial=True).kept) == 1


def test_old_manifests_load_and_list_only_their_tensors() -> None:
    old = {
        "adapter": "default", "site": "n", "op": "MatMul", "module_path": "m", "kind": "dense", "weight": "W",
        "source_layout": "in,out", "rank": 2, "alpha": 2.0, "scale": 1.0, "a": "m.lora_A.weight",
        "b": "m.lora_B.weight", "scale_tensor": "m.lora_scale", "join": "y", "base_join": "y.lora_base",
        "nodes": ["n1", "n2"],
    }  # fmt: skip
    record = BranchRecord.from_json(old)
    assert (record.magnitude, record.peft_path, record.extra_tensors) == ("", "", ())
    assert record.tensors == ("m.lora_A.weight", "m.lora_B.weight", "m.lora_scale")


def test_peft_branches_are_recorded_with_their_extras(tmp_path: Path) -> None:
    _, result = _apply(tmp_path, ["m.lin", "m.convb"], dora=True)
    records = {r.module_path: r for r in read_branches(result.model.proto)}
    lin, conv = records["m.lin"], records["m.convb"]
    assert lin.base_bias == "b_id" and conv.base_bias == "b_convb"
    assert lin.magnitude == "m.lin.lora_magnitude_vector" and lin.weight_norm in lin.tensors
    assert (conv.a_group, conv.b_group, conv.peft_path) == (1, 1, "m.convb")
    norm = np.asarray(result.model.array(lin.weight_norm))
    weight, _, _ = MODULES["m.lin"]
    a = np.asarray(result.model.array(lin.a)).T
    b = np.asarray(result.model.array(lin.b)).T
    np.testing.assert_allclose(norm, np.linalg.norm(weight + 1.5 * b @ a, axis=1), rtol=1e-5)


def _saved(model: lora_onnx.LoadedModel, path: Path) -> onnx.ModelProto:
    return onnx.load(str(lora_onnx.save_model(model, path)))
