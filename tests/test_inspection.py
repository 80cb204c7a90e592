"""inspect: sites with A/B shapes, skipped nodes with reasons, totals."""

from __future__ import annotations

from builders import MODELS

import lora_onnx
from lora_onnx import LoraConfig


def test_convnet_rows_skips_and_totals() -> None:
    report = lora_onnx.inspect(MODELS / "convnet" / "model.onnx", LoraConfig(rank=4))
    rows = {row.module_path: row for row in report.sites}
    assert rows["grouped"].a_shape == (4, 4, 3, 3) and rows["grouped"].b_shape == (32, 1, 1, 1)
    assert rows["head"].layout == "out,in" and (rows["head"].in_features, rows["head"].out_features) == (
        56,
        10,
    )
    assert {s.module_path for s in report.skipped} == {"depthwise"}
    assert report.lora_params == sum(r.lora_params for r in report.sites)
    assert 0 < report.lora_share < 1 and report.base_params > report.lora_params


def test_an_injected_model_lists_its_branches() -> None:
    injected = lora_onnx.inject(MODELS / "tiny_gpt2" / "model.onnx", LoraConfig(rank=2))
    report = lora_onnx.inspect(injected.model, LoraConfig(rank=2))
    assert len(report.branches) == 9
    assert len(report.sites) == 9  # the branches' own MatMuls are not offered as sites again
    assert (
        report.to_json()["totals"]["base_params"]
        == lora_onnx.inspect(MODELS / "tiny_gpt2" / "model.onnx").base_params
    )
