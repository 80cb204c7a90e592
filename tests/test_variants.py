"""Branch variants as plug-ins: every variant a command records maps to exactly one plug-in, a variant
no plug-in claims is a one-line error, and the modules outside ``lora_onnx.variants`` ask the plug-ins
instead of testing ``BranchRecord.variant`` themselves."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rng_array, write_adapter
from onnx import TensorProto, helper
from test_cli_errors import error_line, run_main

import lora_onnx
from lora_onnx import LoraConfig
from lora_onnx.commands.inject_mixed import inject_mixed
from lora_onnx.commands.swap import fresh_source, inject_slots
from lora_onnx.errors import FoldError, LoraOnnxError
from lora_onnx.model.load import load_model
from lora_onnx.model.manifest import MANIFEST_KEY, BranchRecord, read_branches
from lora_onnx.variants import (
    VARIANTS,
    AdapterChoice,
    ConstantBranch,
    DoraBranch,
    LoraBiasBranch,
    SlotBranch,
    StackedBranch,
    binder_for,
    plug_in,
    variant_for,
)

F = TensorProto.FLOAT
IN, OUT, R = 8, 6, 2
PACKAGE = Path(lora_onnx.__file__).parent


def _model() -> onnx.ModelProto:
    """A Linear exported as MatMul + bias Add and one as a Gemm with C: sites of every variant."""
    nodes = [
        helper.make_node("MatMul", ["x", "W_lin"], ["mm"], name="/m/lin/MatMul"),
        helper.make_node("Add", ["mm", "b_lin"], ["lin"], name="/m/lin/Add"),
        helper.make_node("Gemm", ["x", "W_gemm", "C_gemm"], ["gemm"], name="/m/gemm/Gemm", transB=1),
    ]
    inits = {
        "W_lin": rng_array((IN, OUT), 1), "b_lin": rng_array((OUT,), 2),
        "W_gemm": rng_array((OUT, IN), 3), "C_gemm": rng_array((OUT,), 4),
    }  # fmt: skip
    return make_model(nodes, {"x": (F, ["batch", IN])}, ["lin", "gemm"], inits)


def _peft(tmp_path: Path, *, dora: bool = False, lora_bias: bool = False) -> lora_onnx.LoadedModel:
    tensors: dict[str, np.ndarray] = {}
    for seed, module in enumerate(("m.lin", "m.gemm")):
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = rng_array((R, IN), 10 + seed)
        tensors[f"{key}.lora_B.weight"] = rng_array((OUT, R), 20 + seed)
        if dora:
            tensors[f"{key}.lora_magnitude_vector"] = 0.5 + np.abs(rng_array((OUT,), 30 + seed))
        if lora_bias:
            tensors[f"{key}.lora_B.bias"] = rng_array((OUT,), 40 + seed)
    name = "dora" if dora else "bias" if lora_bias else "plain"
    folder = write_adapter(tmp_path / name, tensors, use_dora=dora, lora_bias=lora_bias)
    return lora_onnx.apply_peft(_model(), folder).model


def _recorded(model: lora_onnx.LoadedModel) -> set[type]:
    return {type(variant_for(branch)) for branch in read_branches(model.proto)}


def test_every_variant_a_command_records_maps_to_one_plug_in(tmp_path: Path) -> None:
    config = LoraConfig(rank=R, init="random", seed=5)
    base = load_model(_model())
    made = {
        ConstantBranch: lora_onnx.inject(base, config).model,
        SlotBranch: inject_slots(base, config).model,
        StackedBranch: inject_mixed(base, [fresh_source(base, config)]).model,
        DoraBranch: _peft(tmp_path, dora=True),
        LoraBiasBranch: _peft(tmp_path, lora_bias=True),
    }
    for plug, model in made.items():
        assert _recorded(model) == {plug}, plug.name
    assert _recorded(_peft(tmp_path)) == {ConstantBranch}  # a plain PEFT adapter is plain LoRA
    # one instance per plug-in, every one of them made by some command above
    assert sorted(type(v).__name__ for v in VARIANTS) == sorted(p.__name__ for p in made)
    assert len({v.name for v in VARIANTS}) == len(VARIANTS)


def _record(**fields: object) -> BranchRecord:
    base = dict(
        adapter="a", site="/m/lin/MatMul", op="MatMul", module_path="m.lin", kind="dense", weight="W_lin",
        source_layout="in,out", rank=R, alpha=4.0, scale=2.0, a="A", b="B", scale_tensor="s", join="mm",
        base_join="mm.lora_base", nodes=("n",),
    )  # fmt: skip
    return BranchRecord(**{**base, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "plug"),
    [
        ({}, ConstantBranch),
        ({"magnitude": "m", "weight_norm": "n"}, DoraBranch),
        ({"lora_bias": "bias"}, LoraBiasBranch),
        ({"variant": "slot"}, SlotBranch),
        ({"variant": "mixed"}, StackedBranch),
    ],
)
def test_each_record_is_claimed_by_exactly_one_plug_in(fields: dict[str, str], plug: type) -> None:
    record = _record(**fields)
    assert [type(v) for v in VARIANTS if v.matches(record)] == [plug]
    assert isinstance(variant_for(record), plug)


def test_a_record_two_plug_ins_claim_is_refused() -> None:
    # PEFT rejects use_dora with lora_bias: no command writes it, and folding it as either would be wrong
    record = _record(magnitude="m", weight_norm="n", lora_bias="bias")
    with pytest.raises(LoraOnnxError, match="recorded as dora and lora_bias at once"):
        variant_for(record)


def _with_variant(model: lora_onnx.LoadedModel, variant: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for entry in proto.metadata_props:
        if entry.key == MANIFEST_KEY:
            data = json.loads(entry.value)
            data["branches"][0]["variant"] = variant
            entry.value = json.dumps(data)
    return proto


def test_an_unknown_variant_in_a_manifest_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    injected = lora_onnx.inject(_model(), LoraConfig(rank=R, init="random", seed=1)).model
    edited = _with_variant(injected, "lokr")
    with pytest.raises(LoraOnnxError) as caught:
        read_branches(edited)
    message = str(caught.value)
    assert "\n" not in message
    assert "variant 'lokr'" in message and "'/m/lin/MatMul'" in message
    assert "constant, mixed, slot" in message  # what this lora-onnx knows
    path = tmp_path / "edited.onnx"
    onnx.save(edited, path)
    code, _, err = run_main(["merge", str(path), "-o", str(tmp_path / "out.onnx")], capsys)
    assert code == 2
    assert "variant 'lokr'" in error_line(err)
    assert not (tmp_path / "out.onnx").exists()


def test_merge_asks_the_variant_that_holds_the_choice() -> None:
    assert isinstance(binder_for(AdapterChoice(file="x.onnx_adapter")), SlotBranch)
    assert isinstance(binder_for(AdapterChoice(index=0)), StackedBranch)
    assert binder_for(AdapterChoice()) is None
    assert plug_in(SlotBranch) is next(v for v in VARIANTS if isinstance(v, SlotBranch))


def test_slots_and_stacks_refuse_to_fold_with_their_way_out() -> None:
    config = LoraConfig(rank=R, init="random", seed=2)
    base = load_model(_model())
    with pytest.raises(FoldError, match=r"slot inputs, not constants.*--adapter-file FILE"):
        lora_onnx.merge(inject_slots(base, config).model)
    mixed = inject_mixed(base, [fresh_source(base, config)]).model
    with pytest.raises(FoldError, match=r"several adapters stacked.*--adapter-index I"):
        lora_onnx.merge(mixed)
    stripped = plug_in(StackedBranch).strip(mixed)  # removal leaves the base graph
    assert read_branches(stripped.proto) == ()
    assert [n.name for n in stripped.proto.graph.node] == [n.name for n in base.proto.graph.node]


def test_dora_scales_output_channels_and_refuses_a_second_delta(tmp_path: Path) -> None:
    dora = _peft(tmp_path, dora=True)
    branch = read_branches(dora.proto)[0]
    factor = variant_for(branch).channel_factor(dora, branch, 2)
    expected = dora.array(branch.magnitude).reshape(-1) / dora.array(branch.weight_norm).reshape(-1)
    layout = (1, OUT) if branch.source_layout == "in,out" else (OUT, 1)
    assert factor is not None and factor.shape == layout
    np.testing.assert_allclose(factor.reshape(-1), expected, rtol=1e-6)
    other = dataclasses.replace(branch, a="other_A")
    assert "DoRA rescales the whole weight" in (
        variant_for(branch).weight_refusal("W", [branch, other]) or ""
    )
    assert variant_for(branch).weight_refusal("W", [branch]) is None


def test_no_module_outside_the_plug_ins_tests_a_variant_string() -> None:
    tests = re.compile(r"\.variant\s*(==|!=|\bin\b)|variant\s*==")
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "variants" not in path.relative_to(PACKAGE).parts and tests.search(path.read_text())
    ]
    assert offenders == []
    merging = (PACKAGE / "commands" / "merge.py").read_text()
    assert "lora_onnx.stages.stacked" not in merging and "lora_onnx.commands.swap" not in merging
