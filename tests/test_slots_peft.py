"""PEFT adapters through LoRA slots, judged against PEFT's own outputs (tests/peft_cases.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import peft_cases as pc
import pytest
from builders import run
from swap_builders import load_adapter, run_with, session
from test_cli import cli

import lora_onnx
from lora_onnx.adapters.files import read_adapter_file
from lora_onnx.commands.swap import export_adapter, inject_slots
from lora_onnx.errors import AdapterError, FoldError


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slot_peft_exports")


def test_two_peft_adapters_of_different_ranks_in_one_session_match_peft(
    tmp_path: Path, export_dir: Path
) -> None:
    one = pc.build_case("llama", "torchscript", "plain", tmp_path / "one", export_dir=export_dir)
    two = pc.build_case("llama", "torchscript", "patterns", tmp_path / "two", export_dir=export_dir)
    assert one.onnx_path == two.onnx_path  # one base export, two adapters
    slots, file_one, file_two = (
        tmp_path / "slots.onnx",
        tmp_path / "one.onnx_adapter",
        tmp_path / "two.onnx_adapter",
    )
    made = inject_slots(
        one.onnx_path, peft=one.adapter_dir, output=slots, adapter_output=file_one, validate=True
    )
    assert made.validation is not None and made.validation.ok
    assert made.adapter_validation is not None and made.adapter_validation.ok
    export_adapter(peft=two.adapter_dir, for_model=slots, output=file_two)
    ranks = {
        v.shape[1] for k, v in read_adapter_file(file_two).tensors.items() if k.endswith("lora_A.weight")
    }
    assert ranks == {2, 4, 8}  # rank_pattern: q_proj 2, layers.1 down_proj 8, the rest 4

    feeds = dict(one.inputs)
    sess = session(slots)
    (base,) = run_with(sess, feeds)
    assert np.array_equal(base, pc.run_onnx(one.onnx_path, feeds)[0])
    assert pc.rel_err(base, one.base_output) <= 1e-4
    for case, file in ((one, file_one), (two, file_two), (one, file_one)):
        (got,) = run_with(sess, feeds, load_adapter(file))
        assert pc.rel_err(got, case.peft_output) <= 1e-4
        assert pc.rel_err(got, case.base_output) > 1e-2

    merged = lora_onnx.merge(slots, output=tmp_path / "merged.onnx", adapter_file=file_two)
    assert merged.output is not None and two.merged_output is not None
    assert pc.rel_err(run(merged.output, feeds)[0], two.merged_output) <= 1e-4


def test_grouped_conv_keeps_peft_dense_a_and_is_applied_but_not_folded(
    tmp_path: Path, export_dir: Path
) -> None:
    case = pc.build_case("convnet", "torchscript", "grouped", tmp_path / "case", export_dir=export_dir)
    slots, adapter = tmp_path / "slots.onnx", tmp_path / "a.onnx_adapter"
    inject_slots(case.onnx_path, peft=case.adapter_dir, output=slots, adapter_output=adapter)
    (got,) = run_with(session(slots), dict(case.inputs), load_adapter(adapter))
    assert pc.rel_err(got, case.peft_output) <= 1e-4
    with pytest.raises(FoldError, match="dense"):  # PEFT cannot merge it either
        lora_onnx.merge(slots, adapter_file=adapter)
    # slots made fresh for the same conv take a grouped A (foldable): PEFT's dense A does not fit them
    fresh = inject_slots(
        case.onnx_path,
        lora_onnx.LoraConfig(rank=4, targets=lora_onnx.TargetSelector(names=("gconv", "conv2d"))),
    )
    with pytest.raises(AdapterError, match="PEFT's conv A is dense"):
        export_adapter(peft=case.adapter_dir, for_model=fresh.model, output=tmp_path / "b.onnx_adapter")


def test_dora_adapters_are_refused_for_slots(tmp_path: Path, export_dir: Path) -> None:
    case = pc.build_case("llama", "torchscript", "dora", tmp_path / "case", export_dir=export_dir)
    with pytest.raises(AdapterError, match="slots cannot carry"):
        inject_slots(case.onnx_path, peft=case.adapter_dir)


@pytest.mark.slow
def test_cli_inject_as_inputs_with_peft_then_export_and_check(tmp_path: Path, export_dir: Path) -> None:
    one = pc.build_case("llama", "torchscript", "rslora", tmp_path / "one", export_dir=export_dir)
    slots, adapter = tmp_path / "slots.onnx", tmp_path / "a.safetensors"
    made = cli("inject", one.onnx_path, "-o", slots, "--as-inputs", "--peft", one.adapter_dir, "--validate")
    assert made.returncode == 0, made.stderr
    exported = cli("export-adapter", "--peft", one.adapter_dir, "--for", slots, "-o", adapter)
    assert exported.returncode == 0, exported.stderr
    assert cli("check-adapter", slots, adapter).returncode == 0
    tensors = read_adapter_file(adapter).tensors
    feeds = {**dict(one.inputs), **tensors}  # the same tensors fed by name work like an active adapter
    (got,) = session(slots).run(None, feeds)
    assert pc.rel_err(got, one.peft_output) <= 1e-4
