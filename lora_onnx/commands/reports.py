"""Batch reports: one record per model, written as JSON and JUnit XML, merged across shards.

A model ends in one of four states: ``ok`` (converted, and validated when asked), ``mismatch`` (the
validation in onnxruntime found outputs that disagree; nothing was written), ``failed`` (an error, named
in ``error``; nothing was written) or ``skipped`` (``--skip-existing`` found a complete output). The
batch's exit code is 2 when any model failed, else 1 when any mismatched, else 0.

JUnit maps them to what CI systems display: ``failed`` -> ``<error>``, ``mismatch`` -> ``<failure>``,
``skipped`` -> ``<skipped>``, one ``<testcase>`` per model named by its path relative to the inputs' root.

A folder converted as one unit (``batch FOLDER --peft ADAPTER``: one export split into several files, see
:mod:`lora_onnx.commands.batch`) keeps one record per model file, each naming its ``folder``; the unit's
verdict is every one of its files' status (nothing of a folder is written unless all of it is), and
:class:`FolderReport` holds what belongs to the folder as a whole (side files copied, its error).
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lora_onnx.common import json_input
from lora_onnx.common.atomic import write_file
from lora_onnx.errors import EXIT_MISMATCH, EXIT_USAGE, LoraOnnxError

REPORT_FORMAT = "lora-onnx-batch-report"
REPORT_VERSION = 1
STATUSES = ("ok", "mismatch", "failed", "skipped")


class ReportError(LoraOnnxError):
    """A report file cannot be read, or reports cannot be merged (overlapping or missing shards)."""


@dataclass(frozen=True)
class SkippedNode:
    """A node of a supported op type that took no branch, and why (from the site scan or the plan)."""

    node: str
    op: str
    module_path: str
    reason: str


def _number(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class ModelReport:
    """What happened to one model. ``path`` is relative to the inputs' common root (the report key).

    ``validation`` is the :meth:`ValidationReport.to_json` record when the model was validated;
    ``mismatches`` lists its failing outputs in one line each. ``traceback`` is set only for an
    unexpected internal error (a bug), so it can be reported. ``notes`` are what the user should know
    that is no warning (shared weights a merge untied). A model file of a folder unit names its
    ``folder`` (the :class:`FolderReport`'s path) and the adapter ``modules`` it took.
    """

    path: str
    source: str
    output: str
    status: str
    seconds: float = 0.0
    sites: int = 0
    lora_params: int = 0
    skipped: tuple[SkippedNode, ...] = ()
    warnings: tuple[str, ...] = ()
    validation: Mapping[str, Any] | None = None
    error: str | None = None
    traceback: str | None = None
    notes: tuple[str, ...] = ()
    folder: str | None = None
    modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    @property
    def mismatches(self) -> tuple[str, ...]:
        """One line per output that disagreed in the validation."""
        if not self.validation:
            return ()
        lines = []
        for item in self.validation.get("outputs", []):
            if not item.get("ok", True):
                note = f" ({item['note']})" if item.get("note") else ""
                lines.append(
                    f"{item.get('provider', '?')} output {item.get('name')!r}: max abs err "
                    f"{_number(item.get('max_abs'))}, max rel err {_number(item.get('max_rel'))}, rtol "
                    f"{_number(item.get('rtol'))} / atol {_number(item.get('atol'))}{note}"
                )
        return tuple(lines)

    @property
    def message(self) -> str:
        """A one-line summary for logs."""
        if self.status == "failed":
            return self.error or "failed"
        if self.status == "mismatch":
            if not self.mismatches and self.error:  # a folder's file whose sibling disagreed
                return self.error
            first = self.mismatches[0] if self.mismatches else "outputs disagree"
            return f"validation failed: {first}; nothing was written"
        if self.status == "skipped":
            return "the output exists (--skip-existing)"
        checked = ", validated" if self.validation else ""
        if self.folder is not None:
            if not self.sites:
                return f"unchanged{checked}"
            return f"{len(self.modules)} adapter module(s) on {self.sites} site(s){checked}"
        return f"{self.sites} site(s), {len(self.skipped)} skipped node(s){checked}"

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "source": self.source,
            "output": self.output,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "sites": self.sites,
            "lora_params": self.lora_params,
            "skipped": [vars(skip) for skip in self.skipped],
            "warnings": list(self.warnings),
            "validation": self.validation,
            "mismatches": list(self.mismatches),
            "error": self.error,
            "traceback": self.traceback,
            "notes": list(self.notes),
            "folder": self.folder,
            "modules": list(self.modules),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ModelReport:
        return cls(
            path=str(data["path"]),
            source=str(data.get("source", "")),
            output=str(data.get("output", "")),
            status=str(data["status"]),
            seconds=float(data.get("seconds", 0.0)),
            sites=int(data.get("sites", 0)),
            lora_params=int(data.get("lora_params", 0)),
            skipped=tuple(SkippedNode(**item) for item in data.get("skipped", [])),
            warnings=tuple(data.get("warnings", [])),
            validation=data.get("validation"),
            error=data.get("error"),
            traceback=data.get("traceback"),
            notes=tuple(data.get("notes", [])),
            folder=data.get("folder"),
            modules=tuple(data.get("modules", [])),
        )


@dataclass(frozen=True)
class FolderReport:
    """A folder converted as one unit: its path relative to the inputs' root (``"."`` for the root
    itself; its model records' paths start with it), where it was read and written, the unit's status
    (its model files'), the paths of its model records, the side files copied (config.json, tokenizer
    files, ...), warnings of the folder as a whole, the adapter keys no file took (``--skip-unmatched``)
    and, when it failed, the error."""

    path: str
    source: str
    output: str
    status: str
    models: tuple[str, ...] = ()
    copied: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    error: str | None = None
    seconds: float = 0.0
    skipped_keys: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "source": self.source,
            "output": self.output,
            "status": self.status,
            "seconds": round(self.seconds, 4),
            "models": list(self.models),
            "copied": list(self.copied),
            "warnings": list(self.warnings),
            "skipped_keys": list(self.skipped_keys),
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FolderReport:
        return cls(
            path=str(data["path"]),
            source=str(data.get("source", "")),
            output=str(data.get("output", "")),
            status=str(data["status"]),
            models=tuple(str(m) for m in data.get("models", [])),
            copied=tuple(str(c) for c in data.get("copied", [])),
            warnings=tuple(data.get("warnings", [])),
            error=data.get("error"),
            seconds=float(data.get("seconds", 0.0)),
            skipped_keys=tuple(str(k) for k in data.get("skipped_keys", [])),
        )


@dataclass(frozen=True)
class Shard:
    """Part ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"2/4"`` -> ``Shard(2, 4)``; I counts from 1 (like CI_NODE_INDEX / CI_NODE_TOTAL)."""
    index, sep, count = text.partition("/")
    try:
        shard = Shard(int(index), int(count))
    except ValueError:
        sep = ""
    if not sep or not 1 <= shard.index <= shard.count:
        raise LoraOnnxError(f"--shard takes I/N with 1 <= I <= N (e.g. 2/4), got {text!r}")
    return shard


@dataclass(frozen=True)
class BatchReport:
    """A whole run (or a merge of shard runs): per-model records sorted by path, and the run's recipe.

    ``total`` is the number of models before sharding; ``shards`` the shard indices this report covers
    (empty when the run was not sharded); ``recipe_digest`` tells runs with different recipes apart;
    ``folders`` the folders converted as units (their files are among ``models``).
    """

    models: tuple[ModelReport, ...]
    recipe: Mapping[str, Any] = field(default_factory=dict)
    recipe_digest: str = ""
    total: int = 0
    shard_count: int = 0
    shards: tuple[int, ...] = ()
    seconds: float = 0.0
    created: str = ""
    tool: str = ""
    output_dir: str = ""
    folders: tuple[FolderReport, ...] = ()

    @property
    def counts(self) -> dict[str, int]:
        return {status: sum(m.status == status for m in self.models) for status in STATUSES}

    @property
    def ok(self) -> bool:
        return all(m.status in ("ok", "skipped") for m in self.models)

    @property
    def exit_code(self) -> int:
        counts = self.counts
        if counts["failed"]:
            return EXIT_USAGE
        if counts["mismatch"]:
            return EXIT_MISMATCH
        return 0

    def summary(self) -> str:
        counts = self.counts
        parts = [f"{counts[status]} {status}" for status in STATUSES if counts[status]]
        shard = f" (shards {', '.join(map(str, self.shards))} of {self.shard_count})" if self.shards else ""
        done = ", ".join(parts) or "nothing to do"
        return f"{len(self.models)} model(s){shard}: {done} in {self.seconds:.1f} s"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "tool": self.tool,
            "created": self.created,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "summary": {**self.counts, "models": len(self.models), "seconds": round(self.seconds, 3)},
            "total": self.total,
            "shard_count": self.shard_count,
            "shards": list(self.shards),
            "output_dir": self.output_dir,
            "recipe": dict(self.recipe),
            "recipe_digest": self.recipe_digest,
            "models": [model.to_json() for model in self.models],
            "folders": [folder.to_json() for folder in self.folders],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchReport:
        return cls(
            models=tuple(ModelReport.from_json(item) for item in data["models"]),
            recipe=data.get("recipe", {}),
            recipe_digest=str(data.get("recipe_digest", "")),
            total=int(data.get("total", len(data["models"]))),
            shard_count=int(data.get("shard_count", 0)),
            shards=tuple(int(i) for i in data.get("shards", [])),
            seconds=float(data.get("summary", {}).get("seconds", 0.0)),
            created=str(data.get("created", "")),
            tool=str(data.get("tool", "")),
            output_dir=str(data.get("output_dir", "")),
            folders=tuple(FolderReport.from_json(item) for item in data.get("folders", [])),
        )


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def write_report(path: str | os.PathLike, report: BatchReport) -> Path:
    """Write ``report`` as JSON (atomically)."""
    target = Path(path)
    # atomic: a reader (a CI step) never sees half a report
    write_file(target, (json.dumps(report.to_json(), indent=2) + "\n").encode(), "report")
    return target


def read_report(path: str | os.PathLike) -> BatchReport:
    """Read a report written by :func:`write_report`; :class:`ReportError` names what is wrong."""
    file = Path(path)
    try:
        data = json_input.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ReportError(f"{file}: no such report") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ReportError(f"{file}: cannot read it ({exc})") from exc
    except json.JSONDecodeError as exc:
        raise ReportError(f"{file}: not a JSON report (line {exc.lineno}: {exc.msg})") from exc
    except ValueError as exc:  # nested too deep, or an integer too long to convert
        raise ReportError(f"{file}: not a lora-onnx batch report ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ReportError(f'{file}: not a lora-onnx batch report (no "format": "{REPORT_FORMAT}")')
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ReportError(f"{file}: malformed report (version {version!r} is not a whole number)")
    if version > REPORT_VERSION:
        raise ReportError(f"{file}: report version {data['version']} is newer than this lora-onnx reads")
    try:
        return BatchReport.from_json(data)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:  # AttributeError: e.g. a string summary
        raise ReportError(f"{file}: malformed report ({type(exc).__name__}: {exc})") from exc


def merge_reports(reports: Sequence[tuple[str, BatchReport]], *, allow_missing: bool = False) -> BatchReport:
    """One report from shard reports ``(label, report)``.

    Refuses reports of different recipes, a model listed twice (overlapping shards), shards of runs
    that saw different inputs, and, unless ``allow_missing``, shards left out (``2/4`` given without
    ``1/4``): a CI gate must not pass because a shard never reported. Unsharded reports of one recipe
    (e.g. runs over different folders) merge too, as long as no model appears twice.
    """
    if not reports:
        raise ReportError("no report to merge")
    first_label, first = reports[0]
    seen: dict[str, str] = {}
    shards: dict[int, str] = {}
    models: list[ModelReport] = []
    folders: list[FolderReport] = []
    for label, report in reports:
        if report.recipe_digest != first.recipe_digest:
            raise ReportError(
                f"{label} was made with another recipe than {first_label} "
                f"({report.recipe_digest} vs {first.recipe_digest}); merge shards of one run only"
            )
        if report.shard_count != first.shard_count:
            raise ReportError(
                f"{label} is split into {report.shard_count or 1} shard(s) but {first_label} into "
                f"{first.shard_count or 1}"
            )
        for index in report.shards:
            if index in shards:
                raise ReportError(
                    f"shard {index}/{report.shard_count} is in both {shards[index]} and {label}"
                )
            shards[index] = label
        for model in report.models:
            if model.path in seen:
                raise ReportError(f"model {model.path!r} is in both {seen[model.path]} and {label}")
            seen[model.path] = label
            models.append(model)
        folders.extend(report.folders)
    missing = sorted(set(range(1, first.shard_count + 1)) - set(shards)) if first.shard_count else []
    if missing and not allow_missing:
        listed = ", ".join(f"{i}/{first.shard_count}" for i in missing)
        raise ReportError(f"shard(s) {listed} missing from the reports; a gate must see every shard")
    totals = {report.total for _, report in reports}
    if first.shard_count and not missing and (len(totals) > 1 or len(models) != first.total):
        raise ReportError(
            f"the shards list {len(models)} model(s) but their runs saw {sorted(totals)} in all; were they "
            "run on different inputs?"
        )
    return replace(
        first,
        models=sort_models(models),
        folders=tuple(sorted(folders, key=lambda f: f.path)),
        total=first.total if first.shard_count else len(models),
        shards=tuple(sorted(shards)),
        seconds=max(report.seconds for _, report in reports),
        created=now_iso(),
    )


def junit_xml(report: BatchReport, suite: str = "lora-onnx batch") -> str:
    """JUnit XML for ``report``: one testcase per model (see the module doc)."""
    counts = report.counts
    attrs = {
        "name": suite,
        "tests": str(len(report.models)),
        "failures": str(counts["mismatch"]),
        "errors": str(counts["failed"]),
        "skipped": str(counts["skipped"]),
        "time": f"{sum(m.seconds for m in report.models):.3f}",
    }
    root = ET.Element("testsuites", attrs)
    testsuite = ET.SubElement(root, "testsuite", {**attrs, "timestamp": report.created})
    properties = ET.SubElement(testsuite, "properties")
    for name, value in (("recipe_digest", report.recipe_digest), ("recipe", json.dumps(dict(report.recipe)))):
        ET.SubElement(properties, "property", {"name": name, "value": value})
    for model in report.models:
        case = ET.SubElement(
            testsuite,
            "testcase",
            {"classname": "lora-onnx", "name": model.path, "time": f"{model.seconds:.3f}"},
        )
        if model.status == "failed":
            element = ET.SubElement(case, "error", {"message": model.message, "type": "ConversionError"})
            element.text = model.traceback or model.message
        elif model.status == "mismatch":
            element = ET.SubElement(case, "failure", {"message": model.message, "type": "ValidationMismatch"})
            element.text = "\n".join(model.mismatches)
        elif model.status == "skipped":
            ET.SubElement(case, "skipped", {"message": model.message})
        out = ET.SubElement(case, "system-out")
        out.text = _case_details(model)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _case_details(model: ModelReport) -> str:
    lines = [f"source: {model.source}", f"output: {model.output}", f"sites: {model.sites}"]
    if model.folder is not None:
        lines.append(f"folder: {model.folder} (converted as one unit)")
        lines += [f"module: {m}" for m in model.modules]
    lines += [f"skipped {s.node} ({s.op}, {s.module_path}): {s.reason}" for s in model.skipped]
    lines += [f"warning: {w}" for w in model.warnings]
    lines += [f"note: {n}" for n in model.notes]
    return "\n".join(lines)


def write_junit(path: str | os.PathLike, report: BatchReport) -> Path:
    """Write ``report`` as JUnit XML (atomically)."""
    target = Path(path)
    write_file(target, junit_xml(report).encode(), "JUnit report")
    return target


def sort_models(models: Iterable[ModelReport]) -> tuple[ModelReport, ...]:
    return tuple(sorted(models, key=lambda m: m.path))
