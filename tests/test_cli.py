"""The command line end to end: outputs, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from builders import MODELS

BERT = MODELS / "tiny_bert" / "model.onnx"
CONV = MODELS / "convnet" / "model.onnx"


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lora_onnx", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("lora-onnx: error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.slow
def test_inject_merge_validate_round_trip(tmp_path: Path) -> None:
    lora, merged = tmp_path / "lora.onnx", tmp_path / "merged.onnx"
    result = cli(
        "inject", CONV, "-o", lora, "--rank", "4", "--init", "random", "--exclude", "depthwise", "--validate"
    )
    assert result.returncode == 0, result.stderr
    assert "all outputs agree" in result.stdout and lora.exists()
    result = cli("merge", lora, "-o", merged, "--validate")
    assert result.returncode == 0 and "Folded 8 branch(es)" in result.stdout
    report = tmp_path / "report.json"
    result = cli("validate", lora, merged, "--json", report, "--dim", "batch=3")
    assert result.returncode == 0
    data = json.loads(report.read_text())
    assert data["ok"] and data["inputs"]["input"] == [3, 3, 32, 32]


@pytest.mark.slow
def test_validate_mismatch_exits_1_with_a_report(tmp_path: Path) -> None:
    lora = tmp_path / "lora.onnx"
    assert cli("inject", BERT, "-o", lora, "--init", "random", "--alpha", "64").returncode == 0
    report = tmp_path / "r.json"
    result = cli("validate", BERT, lora, "--json", report)
    assert result.returncode == 1 and "disagree" in result.stdout
    assert json.loads(report.read_text())["ok"] is False
    loose = cli("validate", BERT, lora, "--rtol", "logits:1e9")
    assert loose.returncode == 0


def test_inspect_table_and_json() -> None:
    table = cli("inspect", BERT, "--rank", "4", "--target", "query")
    assert table.returncode == 0 and "bert.encoder.layer.0.attention.self.query" in table.stdout
    assert "Skipped nodes" in table.stdout and "not a constant" in table.stdout
    data = json.loads(cli("inspect", BERT, "--json", "--rank", "2").stdout)
    assert data["totals"]["sites"] == 14 and len(data["sites"]) == 14
    row = next(s for s in data["sites"] if s["module_path"] == "classifier")
    assert row["a_shape"] == [64, 2] and row["b_shape"] == [2, 3] and row["lora_params"] == 134


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("inject", "missing.onnx", "-o", "x.onnx"), ("missing.onnx", "no such file")),
        (("inject", BERT, "-o", "x.onnx", "--target", "qurey"), ("qurey", "nearest module paths")),
        (("inject", BERT, "-o", BERT), ("refusing to overwrite the input",)),
        (("inject", BERT, "-o", "x.onnx", "--rank", "0"), ("--rank must be a positive",)),
        (("inject", BERT, "-o", "x.onnx", "--rank-pattern", "query"), ("--rank-pattern takes KEY=VALUE",)),
        (("merge", BERT, "-o", "x.onnx"), ("carries no lora-onnx branches",)),
        (("validate", BERT, BERT, "--providers", "cuda"), ("CUDAExecutionProvider was requested",)),
    ],
)
def test_user_errors_are_one_line_with_exit_2(tmp_path: Path, args, fragments) -> None:
    result = cli(*args, cwd=tmp_path)
    if "cuda" in args and result.returncode == 0:
        pytest.skip("this machine has a usable CUDA provider")
    assert_one_line_error(result, 2, *fragments)
    assert not (tmp_path / "x.onnx").exists()


def test_help_lists_every_command() -> None:
    result = cli("--help")
    for command in ("inject", "merge", "validate", "inspect"):
        assert command in result.stdout
