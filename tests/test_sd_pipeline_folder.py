"""A single-file SD LoRA over a pipeline folder (issue 12): each component the file adapts goes to the
sub-folder of that name (unet/, text_encoder/, text_encoder_2/), at the file's strength, unmerged and
merged; numerics equal diffusers' own load_lora_weights + forward (fuse_lora for merges)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lora_onnx import apply_peft_folder
from lora_onnx.adapters.formats.source import PeftRef
from lora_onnx.errors import AdapterError
from tests import sd_builders as sb

pytestmark = pytest.mark.slow

TOL = 1e-4


@pytest.fixture(scope="module")
def unet() -> tuple:
    return sb.shared_export("unet")


@pytest.fixture(scope="module")
def clip() -> tuple:
    return sb.shared_export("clip")


def _pipeline(folder: Path, unet_export: sb.Export, clip_export: sb.Export, encoders: int = 1) -> Path:
    (folder / "unet").mkdir(parents=True)
    shutil.copy(unet_export.path, folder / "unet" / "model.onnx")
    for name in ("text_encoder", "text_encoder_2")[:encoders]:
        (folder / name).mkdir()
        shutil.copy(clip_export.path, folder / name / "model.onnx")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text('{"_class_name": "LCMScheduler"}')
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    return folder


def _close(ours: np.ndarray, reference: np.ndarray, base: np.ndarray) -> None:
    assert sb.rel_err(ours, reference) <= TOL
    assert sb.rel_err(base, reference) > 1e-2  # the LoRA changes the output


def test_sd15_pipeline_folder_takes_one_file_at_a_strength_unmerged_and_merged(tmp_path, unet, clip) -> None:
    unet_model, unet_export = unet
    clip_model, clip_export = clip
    un, un_config = sb.peft_lora(unet_model, ("to_q", "to_v", "conv1"), rank=4, alpha=8, seed=21)
    te, te_config = sb.peft_lora(clip_model, sb.CLIP_TARGETS, rank=2, alpha=4, seed=22)
    lora = sb.save_diffusers(
        tmp_path / "lora", unet=un, unet_config=un_config, text_encoder=te, text_encoder_config=te_config
    )
    pipe = _pipeline(tmp_path / "pipe", unet_export, clip_export)
    unet_want = sb.torch_unet_output(sb.diffusers_unet(unet_model, [(lora, 0.8)]), sb.unet_inputs())
    clip_want = sb.torch_clip_output(sb.diffusers_clip(clip_model, lora, 0.8), sb.clip_inputs())
    unet_base = sb.torch_unet_output(unet_model, sb.unet_inputs())
    clip_base = sb.torch_clip_output(clip_model, sb.clip_inputs())

    result = apply_peft_folder(pipe, PeftRef(lora, 0.8), tmp_path / "out", validate=True)
    assert result.ok and {f.model: bool(f.modules) for f in result.files} == {
        "unet/model.onnx": True, "text_encoder/model.onnx": True,
    }  # fmt: skip
    assert (tmp_path / "out" / "scheduler" / "scheduler_config.json").is_file()  # side files carried
    assert (tmp_path / "out" / "model_index.json").is_file()
    _close(sb.run(tmp_path / "out" / "unet" / "model.onnx", sb.unet_inputs()), unet_want, unet_base)
    _close(sb.run(tmp_path / "out" / "text_encoder" / "model.onnx", sb.clip_inputs()), clip_want, clip_base)

    merged = tmp_path / "merged"
    done = subprocess.run(
        [sys.executable, "-m", "lora_onnx", "inject", str(pipe), "--peft", f"{lora}:0.8", "--merge",
         "-o", str(merged), "--json", str(tmp_path / "report.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    fused = sb.torch_unet_output(sb.diffusers_unet(unet_model, [(lora, 0.8)], fuse=True), sb.unet_inputs())
    _close(sb.run(merged / "unet" / "model.onnx", sb.unet_inputs()), fused, unet_base)
    _close(sb.run(merged / "text_encoder" / "model.onnx", sb.clip_inputs()), clip_want, clip_base)
    report = json.loads((tmp_path / "report.json").read_text())
    assert {f["model"] for f in report["files"]} >= {"unet/model.onnx", "text_encoder/model.onnx"}


def test_sdxl_pipeline_folder_routes_kohya_te1_and_te2_to_their_encoders(tmp_path, unet, clip) -> None:
    unet_model, unet_export = unet
    clip_model, clip_export = clip
    un, _ = sb.peft_lora(unet_model, sb.UNET_TARGETS, rank=2, alpha=2, seed=31)
    te1, te1_config = sb.peft_lora(clip_model, ("q_proj", "v_proj"), rank=2, alpha=2, seed=32)
    te2, _ = sb.peft_lora(clip_model, sb.CLIP_TARGETS, rank=4, alpha=4, seed=33)
    lora = sb.save_kohya(
        tmp_path / "xl.safetensors",
        {"unet": un, "text_encoder": te1, "text_encoder_2": te2},
        {"text_encoder_2": 3.0},
        sdxl=True,
    )
    # diffusers' SD 1.5 loader reads no SDXL kohya file with UNet keys, nor a te1-only one: the references
    # come from the same tensors in files it reads (te1 saved by diffusers itself: kohya's alpha = rank is
    # the same scale, te2 beside te1 as in SDXL, the UNet alone)
    references = {
        "text_encoder": sb.save_diffusers(
            tmp_path / "ref_te1", text_encoder=te1, text_encoder_config=te1_config
        ),
        "text_encoder_2": sb.save_kohya(
            tmp_path / "ref_te2.safetensors", {"text_encoder": te1, "text_encoder_2": te2},
            {"text_encoder_2": 3.0}, sdxl=True,
        ),
    }  # fmt: skip
    unet_only = sb.save_kohya(tmp_path / "ref_unet.safetensors", {"unet": un})
    pipe = _pipeline(tmp_path / "pipe", unet_export, clip_export, encoders=2)
    result = apply_peft_folder(pipe, lora, tmp_path / "out")
    assert result.ok
    clip_base = sb.torch_clip_output(clip_model, sb.clip_inputs())
    for name in ("text_encoder", "text_encoder_2"):
        host = sb.diffusers_clip(clip_model, references[name], component=name)
        want = sb.torch_clip_output(host, sb.clip_inputs())
        _close(sb.run(tmp_path / "out" / name / "model.onnx", sb.clip_inputs()), want, clip_base)
    unet_want = sb.torch_unet_output(sb.diffusers_unet(unet_model, [(unet_only, 1.0)]), sb.unet_inputs())
    unet_base = sb.torch_unet_output(unet_model, sb.unet_inputs())
    _close(sb.run(tmp_path / "out" / "unet" / "model.onnx", sb.unet_inputs()), unet_want, unet_base)

    # a component the folder lacks is refused, naming it, unless --skip-unmatched
    lacking = tmp_path / "lacking"
    shutil.copytree(pipe, lacking)
    shutil.rmtree(lacking / "text_encoder_2")
    with pytest.raises(AdapterError, match=r"adapts text_encoder_2, but .* has no such sub-folder"):
        apply_peft_folder(lacking, lora, tmp_path / "out2")
    skipped = apply_peft_folder(lacking, lora, tmp_path / "out3", skip_unmatched=True)
    assert skipped.ok and skipped.skipped_keys


def test_sd15_pipeline_lora_file_per_file_adapters_and_mixed(tmp_path, unet, clip) -> None:
    # export-adapter --peft LORA:0.8 --for SLOTS_DIR and inject DIR --mixed --peft LORA:0.8: each component
    # gets its part of the file, as inject DIR --peft gives it (diffusers' outputs)
    import onnxruntime as ort

    from lora_onnx.commands.folder_exports import export_adapter_folder
    from lora_onnx.commands.folder_mixed import inject_mixed_folder

    unet_model, unet_export = unet
    clip_model, clip_export = clip
    un, un_config = sb.peft_lora(unet_model, ("to_q", "to_v", "conv1"), rank=4, alpha=8, seed=41)
    te, te_config = sb.peft_lora(clip_model, sb.CLIP_TARGETS, rank=2, alpha=4, seed=42)
    lora = sb.save_diffusers(
        tmp_path / "lora", unet=un, unet_config=un_config, text_encoder=te, text_encoder_config=te_config
    )
    pipe = _pipeline(tmp_path / "pipe", unet_export, clip_export)
    want = {
        "unet": sb.torch_unet_output(sb.diffusers_unet(unet_model, [(lora, 0.8)]), sb.unet_inputs()),
        "text_encoder": sb.torch_clip_output(sb.diffusers_clip(clip_model, lora, 0.8), sb.clip_inputs()),
    }
    base = {
        "unet": sb.torch_unet_output(unet_model, sb.unet_inputs()),
        "text_encoder": sb.torch_clip_output(clip_model, sb.clip_inputs()),
    }
    inputs = {"unet": sb.unet_inputs(), "text_encoder": sb.clip_inputs()}
    slots = tmp_path / "slots"
    apply_peft_folder(pipe, PeftRef(lora, 0.8), slots, as_inputs=True)
    export_adapter_folder(peft=PeftRef(lora, 0.8), for_folder=slots, output=tmp_path / "adapters")
    for name in ("unet", "text_encoder"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(tmp_path / "adapters" / name / "model.onnx_adapter"))
        run_options = ort.RunOptions()
        run_options.add_active_adapter(adapter)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(str(slots / name / "model.onnx"), options)
        feeds = {i.name: inputs[name][i.name] for i in session.get_inputs() if i.name in inputs[name]}
        _close(session.run(None, feeds, run_options)[0], want[name], base[name])

    mixed = inject_mixed_folder(pipe, [PeftRef(lora, 0.8)], tmp_path / "mixed", validate=True)
    assert mixed.ok
    rows = np.array([-1, 0], np.int64)  # row 0: the base, row 1: the LoRA at 0.8
    for name in ("unet", "text_encoder"):
        got = sb.run(tmp_path / "mixed" / name / "model.onnx", {**inputs[name], "lora_adapter_index": rows})
        assert sb.rel_err(got[1:], want[name][1:]) <= TOL, name
        assert sb.rel_err(got[:1], base[name][:1]) <= 1e-5, name
