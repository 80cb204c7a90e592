"""The example CI workflow (scripts/ci-gate.yml) runs as written: every lora-onnx command in it, in order."""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import pytest
import yaml
from batch_helpers import BUNDLED, MODELS, REPO, cli, dense_model, save

WORKFLOW = REPO / "scripts" / "ci-gate.yml"


def commands(job: dict, **matrix: object) -> list[list[str]]:
    """The lora-onnx command lines of a job's steps, with ${{ matrix.* }} filled in."""
    lines = []
    for step in job["steps"]:
        for line in str(step.get("run", "")).splitlines():
            for key, value in matrix.items():
                line = line.replace("${{ matrix.%s }}" % key, str(value))  # noqa: UP031
            if line.strip().startswith("lora-onnx "):
                assert "${{" not in line, line
                lines.append(shlex.split(line)[1:])
    return lines


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
    assert any("pip install ." in str(step.get("run", "")) for step in jobs["convert"]["steps"])
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
