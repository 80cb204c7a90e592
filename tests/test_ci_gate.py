"""The example CI workflow (scripts/ci-gate.yml) runs as written: every lora-onnx command in it, in order,
after the install line, which must install lora-onnx itself at a pinned ref."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from batch_helpers import BUNDLED, MODELS, REPO, cli, dense_model, save

import lora_onnx

WORKFLOW = REPO / "scripts" / "ci-gate.yml"


#: The one install line every job runs: lora-onnx itself from its repository, pinned to this version's tag.
PINNED_INSTALL = re.compile(
    r'python -m pip install "lora-onnx @ git\+https://github\.com/[\w.-]+/lora-onnx@(?P<ref>[^"]+)"'
)


def commands(job: dict, **matrix: object) -> list[list[str]]:
    """The lora-onnx command lines of a job's steps, with ${{ matrix.* }} filled in.

    Every other run line must be the pinned install of lora-onnx; here its substitute is this checkout
    (``cli`` puts it first on PYTHONPATH), since installing from git needs the network and a published tag.
    """
    lines = []
    for step in job["steps"]:
        for line in str(step.get("run", "")).splitlines():
            for key, value in matrix.items():
                line = line.replace("${{ matrix.%s }}" % key, str(value))  # noqa: UP031
            if line.strip().startswith("lora-onnx "):
                assert "${{" not in line, line
                lines.append(shlex.split(line)[1:])
            elif line.strip():
                assert_pinned_install(line.strip())
    return lines


def assert_pinned_install(line: str) -> None:
    """The install line names lora-onnx (not the user's project) at a pinned ref: this release's tag."""
    match = PINNED_INSTALL.fullmatch(line)
    assert match, f"not the pinned lora-onnx install: {line}"
    assert match["ref"] == f"v{lora_onnx.__version__}", line


def test_every_job_installs_lora_onnx_pinned() -> None:
    jobs = yaml.safe_load(WORKFLOW.read_text())["jobs"]
    for name, job in jobs.items():
        installs = [s["run"] for s in job["steps"] if "pip install" in str(s.get("run", ""))]
        assert len(installs) == 1, name
        assert_pinned_install(installs[0].strip())
        assert "pip install ." not in installs[0]


def workspace(root: Path, name: str) -> Path:
    """A fresh checkout for one job (CI jobs run on separate machines): the models and the recipe."""
    folder = root / name
    for model in BUNDLED:
        shutil.copytree(MODELS / model, folder / "models" / model)
    (folder / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "ci-recipe.toml", folder / "scripts")
    return folder


@pytest.mark.slow
def test_ci_gate_workflow_runs_as_written(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    workflow = yaml.safe_load(WORKFLOW.read_text())
    jobs = workflow["jobs"]
    assert set(jobs) == {"convert", "gate", "validate"}
    assert any(PINNED_INSTALL.search(str(step.get("run", ""))) for step in jobs["convert"]["steps"])
    shards = jobs["convert"]["strategy"]["matrix"]["shard"]
    assert shards == [1, 2, 3]
    gate = workspace(tmp_path, "gate")
    (gate / "reports").mkdir()
    for shard in shards:
        monkeypatch.chdir(workspace(tmp_path, f"convert-{shard}"))
        (argv,) = commands(jobs["convert"], shard=shard)
        result = cli(*argv)
        assert result.returncode == 0, result.stdout + result.stderr
        for report in Path("reports").iterdir():  # the artifact upload / download
            shutil.copy(report, gate / "reports")

    monkeypatch.chdir(gate)
    (argv,) = commands(jobs["gate"])
    result = cli(*argv)
    assert result.returncode == 0, result.stdout + result.stderr
    merged = json.loads((gate / "reports" / "all.json").read_text())
    assert [m["path"] for m in merged["models"]] == [f"{name}/model.onnx" for name in BUNDLED]
    assert all(m["status"] == "ok" and m["validation"]["ok"] for m in merged["models"])
    assert merged["recipe"]["init"] == "random" and merged["recipe"]["validate"] is True
    assert (gate / "reports" / "all.xml").exists()

    monkeypatch.chdir(workspace(tmp_path, "validate"))
    for argv in commands(jobs["validate"]):
        result = cli(*argv)
        assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(Path("reports/validate.json").read_text())["ok"] is True


def test_validate_gate_fails_on_disagreement(tmp_path: Path) -> None:
    """The single-model gate: outputs that disagree exit 1 and say so in the JSON report."""
    reference = save(dense_model(0), tmp_path / "reference.onnx")
    candidate = save(dense_model(1), tmp_path / "candidate.onnx")  # other weights
    result = cli("validate", reference, candidate, "--json", tmp_path / "reports" / "v.json")
    assert result.returncode == 1
    report = json.loads((tmp_path / "reports" / "v.json").read_text())
    assert report["ok"] is False and report["outputs"][0]["name"] == "y"
    assert cli("validate", reference, reference).returncode == 0
