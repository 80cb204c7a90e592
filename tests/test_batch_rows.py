"""Batch axes and the batch-row probe: which sites keep batch rows apart, checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
from builders import make_model, rel_err, rng_array, run
from mixed_builders import run_rows
from onnx import TensorProto, helper
from swap_builders import mixed_model

from lora_onnx import LoraConfig, load_model
from lora_onnx.commands.inject_mixed import inject_mixed
from lora_onnx.commands.swap import fresh_source
from lora_onnx.proofs.batch_rows import batch_axes, probe_sites, take_rows
from lora_onnx.sites.find import DEFAULT_OPS, scan_sites

F = TensorProto.FLOAT


def test_batch_axes_follow_the_batch_dim_of_each_input_and_output() -> None:
    axes = batch_axes(load_model(mixed_model()))
    assert axes.name == "batch" and axes.anchor == "x"
    assert dict(axes.inputs) == {"x": 0, "xt": 1, "img": 0}  # xt is [5, batch]
    assert dict(axes.outputs) == {"y": 0, "z": 0, "c": 0}
    feeds = {"x": np.arange(6).reshape(3, 2), "xt": np.arange(15).reshape(5, 3), "img": np.zeros((3, 1))}
    rows = take_rows(feeds, axes, [2])
    assert rows["x"].tolist() == [[4, 5]] and rows["xt"].tolist() == [[2], [5], [8], [11], [14]]


def _layouts() -> onnx.ModelProto:
    """Sites whose inputs keep rows apart (a, d: [B, S, in] and the flattened [B*S, in]) and sites whose
    inputs do not (b: sequence-first; c, e: inputs with no batch dim)."""
    nodes = [
        helper.make_node("MatMul", ["x", "Wa"], ["ya"], name="/a/MatMul"),
        helper.make_node("Transpose", ["x"], ["t"], name="seq_first", perm=[1, 0, 2]),
        helper.make_node("MatMul", ["t", "Wb"], ["yb"], name="/b/MatMul"),
        helper.make_node("MatMul", ["p", "Wc"], ["yc"], name="/c/MatMul"),
        helper.make_node("Reshape", ["x", "flat"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "Wd"], ["yd"], name="/d/Gemm", transB=1),
        helper.make_node("Conv", ["q", "We"], ["ye"], name="/e/Conv"),
    ]
    inits = {
        "Wa": rng_array((8, 6), 1), "Wb": rng_array((8, 6), 2), "Wc": rng_array((8, 6), 3),
        "Wd": rng_array((5, 8), 4), "We": rng_array((3, 2, 1, 1), 5), "flat": np.array([-1, 8], np.int64),
    }  # fmt: skip
    inputs = {"x": (F, ["batch", 4, 8]), "p": (F, [3, 8]), "q": (F, [1, 2, 5, 5])}
    return make_model(nodes, inputs, ["ya", "yb", "yc", "yd", "ye"], inits)


def test_probe_keeps_batch_major_sites_and_skips_the_others_with_reasons() -> None:
    model = load_model(_layouts())
    sites = scan_sites(model, DEFAULT_OPS).sites
    probe = probe_sites(model, sites, batch_axes(model))
    kept, skipped = probe.kept, probe.skipped
    assert [s.module_path for s in kept] == ["a", "d"]
    assert probe.batched == {"/a/MatMul"}  # [B, 4, 8] as is; d's [B*4, 8] is reshaped to split rows
    reasons = {s.module_path: s.reason for s in skipped}
    assert set(reasons) == {"b", "c", "e"}
    assert "mix batch rows" in reasons["b"]
    assert "rows cannot be told apart" in reasons["c"] or "does not grow" in reasons["c"]
    assert "not the batch" in reasons["e"]
    assert all(s.reason.startswith("input ") for s in skipped)


def test_mixed_model_skips_unprobed_sites_warns_and_still_proves_the_rest() -> None:
    base = _layouts()
    loaded = load_model(base)
    adapters = [fresh_source(loaded, LoraConfig(rank=2, alpha=2, init="random", seed=s)) for s in (1, 2)]
    result = inject_mixed(base, adapters, validate=True)
    assert {b.module_path for b in result.branches} == {"a", "d"}
    assert {s.module_path for s in result.skipped} == {"b", "c", "e"}
    assert len(result.warnings) == 6 and all("is left out" in w for w in result.warnings)
    assert result.validation is not None and result.validation.ok
    feeds = {"x": rng_array((3, 4, 8), 7), "p": rng_array((3, 8), 8), "q": rng_array((1, 2, 5, 5), 9)}
    got = run_rows(result.model.proto, feeds, [1, -1, 0])
    base_out = run(base, feeds)
    for name, g, b in zip(("ya", "yb", "yc", "yd", "ye"), got, base_out, strict=True):
        if name in ("yb", "yc", "ye"):
            assert np.array_equal(g, b)  # skipped sites: no branch
        else:
            assert rel_err(g[1:2] if name == "ya" else g[4:8], b[1:2] if name == "ya" else b[4:8]) == 0.0
            assert rel_err(g, b) > 1e-3  # rows 0 and 2 carry adapters
