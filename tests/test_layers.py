"""The package layering (pyproject ``[tool.importlinter]``, README "Code map") holds: each layer imports only
from the layers below it. import-linter reads every import statement, call-time ones included."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_layer_imports_only_from_the_layers_below() -> None:
    # The repository's package, not an installed copy (CI installs the project non-editable).
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lint-imports"))],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pipeline layers KEPT" in done.stdout


def test_the_contract_names_every_package() -> None:
    """A new package must take a place in the layers, or the contract would not check it."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    layered = {name.strip() for layer in contract["layers"] for name in layer.split("|")}
    packages = {
        f"lora_onnx.{path.parent.name}"
        for path in (REPO / "lora_onnx").glob("*/__init__.py")
        if path.parent.name != "__pycache__"
    }
    assert packages == layered, f"packages outside the layers: {sorted(packages - layered)}"
