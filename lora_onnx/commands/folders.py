"""Commands on model folders: apply a PEFT adapter across a folder's model files (constant branches,
merged, or LoRA slots), merge every rewritten model of a folder; side files carried over.

:func:`apply_peft_folder` is ``inject FOLDER --peft ADAPTER -o OUT`` (with ``--merge`` or ``--as-inputs``),
:func:`merge_folder` is ``merge FOLDER -o OUT``. Model files are found and adapter modules routed by
:mod:`lora_onnx.adapters.folders`; each file is then the single-model command (:func:`~lora_onnx.apply_peft`,
:func:`~lora_onnx.commands.swap.inject_slots`, :func:`~lora_onnx.commands.merge.merge`) on the modules it
takes.
Everything is planned and proven before the first file is written: a refusal or a failed proof in any
file writes nothing. Files that take nothing are written unchanged (with their data, as ``save_model``
writes any model), so the output folder is complete.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_onnx.adapters.files import write_adapter_file
from lora_onnx.adapters.folders import (
    ModelFolder,
    Routing,
    check_output_folder,
    copy_side_files,
    find_models,
    model_label,
    route_modules,
    without_data_files,
)
from lora_onnx.adapters.formats.detect import is_lora_file, read_lora_file
from lora_onnx.adapters.formats.source import PeftRef
from lora_onnx.adapters.peft.config import read_adapter_config
from lora_onnx.adapters.peft.mapping import AdapterModule, parse_keys
from lora_onnx.adapters.peft.planning import PEFT_OPS, adapter_folder
from lora_onnx.adapters.peft.tensors import open_adapter_weights
from lora_onnx.commands.apply_peft import PeftResult, apply_peft
from lora_onnx.commands.inject_mixed import MixedInjectResult
from lora_onnx.commands.merge import MergeResult, merge
from lora_onnx.commands.swap import SlotInjectResult, inject_slots
from lora_onnx.common.atomic import check_outputs
from lora_onnx.errors import AdapterError, FoldError, LoraOnnxError
from lora_onnx.model.load import LoadedModel, load_model
from lora_onnx.model.manifest import read_branches
from lora_onnx.model.save import model_inputs, planned_writes, save_model
from lora_onnx.proofs.validation import InputsLike, ValidationReport
from lora_onnx.recipes.config import DEFAULT_ADAPTER, LoraConfig
from lora_onnx.sites.find import scan_sites

FolderSource = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass(frozen=True)
class FolderFile:
    """One model file of a folder run: what it took and what was written.

    ``modules`` are the adapter module paths it took, as the adapter names them (component prefix
    included); ``result`` is the single-model command's result, None for a file written unchanged.
    """

    model: str
    modules: tuple[str, ...] = ()
    branches: int = 0
    result: PeftResult | SlotInjectResult | MergeResult | MixedInjectResult | None = None
    output: Path | None = None
    adapter_output: Path | None = None

    @property
    def validations(self) -> tuple[tuple[str, ValidationReport], ...]:
        """(title, report) for every proof that ran on this file."""
        result = self.result
        if isinstance(result, SlotInjectResult):
            found = (
                ("no adapter active vs base", result.validation),
                ("adapter active", result.adapter_validation),
            )
        elif result is not None:
            found = (("proof", result.validation),)
        else:
            found = ()
        return tuple((title, report) for title, report in found if report is not None)

    @property
    def ok(self) -> bool:
        return all(report.ok for _, report in self.validations)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "output": str(self.output) if self.output is not None else None,
            "adapter_output": str(self.adapter_output) if self.adapter_output is not None else None,
            "modules": list(self.modules),
            "branches": self.branches,
            "changed": self.result is not None,
            "validation": {title: report.ok for title, report in self.validations},
        }


@dataclass(frozen=True)
class FolderResult:
    """What a folder run did, file by file; ``skipped_keys``: adapter keys no file took
    (``skip_unmatched``); ``copied``: the side files written to the output folder."""

    folder: Path
    files: tuple[FolderFile, ...]
    output: Path | None = None
    skipped_keys: tuple[str, ...] = ()
    copied: tuple[Path, ...] = ()
    warnings: tuple[str, ...] = ()
    command: str = "inject --peft"
    #: Shared weights a merge untied, per file (``model: note``): information, not warnings.
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(file.ok for file in self.files)

    def to_json(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "folder": str(self.folder),
            "output": str(self.output) if self.output is not None else None,
            "ok": self.ok,
            "files": [file.to_json() for file in self.files],
            "skipped_keys": list(self.skipped_keys),
            "copied": [str(path) for path in self.copied],
            "warnings": list(self.warnings),
            "notes": list(self.notes),
        }


def _adapter_modules(adapter_dir: str | os.PathLike) -> tuple[list[AdapterModule], str]:
    """Every module of the PEFT adapter (checked as ``plan_peft_adapter`` checks them) and its file name."""
    folder = adapter_folder(adapter_dir)
    config = read_adapter_config(folder)
    weights = open_adapter_weights(folder)
    source = str(weights.path)
    modules_to_save = list(config.raw.get("modules_to_save") or ())
    return parse_keys(weights, modules_to_save=modules_to_save, source=source), source


def _route_lora_file(
    folder: ModelFolder, adapter: str | os.PathLike, skip_unmatched: bool
) -> tuple[Routing, dict[str, str]]:
    """A single-file LoRA over a pipeline folder: each component the file adapts (``unet``,
    ``text_encoder``, ...) goes to the model files of the sub-folder of that name; a file without
    components goes to every model file. Every component must have a model file, unless
    ``skip_unmatched`` (its modules are then left out and listed)."""
    lora = read_lora_file(adapter)
    wanted = sorted(lora.components)
    by_component: dict[str, list[AdapterModule]] = {}
    for module in lora.modules:
        by_component.setdefault(module.component, []).append(AdapterModule(module.path, module.keys))
    files: dict[str, tuple[AdapterModule, ...]] = {}
    parts: dict[str, str] = {}
    for model in folder.models:
        component = folder.component(model)
        part = component if component in lora.components else ("" if "" in lora.components else None)
        files[model] = tuple(by_component[part]) if part is not None else ()
        if part is not None:
            parts[model] = part
    landed = set(parts.values())
    missing = [c for c in wanted if c not in landed]
    if missing and not skip_unmatched:
        have = ", ".join(folder.components) or "none (model files at the top level)"
        raise AdapterError(
            f"{Path(adapter).name} adapts {', '.join(missing)}, but {folder.root} has no such sub-folder "
            f"(its components: {have}); add the model, or --skip-unmatched to leave those modules out"
        )
    unmatched = tuple(m for c in missing for m in by_component[c])
    return Routing(files, unmatched), parts


def _part(adapter: str | os.PathLike, component: str) -> os.PathLike[str]:
    """``adapter`` (a path or ``PeftRef``) restricted to ``component``, its strength kept."""
    strength = adapter.strength if isinstance(adapter, PeftRef) else 1.0
    return PeftRef(Path(os.fspath(adapter)), strength, component or None)


def _load(folder: ModelFolder) -> dict[str, LoadedModel]:
    models = {}
    for model in folder.models:
        try:
            models[model] = load_model(folder.path(model))
        except LoraOnnxError as exc:
            raise model_label(model, exc) from exc
    return models


def _check_writes(
    folder: ModelFolder,
    models: Mapping[str, LoadedModel],
    output: Path,
    protect: Sequence[Path] = (),
    adapter_files: Sequence[Path] = (),
) -> list[Path]:
    """Refuse, before any work, an output that would replace an input; every input (to protect)."""
    reads = [*(p for model in models.values() for p in model_inputs(model)), *protect]
    reads.extend(folder.path(name) for name in folder.side_files)
    writes = [p for name, model in models.items() for p in planned_writes(model, output / name)]
    writes.extend(output / name for name in folder.side_files)
    check_outputs([*writes, *adapter_files], reads)
    return reads


def _adapter_file(adapter_output: Path, model: str) -> Path:
    return adapter_output / (model.removesuffix(".onnx") + ".onnx_adapter")


def apply_peft_folder(
    folder: FolderSource,
    adapter_dir: str | os.PathLike,
    output: str | os.PathLike | None = None,
    *,
    merge: bool = False,
    as_inputs: bool = False,
    strength_input: bool = False,
    adapter_output: str | os.PathLike | None = None,
    validate: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
    skip_unmatched: bool = False,
    link_data: bool = False,
    inputs: InputsLike = None,
) -> FolderResult:
    """Apply the PEFT adapter in ``adapter_dir`` to the model files of ``folder`` (a folder, or several
    model files) and write them, with the folder's side files, to the folder ``output``.

    Each model file takes the adapter modules it carries (routing: :mod:`lora_onnx.adapters.folders`); every
    module must land in at least one file, else :class:`~lora_onnx.errors.AdapterError` listing the files
    tried, unless ``skip_unmatched`` (those keys are skipped and listed in ``skipped_keys``). Per file the
    adapter becomes constant branches (:func:`~lora_onnx.apply_peft`; ``merge``: folded) or, with
    ``as_inputs``, LoRA slots (:func:`~lora_onnx.commands.swap.inject_slots`; ``strength_input`` as there),
    each file's adapter file written to the folder ``adapter_output`` as ``<model>.onnx_adapter``.
    ``validate`` proves every changed file before anything is written (``inputs``: an .npz path or
    arrays by input name, each file taking the arrays of its inputs); the other options are those of
    the single-model functions.
    """
    if merge and as_inputs:
        raise LoraOnnxError("merge and as_inputs exclude each other: slots stay unfolded")
    if (strength_input or adapter_output is not None) and not as_inputs:
        raise LoraOnnxError("strength_input and adapter_output go with as_inputs (LoRA slots)")
    found = find_models(folder)
    models = _load(found)
    found = without_data_files(found, models)
    out = check_output_folder(found, output) if output is not None else None
    adapters_out = Path(adapter_output) if adapter_output is not None else None
    if adapters_out is not None and adapters_out.suffix:
        raise LoraOnnxError(
            f"--adapter-out {adapters_out}: a folder run writes one adapter file per model file, so it "
            "takes a folder"
        )
    adapter_files = [_adapter_file(adapters_out, m) for m in found.models] if adapters_out is not None else []
    reads: list[Path] = []
    if out is not None:
        reads = _check_writes(found, models, out, [Path(adapter_dir)], adapter_files)
    lora_file = is_lora_file(adapter_dir)
    if lora_file:
        routing, parts = _route_lora_file(found, adapter_dir, skip_unmatched)
    else:
        modules, source = _adapter_modules(adapter_dir)
        scans = {name: scan_sites(model, PEFT_OPS) for name, model in models.items()}
        routing = route_modules(found, modules, scans, source=source, skip_unmatched=skip_unmatched)
    results: dict[str, PeftResult | SlotInjectResult] = {}
    warnings: list[str] = []
    notes: list[str] = []
    for name, model in models.items():
        taken = routing.files[name]
        if not taken:
            continue
        # A single-file LoRA (diffusers / kohya) goes to each model as its component's part; a PEFT folder
        # as the modules routed to the file.
        adapter: str | os.PathLike = adapter_dir
        chosen: Sequence[AdapterModule] | None = taken
        if lora_file:
            adapter, chosen = _part(adapter_dir, parts[name]), None
        try:
            if as_inputs:
                results[name] = inject_slots(
                    model, LoraConfig(adapter_name=adapter_name), peft=adapter, modules=chosen,
                    strength_input=strength_input, validate=validate, providers=providers, dims=dims,
                    allow_nonfinite=allow_nonfinite, inputs=inputs,
                )  # fmt: skip
                warnings.extend(f"{name}: {message}" for message in results[name].source.warnings)
            else:
                results[name] = apply_peft(
                    model, adapter, merge=merge, validate=validate, adapter_name=adapter_name,
                    providers=providers, dims=dims, allow_nonfinite=allow_nonfinite, modules=chosen,
                    inputs=inputs,
                )  # fmt: skip
                warnings.extend(f"{name}: {message}" for message in results[name].warnings)
                notes.extend(f"{name}: {note}" for note in results[name].fold_notes)
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
    if routing.unmatched:
        paths = [module.full_path for module in routing.unmatched]
        listed = ", ".join(paths[:8]) + (f" and {len(paths) - 8} more" if len(paths) > 8 else "")
        warnings.append(
            f"skipped {len(routing.skipped_keys)} adapter key(s) of {len(paths)} module(s) no model file "
            f"has (--skip-unmatched): {listed}"
        )
    ok = all(FolderFile(name, result=result).ok for name, result in results.items())
    files: list[FolderFile] = []
    copied: tuple[Path, ...] = ()
    for name, model in models.items():
        result = results.get(name)
        written = adapter_written = None
        if out is not None and ok:
            rewritten = result.model if result is not None else model
            written = save_model(rewritten, out / name, protect=reads, link_data=link_data)
        if adapters_out is not None and ok and isinstance(result, SlotInjectResult):
            adapter_written = write_adapter_file(
                result.tensors, _adapter_file(adapters_out, name), "onnx_adapter", protect=reads
            )
        branches = len(result.branches) if result is not None else 0
        taken_paths = tuple(module.full_path for module in routing.files[name])
        files.append(FolderFile(name, taken_paths, branches, result, written, adapter_written))
    if out is not None and ok:
        copied = copy_side_files(found, out, reads)
    command = "inject --peft" + (" --merge" if merge else " --as-inputs" if as_inputs else "")
    return FolderResult(
        found.root, tuple(files), out if ok else None, routing.skipped_keys, copied, tuple(warnings), command,
        tuple(notes),
    )  # fmt: skip


def merge_folder(
    folder: FolderSource,
    output: str | os.PathLike | None = None,
    *,
    adapters: Collection[str] | None = None,
    partial: bool = False,
    dequantize: bool = False,
    validate: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
) -> FolderResult:
    """Fold the branches of every model file of ``folder`` that has some
    (:func:`~lora_onnx.commands.merge.merge` with these options) and write all model files, with the side
    files, to the folder ``output``.

    A folder none of whose models has LoRA branches is refused. Models with LoRA slots or mixed-batch
    branches need an adapter file / index per model: merge those files one by one.
    """
    found = find_models(folder)
    models = _load(found)
    found = without_data_files(found, models)
    out = check_output_folder(found, output) if output is not None else None
    reads = _check_writes(found, models, out) if out is not None else []
    with_branches = [name for name, model in models.items() if read_branches(model.ir_model)]
    if not with_branches:
        raise FoldError(f"no model file of {found.root} has LoRA branches ({', '.join(found.models)})")
    results: dict[str, MergeResult] = {}
    for name in with_branches:
        try:
            results[name] = merge(
                models[name], adapters=adapters, partial=partial, dequantize=dequantize, validate=validate,
                providers=providers, dims=dims, allow_nonfinite=allow_nonfinite,
            )  # fmt: skip
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
    ok = all(r.validation is None or r.validation.ok for r in results.values())
    files: list[FolderFile] = []
    for name, model in models.items():
        result = results.get(name)
        written = None
        if out is not None and ok:
            written = save_model(result.model if result is not None else model, out / name, protect=reads)
        folded = len(result.folded) if result is not None else 0
        paths = tuple(dict.fromkeys(b.module_path for b in result.folded)) if result is not None else ()
        files.append(FolderFile(name, paths, folded, result, written))
    copied = copy_side_files(found, out, reads) if out is not None and ok else ()
    warnings = tuple(
        f"{name}: kept the branch at node {kept.branch.site!r} ({kept.branch.module_path}): {kept.reason}"
        for name, result in results.items()
        for kept in result.kept
    )
    notes = tuple(f"{name}: {note}" for name, result in results.items() for note in result.notes)
    return FolderResult(found.root, tuple(files), out if ok else None, (), copied, warnings, "merge", notes)
