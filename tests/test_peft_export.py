"""export_peft_adapter: PEFT -> ONNX -> PEFT gives back the same tensors and config, PEFT loads the result,
and adapters made by lora-onnx export to adapters PEFT computes the same outputs with."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.numpy import load_file

import lora_onnx
from lora_onnx import LoraConfig, TargetSelector
from lora_onnx.adapters.peft import export_peft_adapter
from lora_onnx.errors import AdapterError, OutputError

try:  # import the harness exactly as test_peft_cases_smoke does, so both share its export cache
    from . import peft_cases as pc
except ImportError:
    import peft_cases as pc


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peft_export_exports")


def _load_with_peft(arch: str, adapter: Path) -> torch.nn.Module:
    """A fresh base model with ``adapter`` loaded by PEFT (onto the arch's PEFT root), in eval mode."""
    host = pc.base_model(arch)
    root = pc.ARCH_SPECS[arch].peft_root
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(host.get_submodule(root) if root else host, str(adapter)).eval()
    return host


@pytest.mark.parametrize(
    ("arch", "preset"),
    [
        ("bert", "dora"),
        ("gpt2", "lora_bias"),
        ("convnet", "grouped"),
        ("llama", "lm_head"),
        ("llama_inner", "embedding"),
    ],
)
def test_round_trip_gives_back_the_same_adapter(
    arch: str, preset: str, export_dir: Path, tmp_path: Path
) -> None:
    case = pc.build_case(arch, "torchscript", preset, tmp_path / "case", export_dir=export_dir)
    model = tmp_path / "lora.onnx"
    lora_onnx.apply_peft(case.onnx_path, case.adapter_dir, output=model)
    exported = export_peft_adapter(model, tmp_path / "exported")

    original, again = pc.adapter_tensors(case), load_file(str(exported / "adapter_model.safetensors"))
    # PEFT also saves whole copies of targeted embedding / lm_head base weights; they are the base's own
    # weights, not adapter tensors, and PEFT loads an adapter without them.
    assert set(again) == {key for key in original if not key.endswith(".base_layer.weight")}
    for key, value in again.items():
        assert value.dtype == original[key].dtype
        np.testing.assert_array_equal(value, original[key], err_msg=key)
    assert json.loads((exported / "adapter_config.json").read_text()) == pc.adapter_config(case)

    host = _load_with_peft(arch, exported)
    assert pc.rel_err(pc.torch_output(arch, host, case.inputs), case.peft_output) <= 1e-6


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        (
            "bert",
            LoraConfig(
                rank=4, alpha=16, init="random", seed=3, rank_pattern={r"layer\.1\..*value": 2},
                targets=TargetSelector(names=("query", "value", "classifier")),
            ),
        ),
        # the grouped conv gets a grouped A (group 2), exported as PEFT's dense A
        ("convnet", LoraConfig(rank=4, alpha=2, use_rslora=True, init="random", seed=4)),
    ],
)  # fmt: skip
def test_adapters_made_here_export_to_what_peft_computes(
    arch: str, config: LoraConfig, export_dir: Path, tmp_path: Path
) -> None:
    base = pc.export_base(arch, "torchscript", export_dir)
    injected = lora_onnx.inject(base.onnx_path, config, output=tmp_path / "lora.onnx")
    assert any(b.a_group > 1 for b in injected.branches) == (arch == "convnet")
    exported = export_peft_adapter(tmp_path / "lora.onnx", tmp_path / "exported")
    saved = json.loads((exported / "adapter_config.json").read_text())
    assert saved["use_rslora"] == config.use_rslora
    inputs = pc.make_inputs(arch)
    (onnx_out,) = pc.run_onnx(tmp_path / "lora.onnx", inputs)
    torch_out = pc.torch_output(arch, _load_with_peft(arch, exported), inputs)
    assert pc.rel_err(torch_out, onnx_out) <= 1e-4
    assert pc.rel_err(torch_out, pc.torch_output(arch, pc.base_model(arch), inputs)) > 1e-3


def test_export_errors(export_dir: Path, tmp_path: Path) -> None:
    base = pc.export_base("convnet", "torchscript", export_dir)
    with pytest.raises(AdapterError, match="carries no LoRA branches"):
        export_peft_adapter(base.onnx_path, tmp_path / "x")
    first = lora_onnx.inject(base.onnx_path, LoraConfig(rank=4, adapter_name="one")).model
    both = lora_onnx.inject(
        first, LoraConfig(rank=2, adapter_name="two", targets=TargetSelector(("head",)))
    ).model
    with pytest.raises(AdapterError, match="carries adapters one, two; choose one"):
        export_peft_adapter(both, tmp_path / "x")
    with pytest.raises(AdapterError, match="has no adapter 'three'"):
        export_peft_adapter(both, tmp_path / "x", adapter="three")
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is a file"):
        export_peft_adapter(both, tmp_path / "file", adapter="two")
    folder = export_peft_adapter(both, tmp_path / "two", adapter="two")
    assert json.loads((folder / "adapter_config.json").read_text())["target_modules"] == ["head"]
