"""PEFT parity: ``inject --peft`` and ``merge`` in onnxruntime against PEFT's own PyTorch outputs.

The presets of tests/peft_cases.py (plain, rsLoRA, rank/alpha patterns, DoRA on Linear / Conv1D / conv /
embedding, lora_bias, embeddings, grouped convs, target regexes and excludes) on llama, bert, gpt2 (Conv1D)
and a conv net, plus the Optimum-style roots (llama_inner / llama_outer), each exported with TorchScript and
with dynamo (dynamo skips the presets that only change which modules are targeted); adapters have non-zero
A and B and perturbed DoRA magnitudes. fp32 relative error <= 1e-4 (peft_cases.rel_err); the per-case
errors are recorded as junit properties (``--junitxml``). Also: dilated convs against PEFT's merged model.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lora_onnx
from lora_onnx.errors import AdapterError, FoldError
from lora_onnx.model.manifest import read_branches

try:  # import the harness exactly as test_peft_cases_smoke does, so both share its export cache
    from . import peft_cases as pc
except ImportError:
    import peft_cases as pc

RTOL = 1e-4
#: PEFT's merge_and_unload edits GPT-2's wte, which lm_head shares in PyTorch; the exports store two
#: tensors, so our merge equals PEFT's forward (the adapter as trained), not PEFT's merged model.
MERGE_DIFFERS = {("gpt2", "embedding_tied")}
#: Grouped convs: PEFT's dense lora_A cannot fold into a grouped weight; PEFT refuses the merge as well.
MERGE_IMPOSSIBLE = {("convnet", "grouped"), ("convnet", "dora_grouped")}
#: The adapter targets lm_head, which the bare LlamaModel export does not have.
APPLY_FAILS = {
    ("llama_outer", "lm_head_missing"): "'base_model.model.lm_head.lora_A.weight' matches no module"
}

#: The root-mismatch archs differ from llama only in module paths: a few presets cover their mapping.
ROOT_PRESETS = {
    "llama_inner": {"plain", "dora", "embedding"},
    "llama_outer": {"plain", "dora_patterns", "embedding", "lm_head_missing"},
}
#: Presets that only change which modules PEFT targets (the keys), not how a branch is exported:
#: TorchScript runs them; dynamo runs every preset that changes the branches.
SELECTION_ONLY = {"regex", "exclude_list", "exclude_regex"}


def _cases() -> list[object]:
    cases = []
    for exporter in pc.EXPORTERS:
        for arch, preset in pc.preset_cases():
            if arch in ROOT_PRESETS and preset not in ROOT_PRESETS[arch]:
                continue
            if exporter == "dynamo" and preset in SELECTION_ONLY:
                continue
            cases.append(pytest.param(exporter, arch, preset, id=f"{exporter}-{arch}-{preset}"))
    return cases


CASES = _cases()


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peft_parity_exports")


def _adapter_modules(case: pc.PeftCase) -> set[str]:
    keys = pc.adapter_tensors(case)
    return {k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in keys if ".lora_" in k}


@pytest.mark.parametrize(("exporter", "arch", "preset"), CASES)
def test_inject_peft_and_merge_match_peft(
    exporter: str, arch: str, preset: str, export_dir: Path, tmp_path: Path, record_property
) -> None:
    case = pc.build_case(arch, exporter, preset, tmp_path / "case", export_dir=export_dir)
    lora_path, merged_path = tmp_path / "lora.onnx", tmp_path / "merged.onnx"
    if (arch, preset) in APPLY_FAILS:
        with pytest.raises(AdapterError, match=APPLY_FAILS[arch, preset]):
            lora_onnx.apply_peft(case.onnx_path, case.adapter_dir, output=lora_path)
        assert not lora_path.exists()
        return

    result = lora_onnx.apply_peft(case.onnx_path, case.adapter_dir, output=lora_path)
    assert {b.peft_path for b in result.branches} == _adapter_modules(case)
    (unmerged,) = pc.run_onnx(lora_path, case.inputs)
    error = pc.rel_err(unmerged, case.peft_output)
    record_property("unmerged_rel_err", error)
    assert error <= RTOL
    assert pc.rel_err(unmerged, case.base_output) > 1e-3  # the adapter really changed the output

    if (arch, preset) in MERGE_IMPOSSIBLE:
        assert case.merged_output is None  # PEFT cannot merge it either
        with pytest.raises(FoldError, match="group"):
            lora_onnx.merge(lora_path, output=merged_path)
        assert not merged_path.exists()
        return
    lora_onnx.merge(lora_path, output=merged_path)
    (merged,) = pc.run_onnx(merged_path, case.inputs)
    assert case.merged_output is not None
    reference = case.peft_output if (arch, preset) in MERGE_DIFFERS else case.merged_output
    merge_error = pc.rel_err(merged, reference)
    record_property("merged_rel_err", merge_error)
    assert merge_error <= RTOL
    if (arch, preset) in MERGE_DIFFERS:
        assert pc.rel_err(merged, case.merged_output) > 1e-2
    base, folded = onnx.load(str(case.onnx_path), load_external_data=False), onnx.load(str(merged_path))
    assert [n.op_type for n in folded.graph.node] == [n.op_type for n in base.graph.node]
    assert not read_branches(folded)


@pytest.mark.parametrize(
    ("arch", "preset"), [("bert", "lora_bias"), ("gpt2", "dora"), ("convnet", "dora"), ("llama", "embedding")]
)
def test_one_step_merge_equals_inject_then_merge(
    arch: str, preset: str, export_dir: Path, tmp_path: Path
) -> None:
    case = pc.build_case(arch, "torchscript", preset, tmp_path / "case", export_dir=export_dir)
    one_step = tmp_path / "one.onnx"
    result = lora_onnx.apply_peft(
        case.onnx_path, case.adapter_dir, output=one_step, merge=True, validate=True
    )
    assert result.validation is not None and result.validation.ok
    assert len(result.folded) == len(result.branches) > 0
    lora_onnx.apply_peft(case.onnx_path, case.adapter_dir, output=tmp_path / "lora.onnx")
    lora_onnx.merge(tmp_path / "lora.onnx", output=tmp_path / "two.onnx")
    (a,), (b,) = pc.run_onnx(one_step, case.inputs), pc.run_onnx(tmp_path / "two.onnx", case.inputs)
    np.testing.assert_array_equal(a, b)
    assert pc.rel_err(a, case.merged_output) <= RTOL


class _Dilated(nn.Module):
    """A dilated Conv2d (padded to keep its size) and a strided, dilated Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, kernel_size=3, padding=2, dilation=2)
        self.conv1d = nn.Conv1d(8, 8, kernel_size=3, padding=2, dilation=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1d(torch.relu(self.conv(x)).flatten(2))


_DILATED_EXPORTS: dict[str, Path] = {}


def _dilated_export(exporter: str, model: nn.Module, folder: Path) -> Path:
    if exporter not in _DILATED_EXPORTS:
        path = folder / f"dilated_{exporter}.onnx"
        kwargs = (
            {"dynamo": False, "dynamic_axes": {"x": {0: "batch"}}}
            if exporter == "torchscript"
            else {"dynamo": True, "dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1, max=8)}}}
        )
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (torch.zeros(2, 4, 8, 8),), str(path), input_names=["x"], **kwargs)
        _DILATED_EXPORTS[exporter] = path
    return _DILATED_EXPORTS[exporter]


@pytest.mark.parametrize("exporter", pc.EXPORTERS)
def test_dilated_convs_match_peft_merged_model(exporter: str, export_dir: Path, tmp_path: Path) -> None:
    """PEFT's conv lora_A drops the base's dilation (peft issue 3697): its forward fails here (the branch's
    output size differs), while merge_and_unload is right. Our conv A keeps the dilation, so both our
    unmerged and merged models equal PEFT's merged model."""
    torch.manual_seed(0)
    base = _Dilated().eval()
    onnx_path = _dilated_export(exporter, base, export_dir)
    x = torch.randn(3, 4, 8, 8)
    for dora in (False, True):
        config = LoraConfig(
            r=4, lora_alpha=8, target_modules=["conv", "conv1d"], init_lora_weights=False, use_dora=dora
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(copy.deepcopy(base), config).eval()
        with torch.no_grad():
            for name, parameter in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    parameter.mul_(0.5 + torch.rand(parameter.shape))
            with pytest.raises(RuntimeError, match="must match the size"):
                peft_model(x)
            adapter = tmp_path / f"adapter_{dora}"
            peft_model.save_pretrained(str(adapter))
            reference = peft_model.merge_and_unload()(x).numpy()
        result = lora_onnx.apply_peft(onnx_path, adapter, output=tmp_path / f"lora_{dora}.onnx")
        assert sum("peft issue 3697" in w for w in result.warnings) == 2
        (unmerged,) = pc.run_onnx(tmp_path / f"lora_{dora}.onnx", {"x": x.numpy()})
        assert pc.rel_err(unmerged, reference) <= RTOL
        lora_onnx.merge(tmp_path / f"lora_{dora}.onnx", output=tmp_path / f"merged_{dora}.onnx")
        (merged,) = pc.run_onnx(tmp_path / f"merged_{dora}.onnx", {"x": x.numpy()})
        assert pc.rel_err(merged, reference) <= RTOL
        assert pc.rel_err(merged, base(x).detach().numpy()) > 1e-3
