"""Batch reports: JSON round trip, JUnit XML, exit codes, merging shard reports."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import pytest

from lora_onnx.commands.reports import (
    BatchReport,
    ModelReport,
    ReportError,
    Shard,
    SkippedNode,
    junit_xml,
    merge_reports,
    parse_shard,
    read_report,
    write_junit,
    write_report,
)

VALIDATION_FAIL = {
    "ok": False,
    "providers": ["CPUExecutionProvider"],
    "outputs": [
        {"provider": "CPUExecutionProvider", "name": "y", "shape": [2], "max_abs": 0.5, "max_rel": 0.1,
         "rtol": 1e-4, "atol": 1e-5, "ok": False, "note": ""},
    ],
}  # fmt: skip


def model(path: str, status: str = "ok", **fields: object) -> ModelReport:
    return ModelReport(path=path, source=f"/in/{path}", output=f"/out/{path}", status=status, **fields)


def report(
    models: tuple[ModelReport, ...], shard: Shard | None = None, total: int | None = None
) -> BatchReport:
    return BatchReport(
        models=models,
        recipe={"rank": 4},
        recipe_digest="abc",
        total=total if total is not None else len(models),
        shard_count=shard.count if shard else 0,
        shards=(shard.index,) if shard else (),
        seconds=1.5,
    )


def test_exit_code_and_counts() -> None:
    assert report((model("a"), model("b", "skipped"))).exit_code == 0
    assert report((model("a"), model("b", "mismatch", validation=VALIDATION_FAIL))).exit_code == 1
    mixed = report((model("a", "failed", error="boom"), model("b", "mismatch")))
    assert mixed.exit_code == 2 and mixed.counts == {"ok": 0, "mismatch": 1, "failed": 1, "skipped": 0}
    with pytest.raises(ValueError, match="unknown status"):
        model("a", "weird")


def test_json_round_trip(tmp_path: Path) -> None:
    original = report(
        (
            model("a/x.onnx", sites=3, lora_params=96, skipped=(SkippedNode("n", "MatMul", "m", "why"),),
                  warnings=("w",), seconds=0.25),
            model("b/y.onnx", "mismatch", validation=VALIDATION_FAIL),
            model("c.onnx", "failed", error="c.onnx: no such file"),
        ),
        Shard(2, 3),
        total=9,
    )  # fmt: skip
    path = write_report(tmp_path / "r.json", original)
    data = json.loads(path.read_text())
    assert data["format"] == "lora-onnx-batch-report" and data["exit_code"] == 2
    assert data["summary"] == {"ok": 1, "mismatch": 1, "failed": 1, "skipped": 0, "models": 3, "seconds": 1.5}
    assert data["models"][1]["mismatches"][0].startswith("CPUExecutionProvider output 'y': max abs err 0.5")
    back = read_report(path)
    assert back.models == original.models
    assert (back.total, back.shard_count, back.shards, back.recipe_digest) == (9, 3, (2,), "abc")
    assert not list(tmp_path.glob(".*tmp*")), "no temporary file is left behind"


def test_read_report_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="no such report"):
        read_report(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(ReportError, match=r"x.json: not a JSON report"):
        read_report(tmp_path / "x.json")
    (tmp_path / "y.json").write_text('{"models": []}')
    with pytest.raises(ReportError, match=r"y.json: not a lora-onnx batch report"):
        read_report(tmp_path / "y.json")
    (tmp_path / "z.json").write_text('{"format": "lora-onnx-batch-report", "version": 1, "models": [{}]}')
    with pytest.raises(ReportError, match=r"z.json: malformed report"):
        read_report(tmp_path / "z.json")


def test_junit_xml_maps_statuses(tmp_path: Path) -> None:
    run = report(
        (
            model("ok.onnx", sites=2, skipped=(SkippedNode("n1", "Conv", "c", "rank 8 vs group 32"),)),
            model("bad.onnx", "failed", error="bad.onnx: not an ONNX model"),
            model("diff.onnx", "mismatch", validation=VALIDATION_FAIL),
            model("old.onnx", "skipped"),
        )
    )
    path = write_junit(tmp_path / "j.xml", run)
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped")} == {
        "tests": "4", "failures": "1", "errors": "1", "skipped": "1",
    }  # fmt: skip
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert cases["bad.onnx"].find("error").get("message") == "bad.onnx: not an ONNX model"  # type: ignore[union-attr]
    failure = cases["diff.onnx"].find("failure")
    assert failure is not None and "output 'y'" in (failure.text or "")
    assert cases["old.onnx"].find("skipped") is not None
    assert cases["ok.onnx"].find("error") is None and cases["ok.onnx"].find("failure") is None
    assert "rank 8 vs group 32" in (cases["ok.onnx"].findtext("system-out") or "")


def test_junit_escapes_markup() -> None:
    text = junit_xml(report((model("a<&>.onnx", "failed", error='bad "<x>" & more'),)))
    case = ET.fromstring(text.split("?>", 1)[1]).find("testsuite/testcase")
    assert case is not None and case.get("name") == "a<&>.onnx"
    assert case.find("error").get("message") == 'bad "<x>" & more'  # type: ignore[union-attr]


def test_parse_shard() -> None:
    assert parse_shard("2/4") == Shard(2, 4)
    for bad in ("0/4", "5/4", "1", "a/b", "1/0", "-1/2"):
        with pytest.raises(Exception, match="--shard takes I/N"):
            parse_shard(bad)


def shards() -> list[tuple[str, BatchReport]]:
    return [
        ("s1.json", report((model("a"), model("c")), Shard(1, 2), total=3)),
        ("s2.json", report((model("b", "failed", error="x"),), Shard(2, 2), total=3)),
    ]


def test_merge_shards() -> None:
    merged = merge_reports(shards())
    assert [m.path for m in merged.models] == ["a", "b", "c"]
    assert merged.shards == (1, 2) and merged.total == 3 and merged.exit_code == 2


def test_merge_refuses_overlap_missing_and_foreign_reports() -> None:
    first, second = shards()
    with pytest.raises(ReportError, match=r"shard\(s\) 2/2 missing"):
        merge_reports([first])
    assert merge_reports([first], allow_missing=True).shards == (1,)
    with pytest.raises(ReportError, match=r"shard 1/2 is in both s1.json and again.json"):
        merge_reports([first, ("again.json", first[1])])
    overlap = ("s2.json", replace(second[1], models=(model("a"),)))
    with pytest.raises(ReportError, match=r"model 'a' is in both s1.json and s2.json"):
        merge_reports([first, overlap])
    other = ("s2.json", replace(second[1], recipe_digest="zzz"))
    with pytest.raises(ReportError, match=r"s2.json was made with another recipe"):
        merge_reports([first, other])
    fewer = ("s2.json", replace(second[1], models=()))
    with pytest.raises(ReportError, match="the shards list 2 model"):
        merge_reports([first, fewer])
    with pytest.raises(ReportError, match="no report"):
        merge_reports([])


def test_merge_whole_runs_of_one_recipe() -> None:
    merged = merge_reports([("x.json", report((model("a"),))), ("y.json", report((model("b"),)))])
    assert [m.path for m in merged.models] == ["a", "b"] and merged.total == 2 and merged.exit_code == 0
