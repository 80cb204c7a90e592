"""Exporter folds into an adapted weight (BatchNorm after a Conv / Linear): refused with the fix, or
computed exactly from the base's original weights (``--base-weights``), judged against PEFT in PyTorch.

Real tools: torch 2.13's two exporters (dynamo with onnxscript's optimizer, TorchScript with constant
folding) on tiny models, PEFT 0.21 for the adapters and the reference outputs.
"""

from __future__ import annotations

import copy
import functools
import io
import subprocess
import sys
import warnings
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import safetensors.torch
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from lora_onnx import apply_peft
from lora_onnx.adapters.peft import export_peft_adapter
from lora_onnx.commands.inject_mixed import inject_mixed
from lora_onnx.commands.inspect import inspect_model
from lora_onnx.commands.swap import export_adapter, inject_slots
from lora_onnx.errors import AdapterError
from lora_onnx.sites.folded_weights import FoldedWeightError
from tests.builders import rel_err, run

EXPORTERS = ("dynamo", "torchscript")


class ConvBN(nn.Module):
    """The issue's repro: Conv2d(3, 8, 3, bias=False) -> BatchNorm2d(8), running_var 4, weight 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=False)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_var.fill_(4.0)
            self.bn.weight.fill_(0.5)
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LinearBN(nn.Module):
    """Linear -> BatchNorm1d with per-channel statistics (factors differ per output feature)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.bn = nn.BatchNorm1d(8)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 4.0)
            self.bn.weight.uniform_(-1.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.fc(x))


class DepthwiseBN(nn.Module):
    """A mobilenet block's depthwise conv -> BatchNorm (grouped: PEFT's rank a multiple of the groups)."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            self.bn.running_var.uniform_(0.5, 4.0)
            self.bn.weight.uniform_(0.2, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.dw(x))


class PlainConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PlainLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


#: kind -> (module, input shape, target)
MODELS = {
    "convbn": (ConvBN, (2, 3, 6, 6), "conv"),
    "linbn": (LinearBN, (4, 6), "fc"),
    "dwbn": (DepthwiseBN, (2, 8, 6, 6), "dw"),
    "conv": (PlainConv, (2, 3, 6, 6), "conv"),
    "linear2d": (PlainLinear, (4, 6), "fc"),  # Gemm on fc.weight
    "linear3d": (PlainLinear, (2, 3, 6), "fc"),  # MatMul on a pre-transposed (anonymous) weight
}


@dataclass(frozen=True)
class Case:
    onnx_path: Path
    adapter: Path
    base_weights: Path
    x: np.ndarray
    peft_output: np.ndarray
    merged_output: np.ndarray


def _export(model: nn.Module, x: torch.Tensor, path: Path, exporter: str) -> None:
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        # TorchScript with a symbolic batch dim, as mixed batches need one.
        dynamic = {} if exporter == "dynamo" else {"dynamic_axes": {"x": {0: "batch"}}}
        torch.onnx.export(model, (x,), str(path), dynamo=exporter == "dynamo", input_names=["x"], **dynamic)


@functools.cache
def _exported(root: Path, kind: str, exporter: str) -> tuple[nn.Module, torch.Tensor, Path, Path]:
    """The seeded model, its input, its export and its state dict (the base weights); once per module."""
    cls, shape, _ = MODELS[kind]
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(*shape)
    folder = root / f"{kind}_{exporter}"
    folder.mkdir(parents=True)
    _export(model, x, folder / "model.onnx", exporter)
    safetensors.torch.save_file(model.state_dict(), str(folder / "base.safetensors"))
    return model, x, folder / "model.onnx", folder / "base.safetensors"


@functools.cache
def _case(root: Path, kind: str, exporter: str, variant: str = "lora") -> Case:
    """``variant``: plain LoRA, ``dora`` or ``bias`` (lora_bias)."""
    model, x, onnx_path, base_weights = _exported(root, kind, exporter)
    target = MODELS[kind][2]
    config = LoraConfig(
        r=8 if kind == "dwbn" else 4, lora_alpha=8, target_modules=[target], init_lora_weights=False,
        use_dora=variant == "dora", lora_bias=variant == "bias",
    )  # fmt: skip
    torch.manual_seed(1)
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    if variant == "bias":  # lora_B's bias starts at zero: make it count
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    param.uniform_(-1.0, 1.0)
    if (
        variant == "dora"
    ):  # PEFT starts DoRA's magnitude at the weight's norm (factor 1): move it so it matters
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_magnitude_vector" in name:
                    param.mul_(torch.linspace(0.5, 1.5, param.numel()).reshape(param.shape))
    adapter = onnx_path.parent / variant
    peft_model.save_pretrained(str(adapter))
    with torch.no_grad():
        output = peft_model(x).numpy()
        try:
            merged = peft_model.merge_and_unload()(x).numpy()
        except (
            RuntimeError,
            NotImplementedError,
        ):  # PEFT merges no grouped conv, no lora_bias without a bias
            merged = output
    return Case(onnx_path, adapter, base_weights, x.numpy(), output, merged)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("folded")
    return lambda kind, exporter, variant="lora": _case(root, kind, exporter, variant)


def _output(path: Path, x: np.ndarray) -> np.ndarray:
    return run(path, {"x": x})[0]


# ----------------------------------------------------------------------------------------------------
# What torch 2.13 emits (the facts the detection relies on)


def test_exporters_fold_batchnorm_into_conv_and_the_documented_flags_keep_it(case, tmp_path: Path) -> None:
    dynamo = onnx.load(case("convbn", "dynamo").onnx_path, load_external_data=False)
    assert [n.op_type for n in dynamo.graph.node] == ["Conv"]
    rules = {p.key: p.value for p in dynamo.graph.node[0].metadata_props}["pkg.onnxscript.rewriter.rule_name"]
    assert "FuseBatchNormIntoConv" in rules
    script = onnx.load(case("convbn", "torchscript").onnx_path)
    assert [n.op_type for n in script.graph.node] == ["Conv"]
    assert script.graph.node[0].input[1].startswith("onnx::Conv_")
    # The fix the refusal names: both flags keep the BatchNorm as its own node.
    model, x = ConvBN().eval(), torch.randn(1, 3, 6, 6)
    for name, kwargs in (
        ("d", {"dynamo": True, "optimize": False}),
        ("t", {"dynamo": False, "do_constant_folding": False}),
    ):
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(tmp_path / f"{name}.onnx"), **kwargs)
        ops = [n.op_type for n in onnx.load(tmp_path / f"{name}.onnx").graph.node]
        assert "BatchNormalization" in ops, (kwargs, ops)


# ----------------------------------------------------------------------------------------------------
# Refused without the base weights, with the reason and the fix


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("merge", [False, True])
def test_folded_conv_is_refused_with_the_fix(case, exporter: str, merge: bool, tmp_path: Path) -> None:
    c = case("convbn", exporter)
    with pytest.raises(FoldedWeightError) as caught:
        apply_peft(c.onnx_path, c.adapter, output=tmp_path / "out.onnx", merge=merge)
    message = str(caught.value)
    assert "'conv'" in message and "BatchNorm" in message
    flag = "optimize=False" if exporter == "dynamo" else "do_constant_folding=False"
    assert flag in message and "--base-weights" in message
    assert not (tmp_path / "out.onnx").exists()


def test_dynamo_folds_batchnorm1d_into_gemm_and_it_is_refused(case) -> None:
    c = case("linbn", "dynamo")
    with pytest.raises(FoldedWeightError, match="FuseBatchNormIntoGemm"):
        apply_peft(c.onnx_path, c.adapter)


def test_every_peft_path_refuses_the_folded_site(case, tmp_path: Path) -> None:
    c = case("convbn", "torchscript")
    with pytest.raises(FoldedWeightError):
        inject_slots(c.onnx_path, peft=c.adapter)
    slotted = tmp_path / "slots.onnx"
    inject_slots(c.onnx_path, peft=c.adapter, base_weights=c.base_weights, output=slotted)
    with pytest.raises(FoldedWeightError):
        export_adapter(output=tmp_path / "a.onnx_adapter", peft=c.adapter, for_model=slotted)
    with pytest.raises(FoldedWeightError):
        inject_mixed(c.onnx_path, [c.adapter])


def test_branches_on_folded_sites_are_not_exported_as_peft_adapters(case, tmp_path: Path) -> None:
    import lora_onnx

    c = case("convbn", "dynamo")
    fresh = tmp_path / "fresh.onnx"
    lora_onnx.inject(
        c.onnx_path, lora_onnx.LoraConfig(rank=2, init="random"), output=fresh
    )  # ONNX-only: fine
    with pytest.raises(FoldedWeightError, match="runs before the folded op"):
        export_peft_adapter(fresh, tmp_path / "fresh_adapter")
    # Applied with --base-weights, B carries the factor (recorded in the model): not PEFT's B either.
    script = case("convbn", "torchscript")
    applied = tmp_path / "applied.onnx"
    apply_peft(script.onnx_path, script.adapter, output=applied, base_weights=script.base_weights)
    with pytest.raises(FoldedWeightError):
        export_peft_adapter(applied, tmp_path / "applied_adapter")
    assert not (tmp_path / "applied_adapter").exists()
    plain = case("conv", "torchscript")
    round_trip = tmp_path / "plain.onnx"
    apply_peft(plain.onnx_path, plain.adapter, output=round_trip, base_weights=plain.base_weights)
    export_peft_adapter(round_trip, tmp_path / "plain_adapter")
    assert (tmp_path / "plain_adapter" / "adapter_model.safetensors").is_file()


def test_cli_refuses_on_one_line_with_exit_2(case, tmp_path: Path) -> None:
    c = case("convbn", "dynamo")
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_onnx",
            "inject",
            str(c.onnx_path),
            "--peft",
            str(c.adapter),
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lora-onnx: error: ")
    assert "optimize=False" in lines[0] and "Traceback" not in done.stderr
    assert not out.exists()


def test_an_input_side_fold_is_not_recoverable_from_base_weights(tmp_path: Path) -> None:
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import affine_conv_fusion_rule

    class Affine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x * 2.0 + 1.0)

    _export(Affine().eval(), torch.randn(1, 3, 4, 4), tmp_path / "m.onnx", "torchscript")
    onnx.save(rewrite(onnx.load(tmp_path / "m.onnx"), [affine_conv_fusion_rule]), tmp_path / "fused.onnx")
    (fold,) = inspect_model(tmp_path / "fused.onnx").folded
    assert fold.evidence.startswith("onnxscript rule AffineConvFusion") and not fold.output_side
    assert "--base-weights" not in fold.note and "do_constant_folding=False" not in fold.note
    assert "optimize=False" in fold.note


def test_inspect_notes_the_folded_site(case) -> None:
    for exporter in EXPORTERS:
        inspection = inspect_model(case("convbn", exporter).onnx_path)
        assert [f.module_path for f in inspection.folded] == ["conv"]
        assert inspection.folded[0].reason == "weight was folded by the exporter (BatchNorm)"
        assert any("weight was folded by the exporter (BatchNorm)" in w for w in inspection.warnings)
        assert inspection.to_json()["folded"][0]["site"] == inspection.folded[0].site
    assert inspect_model(case("conv", "torchscript").onnx_path).folded == ()


# ----------------------------------------------------------------------------------------------------
# Exact with --base-weights


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("merge", [False, True])
def test_base_weights_make_the_folded_conv_equal_peft(
    case, exporter: str, merge: bool, tmp_path: Path
) -> None:
    c = case("convbn", exporter)
    out = tmp_path / "out.onnx"
    result = apply_peft(
        c.onnx_path, c.adapter, output=out, merge=merge, validate=True, base_weights=c.base_weights
    )
    assert result.validation is not None and result.validation.ok
    actual = _output(out, c.x)
    assert rel_err(actual, c.merged_output if merge else c.peft_output) <= 1e-4
    # Not trivially so: without the factor the branch is off (the 2.7x).
    base = _output(c.onnx_path, c.x)
    assert rel_err(base, c.peft_output) > 1e-2


def test_base_weights_make_a_folded_depthwise_conv_equal_peft(case, tmp_path: Path) -> None:
    c = case("dwbn", "torchscript")
    with pytest.raises(FoldedWeightError, match="'dw'"):
        apply_peft(c.onnx_path, c.adapter)
    out = tmp_path / "out.onnx"
    apply_peft(c.onnx_path, c.adapter, output=out, base_weights=c.base_weights)
    assert rel_err(_output(out, c.x), c.peft_output) <= 1e-4


def test_base_weights_make_the_dynamo_gemm_batchnorm1d_equal_peft(case, tmp_path: Path) -> None:
    c = case("linbn", "dynamo")
    for merge in (False, True):
        out = tmp_path / f"out{merge}.onnx"
        apply_peft(c.onnx_path, c.adapter, output=out, merge=merge, base_weights=c.base_weights)
        assert rel_err(_output(out, c.x), c.peft_output) <= 1e-4


@pytest.mark.parametrize("variant", ["dora", "bias"])
def test_dora_and_lora_bias_on_a_folded_conv_equal_peft(case, variant: str, tmp_path: Path) -> None:
    # DoRA's norm must come from the original weight; lora_B's bias is scaled by f like B.
    c = case("convbn", "dynamo" if variant == "dora" else "torchscript", variant)
    with pytest.raises(FoldedWeightError):
        apply_peft(c.onnx_path, c.adapter)
    for merge in (False, True):
        out = tmp_path / f"out{merge}.onnx"
        apply_peft(c.onnx_path, c.adapter, output=out, merge=merge, base_weights=c.base_weights)
        assert rel_err(_output(out, c.x), c.peft_output) <= 1e-4


def test_slots_from_peft_with_base_weights_equal_peft(case, tmp_path: Path) -> None:
    import onnxruntime as ort

    c = case("convbn", "torchscript")
    slotted, file = tmp_path / "slots.onnx", tmp_path / "a.onnx_adapter"
    inject_slots(
        c.onnx_path, peft=c.adapter, base_weights=c.base_weights, output=slotted, adapter_output=file
    )
    adapter = ort.LoraAdapter()
    adapter.Load(str(file))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session = ort.InferenceSession(str(slotted), providers=["CPUExecutionProvider"])
    assert rel_err(session.run(None, {"x": c.x}, options)[0], c.peft_output) <= 1e-4
    # export-adapter --peft --for writes the same tensors for those slots.
    again = tmp_path / "b.onnx_adapter"
    export_adapter(output=again, peft=c.adapter, for_model=slotted, base_weights=c.base_weights)
    adapter = ort.LoraAdapter()
    adapter.Load(str(again))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    assert rel_err(session.run(None, {"x": c.x}, options)[0], c.peft_output) <= 1e-4


def test_mixed_batch_from_peft_with_base_weights_equals_peft(case, tmp_path: Path) -> None:
    c = case("convbn", "torchscript")
    out = tmp_path / "mixed.onnx"
    result = inject_mixed(c.onnx_path, [c.adapter], output=out, base_weights=c.base_weights)
    rows = np.array([0, -1], np.int64)  # row 0 with the adapter, row 1 the base
    got = run(out, {"x": c.x, result.index_name: rows})[0]
    assert rel_err(got[:1], c.peft_output[:1]) <= 1e-4
    assert rel_err(got[1:], _output(c.onnx_path, c.x)[1:]) <= 1e-6


def test_cli_base_weights_merge_equals_peft(case, tmp_path: Path) -> None:
    c = case("convbn", "torchscript")
    out = tmp_path / "out.onnx"
    done = subprocess.run(
        [
            sys.executable, "-m", "lora_onnx", "inject", str(c.onnx_path), "--peft", str(c.adapter),
            "--base-weights", str(c.base_weights), "--merge", "--validate", "-o", str(out),
        ],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert rel_err(_output(out, c.x), c.merged_output) <= 1e-4


def test_base_weights_missing_key_or_other_model_are_named(case, tmp_path: Path) -> None:
    c = case("convbn", "torchscript")
    partial = tmp_path / "partial.safetensors"
    safetensors.torch.save_file({"bn.weight": torch.ones(8)}, str(partial))
    with pytest.raises(AdapterError, match=r"no tensor 'conv\.weight'"):
        apply_peft(c.onnx_path, c.adapter, base_weights=partial)
    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    safetensors.torch.save_file(ConvBN().state_dict(), str(other))
    with pytest.raises(FoldedWeightError, match=r"'/conv/Conv'.*not --base-weights 'conv\.weight'"):
        apply_peft(c.onnx_path, c.adapter, base_weights=other)
    with pytest.raises(AdapterError, match="no such file"):
        apply_peft(c.onnx_path, c.adapter, base_weights=tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------------
# Unfolded exports are untouched


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("kind", ["conv", "linear2d", "linear3d"])
def test_plain_conv_and_linear_apply_without_refusal(case, kind: str, exporter: str, tmp_path: Path) -> None:
    c = case(kind, exporter)
    out = tmp_path / "out.onnx"
    apply_peft(c.onnx_path, c.adapter, output=out)
    assert rel_err(_output(out, c.x), c.peft_output) <= 1e-4
    assert inspect_model(c.onnx_path).folded == ()
    # The base weights confirm the sites are plain (equal weights; MatMul's (in, out) layout accounted for).
    apply_peft(c.onnx_path, c.adapter, output=out, base_weights=c.base_weights)
    assert rel_err(_output(out, c.x), c.peft_output) <= 1e-4


def test_torchscript_keeps_batchnorm1d_after_a_linear(case, tmp_path: Path) -> None:
    c = case("linbn", "torchscript")
    ops = [n.op_type for n in onnx.load(c.onnx_path).graph.node]
    assert "BatchNormalization" in ops
    out = tmp_path / "out.onnx"
    apply_peft(c.onnx_path, c.adapter, output=out)
    assert rel_err(_output(out, c.x), c.peft_output) <= 1e-4
