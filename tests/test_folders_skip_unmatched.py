"""Modules the export pruned: an adapter trained on BertModel carries the pooler's keys, but an export of
``last_hidden_state`` alone has no pooler. Strict by default (the error lists the keys and offers
--skip-unmatched); with it the keys are skipped, listed in a warning and the JSON, and the rest equals PEFT.
Also as a genai-style folder (model.onnx + model.onnx.data + genai_config.json).
"""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from builders import rel_err, run
from torch import nn

from lora_onnx import apply_peft
from lora_onnx.commands.folders import apply_peft_folder
from lora_onnx.errors import AdapterError

pytestmark = pytest.mark.slow


class Hidden(nn.Module):
    """BertModel exported for its last_hidden_state only: the pooler is dead code in the graph."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids).last_hidden_state


IDS = np.array([[2, 7, 11, 5], [9, 1, 3, 4]], np.int64)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16,
    )  # fmt: skip
    base = BertModel(config).eval()
    model = root / "model.onnx"
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(Hidden(base), (torch.from_numpy(IDS),), str(model), dynamo=False,
                          input_names=["input_ids"], output_names=["last_hidden_state"])  # fmt: skip
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value", "pooler.dense"], init_lora_weights=False
        ),
    ).eval()
    peft_model.save_pretrained(root / "adapter")
    with torch.no_grad():
        expected = peft_model(input_ids=torch.from_numpy(IDS)).last_hidden_state.numpy()
    # a genai-style folder: the same graph with its weights in model.onnx.data, and the side files
    genai = root / "genai"
    genai.mkdir()
    proto = onnx.load(model)
    onnx.save(
        proto, genai / "model.onnx", save_as_external_data=True, location="model.onnx.data", size_threshold=0
    )
    (genai / "genai_config.json").write_text('{"model": {"decoder": {"filename": "model.onnx"}}}')
    (genai / "tokenizer.json").write_text("{}")
    return {"model": model, "adapter": root / "adapter", "expected": expected, "genai": genai}


def test_pruned_pooler_is_refused_by_default_naming_the_keys(bert: dict, tmp_path: Path) -> None:
    with pytest.raises(AdapterError) as error:
        apply_peft(bert["model"], bert["adapter"], output=tmp_path / "out.onnx")
    message = str(error.value)
    assert "pooler.dense.lora_A.weight" in message and "matches no module of the graph" in message
    assert "--skip-unmatched" in message and "1 adapter module(s) match no module (pooler.dense)" in message
    assert not (tmp_path / "out.onnx").exists()


def test_skip_unmatched_applies_the_rest(bert: dict, tmp_path: Path) -> None:
    for merge in (False, True):
        out = tmp_path / f"out_{merge}.onnx"
        result = apply_peft(bert["model"], bert["adapter"], output=out, skip_unmatched=True, merge=merge)
        assert sorted(result.peft.skipped_keys) == [
            "base_model.model.pooler.dense.lora_A.weight", "base_model.model.pooler.dense.lora_B.weight",
        ]  # fmt: skip
        assert any("--skip-unmatched" in w and "pooler.dense" in w for w in result.warnings)
        assert len(result.branches) == 4  # query and value of 2 layers
        assert rel_err(run(out, {"input_ids": IDS})[0], bert["expected"]) <= 1e-4


def test_cli_error_and_json(bert: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lora_onnx.cli.main import main

    args = ["inject", str(bert["model"]), "--peft", str(bert["adapter"]), "-o", str(tmp_path / "out.onnx")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-onnx: error: ") and err.count("\n") == 1
    assert "pooler.dense" in err and "--skip-unmatched" in err
    report = tmp_path / "report.json"
    assert main([*args, "--skip-unmatched", "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert "lora-onnx: warning: skipped 2 adapter key(s)" in captured.err
    data = json.loads(report.read_text())
    assert data["skipped_keys"] == [
        "base_model.model.pooler.dense.lora_A.weight", "base_model.model.pooler.dense.lora_B.weight",
    ]  # fmt: skip
    assert data["branches"] == 4 and len(data["modules"]) == 4
    assert main(["inject", str(bert["model"]), "-o", str(tmp_path / "x.onnx"), "--skip-unmatched"]) == 2


def test_genai_style_folder_with_external_data(bert: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(AdapterError, match=r"pooler\.dense.*tried model\.onnx.*--skip-unmatched"):
        apply_peft_folder(bert["genai"], bert["adapter"], out)
    result = apply_peft_folder(bert["genai"], bert["adapter"], out, skip_unmatched=True, validate=True)
    assert result.ok and len(result.skipped_keys) == 2
    # the model's data is written as a single model's output gets it, not copied as a side file
    assert sorted(p.name for p in result.copied) == ["genai_config.json", "tokenizer.json"]
    assert sorted(p.name for p in out.iterdir()) == [
        "genai_config.json",
        "model.onnx",
        "model.onnx.data",
        "tokenizer.json",
    ]  # fmt: skip  (rank-2 LoRA tensors are under 1 KiB: inline, no .lora.data)
    refs = {
        entry.value
        for tensor in onnx.load(out / "model.onnx", load_external_data=False).graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    assert refs == {"model.onnx.data"}
    assert rel_err(run(out / "model.onnx", {"input_ids": IDS})[0], bert["expected"]) <= 1e-4


def test_slots_and_export_adapter_skip_too(
    bert: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    from lora_onnx.cli.main import main

    slots = tmp_path / "slots.onnx"
    base = ["inject", str(bert["model"]), "--peft", str(bert["adapter"]), "-o", str(slots), "--as-inputs"]
    assert main(base) == 2 and "--skip-unmatched" in capsys.readouterr().err
    assert main([*base, "--skip-unmatched", "--validate"]) == 0
    assert "pooler.dense" in capsys.readouterr().err  # the warning names what was skipped
    export = [
        "export-adapter",
        "--peft",
        str(bert["adapter"]),
        "--for",
        str(slots),
        "-o",
        str(tmp_path / "a.onnx_adapter"),
    ]
    assert main(export) == 2 and "--skip-unmatched" in capsys.readouterr().err
    assert main([*export, "--skip-unmatched"]) == 0
    err = capsys.readouterr().err
    assert "skipped 2 adapter key(s)" in err and "pooler.dense.lora_A.weight" in err
    # the slotted model with that file active equals PEFT
    adapter = ort.LoraAdapter()
    adapter.Load(str(tmp_path / "a.onnx_adapter"))
    options = ort.RunOptions()
    options.add_active_adapter(adapter)
    session_options = ort.SessionOptions()
    session_options.log_severity_level = 3
    session = ort.InferenceSession(str(slots), session_options)
    (hidden,) = session.run(None, {"input_ids": IDS}, options)
    assert rel_err(hidden, bert["expected"]) <= 1e-4
