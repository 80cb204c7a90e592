"""Check an adapter file against a model's LoRA slots before onnxruntime trips over it at run time.

Every tensor of the file is compared with the graph input of the same name: its dtype, its number of
dims, every fixed dim; per slot, A's and B's ranks must agree (a grouped conv's B holds rank / group)
and suit the conv's groups. Slots of the adapter the file addresses that the file lacks are *missing*;
names no slot has are *unexpected*. A file may leave a slot out entirely with ``partial`` (the slot then
adds zero), never one tensor of a pair (onnxruntime would fail on the rank-0 partner).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from lora_onnx.adapters.files import read_adapter_file
from lora_onnx.common.names import nearest
from lora_onnx.errors import AdapterError
from lora_onnx.kinds import form_of
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.stages.slots import SlotSpec, choose_adapter, slot_adapters, slot_records, slot_specs

OK, EMPTY, UNUSED = "ok", "empty", "unused"
MISSING, UNEXPECTED, SHAPE, DTYPE, RANK = "missing", "unexpected", "shape", "dtype", "rank"
#: Statuses that do not make a check fail.
PASSING = frozenset({OK, EMPTY, UNUSED})


@dataclass(frozen=True)
class TensorCheck:
    """One tensor: what the model expects, what the file holds, and the verdict."""

    name: str
    status: str
    adapter: str | None = None
    role: str | None = None
    expected_shape: tuple[int | str, ...] | None = None
    actual_shape: tuple[int, ...] | None = None
    expected_dtype: str | None = None
    actual_dtype: str | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status in PASSING


@dataclass(frozen=True)
class AdapterCheck:
    model: str
    file: str
    format: str
    adapters: tuple[str, ...]
    rows: tuple[TensorCheck, ...]

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def problems(self) -> tuple[TensorCheck, ...]:
        return tuple(row for row in self.rows if not row.ok)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def to_json(self) -> dict[str, object]:
        def row_json(row: TensorCheck) -> dict[str, object]:
            data = asdict(row)
            for key in ("expected_shape", "actual_shape"):
                data[key] = None if data[key] is None else list(data[key])
            return data

        return {
            "ok": self.ok,
            "model": self.model,
            "file": self.file,
            "format": self.format,
            "adapters": list(self.adapters),
            "counts": self.counts(),
            "tensors": [row_json(row) for row in self.rows],
        }


def check_adapter(
    model: ModelLike,
    adapter_file: str | os.PathLike,
    *,
    adapter: str | None = None,
    partial: bool = False,
    format: str | None = None,
) -> AdapterCheck:
    """Check ``adapter_file`` against ``model``'s slots (of ``adapter``; by default the adapter whose
    slot names the file uses). Raises :class:`AdapterError` for an unreadable file or a model without slots.
    """
    loaded = load_model(model)
    file = read_adapter_file(adapter_file, format)
    return check_tensors(
        loaded, file.tensors, adapter=adapter, partial=partial, label=str(file.path), format=file.format
    )


def check_tensors(
    model: LoadedModel,
    tensors: Mapping[str, np.ndarray],
    *,
    adapter: str | None = None,
    partial: bool = False,
    label: str = "<tensors>",
    format: str = "",
) -> AdapterCheck:
    """:func:`check_adapter` for tensors already in memory."""
    specs = slot_specs(model)
    if not specs:
        choose_adapter(model, adapter)  # raises: the model has no slots
    targets = _target_adapters(model, specs, tensors, adapter)
    rows: dict[str, TensorCheck] = {}
    for name, spec in specs.items():
        if spec.adapter in targets and name in tensors:
            rows[name] = _compare(spec, np.asarray(tensors[name]))
    for record in slot_records(model):
        if record.adapter in targets:
            _check_pair(record, tensors, rows, partial, specs)
    unexpected = [
        _unexpected(name, np.asarray(value), specs, targets)
        for name, value in tensors.items()
        if name not in specs or specs[name].adapter not in targets
    ]
    ordered = [rows[name] for name in specs if name in rows]
    return AdapterCheck(model.name, label, format, tuple(sorted(targets)), (*ordered, *unexpected))


def _target_adapters(
    model: LoadedModel, specs: Mapping[str, SlotSpec], tensors: Mapping[str, np.ndarray], adapter: str | None
) -> set[str]:
    if adapter is not None:
        return {choose_adapter(model, adapter)}
    addressed = {specs[name].adapter for name in tensors if name in specs}
    if addressed:
        return addressed
    adapters = slot_adapters(model)
    return set(adapters) if len(adapters) == 1 else set()


def _compare(spec: SlotSpec, value: np.ndarray) -> TensorCheck:
    common = dict(
        adapter=spec.adapter, role=spec.role, expected_shape=spec.dims, actual_shape=tuple(value.shape),
        expected_dtype=str(spec.dtype), actual_dtype=str(value.dtype),
    )  # fmt: skip
    if value.dtype != spec.dtype:
        return TensorCheck(spec.name, DTYPE, **common, detail=f"the slot takes {spec.dtype}")  # type: ignore[arg-type]
    if value.ndim != len(spec.dims) or any(
        isinstance(want, int) and want != got for want, got in zip(spec.dims, value.shape, strict=False)
    ):
        return TensorCheck(spec.name, SHAPE, **common, detail="fixed dims differ")  # type: ignore[arg-type]
    status = EMPTY if spec.role != "strength" and value.size == 0 else OK
    detail = "rank 0: this slot stays off" if status == EMPTY else ""
    return TensorCheck(spec.name, status, **common, detail=detail)  # type: ignore[arg-type]


def _check_pair(
    record: BranchRecord,
    tensors: Mapping[str, np.ndarray],
    rows: dict[str, TensorCheck],
    partial: bool,
    specs: Mapping[str, SlotSpec],
) -> None:
    present = [name in tensors for name in (record.a, record.b)]
    if not any(present):
        for name in (record.a, record.b):
            if name not in rows:
                status, detail = (UNUSED, "not in the file: the slot stays off") if partial else (MISSING, "")
                rows[name] = _absent(specs[name], status, detail)
        return
    if not all(present):
        have, lack = (record.a, record.b) if present[0] else (record.b, record.a)
        detail = f"{have!r} is in the file: onnxruntime would fail on this pair"
        rows[lack] = _absent(specs[lack], MISSING, detail)
        return
    if not (rows[record.a].ok and rows[record.b].ok):
        return
    a, b = np.asarray(tensors[record.a]), np.asarray(tensors[record.b])
    form = form_of(record.kind)
    rank_a, rank_b = form.ranks(a, b, record.a_group, record.b_group)
    problem = ""
    if rank_a != rank_b:
        problem = f"A has rank {rank_a} but B has rank {rank_b} ({record.module_path})"
    else:
        problem = form.rank_group_refusal(rank_a, record.a_group, record.b_group) or ""
    if problem:
        rows[record.b] = _replace_status(rows[record.b], RANK, problem)


def _absent(spec: SlotSpec, status: str, detail: str) -> TensorCheck:
    return TensorCheck(
        spec.name, status, spec.adapter, spec.role, expected_shape=spec.dims, expected_dtype=str(spec.dtype),
        detail=detail,
    )  # fmt: skip


def _replace_status(row: TensorCheck, status: str, detail: str) -> TensorCheck:
    data = asdict(row)
    data.update(status=status, detail=detail)
    for key in ("expected_shape", "actual_shape"):
        data[key] = None if data[key] is None else tuple(data[key])
    return TensorCheck(**data)


def _unexpected(
    name: str, value: np.ndarray, specs: Mapping[str, SlotSpec], targets: set[str]
) -> TensorCheck:
    if name in specs:
        detail = (
            f"a slot of adapter {specs[name].adapter!r}, not of {', '.join(sorted(targets)) or 'this file'}"
        )
    else:
        close = nearest(name, specs, n=1)
        detail = "no slot has this name" + (f"; nearest: {close[0]}" if close else "")
    return TensorCheck(
        name, UNEXPECTED, actual_shape=tuple(value.shape), actual_dtype=str(value.dtype), detail=detail
    )


def require_fit(check: AdapterCheck) -> None:
    """Raise :class:`AdapterError` naming the first problem of ``check`` (for commands that need a fit)."""
    if check.ok:
        return
    first = check.problems[0]
    more = f" (and {len(check.problems) - 1} more; see check-adapter)" if len(check.problems) > 1 else ""
    raise AdapterError(f"{check.file} does not fit {check.model}: {first.name!r} is {_phrase(first)}{more}")


def fitting_adapter(check: AdapterCheck, use: str) -> str:
    """The one slot adapter a file that fits addresses; :class:`AdapterError` otherwise (``use`` says why
    one is needed, e.g. "a fold takes one adapter's file")."""
    require_fit(check)
    if len(check.adapters) != 1:
        adapters = list(check.adapters) or "none"
        raise AdapterError(f"{check.file} addresses the slots of adapters {adapters} of {check.model}; {use}")
    return check.adapters[0]


def _phrase(row: TensorCheck) -> str:
    shapes = f" expected {row.expected_shape}, got {row.actual_shape}" if row.expected_shape else ""
    text = {
        MISSING: "missing",
        UNEXPECTED: "unexpected",
        SHAPE: f"mis-shaped:{shapes}",
        DTYPE: f"of dtype {row.actual_dtype}, the slot takes {row.expected_dtype}",
        RANK: "inconsistent",
    }.get(row.status, row.status)
    return f"{text} ({row.detail})" if row.detail and row.status != SHAPE else text


def shapes_text(dims: Sequence[int | str] | None) -> str:
    return "" if dims is None else "(" + ", ".join(str(d) for d in dims) + ")"
