"""``--inputs FILE.npz`` on every command that proves, for models generated inputs cannot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import make_model, rng_array, write_adapter
from onnx import TensorProto, helper
from test_cli import assert_one_line_error, cli

F, I64 = TensorProto.FLOAT, TensorProto.INT64
ROWS = 4  # the table's rows: generated ids (0..15) index past them, since an Add hides the table


def _model(tmp_path: Path) -> Path:
    nodes = [
        helper.make_node("Add", ["idx", "zero"], ["shifted"], name="/shift/Add"),
        helper.make_node("Gather", ["table", "shifted"], ["e"], name="/embed/Gather"),
        helper.make_node("MatMul", ["e", "W"], ["h"], name="/fc/MatMul"),
        helper.make_node("MatMul", ["h", "W2"], ["y"], name="/head/MatMul"),
    ]
    inits = {
        "zero": np.zeros((1,), np.int64), "table": rng_array((ROWS, 8), 1), "W": rng_array((8, 6), 2),
        "W2": rng_array((6, 3), 3),
    }  # fmt: skip
    path = tmp_path / "base.onnx"
    onnx.save(make_model(nodes, {"idx": (I64, ["batch", 3])}, ["y"], inits), path)
    return path


def _adapter(tmp_path: Path, name: str, seed: int) -> Path:
    tensors = {
        "base_model.model.fc.lora_A.weight": rng_array((2, 8), seed),
        "base_model.model.fc.lora_B.weight": rng_array((6, 2), seed + 1),
    }
    return write_adapter(tmp_path / name, tensors, target_modules=["fc"])


@pytest.mark.slow
def test_every_proving_command_takes_inputs_where_generated_ones_cannot_run(tmp_path: Path) -> None:
    base = _model(tmp_path)
    adapter, other = _adapter(tmp_path, "a", 1), _adapter(tmp_path, "b", 5)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, idx=np.array([[0, 1, 2], [3, 2, 1], [1, 1, 0]], np.int64))
    lora, slots, mixed = tmp_path / "lora.onnx", tmp_path / "slots.onnx", tmp_path / "mixed.onnx"
    commands = [
        ("inject", base, "-o", tmp_path / "fresh.onnx", "--init", "random", "--validate"),
        ("inject", base, "-o", lora, "--peft", adapter, "--validate"),
        ("merge", lora, "-o", tmp_path / "merged.onnx", "--validate"),
        ("inject", base, "-o", slots, "--as-inputs", "--peft", adapter, "--validate"),
        ("inject", base, "-o", mixed, "--mixed", "--peft", adapter, "--peft", other, "--validate"),
        ("batch", base, "-o", tmp_path / "batch", "--peft", adapter, "--validate"),
    ]
    for args in commands:
        generated = cli(*args)  # ids past the table's rows: onnxruntime refuses the run
        assert generated.returncode == 2, (args[0], generated.stderr)
        if args[0] != "batch":  # batch reports per model
            assert_one_line_error(generated, 2, "onnxruntime failed to run")
        given = cli(*args, "--inputs", inputs)
        assert given.returncode == 0, (args[0], given.stderr)
    compared = cli("validate", base, lora, "--inputs", inputs)
    assert compared.returncode == 1  # the adapter changes y: validate compares on the file's ids


def test_inputs_without_validate_or_beside_dim_is_refused(tmp_path: Path) -> None:
    base = _model(tmp_path)
    inputs = tmp_path / "inputs.npz"
    np.savez(inputs, idx=np.zeros((2, 3), np.int64))
    out = tmp_path / "out.onnx"
    assert_one_line_error(cli("inject", base, "-o", out, "--inputs", inputs), 2, "add --validate")
    assert_one_line_error(
        cli("inject", base, "-o", out, "--validate", "--inputs", inputs, "--dim", "batch=2"), 2, "--dim"
    )
    assert_one_line_error(cli("batch", base, "-o", tmp_path / "b", "--inputs", inputs), 2, "add --validate")
    missing = tmp_path / "other.npz"
    np.savez(missing, ids=np.zeros((2, 3), np.int64))
    lora = tmp_path / "lora.onnx"
    assert cli("inject", base, "-o", lora, "--init", "random").returncode == 0
    assert_one_line_error(
        cli("merge", lora, "-o", out, "--validate", "--inputs", missing), 2, "has no array 'idx'"
    )
    assert not out.exists()
