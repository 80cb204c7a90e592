"""PEFT adapters in one mixed batch, judged against PEFT's own mixed-batch forward
(``model(..., adapter_names=[...])``, tests/peft_cases.py builds the models and adapters).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import peft_cases as pc
import pytest
import torch
from mixed_builders import run_rows
from peft import PeftModel
from test_cli import cli

from lora_onnx.commands.inject_mixed import inject_mixed
from lora_onnx.commands.swap import export_adapter, inject_slots
from lora_onnx.errors import AdapterError

#: (arch, two presets whose adapters share one base export)
CASES = [("llama", ("plain", "patterns")), ("gpt2", ("plain", "patterns")), ("convnet", ("plain", "grouped"))]


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mixed_peft_exports")


def peft_mixed_output(
    arch: str, adapter_dirs: Sequence[Path], inputs: Mapping[str, np.ndarray], rows: Sequence[int]
) -> np.ndarray:
    """PEFT's mixed batch: adapter i loaded as ``a<i>``, row b runs ``a<rows[b]>`` (``__base__`` for -1)."""
    model = PeftModel.from_pretrained(pc.base_model(arch), str(adapter_dirs[0]), adapter_name="a0")
    for i, folder in enumerate(adapter_dirs[1:], start=1):
        model.load_adapter(str(folder), adapter_name=f"a{i}")
    model.eval()
    feeds = {name: torch.from_numpy(np.array(value)) for name, value in inputs.items()}
    names = ["__base__" if r < 0 else f"a{r}" for r in rows]
    with torch.no_grad():
        out = model(**feeds, adapter_names=names)
    return (out.logits if hasattr(out, "logits") else out).numpy()


@pytest.mark.parametrize(("arch", "presets"), CASES, ids=[arch for arch, _ in CASES])
def test_peft_folders_in_one_batch_equal_peft_mixed_batch(
    arch: str, presets: tuple[str, str], tmp_path: Path, export_dir: Path
) -> None:
    cases = [pc.build_case(arch, "torchscript", p, tmp_path / p, export_dir=export_dir) for p in presets]
    assert cases[0].onnx_path == cases[1].onnx_path
    dirs = [case.adapter_dir for case in cases]
    result = inject_mixed(cases[0].onnx_path, dirs, validate=True, output=tmp_path / "mixed.onnx")
    assert result.validation is not None and result.validation.ok and not result.skipped
    rows = [1, -1, 0]
    (got,) = run_rows(result.output, dict(cases[0].inputs), rows)
    want = peft_mixed_output(arch, dirs, cases[0].inputs, rows)
    assert pc.rel_err(got, want) <= 1e-4
    for b, r in enumerate(rows):  # and each row is that adapter's own PEFT output
        reference = cases[0].base_output if r < 0 else cases[r].peft_output
        assert pc.rel_err(got[b : b + 1], reference[b : b + 1]) <= 1e-4
        if r >= 0:
            assert pc.rel_err(reference[b : b + 1], cases[0].base_output[b : b + 1]) > 1e-3


def test_adapter_files_of_peft_adapters_equal_peft_mixed_batch(tmp_path: Path, export_dir: Path) -> None:
    one = pc.build_case("llama", "torchscript", "plain", tmp_path / "one", export_dir=export_dir)
    two = pc.build_case("llama", "torchscript", "rslora", tmp_path / "two", export_dir=export_dir)
    slots, file_one, file_two = (
        tmp_path / "slots.onnx",
        tmp_path / "1.onnx_adapter",
        tmp_path / "2.safetensors",
    )
    inject_slots(one.onnx_path, peft=one.adapter_dir, output=slots, adapter_output=file_one)
    export_adapter(peft=two.adapter_dir, for_model=slots, output=file_two)
    mixed = inject_mixed(slots, [file_two, file_one], validate=True)
    assert mixed.validation is not None and mixed.validation.ok
    rows = [0, 1, -1]
    (got,) = run_rows(mixed.model.proto, dict(one.inputs), rows)
    want = peft_mixed_output("llama", [two.adapter_dir, one.adapter_dir], one.inputs, rows)
    assert pc.rel_err(got, want) <= 1e-4


def test_cli_mixes_peft_folders_in_the_order_given(tmp_path: Path, export_dir: Path) -> None:
    cases = [
        pc.build_case("gpt2", "torchscript", p, tmp_path / p, export_dir=export_dir)
        for p in ("plain", "rslora")
    ]
    out = tmp_path / "mixed.onnx"
    folders = ("--peft", cases[1].adapter_dir, "--peft", cases[0].adapter_dir)
    result = cli("inject", cases[0].onnx_path, "--mixed", *folders, "--validate", "-o", out)
    assert result.returncode == 0, result.stderr
    rows = [0, 1, -1]
    (got,) = run_rows(out, dict(cases[0].inputs), rows)
    want = peft_mixed_output("gpt2", [cases[1].adapter_dir, cases[0].adapter_dir], cases[0].inputs, rows)
    assert pc.rel_err(got, want) <= 1e-4


def test_dora_adapters_are_refused_as_peft_refuses_them_in_mixed_batches(
    tmp_path: Path, export_dir: Path
) -> None:
    case = pc.build_case("llama", "torchscript", "dora", tmp_path / "dora", export_dir=export_dir)
    with pytest.raises(AdapterError, match="mixed-batch branches cannot carry"):
        inject_mixed(case.onnx_path, [case.adapter_dir])
