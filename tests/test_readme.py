"""The README's examples run as written: the quickstart's inject command and every Python block."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from builders import REPO

README = (REPO / "README.md").read_text()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def _workdir(tmp_path: Path) -> Path:
    (tmp_path / "models").symlink_to(REPO / "models")
    return tmp_path


@pytest.mark.slow
def test_quickstart_has_two_commands_and_the_first_runs(tmp_path: Path) -> None:
    quickstart = _blocks("bash")[0].strip().splitlines()
    assert len(quickstart) == 2
    assert quickstart[1] == 'python -m pip install ".[test]" && python -m pytest'
    install, run = quickstart[0].split(" && ", 1)
    assert install == "python -m pip install ."
    args = shlex.split(run)
    assert args[:3] == ["python", "-m", "lora_onnx"]
    result = subprocess.run(
        [sys.executable, *args[1:]], cwd=_workdir(tmp_path), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "all outputs agree" in result.stdout and (tmp_path / "out" / "tiny_llama_lora.onnx").exists()


def test_ci_runs_the_readme_test_command() -> None:
    assert 'python -m pip install ".[test]" && python -m pytest' in (REPO / ".ci" / "run").read_text()


@pytest.mark.slow
def test_python_examples(tmp_path: Path) -> None:
    blocks = _blocks("python")
    assert blocks
    workdir = _workdir(tmp_path)  # once: the blocks share one folder (and its models link)
    for code in blocks:
        result = subprocess.run([sys.executable, "-c", code], cwd=workdir, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
