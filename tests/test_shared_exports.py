"""The PEFT harness's base exports are made once per test run and reused by every worker process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

try:  # import the harness exactly as the PEFT tests do, so the module (and its cache) is the same
    from . import peft_cases as pc
except ImportError:
    import peft_cases as pc


def test_a_second_process_reuses_the_shared_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shared = tmp_path / "shared"
    monkeypatch.setenv(pc.SHARED_EXPORTS_ENV, str(shared))
    monkeypatch.setattr(pc, "_EXPORTS", {})  # a fresh process: nothing cached in memory
    first = pc.export_base("convnet", "torchscript", tmp_path / "ignored", seed=5)
    assert first.onnx_path == shared / "convnet_torchscript_s5" / "model.onnx" and first.onnx_path.exists()
    record = json.loads((shared / "convnet_torchscript_s5" / "export.json").read_text())
    assert record["input_names"] == list(first.input_names) == ["x"]
    assert not (tmp_path / "ignored").exists()

    def no_export(*args: object) -> pc.BaseExport:
        raise AssertionError("exported again instead of reusing the shared export")

    monkeypatch.setattr(pc, "_EXPORTS", {})  # another worker process
    monkeypatch.setattr(pc, "_export", no_export)
    again = pc.export_base("convnet", "torchscript", tmp_path / "other", seed=5)
    assert again == first
