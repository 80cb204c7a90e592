"""Smoke tests of the PEFT parity harness itself (tests/peft_cases.py), independent of lora_onnx."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

try:  # tests/ may or may not become a package
    from . import peft_cases as pc
except ImportError:
    import peft_cases as pc

# PEFT merges differ from PEFT's forward here, for reasons of PEFT's own (see FEATURE_PRESETS comments).
_MERGE_DIFFERS = {("gpt2", "embedding_tied")}  # merging edits wte, which lm_head shares
_MERGE_IMPOSSIBLE = {("convnet", "grouped"), ("convnet", "dora_grouped")}  # groups > 1


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("peft_exports")


def test_rel_err() -> None:
    b = np.array([[1.0, -4.0], [2.0, 0.0]], dtype=np.float32)
    assert pc.rel_err(b, b) == 0.0
    assert pc.rel_err(b + np.float32(0.4), b) == pytest.approx(0.1)
    assert pc.rel_err(np.zeros(2), np.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        pc.rel_err(np.zeros(2), np.zeros(3))


@pytest.mark.parametrize("exporter", pc.EXPORTERS)
@pytest.mark.parametrize("arch", pc.ARCHS)
def test_base_export_matches_torch_and_adapter_is_live(
    arch: str, exporter: str, export_dir: Path, tmp_path: Path
) -> None:
    case = pc.build_case(arch, exporter, "plain", tmp_path, export_dir=export_dir)

    sess = ort.InferenceSession(str(case.onnx_path), providers=["CPUExecutionProvider"])
    assert sess.get_providers() == ["CPUExecutionProvider"]
    assert [i.name for i in sess.get_inputs()] == list(case.inputs)
    assert len(sess.get_outputs()) == 1
    # The case inputs have another batch/seq than the export trace: this also checks the dynamic dims.
    (onnx_out,) = sess.run(None, dict(case.inputs))
    assert onnx_out.shape == case.base_output.shape
    assert pc.rel_err(onnx_out, case.base_output) <= 1e-4

    # Non-zero A and B: PEFT's output must move away from the base output.
    assert pc.rel_err(case.peft_output, case.base_output) > 1e-2
    assert case.merged_output is not None
    assert pc.rel_err(case.merged_output, case.peft_output) <= 1e-4

    assert (case.adapter_dir / "adapter_config.json").is_file()
    tensors = pc.adapter_tensors(case)
    assert tensors and all(k.startswith("base_model.model.") for k in tensors)
    assert any(k.endswith(".lora_A.weight") for k in tensors)
    assert all(np.any(v != 0) for v in tensors.values())
    assert pc.adapter_config(case)["peft_type"] == "LORA"


@pytest.mark.parametrize(("arch", "preset"), pc.preset_cases())
def test_presets_build(arch: str, preset: str, export_dir: Path, tmp_path: Path) -> None:
    case = pc.build_case(arch, "torchscript", preset, tmp_path, export_dir=export_dir)
    cfg = pc.adapter_config(case)
    tensors = pc.adapter_tensors(case)
    feats = pc.FEATURE_PRESETS[arch][preset]

    assert pc.rel_err(case.peft_output, case.base_output) > 1e-3
    for key in ("use_dora", "use_rslora", "lora_bias"):
        assert cfg[key] == feats.get(key, False)
    assert cfg["rank_pattern"] == feats.get("rank_pattern", {})
    assert cfg["alpha_pattern"] == feats.get("alpha_pattern", {})
    assert any(k.endswith("lora_magnitude_vector") for k in tensors) == bool(feats.get("use_dora"))
    assert any(k.endswith("lora_B.bias") for k in tensors) == bool(feats.get("lora_bias"))
    if feats.get("use_dora"):
        assert case.extra["dora_magnitudes_perturbed"] > 0

    if (arch, preset) in _MERGE_IMPOSSIBLE:
        assert case.merged_output is None
        assert case.merge_error is not None and "groups" in case.merge_error
    elif (arch, preset) in _MERGE_DIFFERS:
        assert case.merged_output is not None
        assert pc.rel_err(case.merged_output, case.peft_output) > 1e-2
    else:
        assert case.merged_output is not None, case.merge_error
        assert pc.rel_err(case.merged_output, case.peft_output) <= 1e-4


def test_rank_pattern_shapes(export_dir: Path, tmp_path: Path) -> None:
    case = pc.build_case("llama", "torchscript", "patterns", tmp_path, export_dir=export_dir)
    t = pc.adapter_tensors(case)
    prefix = "base_model.model.model.layers."
    assert t[prefix + "0.self_attn.q_proj.lora_A.weight"].shape == (2, 32)
    assert t[prefix + "1.mlp.down_proj.lora_A.weight"].shape == (8, 64)
    assert t[prefix + "0.mlp.down_proj.lora_B.weight"].shape == (32, 4)


def test_root_mismatch_prefixes(export_dir: Path, tmp_path: Path) -> None:
    inner = pc.build_case("llama_inner", "torchscript", "plain", tmp_path / "i", export_dir=export_dir)
    outer = pc.build_case("llama_outer", "torchscript", "plain", tmp_path / "o", export_dir=export_dir)
    assert (inner.graph_only_prefix, inner.adapter_only_prefix) == ("model", "")
    assert (outer.graph_only_prefix, outer.adapter_only_prefix) == ("", "model")
    assert "base_model.model.layers.0.self_attn.q_proj.lora_A.weight" in pc.adapter_tensors(inner)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in pc.adapter_tensors(outer)


def test_export_cache_and_immutability(export_dir: Path, tmp_path: Path) -> None:
    a = pc.build_case("convnet", "torchscript", {"r": 2}, tmp_path / "a", export_dir=export_dir)
    b = pc.build_case("convnet", "torchscript", {"r": 8}, tmp_path / "b", export_dir=export_dir)
    assert a.onnx_path == b.onnx_path
    assert a.export_seconds == b.export_seconds  # the second case reused the export
    np.testing.assert_array_equal(a.base_output, b.base_output)
    assert not np.array_equal(a.peft_output, b.peft_output)
    with pytest.raises(ValueError, match="read-only"):
        a.inputs["x"][0, 0, 0, 0] = 1.0
    with pytest.raises(TypeError):
        a.inputs["y"] = np.zeros(1)  # type: ignore[index]


def test_lora_config_passes_through(export_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig

    cfg = LoraConfig(r=2, lora_alpha=5, init_lora_weights=False, target_modules=["head"])
    case = pc.build_case("convnet", "torchscript", cfg, tmp_path, export_dir=export_dir)
    saved = pc.adapter_config(case)
    assert (saved["r"], saved["lora_alpha"], saved["target_modules"]) == (2, 5, ["head"])
    assert set(pc.adapter_tensors(case)) == {
        "base_model.model.head.lora_A.weight",
        "base_model.model.head.lora_B.weight",
    }
