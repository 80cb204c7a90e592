"""Loading refuses broken inputs with one clear line, and never reads external weight bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from builders import MODELS

from lora_onnx.errors import ModelLoadError
from lora_onnx.model.load import load_model


def test_missing_not_onnx_and_truncated_files(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model")
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        load_model(text)
    data = (MODELS / "tiny_bert" / "model.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"cut\.onnx"):
        load_model(cut)


def test_external_data_missing_or_truncated(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    shutil.copytree(MODELS / "tiny_llama", folder)
    data = folder / "model.onnx.data"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(ModelLoadError, match="is truncated: initializer"):
        load_model(folder / "model.onnx")
    data.unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx\.data for initializer .* is missing"):
        load_model(folder / "model.onnx")


def test_graph_only_load_keeps_weights_on_disk() -> None:
    model = load_model(MODELS / "tiny_llama" / "model.onnx")
    refs = model.external_refs()
    assert refs and all(not t.raw_data for t in model.proto.graph.initializer if t.name in refs)
    assert model.array("val_76").shape == (64, 64)  # read on demand, memory-mapped
