"""Saving: data linked (never via ..), LoRA tensors in their own file, atomic writes, inputs protected."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import MODELS, rel_err, run

import lora_onnx
from lora_onnx import LoraConfig
from lora_onnx.errors import OutputError
from lora_onnx.model.load import load_model
from lora_onnx.model.tensors import external_ref


@pytest.fixture
def llama(tmp_path: Path) -> Path:
    """A private copy of the bundled dynamo export (model.onnx + model.onnx.data)."""
    folder = tmp_path / "src"
    shutil.copytree(MODELS / "tiny_llama", folder)
    return folder / "model.onnx"


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_inject_links_base_data_into_another_folder_on_request(llama: Path, tmp_path: Path) -> None:
    before = _digest(llama.parent)
    out = tmp_path / "elsewhere" / "lora.onnx"
    lora_onnx.inject(llama, LoraConfig(rank=4, init="random"), output=out, link_data=True)
    assert _digest(llama.parent) == before
    data = out.with_name("lora.onnx.data")
    assert os.path.samefile(data, llama.with_name("model.onnx.data"))  # a hard link, not a copy
    graph = onnx.load(out, load_external_data=False).graph
    locations = {external_ref(t).location for t in graph.initializer if external_ref(t)}
    assert locations == {"lora.onnx.data", "lora.onnx.lora.data"}
    assert not any(".." in loc for loc in locations)
    assert not list(out.parent.glob(".*tmp*"))
    feeds = {
        "input_ids": __import__("numpy").ones((1, 4), "int64"),
        "attention_mask": __import__("numpy").ones((1, 4), "int64"),
    }
    assert run(out, feeds)[0].shape == (1, 4, 256)


def test_merge_streams_a_fresh_data_file_and_drops_stale_bytes(llama: Path, tmp_path: Path) -> None:
    injected = tmp_path / "a" / "lora.onnx"
    lora_onnx.inject(llama, LoraConfig(rank=4, init="random"), output=injected)
    merged = tmp_path / "b" / "merged.onnx"
    lora_onnx.merge(injected, output=merged)
    assert sorted(p.name for p in merged.parent.iterdir()) == ["merged.onnx", "merged.onnx.data"]
    assert not os.path.samefile(merged.with_name("merged.onnx.data"), llama.with_name("model.onnx.data"))
    import numpy as np

    feeds = {
        "input_ids": np.arange(6, dtype="int64").reshape(1, 6),
        "attention_mask": np.ones((1, 6), "int64"),
    }
    assert rel_err(run(merged, feeds)[0], run(injected, feeds)[0]) <= 1e-4


def test_refuses_to_overwrite_inputs(llama: Path) -> None:
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        lora_onnx.inject(llama, LoraConfig(), output=llama)
    # the output's data file would replace the input's data file
    other = llama.with_name("model.onnx.data").with_name("x.onnx")
    shutil.copy(llama, other)
    with pytest.raises(OutputError, match=r"model\.onnx\.data"):
        lora_onnx.inject(other, LoraConfig(), output=llama.with_name("model.onnx"))


def test_a_failure_while_writing_leaves_nothing(llama: Path, tmp_path: Path) -> None:
    injected = lora_onnx.inject(llama, LoraConfig(rank=2, init="random")).model
    folded = lora_onnx.merge(injected).model

    def broken() -> None:
        raise OSError(28, "No space left on device")

    first = next(iter(folded.overrides))
    sabotaged = folded.with_proto(folded.proto, {first: broken})
    out = tmp_path / "out" / "merged.onnx"
    with pytest.raises(OutputError, match="disk full while writing"):
        lora_onnx.save_model(sabotaged, out)
    assert list(out.parent.iterdir()) == []


def test_rewriting_an_existing_output_replaces_it_whole(llama: Path, tmp_path: Path) -> None:
    out = tmp_path / "o" / "lora.onnx"
    lora_onnx.inject(llama, LoraConfig(rank=2, init="random", seed=1), output=out)
    lora_onnx.inject(llama, LoraConfig(rank=3, init="random", seed=2), output=out)
    model = load_model(out)
    assert model.array("model.layers.0.self_attn.q_proj.lora_A.weight").shape == (64, 3)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "lora.onnx",
        "lora.onnx.data",
        "lora.onnx.lora.data",
    ]


def test_lora_tensors_of_an_external_data_model_are_generated_while_writing(
    llama: Path, tmp_path: Path
) -> None:
    result = lora_onnx.inject(llama, LoraConfig(rank=4, init="random"))
    lora = {name for b in result.branches for name in (b.a, b.b)}
    in_graph = {t.name: t for t in result.model.proto.graph.initializer if t.name in lora}
    assert set(in_graph) == lora and not any(t.raw_data for t in in_graph.values())  # metadata only
    first = result.branches[0]
    assert result.model.array(first.a).shape == (64, 4)
    out = lora_onnx.save_model(result.model, tmp_path / "o" / "lora.onnx")
    saved = load_model(out)
    for name in lora:
        assert np.array_equal(saved.array(name), result.model.array(name))
    again = lora_onnx.inject(llama, LoraConfig(rank=4, init="random"), validate=True)
    assert again.validation.ok
