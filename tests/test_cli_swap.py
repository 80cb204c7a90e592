"""The run-time adapter commands end to end: inject --as-inputs, export-adapter, check-adapter, merge
--adapter-file; exit codes 0 / 1 / 2 and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from builders import MODELS
from test_cli import assert_one_line_error, cli

BERT = MODELS / "tiny_bert" / "model.onnx"
GPT2 = MODELS / "tiny_gpt2" / "model.onnx"


@pytest.mark.slow
def test_slots_adapter_file_check_and_fold_round_trip(tmp_path: Path) -> None:
    slots, adapter = tmp_path / "slots.onnx", tmp_path / "a.onnx_adapter"
    result = cli(
        "inject", BERT, "-o", slots, "--as-inputs", "--strength-input", "--rank", "4", "--init", "random",
        "--target", "query", "value", "--adapter-out", adapter, "--validate",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "No adapter active vs base (must be exact): all outputs agree" in result.stdout
    assert "Adapter active vs the same tensors as constant branches: all outputs agree" in result.stdout
    assert "Added 4 LoRA slot(s)" in result.stdout and "default.lora_strength" in result.stdout
    ort.LoraAdapter().Load(str(adapter))

    check = cli("check-adapter", slots, adapter)
    assert check.returncode == 0 and "fits" in check.stdout and "8 ok" in check.stdout

    merged = cli("merge", slots, "-o", tmp_path / "m.onnx", "--adapter-file", adapter, "--validate")
    assert merged.returncode == 0, merged.stderr
    assert "Folded 4 branch(es)" in merged.stdout and "all outputs agree" in merged.stdout


@pytest.mark.slow
def test_export_adapter_from_a_constant_model_in_each_format(tmp_path: Path) -> None:
    constant = tmp_path / "c.onnx"
    assert (
        cli(
            "inject", GPT2, "-o", constant, "--rank", "2", "--init", "random", "--target", "c_attn"
        ).returncode
        == 0
    )
    slots = tmp_path / "s.onnx"
    assert cli("inject", GPT2, "-o", slots, "--as-inputs", "--target", "c_attn", "c_proj").returncode == 0
    for name in ("a.onnx_adapter", "a.safetensors", "a.npz"):
        result = cli("export-adapter", constant, "--for", slots, "-o", tmp_path / name)
        assert result.returncode == 0, result.stderr
        assert "12 tensors for 6 slot(s); 4 left empty" in result.stdout
        assert cli("check-adapter", slots, tmp_path / name).returncode == 0
    adapter = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter"))
    with np.load(tmp_path / "a.npz") as npz:
        for key, value in adapter.get_parameters().items():
            assert np.array_equal(value.numpy(), npz[key])


@pytest.mark.slow
def test_check_adapter_exit_codes_and_json(tmp_path: Path) -> None:
    bert_slots, gpt2_slots = tmp_path / "bert.onnx", tmp_path / "gpt2.onnx"
    gpt2_adapter = tmp_path / "gpt2.onnx_adapter"
    assert cli("inject", BERT, "-o", bert_slots, "--as-inputs", "--target", "query").returncode == 0
    made = cli(
        "inject", GPT2, "-o", gpt2_slots, "--as-inputs", "--target", "c_attn", "--adapter-out", gpt2_adapter
    )
    assert made.returncode == 0, made.stderr
    rejected = cli("check-adapter", bert_slots, gpt2_adapter)
    assert rejected.returncode == 1 and "does NOT fit" in rejected.stdout and "UNEXPECTED" in rejected.stdout
    report = json.loads(cli("check-adapter", bert_slots, gpt2_adapter, "--json").stdout)
    assert report["ok"] is False and report["counts"] == {"missing": 4, "unexpected": 4}
    junk = tmp_path / "junk.onnx_adapter"
    junk.write_bytes(b"junk")
    assert_one_line_error(cli("check-adapter", bert_slots, junk), 2, "junk.onnx_adapter", "not a readable")
    assert_one_line_error(cli("check-adapter", BERT, gpt2_adapter), 2, "has no LoRA slots")


@pytest.mark.slow
def test_user_errors_of_the_slot_commands(tmp_path: Path) -> None:
    assert_one_line_error(
        cli("export-adapter", "-o", tmp_path / "a.onnx_adapter"), 2, "give MODEL", "--peft DIR --for MODEL"
    )
    assert_one_line_error(cli("export-adapter", BERT, "-o", tmp_path / "a.bin"), 2, "suffix '.bin'")
    assert_one_line_error(cli("export-adapter", BERT, "-o", tmp_path / "a.npz"), 2, "no lora-onnx branches")
    no_adapter = cli("inject", BERT, "-o", tmp_path / "x.onnx", "--as-inputs", "--peft", tmp_path / "none")
    assert_one_line_error(no_adapter, 2, str(tmp_path / "none"))
    assert not list(tmp_path.iterdir())


def test_help_lists_the_adapter_commands() -> None:
    result = cli("--help")
    assert "export-adapter" in result.stdout and "check-adapter" in result.stdout
