"""``lora-onnx batch``: many models, mirrored outputs, per-model reports, shards, parallel jobs."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from batch_helpers import (
    chaotic_model,
    cli,
    copy_bundled,
    custom_op_model,
    dense_model,
    files_under,
    no_site_model,
    save,
    tree_hashes,
)
from builders import run, write_adapter

from lora_onnx import LoraConfig, load_model, validate
from lora_onnx.commands.batch import BatchOptions, ModelJob, plan_batch, run_batch
from lora_onnx.commands.inspect import inspect_model
from lora_onnx.commands.reports import ModelReport, Shard, read_report
from lora_onnx.errors import LoraOnnxError, OutputError
from lora_onnx.model.manifest import read_branches


@pytest.fixture(scope="module")
def bundled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Copies of the four bundled models, shared read-only by this module's tests."""
    return copy_bundled(tmp_path_factory.mktemp("bundled") / "models")


def test_bundled_models_end_to_end(bundled: Path, tmp_path: Path) -> None:
    before = tree_hashes(bundled)
    out = tmp_path / "out"
    result = cli(
        "batch", bundled, "-o", out, "--init", "random", "--rank", "4", "--validate",
        "--report", tmp_path / "r.json", "--junit", tmp_path / "j.xml",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree_hashes(bundled) == before, "inputs are never modified"
    report = read_report(tmp_path / "r.json")
    assert [m.path for m in report.models] == [f"{n}/model.onnx" for n in sorted(os.listdir(bundled))]
    for entry in report.models:
        assert entry.status == "ok" and entry.validation and entry.validation["ok"]
        source = bundled / entry.path
        expected = inspect_model(source, LoraConfig(rank=4))
        assert entry.sites == len(expected.sites) and len(entry.skipped) == len(expected.skipped)
        output = out / entry.path
        assert Path(entry.output) == output
        written = load_model(output)  # checks its external data is present and complete
        assert len(read_branches(written.proto)) == entry.sites
        for location in written.external_refs().values():
            assert "/" not in location.location, "data lives beside the output, never through .."
    assert validate(out / "convnet/model.onnx", out / "convnet/model.onnx").ok
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert suite is not None and suite.get("tests") == "4" and suite.get("errors") == "0"
    assert "4 model(s): 4 ok" in result.stdout and "[4/4]" in result.stdout


def test_merge_writes_plain_models_equal_to_the_adapter(tmp_path: Path) -> None:
    source = save(dense_model(), tmp_path / "in" / "dense.onnx", external=True)
    out = tmp_path / "out"
    options = BatchOptions(LoraConfig(rank=2, init="random", seed=3), merge=True, validate=True)
    report = run_batch([source], out, options)
    (entry,) = report.models
    assert entry.status == "ok" and entry.sites == 2 and entry.validation["ok"]
    merged = load_model(out / "dense.onnx")
    assert [n.op_type for n in merged.proto.graph.node] == [n.op_type for n in dense_model().graph.node]
    assert read_branches(merged.proto) == ()
    assert not validate(source, out / "dense.onnx").ok, "a random adapter changes the outputs"


def test_one_failure_never_stops_the_others(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    save(dense_model(), inputs / "good" / "a.onnx")
    save(dense_model(1), inputs / "good" / "b.onnx", external=True)
    save(no_site_model(), inputs / "bad" / "no_site.onnx")
    save(custom_op_model(), inputs / "bad" / "custom.onnx")
    (inputs / "bad" / "text.onnx").write_text("not a model")
    before = tree_hashes(inputs)
    out = tmp_path / "out"
    result = cli("batch", inputs, "-o", out, "--validate", "--report", tmp_path / "r.json")
    assert result.returncode == 2, result.stdout + result.stderr
    report = read_report(tmp_path / "r.json")
    status = {m.path: m.status for m in report.models}
    assert status == {
        "bad/custom.onnx": "failed", "bad/no_site.onnx": "failed", "bad/text.onnx": "failed",
        "good/a.onnx": "ok", "good/b.onnx": "ok",
    }  # fmt: skip
    errors = {m.path: m.error or "" for m in report.models}
    assert (
        "com.example:Frobnicate" in errors["bad/custom.onnx"] and "custom.onnx" in errors["bad/custom.onnx"]
    )
    assert "no node that can take a LoRA branch" in errors["bad/no_site.onnx"]
    assert "dynamic_mm" in errors["bad/no_site.onnx"], "the error names the node and why it was skipped"
    assert "text.onnx: not an ONNX model" in errors["bad/text.onnx"]
    assert files_under(out) == ["good/a.onnx", "good/b.onnx", "good/b.onnx.data"]
    assert tree_hashes(inputs) == before
    for path in ("bad/custom.onnx", "bad/no_site.onnx", "bad/text.onnx"):
        assert f"lora-onnx: error: {path}: " in result.stderr


def test_validation_mismatch_exits_1_and_writes_nothing(tmp_path: Path) -> None:
    save(dense_model(), tmp_path / "in" / "fine.onnx")
    save(chaotic_model(), tmp_path / "in" / "chaotic.onnx")
    result = cli(
        "batch", tmp_path / "in", "-o", tmp_path / "out", "--init", "random", "--validate",
        "--junit", tmp_path / "j.xml",
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert files_under(tmp_path / "out") == ["fine.onnx"]
    assert "MISMATCH chaotic.onnx: validation failed: CPUExecutionProvider output 'chaotic'" in result.stdout
    case = next(c for c in ET.parse(tmp_path / "j.xml").iter("testcase") if c.get("name") == "chaotic.onnx")
    assert case.find("failure") is not None


def test_skip_existing_resumes_a_run(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for index in range(3):
        save(dense_model(index), inputs / f"m{index}.onnx")
    out = tmp_path / "out"
    first = run_batch([inputs], out, BatchOptions(LoraConfig(rank=2)))
    assert [m.status for m in first.models] == ["ok"] * 3
    (out / "m1.onnx").unlink()
    (out / "m2.onnx").write_bytes((out / "m2.onnx").read_bytes()[:100])  # a damaged earlier output
    kept = (out / "m0.onnx").stat().st_mtime_ns
    second = run_batch([inputs], out, BatchOptions(LoraConfig(rank=2), skip_existing=True))
    assert {m.path: m.status for m in second.models} == {
        "m0.onnx": "skipped",
        "m1.onnx": "ok",
        "m2.onnx": "ok",
    }
    assert second.models[0].sites == 2 and second.exit_code == 0
    assert (out / "m0.onnx").stat().st_mtime_ns == kept
    assert load_model(out / "m2.onnx") is not None


def test_layout_roots_for_files_and_globs(tmp_path: Path) -> None:
    for name in ("a", "b"):
        save(dense_model(), tmp_path / "in" / name / "model.onnx")
    single = plan_batch([tmp_path / "in" / "a" / "model.onnx"], tmp_path / "o1")
    assert [(j.path, j.output) for j in single.jobs] == [("model.onnx", tmp_path / "o1" / "model.onnx")]
    globbed = plan_batch([str(tmp_path / "in" / "*" / "model.onnx")], tmp_path / "o2")
    assert [j.path for j in globbed.jobs] == [
        "a/model.onnx",
        "b/model.onnx",
    ] and globbed.root == tmp_path / "in"
    mixed = plan_batch([tmp_path / "in" / "a", tmp_path / "in" / "b" / "model.onnx"], tmp_path / "o3")
    assert [j.path for j in mixed.jobs] == ["a/model.onnx", "b/model.onnx"]
    dupes = plan_batch([tmp_path / "in", tmp_path / "in" / "a" / "model.onnx"], tmp_path / "o4")
    assert len(dupes.jobs) == 2, "a model named twice is converted once"


def test_output_folder_rules(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    save(dense_model(), inputs / "m.onnx")
    with pytest.raises(OutputError, match="is the input folder"):
        plan_batch([inputs], inputs)
    with pytest.raises(OutputError, match="inside the output folder"):
        plan_batch([inputs / "m.onnx"], inputs)
    with pytest.raises(OutputError, match="inside the output folder"):
        plan_batch([inputs], tmp_path)
    # an output folder inside the input folder: earlier outputs are not inputs of the next run
    run_batch([inputs], inputs / "converted", BatchOptions(LoraConfig(rank=2)))
    again = plan_batch([inputs], inputs / "converted")
    assert [j.path for j in again.jobs] == ["m.onnx"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraOnnxError, match=r"no .onnx model in this folder"):
        plan_batch([tmp_path / "empty"], tmp_path / "o")
    with pytest.raises(LoraOnnxError, match=r"matches no .onnx model"):
        plan_batch([str(tmp_path / "in" / "*.nope")], tmp_path / "o")
    result = cli("batch", inputs, "-o", inputs)
    assert (
        result.returncode == 2 and result.stderr.count("\n") == 1 and "is the input folder" in result.stderr
    )


@pytest.mark.slow
def test_shards_partition_the_models_and_merge(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    names = [f"d{index}/model.onnx" for index in range(5)]
    for index, name in enumerate(names):
        save(dense_model(index), inputs / name)
    parts = [plan_batch([inputs], tmp_path / "out", Shard(i, 3)) for i in (1, 2, 3)]
    assigned = [[job.path for job in part.jobs] for part in parts]
    # documented rule: sorted relative paths, the k-th to shard k % 3 + 1
    assert assigned == [[names[0], names[3]], [names[1], names[4]], [names[2]]]
    assert [j.path for j in plan_batch([inputs], tmp_path / "out", Shard(1, 3)).jobs] == assigned[0]
    for index in (1, 2, 3):
        result = cli(
            "batch", inputs, "-o", tmp_path / "out", "--rank", "2", "--shard", f"{index}/3",
            "--report", tmp_path / f"s{index}.json", "--jobs", "2",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert f"(shard {index}/3 of 5 models)" in result.stdout
    assert files_under(tmp_path / "out") == names
    merged = cli(
        "report", "merge", *(tmp_path / f"s{i}.json" for i in (1, 2, 3)), "-o", tmp_path / "all.json",
        "--junit", tmp_path / "all.xml",
    )  # fmt: skip
    assert merged.returncode == 0, merged.stderr
    data = json.loads((tmp_path / "all.json").read_text())
    assert [m["path"] for m in data["models"]] == names and data["shards"] == [1, 2, 3]
    assert ET.parse(tmp_path / "all.xml").getroot().get("tests") == "5"
    partial = cli("report", "merge", tmp_path / "s1.json", tmp_path / "s3.json")
    assert partial.returncode == 2 and "shard(s) 2/3 missing" in partial.stderr


@pytest.mark.slow
def test_report_merge_exit_code_follows_the_models(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    save(dense_model(), inputs / "a.onnx")
    (inputs / "b.onnx").write_text("garbage")
    for index in (1, 2):
        cli(
            "batch",
            inputs,
            "-o",
            tmp_path / "out",
            "--shard",
            f"{index}/2",
            "--report",
            tmp_path / f"{index}.json",
        )
    merged = cli("report", "merge", tmp_path / "1.json", tmp_path / "2.json")
    assert merged.returncode == 2 and "b.onnx: " in merged.stderr and "1 ok, 1 failed" in merged.stdout


def test_parallel_jobs_match_serial(tmp_path: Path, bundled: Path) -> None:
    options = BatchOptions(
        LoraConfig(rank=4, init="random", seed=5, rank_pattern={"depthwise": 32}), validate=True
    )
    serial = run_batch([bundled], tmp_path / "serial", options, jobs=1)
    parallel = run_batch([bundled], tmp_path / "parallel", options, jobs=2)
    assert [(m.path, m.status, m.sites) for m in serial.models] == [
        (m.path, m.status, m.sites) for m in parallel.models
    ]
    assert all(m.status == "ok" for m in parallel.models)
    assert tree_hashes(tmp_path / "serial") == tree_hashes(tmp_path / "parallel"), "same bytes either way"


def test_a_killed_job_fails_only_its_model(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for index in range(3):
        save(dense_model(index), inputs / f"m{index}.onnx")

    def kill_m1(job: ModelJob) -> None:
        # Jobs go out in sorted order, one to each new worker: worker 2 has just received m1. Kill it
        # as the OOM killer would, before it can finish.
        if job.path == "m1.onnx":
            (worker,) = [p for p in multiprocessing.active_children() if p.name == "lora-onnx worker 2"]
            os.kill(worker.pid, signal.SIGKILL)

    seen: list[ModelReport] = []
    report = run_batch(
        [inputs], tmp_path / "out", BatchOptions(LoraConfig(rank=2), validate=True), jobs=2,
        on_start=kill_m1, on_result=seen.append,
    )  # fmt: skip
    status = {m.path: m.status for m in report.models}
    assert status == {"m0.onnx": "ok", "m1.onnx": "failed", "m2.onnx": "ok"}
    assert "killed by SIGKILL" in (report.models[1].error or "")
    assert len(seen) == 3 and files_under(tmp_path / "out") == ["m0.onnx", "m2.onnx"]
    assert not [p for p in multiprocessing.active_children() if p.name.startswith("lora-onnx")], "all joined"


def test_progress_bar_on_a_terminal_and_plain_lines_otherwise(tmp_path: Path) -> None:
    save(dense_model(), tmp_path / "in" / "a.onnx")
    plain = cli("batch", tmp_path / "in", "-o", tmp_path / "o1")
    assert plain.returncode == 0 and "\x1b[" not in plain.stdout
    assert "[1/1] ok       a.onnx: 2 site(s)" in plain.stdout
    tty = cli(
        "batch", tmp_path / "in", "-o", tmp_path / "o2", env={"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1"}
    )
    assert tty.returncode == 0, tty.stderr
    assert "\x1b[" in tty.stdout and "1/1" in tty.stdout and "━" in tty.stdout, "a rich progress bar"


@pytest.mark.slow
def test_config_file_with_flag_overrides(tmp_path: Path) -> None:
    save(dense_model(), tmp_path / "in" / "a.onnx")
    config = tmp_path / "recipe.toml"
    config.write_text('rank = 2\ntarget = ["fc1"]\ninit = "random"\nvalidate = true\nmerge = false\n')
    result = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--config", config, "--rank", "3",
                 "--report", tmp_path / "r.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = read_report(tmp_path / "r.json")
    assert report.recipe["rank"] == 3 and report.recipe["target"] == ["fc1"] and report.recipe["validate"]
    (entry,) = report.models
    assert entry.sites == 1 and entry.validation is not None
    branches = read_branches(onnx.load(tmp_path / "out" / "a.onnx", load_external_data=False))
    assert [(b.module_path, b.rank) for b in branches] == [("fc1", 3)]
    config.write_text("rank = 2\nrnak = 4\n")
    bad = cli("batch", tmp_path / "in", "-o", tmp_path / "out2", "--config", config)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and not (tmp_path / "out2").exists()
    assert f"{config}: unknown key 'rnak' (did you mean 'rank'?)" in bad.stderr


def test_peft_adapter_config_as_a_recipe(tmp_path: Path) -> None:
    save(dense_model(), tmp_path / "in" / "a.onnx")
    config = tmp_path / "adapter_config.json"
    config.write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["fc2"]}))
    result = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--config", config, "--validate")
    assert result.returncode == 0, result.stderr
    branches = read_branches(onnx.load(tmp_path / "out" / "a.onnx"))
    assert [(b.module_path, b.rank, b.scale) for b in branches] == [("fc2", 2, 2.0)]


@pytest.mark.slow
def test_a_trained_peft_adapter_is_applied_to_every_model(tmp_path: Path) -> None:
    save(dense_model(0), tmp_path / "in" / "a.onnx")
    save(dense_model(1), tmp_path / "in" / "sub" / "b.onnx", external=True)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 8)).astype(np.float32), rng.standard_normal((4, 2)).astype(np.float32)
    adapter = write_adapter(
        tmp_path / "adapter",
        {"base_model.model.fc2.lora_A.weight": a, "base_model.model.fc2.lora_B.weight": b},
        target_modules=["fc2"],
    )
    result = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--peft", adapter, "--validate",
                 "--report", tmp_path / "r.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert [(m.path, m.status, m.sites) for m in read_report(tmp_path / "r.json").models] == [
        ("a.onnx", "ok", 1), ("sub/b.onnx", "ok", 1)
    ]  # fmt: skip
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
    for name in ("a.onnx", "sub/b.onnx"):
        base = run(tmp_path / "in" / name, {"x": x})[0]
        applied = run(tmp_path / "out" / name, {"x": x})[0]
        hidden = np.maximum(x @ load_model(tmp_path / "in" / name).array("fc1.weight"), 0)
        assert np.allclose(applied, base + 2.0 * hidden @ a.T @ b.T, rtol=1e-5, atol=1e-5)
    missing = cli("batch", tmp_path / "in", "-o", tmp_path / "out2", "--peft", tmp_path / "nope")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and not (tmp_path / "out2").exists()
    both = cli("batch", tmp_path / "in", "-o", tmp_path / "out3", "--peft", adapter, "--rank", "4")
    assert both.returncode == 2 and "rank cannot apply to it" in both.stderr


def test_unusable_provider_fails_the_run_once(tmp_path: Path) -> None:
    save(dense_model(), tmp_path / "in" / "a.onnx")
    result = cli("batch", tmp_path / "in", "-o", tmp_path / "out", "--validate", "--providers", "cuda")
    assert result.returncode == 2 and "CUDAExecutionProvider was requested" in result.stderr
    assert not (tmp_path / "out").exists()


def test_rerun_into_the_same_outputs(bundled: Path, tmp_path: Path) -> None:
    """Regression: an earlier output's data file is a hard link to the input's data; replacing it on a
    re-run must not be mistaken for overwriting the input (it was refused before)."""
    before = tree_hashes(bundled)
    out = tmp_path / "out"
    options = BatchOptions(LoraConfig(rank=2, init="random"))
    first = run_batch([bundled / "tiny_llama", bundled / "convnet"], out, options)
    second = run_batch([bundled / "tiny_llama", bundled / "convnet"], out, BatchOptions(LoraConfig(rank=4)))
    assert [m.status for m in first.models] == [m.status for m in second.models] == ["ok", "ok"]
    for entry in second.models:
        assert {b.rank for b in read_branches(load_model(entry.output).proto)} == {4}
        assert validate(entry.source, entry.output).ok, "rank 4 default init: outputs unchanged"
    assert tree_hashes(bundled) == before
    again = cli("inject", bundled / "tiny_llama/model.onnx", "-o", out / "tiny_llama/model.onnx")
    assert again.returncode == 0, again.stderr


def test_an_internal_error_is_recorded_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug (not a user error) in one model's conversion: that model fails with its traceback."""
    import lora_onnx.commands.batch as batch

    for index in range(3):
        save(dense_model(index), tmp_path / "in" / f"m{index}.onnx")
    real = batch.apply_config

    def flaky(source, config, options):  # type: ignore[no-untyped-def]
        if source.path.name == "m1.onnx":
            raise ZeroDivisionError("simulated bug")
        return real(source, config, options)

    monkeypatch.setattr(batch, "apply_config", flaky)
    report = run_batch([tmp_path / "in"], tmp_path / "out", BatchOptions(LoraConfig(rank=2)))
    assert [m.status for m in report.models] == ["ok", "failed", "ok"]
    broken = report.models[1]
    assert broken.error is not None and "internal error (ZeroDivisionError: simulated bug)" in broken.error
    assert broken.traceback is not None and "flaky" in broken.traceback
    assert files_under(tmp_path / "out") == ["m0.onnx", "m2.onnx"]


def test_thread_cap_for_onnxruntime_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_onnx.proofs.validation import THREADS_ENV, create_session

    path = save(dense_model(), tmp_path / "m.onnx")
    monkeypatch.setenv(THREADS_ENV, "1")
    session = create_session(path, "CPUExecutionProvider")
    assert session.get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(LoraOnnxError, match="LORA_ONNX_THREADS must be a positive whole number"):
        create_session(path, "CPUExecutionProvider")
