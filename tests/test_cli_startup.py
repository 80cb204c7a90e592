"""Start-up cost: ``--help``, ``--version`` and argument errors import neither onnx nor onnxruntime, and
``import lora_onnx`` loads the library lazily while every public name still works."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from builders import MODELS

import lora_onnx

BERT = MODELS / "tiny_bert" / "model.onnx"
HEAVY = ("onnx", "onnxruntime", "numpy", "rich", "ml_dtypes")


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run ``python -X importtime ARGS``; the result and the names of every module it imported."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *args], capture_output=True, text=True, timeout=120
    )
    # "import time:   self [us] | cumulative | module" (the module name is indented by its depth)
    lines = [line for line in result.stderr.splitlines() if line.startswith("import time:")]
    modules = {line.rsplit("|", 1)[1].strip() for line in lines[1:]}  # [0] is the header
    return result, modules


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("--help",), 0),
        (("--version",), 0),
        (("inject", "--help"), 0),
        (("inspect", "--help"), 0),
        (("batch", "--help"), 0),
        (("report", "merge", "--help"), 0),
        (("inject",), 2),  # missing MODEL and -o
        (("inject", str(BERT), "-o", "x.onnx", "--rank", "four"), 2),
        (("inspect", str(BERT), "--init", "random"), 2),  # not an inspect option
        (("no-such-command",), 2),
    ],
)
def test_help_version_and_argument_errors_import_no_onnx(args: tuple[str, ...], code: int) -> None:
    result, modules = imported_modules("-m", "lora_onnx", *args)
    assert result.returncode == code, result.stderr[-2000:]
    assert "lora_onnx.cli.main" in modules
    assert not heavy(modules), f"lora-onnx {' '.join(args)} imported {heavy(modules)}"
    if code == 2:
        assert "Traceback" not in result.stderr and "error:" in result.stderr


def test_import_lora_onnx_is_light_and_loads_a_name_on_first_use() -> None:
    _, modules = imported_modules("-c", "import lora_onnx")
    assert "lora_onnx" in modules and not heavy(modules), heavy(modules)
    # (importlib.import_module, which __getattr__ uses, is not itself logged by -X importtime)
    code = (
        "import sys, lora_onnx; assert 'lora_onnx.commands.inspect' not in sys.modules; "
        "from lora_onnx import inspect_model; assert 'lora_onnx.commands.inspect' in sys.modules; "
        "assert inspect_model.__module__ == 'lora_onnx.commands.inspect'"
    )
    result, modules = imported_modules("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnx" in modules


def test_a_command_imports_what_it_uses(tmp_path) -> None:
    # inject without --validate never opens an onnxruntime session, and -q draws no table.
    result, modules = imported_modules(
        "-m", "lora_onnx", "inject", str(BERT), "-o", str(tmp_path / "b.onnx"), "-q"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "onnx" in modules and "lora_onnx.commands.inject" in modules
    assert "onnxruntime" not in modules and "rich" not in modules
    assert "lora_onnx.adapters.peft" not in modules and "lora_onnx.commands.inject_mixed" not in modules


def test_public_api_resolves_to_the_defining_modules() -> None:
    for name in lora_onnx.__all__:
        module, attribute = lora_onnx._LAZY[name]
        assert getattr(lora_onnx, name) is getattr(importlib.import_module(f"lora_onnx.{module}"), attribute)
    assert lora_onnx.inspect is lora_onnx.inspect_model
    assert set(lora_onnx.__all__) <= set(dir(lora_onnx))
    with pytest.raises(AttributeError, match="no_such_name"):
        lora_onnx.no_such_name  # noqa: B018
    from lora_onnx import LoraConfig, inject, validate  # the documented spellings

    assert callable(inject) and callable(validate) and LoraConfig(rank=2).rank == 2


def test_star_import_in_a_fresh_interpreter() -> None:
    code = "from lora_onnx import *; import lora_onnx; assert all(n in globals() for n in lora_onnx.__all__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
