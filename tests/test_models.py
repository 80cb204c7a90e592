"""The bundled real exports: default init leaves outputs unchanged, inject then merge equals inject."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from builders import BUNDLED, MODELS

import lora_onnx
from lora_onnx import LoraConfig


@pytest.mark.parametrize("name", BUNDLED)
def test_default_init_is_proven_unchanged(name: str, tmp_path: Path) -> None:
    config = LoraConfig(rank=4, rank_pattern={"depthwise": 32})
    result = lora_onnx.inject(
        MODELS / name / "model.onnx", config, output=tmp_path / "lora.onnx", validate=True
    )
    assert result.validation.ok and all(c.max_abs <= 1e-6 for c in result.validation.comparisons)
    assert result.output and result.output.exists()


@pytest.mark.parametrize("name", BUNDLED)
def test_random_inject_then_merge_equals_inject_with_the_base_node_list(name: str, tmp_path: Path) -> None:
    source = MODELS / name / "model.onnx"
    config = LoraConfig(rank=4, alpha=8, init="random", rank_pattern={"depthwise": 32})
    injected = lora_onnx.inject(source, config, output=tmp_path / "lora.onnx")
    base_check = lora_onnx.validate(source, injected.output)
    assert not base_check.ok  # non-zero A and B really change the outputs
    merged = lora_onnx.merge(injected.output, output=tmp_path / "merged.onnx")
    check = lora_onnx.validate(injected.output, merged.output)
    assert check.ok and max(c.max_rel for c in check.comparisons) <= 1e-4
    base_nodes = [n.op_type for n in onnx.load(source, load_external_data=False).graph.node]
    merged_nodes = [n.op_type for n in onnx.load(merged.output, load_external_data=False).graph.node]
    assert merged_nodes == base_nodes
