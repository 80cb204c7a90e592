"""sympy (which onnx-ir imports) is loaded only when something uses it: a command never does, and the
first use anywhere gets the real module (lora_onnx.common.deferred_imports)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from builders import MODELS

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_inject_and_merge_never_load_sympy(tmp_path: Path) -> None:
    code = f"""
import sys
import lora_onnx
from lora_onnx import LoraConfig
base, out = {str(MODELS / "tiny_llama" / "model.onnx")!r}, {str(tmp_path / "lora.onnx")!r}
assert lora_onnx.inject(base, LoraConfig(init="random"), output=out, validate=True).validation.ok
lora_onnx.merge(out, output={str(tmp_path / "merged.onnx")!r}, validate=True)
modules = [sys.modules[name] for name in ("sympy", "onnx_ir._symbolic_shapes")]
print([type(m).__name__ != "_Deferred" or m.__dict__.get("_lora_onnx_loaded", False) for m in modules])
"""
    assert _run(code) == "[False, False]"


def test_the_first_use_gets_the_real_sympy() -> None:
    code = """
import lora_onnx.model.graph
import onnx_ir as ir
import sympy.core.symbol
import sympy
from sympy import Max
print(sympy.Symbol("x") + 1, ir.SymbolicDim("n") * 2, Max(1, 2), sympy.core.symbol.Symbol is sympy.Symbol)
"""
    assert _run(code) == "x + 1 2*n 2 True"


def test_torch_exports_after_lora_onnx_deferred_sympy(tmp_path: Path) -> None:
    """torch's exporter is sympy's heaviest user: a dynamo export with a dynamic dim, then an inject."""
    code = f"""
import lora_onnx
import torch
model = torch.nn.Sequential(torch.nn.Linear(4, 3))
path = {str(tmp_path / "m.onnx")!r}
torch.onnx.export(model, (torch.randn(2, 4),), path, dynamo=True,
                  dynamic_shapes={{"input": {{0: torch.export.Dim("batch")}}}})
print(lora_onnx.inject(path, output={str(tmp_path / "o.onnx")!r}, validate=True).validation.ok)
"""
    assert _run(code).splitlines()[-1] == "True"
