"""Single-file SD LoRAs against diffusers itself (issue 12): tiny random UNet2DConditionModel and
CLIPTextModel exports, LoRAs made with PEFT and saved by diffusers (``save_lora_weights``) or in the kohya
layout, applied with lora-onnx and compared in onnxruntime with diffusers' own ``load_lora_into_unet`` /
``load_lora_into_text_encoder`` forward (``set_adapters`` strengths), and ``fuse_lora`` for merges."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch

from lora_onnx import apply_peft
from tests import sd_builders as sb

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.fixture(scope="module")
def unet() -> tuple:
    return sb.shared_export("unet")


@pytest.fixture(scope="module")
def clip() -> tuple:
    return sb.shared_export("clip")


@pytest.fixture(scope="module")
def unet_base(unet) -> np.ndarray:
    return sb.torch_unet_output(unet[0], sb.unet_inputs())


def _check(ours: np.ndarray, reference: np.ndarray, base: np.ndarray) -> None:
    assert sb.rel_err(ours, reference) <= TOL
    assert sb.rel_err(base, reference) > 1e-2  # the LoRA changes the output: the comparison means something


def test_diffusers_file_with_locon_convs_equals_diffusers(tmp_path, unet, unet_base) -> None:
    model, export = unet
    state, config = sb.peft_lora(model, sb.UNET_TARGETS + sb.UNET_CONV_TARGETS, rank=4, alpha=6, seed=3)
    path = sb.save_diffusers(tmp_path / "lora", unet=state, unet_config=config)
    result = apply_peft(export.path, path, output=tmp_path / "out" / "model.onnx")
    assert any(b.site.op == "Conv" and b.site.kernel == (3, 3) for b in result.plan.branches)
    assert {b.scale for b in result.plan.branches} == {1.5}
    reference = sb.torch_unet_output(sb.diffusers_unet(model, [(path, 1.0)]), sb.unet_inputs())
    _check(sb.run(tmp_path / "out" / "model.onnx", sb.unet_inputs()), reference, unet_base)


def test_kohya_file_with_locon_and_alphas_equals_diffusers(tmp_path, unet, unet_base) -> None:
    model, export = unet
    state, _ = sb.peft_lora(model, sb.UNET_TARGETS + sb.UNET_CONV_TARGETS, rank=4, alpha=4, seed=4)
    path = sb.save_kohya(tmp_path / "k.safetensors", {"unet": state}, {"unet": 2.0})
    result = apply_peft(export.path, path, output=tmp_path / "out" / "model.onnx")
    assert {b.scale for b in result.plan.branches} == {0.5}
    reference = sb.torch_unet_output(sb.diffusers_unet(model, [(path, 1.0)]), sb.unet_inputs())
    _check(sb.run(tmp_path / "out" / "model.onnx", sb.unet_inputs()), reference, unet_base)


def test_old_diffusers_processor_file_equals_diffusers(tmp_path, unet, unet_base) -> None:
    model, export = unet
    state, _ = sb.peft_lora(model, ("to_q", "to_k", "to_v", "to_out.0", "proj_in"), rank=2, alpha=2, seed=5)
    path = tmp_path / "old.safetensors"
    safetensors.torch.save_file(sb.old_diffusers_layout(state, "unet"), str(path))
    apply_peft(export.path, path, output=tmp_path / "out" / "model.onnx")
    reference = sb.torch_unet_output(sb.diffusers_unet(model, [(path, 1.0)]), sb.unet_inputs())
    _check(sb.run(tmp_path / "out" / "model.onnx", sb.unet_inputs()), reference, unet_base)


def test_text_encoder_part_of_a_two_component_file_at_a_strength(tmp_path, unet, clip) -> None:
    unet_model, _ = unet
    model, export = clip
    te, te_config = sb.peft_lora(model, sb.CLIP_TARGETS, rank=2, alpha=6, seed=2)
    un, un_config = sb.peft_lora(unet_model, ("to_q",), rank=2, alpha=2, seed=1)
    path = sb.save_diffusers(
        tmp_path / "lora", unet=un, unet_config=un_config, text_encoder=te, text_encoder_config=te_config
    )
    # the file adapts the unet and the text encoder: the CLIP export's paths pick text_encoder
    result = apply_peft(export.path, (path, 0.7), output=tmp_path / "out" / "model.onnx")
    paths = {b.site.module_path for b in result.plan.branches}
    assert paths and all(p.startswith("encoder.layers.") for p in paths)
    reference = sb.torch_clip_output(sb.diffusers_clip(model, path, 0.7), sb.clip_inputs())
    base = sb.torch_clip_output(model, sb.clip_inputs())
    _check(sb.run(tmp_path / "out" / "model.onnx", sb.clip_inputs()), reference, base)


def test_kohya_sdxl_text_encoders_need_and_take_component(tmp_path, clip) -> None:
    model, export = clip
    te1, _ = sb.peft_lora(model, ("q_proj", "v_proj"), rank=2, alpha=2, seed=6)
    te2, _ = sb.peft_lora(model, sb.CLIP_TARGETS, rank=4, alpha=4, seed=7)
    path = sb.save_kohya(
        tmp_path / "xl.safetensors",
        {"text_encoder": te1, "text_encoder_2": te2},
        {"text_encoder_2": 3.0},
        sdxl=True,
    )
    from lora_onnx.errors import AdapterError

    with pytest.raises(AdapterError, match="--component NAME"):
        apply_peft(export.path, path)  # both encoders' paths match a CLIP export
    apply_peft(export.path, path, component="text_encoder_2", output=tmp_path / "out" / "model.onnx")
    reference = sb.torch_clip_output(
        sb.diffusers_clip(model, path, component="text_encoder_2"), sb.clip_inputs()
    )
    base = sb.torch_clip_output(model, sb.clip_inputs())
    _check(sb.run(tmp_path / "out" / "model.onnx", sb.clip_inputs()), reference, base)


@pytest.fixture(scope="module")
def two_loras(unet, tmp_path_factory) -> tuple[Path, Path]:
    """A diffusers "style" LoRA (attention + LoCon) and a kohya "lcm" LoRA (all linears, alpha != rank)."""
    model, _ = unet
    folder = tmp_path_factory.mktemp("two_loras")
    style, config = sb.peft_lora(model, ("to_q", "to_v", "conv1"), rank=4, alpha=8, seed=11)
    lcm, _ = sb.peft_lora(model, sb.UNET_TARGETS, rank=2, alpha=2, seed=12)
    style_path = sb.save_diffusers(folder / "style", unet=style, unet_config=config)
    style_file = style_path.rename(folder / "style.safetensors")
    return style_file, sb.save_kohya(folder / "lcm.safetensors", {"unet": lcm}, {"unet": 1.0})


def test_two_loras_with_strengths_as_branches_and_merged(tmp_path, unet, unet_base, two_loras) -> None:
    model, export = unet
    style, lcm = two_loras
    loras = [(style, 0.8), (lcm, 0.5)]
    result = apply_peft(export.path, loras, output=tmp_path / "branches" / "model.onnx")
    assert result.adapters == ("style", "lcm")
    assert {b.adapter for b in result.branches} == {"style", "lcm"}
    reference = sb.torch_unet_output(sb.diffusers_unet(model, loras), sb.unet_inputs())
    _check(sb.run(tmp_path / "branches" / "model.onnx", sb.unet_inputs()), reference, unet_base)

    merged = apply_peft(
        export.path, loras, merge=True, validate=True, output=tmp_path / "merged" / "model.onnx"
    )
    assert merged.validation is not None and merged.validation.ok
    assert len(merged.folded) == len(merged.branches)
    fused = sb.torch_unet_output(sb.diffusers_unet(model, loras, fuse=True), sb.unet_inputs())
    _check(sb.run(tmp_path / "merged" / "model.onnx", sb.unet_inputs()), fused, unet_base)


def test_cli_two_loras_with_strengths_merged_equals_fuse_lora(tmp_path, unet, unet_base, two_loras) -> None:
    model, export = unet
    style, lcm = two_loras
    out = tmp_path / "cli" / "model.onnx"
    done = subprocess.run(
        [sys.executable, "-m", "lora_onnx", "inject", str(export.path), "--peft", f"{style}:0.8",
         "--peft", f"{lcm}:0.5", "--merge", "-o", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "at strength 0.8" in done.stdout and "Merged: folded" in done.stdout
    fused = sb.torch_unet_output(
        sb.diffusers_unet(model, [(style, 0.8), (lcm, 0.5)], fuse=True), sb.unet_inputs()
    )
    _check(sb.run(out, sb.unet_inputs()), fused, unet_base)


def _fp16(source: Path, target: Path) -> Path:
    """``source`` in float16 (onnxruntime's converter; inputs and outputs stay float32), as fp16 SD
    exports ship."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    target.parent.mkdir(parents=True, exist_ok=True)
    half = convert_float_to_float16(onnx.load(source), keep_io_types=True)
    # the converter appends its input Casts at the end: sort the nodes (Kahn) so the graph is valid ONNX
    graph = half.graph
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = [n for n in pending if all(i in defined for i in n.input)]
        assert ready, "cycle in the converted graph"
        for node in ready:
            ordered.append(node)
            defined.update(node.output)
        pending = [n for n in pending if n not in ready]
    del graph.node[:]
    graph.node.extend(ordered)
    onnx.save(half, target)
    return target


@pytest.mark.parametrize("kind", ["unet", "clip"])
def test_fp16_exports_take_the_file_within_fp16_tolerance(tmp_path, unet, clip, kind) -> None:
    """On float16 exports the branches compute in float16: within rel 1e-2 of diffusers' fp32 forward,
    unmerged and merged (the LoRA still changes the output by far more)."""
    model, export = unet if kind == "unet" else clip
    targets = sb.UNET_TARGETS + sb.UNET_CONV_TARGETS if kind == "unet" else sb.CLIP_TARGETS
    state, config = sb.peft_lora(model, targets, rank=4, alpha=4, seed=41)
    if kind == "unet":
        path = sb.save_diffusers(tmp_path / "lora", unet=state, unet_config=config)
        inputs, reference = sb.unet_inputs(), sb.diffusers_unet(model, [(path, 0.9)])
        forward, base = sb.torch_unet_output, sb.torch_unet_output(model, sb.unet_inputs())
    else:
        path = sb.save_diffusers(tmp_path / "lora", text_encoder=state, text_encoder_config=config)
        inputs, reference = sb.clip_inputs(), sb.diffusers_clip(model, path, 0.9)
        forward, base = sb.torch_clip_output, sb.torch_clip_output(model, sb.clip_inputs())
    want = forward(reference, inputs)
    half = _fp16(export.path, tmp_path / "fp16" / "model.onnx")
    for merge in (False, True):
        out = tmp_path / ("merged" if merge else "branches") / "model.onnx"
        result = apply_peft(half, (path, 0.9), merge=merge, output=out)
        assert result.branches and all(b.site.dtype == 10 for b in result.plan.branches)  # FLOAT16 sites
        ours = sb.run(out, inputs)
        assert sb.rel_err(ours, want) <= 1e-2
        assert sb.rel_err(base, want) > 5e-2
