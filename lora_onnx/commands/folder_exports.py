"""``export-adapter`` on model folders: adapter files for every slotted model file of a folder, and one
PEFT adapter gathered from every model file of a folder.

:func:`export_adapter_folder` writes one adapter file per model file, named after it
(``decoder_model.onnx`` -> ``decoder_model.onnx_adapter``, sub-folders kept) in the output folder: from a
PEFT adapter for a folder of slotted models (``export-adapter --peft ADAPTER --for SLOTS_DIR -o DIR``; the
adapter's modules are routed to the files as ``inject FOLDER --peft`` routes them, every module must land
in at least one file), or from the constant branches each model file of a folder carries
(``export-adapter DIR -o OUT_DIR``, renamed for the slots of the same file of ``--for SLOTS_DIR``).
:func:`export_peft_folder` gathers the constant branches of every model file into one PEFT adapter folder
(``export-adapter DIR --format peft -o PEFT_DIR``): a module two files share (Optimum's decoder_model and
decoder_with_past_model) is written once when its tensors are equal and refused, naming the module and
the files, when they differ; a pipeline component's files get its prefix (``unet.``) back, so
``inject DIR --peft PEFT_DIR`` routes every module to the file it came from.

Everything is computed before the first file is written: a refusal in any file writes nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lora_onnx.adapters.files import FORMATS
from lora_onnx.adapters.folders import ModelFolder, Routing, find_models, model_label, route_modules
from lora_onnx.adapters.formats.detect import is_lora_file
from lora_onnx.adapters.peft.export import (
    PeftExport,
    check_peft_folder,
    derived_config,
    peft_export,
    write_peft_folder,
)
from lora_onnx.adapters.peft.mapping import PEFT_PREFIX, AdapterModule
from lora_onnx.adapters.peft.planning import PEFT_OPS
from lora_onnx.commands.folders import FolderSource, _adapter_modules, _load, _part, _route_lora_file
from lora_onnx.commands.swap import model_slot_tensors, peft_slot_tensors, write_export
from lora_onnx.common.atomic import check_outputs
from lora_onnx.errors import AdapterError, LoraOnnxError, OutputError
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import adapter_names, read_branches
from lora_onnx.model.save import model_inputs
from lora_onnx.sites.find import scan_sites
from lora_onnx.stages.slots import base_view, slot_records
from lora_onnx.variants import variant_for


@dataclass(frozen=True)
class ExportFile:
    """One model file of a folder export: the modules it gave (adapter module paths), the file written
    for it (None: nothing, see ``note``), the number of tensors written (PEFT: contributed)."""

    model: str
    modules: tuple[str, ...] = ()
    output: Path | None = None
    tensors: int = 0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "modules": list(self.modules),
            "output": str(self.output) if self.output is not None else None,
            "tensors": self.tensors,
            "note": self.note,
        }


@dataclass(frozen=True)
class FolderExportResult:
    """What a folder export wrote: per model file (``files``), the output folder, the format and adapter,
    PEFT keys no file took (``skip_unmatched``) and warnings."""

    folder: Path
    files: tuple[ExportFile, ...]
    output: Path
    format: str
    adapter: str | None = None
    origin: str = ""
    skipped_keys: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "command": "export-adapter",
            "folder": str(self.folder),
            "output": str(self.output),
            "format": self.format,
            "adapter": self.adapter,
            "origin": self.origin,
            "files": [file.to_json() for file in self.files],
            "skipped_keys": list(self.skipped_keys),
            "warnings": list(self.warnings),
        }


def adapter_file_name(model: str, format: str = "onnx_adapter") -> str:
    """The adapter file of model file ``model`` (relative, sub-folders kept): its name with the format's
    suffix instead of ``.onnx``."""
    return model.removesuffix(".onnx") + FORMATS[format]


def _output_folder(output: str | os.PathLike, format: str | None) -> tuple[Path, str]:
    out = Path(output)
    kind = format if format is not None else "onnx_adapter"
    if kind not in FORMATS:
        raise LoraOnnxError(f"unknown --format {kind!r}; use one of {', '.join((*FORMATS, 'peft'))}")
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"{out} exists and is not a folder; a folder export writes one adapter file per model"
        )
    if out.suffix.lower() in (*FORMATS.values(), ".onnx"):
        raise OutputError(
            f"-o {out}: a folder export writes one adapter file per model file (named after it), so -o "
            "takes a folder"
        )
    return out, kind


def _route(
    found: ModelFolder, models: Mapping[str, LoadedModel], peft: str | os.PathLike, skip_unmatched: bool
) -> tuple[Routing, dict[str, str] | None]:
    """The adapter's modules per model file (routed on each file's base graph, slots left out); for a
    single-file LoRA also each file's component part."""
    if is_lora_file(peft):
        return _route_lora_file(found, peft, skip_unmatched)
    modules, source = _adapter_modules(peft)
    scans = {name: scan_sites(base_view(model), PEFT_OPS) for name, model in models.items()}
    return route_modules(found, modules, scans, source=source, skip_unmatched=skip_unmatched), None


def export_adapter_folder(
    model: FolderSource | None = None,
    output: str | os.PathLike | None = None,
    *,
    peft: str | os.PathLike | None = None,
    for_folder: FolderSource | None = None,
    adapter: str | None = None,
    format: str | None = None,
    adapter_version: int = 1,
    model_version: int = 1,
    skip_unmatched: bool = False,
) -> FolderExportResult:
    """One adapter file per model file, in the folder ``output`` (``format``: onnx_adapter, the default,
    safetensors or npz; ``"peft"``: :func:`export_peft_folder`).

    With ``peft`` (a PEFT folder or LoRA file), for the slotted models of ``for_folder`` (made by
    ``inject FOLDER --peft A --as-inputs``): each file takes the adapter modules it carries, as
    :func:`~lora_onnx.commands.folders.apply_peft_folder` routes them; every module must land in at least
    one file, else :class:`~lora_onnx.errors.AdapterError`, unless ``skip_unmatched``. A file that takes
    none gets no adapter file (its slots stay empty). Without ``peft``: the constant branches each model
    file of ``model`` carries (files without any are left out), renamed for the slots of the file of the
    same name in ``for_folder`` when given. ``adapter`` picks the adapter (else the only one); the LoRA
    scale is folded into B, as :func:`~lora_onnx.commands.swap.export_adapter` writes a single file.
    """
    if output is None:
        raise LoraOnnxError("export-adapter needs an output folder (-o DIR)")
    if format == "peft":
        if peft is not None or for_folder is not None or model is None:
            raise LoraOnnxError(
                "--format peft exports the constant branches of a folder: give the folder only"
            )
        return export_peft_folder(model, output, adapter=adapter)
    out, kind = _output_folder(output, format)
    if peft is not None:
        if model is not None:
            raise LoraOnnxError("give either a folder of models or --peft DIR --for SLOTS_DIR, not both")
        if for_folder is None:
            raise LoraOnnxError(
                "--peft DIR needs --for SLOTS_DIR (the slotted model files the files are for)"
            )
        return _export_peft_for(
            peft, for_folder, out, kind, adapter, adapter_version, model_version, skip_unmatched
        )
    if skip_unmatched:
        raise LoraOnnxError("--skip-unmatched goes with --peft (keys of modules no model file has)")
    if model is None:
        raise LoraOnnxError(
            "give a folder of models with constant LoRA branches, or --peft DIR --for SLOTS_DIR"
        )
    return _export_branches(model, for_folder, out, kind, adapter, adapter_version, model_version)


def _export_peft_for(
    peft: str | os.PathLike,
    for_folder: FolderSource,
    out: Path,
    kind: str,
    adapter: str | None,
    adapter_version: int,
    model_version: int,
    skip_unmatched: bool,
) -> FolderExportResult:
    found = find_models(for_folder)
    models = _load(found)
    targets = {name: out / adapter_file_name(name, kind) for name in found.models}
    reads = [*(p for m in models.values() for p in model_inputs(m)), Path(peft)]
    check_outputs(list(targets.values()), reads)  # before any work
    routing, parts = _route(found, models, peft, skip_unmatched)
    planned: dict[str, tuple[dict[str, np.ndarray], str, str]] = {}
    warnings: list[str] = []
    for name, loaded in models.items():
        taken = routing.files[name]
        if not taken:
            continue
        source: str | os.PathLike = peft
        chosen: Sequence[AdapterModule] | None = taken
        if parts is not None:
            source, chosen = _part(peft, parts[name]), None
        try:
            tensors, slot_adapter, produced = peft_slot_tensors(loaded, source, adapter, modules=chosen)
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
        planned[name] = (tensors, slot_adapter, produced.origin)
        warnings.extend(f"{name}: {message}" for message in produced.warnings)
    if routing.unmatched:
        paths = [module.full_path for module in routing.unmatched]
        warnings.append(
            f"skipped {len(routing.skipped_keys)} adapter key(s) of {len(paths)} module(s) no model file "
            f"has (--skip-unmatched): {', '.join(paths)}"
        )
    files: list[ExportFile] = []
    for name in found.models:
        taken_paths = tuple(module.full_path for module in routing.files[name])
        if name not in planned:
            note = "takes no module of the adapter: no adapter file (its slots stay empty)"
            if not slot_records(models[name]):
                note = "has no LoRA slots and takes no module of the adapter: no adapter file"
            warnings.append(f"{name} {note}")
            files.append(ExportFile(name, taken_paths, note=note))
            continue
        tensors, slot_adapter, origin = planned[name]
        written = write_export(
            tensors, targets[name], kind, slot_adapter, origin, reads, adapter_version, model_version
        )
        files.append(ExportFile(name, taken_paths, written.output, len(tensors)))
    names = {slot_adapter for _, slot_adapter, _ in planned.values()}
    return FolderExportResult(
        found.root, tuple(files), out, kind, names.pop() if len(names) == 1 else None, f"PEFT {peft}",
        routing.skipped_keys, tuple(warnings),
    )  # fmt: skip


def _constant_adapters(model: LoadedModel) -> set[str]:
    return {b.adapter for b in read_branches(model.ir_model) if variant_for(b).constant_tensors}


def _export_branches(
    model: FolderSource,
    for_folder: FolderSource | None,
    out: Path,
    kind: str,
    adapter: str | None,
    adapter_version: int,
    model_version: int,
) -> FolderExportResult:
    found = find_models(model)
    models = _load(found)
    carried = {name: _constant_adapters(loaded) for name, loaded in models.items()}
    if adapter is not None and any(adapter in names for names in carried.values()):
        carried = {name: names & {adapter} for name, names in carried.items()}  # the files having it
    carrying = [name for name, names in carried.items() if names]
    if not carrying:
        raise AdapterError(
            f"no model file of {found.root} carries constant LoRA branches ({', '.join(found.models)}); "
            "export a folder made by inject FOLDER --peft ADAPTER, or use --peft ADAPTER --for SLOTS_DIR"
        )
    slots: dict[str, LoadedModel] = {}
    if for_folder is not None:
        slot_found = find_models(for_folder)
        missing = [name for name in carrying if name not in slot_found.models]
        if missing:
            raise AdapterError(
                f"--for {slot_found.root} has no model file {missing[0]} (the files are matched by name; "
                f"it has {', '.join(slot_found.models)})"
            )
        loaded_slots = _load(ModelFolder(slot_found.root, tuple(carrying)))
        slots = dict(loaded_slots)
    targets = {name: out / adapter_file_name(name, kind) for name in carrying}
    reads = [p for m in (*models.values(), *slots.values()) for p in model_inputs(m)]
    check_outputs(list(targets.values()), reads)
    planned: dict[str, tuple[dict[str, np.ndarray], str, str, tuple[str, ...]]] = {}
    for name in carrying:
        try:
            tensors, chosen, source = model_slot_tensors(models[name], slots.get(name), adapter)
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
        paths = tuple(dict.fromkeys(plan.site.module_path for plan in source.plans))
        planned[name] = (tensors, chosen, source.origin, paths)
    files: list[ExportFile] = []
    warnings: list[str] = []
    for name in found.models:
        if name not in planned:
            what = f" of adapter {adapter!r}" if adapter is not None else ""
            note = f"carries no constant LoRA branches{what}: no adapter file"
            warnings.append(f"{name} {note}")
            files.append(ExportFile(name, note=note))
            continue
        tensors, chosen, origin, paths = planned[name]
        written = write_export(
            tensors, targets[name], kind, chosen, origin, reads, adapter_version, model_version
        )
        files.append(ExportFile(name, paths, written.output, len(tensors)))
    names = {chosen for _, chosen, _, _ in planned.values()}
    return FolderExportResult(
        found.root, tuple(files), out, kind, names.pop() if len(names) == 1 else None,
        f"folder {found.root}", (), tuple(warnings),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# One PEFT adapter from a folder

_ROLE = re.compile(r"\.(lora_[A-Za-z_]+(\.weight|\.bias)?|lora_magnitude_vector|modules_to_save\..*)$")


def _module_of(key: str) -> str:
    return _ROLE.sub("", key.removeprefix(PEFT_PREFIX))


def export_peft_folder(
    folder: FolderSource, output: str | os.PathLike, *, adapter: str | None = None
) -> FolderExportResult:
    """Gather the adapter ``adapter`` (the folder's only one when None) of every model file of ``folder``
    into one PEFT adapter folder ``output`` (adapter_config.json + adapter_model.safetensors).

    Module paths are those the adapter was applied with (a file in a pipeline sub-folder gets its
    component prefix, ``unet.``, in front). A module several files carry with equal tensors is written
    once; with different tensors it is refused (:class:`~lora_onnx.errors.AdapterError` naming the module
    and both files). The config is the adapter_config.json the adapter was imported with when every
    file has the same one, else derived from all branches (as for one model).
    """
    found = find_models(folder)
    models = _load(found)
    out = Path(output)
    reads = [p for m in models.values() for p in model_inputs(m)]
    check_peft_folder(out, reads)  # before any work
    carried = {name: adapter_names(read_branches(m.ir_model)) for name, m in models.items()}
    if not any(carried.values()):
        raise AdapterError(f"no model file of {found.root} carries LoRA branches to export")
    if adapter is None:
        every = sorted({a for names in carried.values() for a in names})
        if len(every) > 1:
            raise AdapterError(
                f"the model files of {found.root} carry adapters {', '.join(every)}; choose one with --name"
            )
        adapter = every[0]
    having = [name for name, names in carried.items() if adapter in names]
    if not having:
        every = sorted({a for names in carried.values() for a in names})
        raise AdapterError(
            f"no model file of {found.root} has an adapter {adapter!r}; they have {', '.join(every)}"
        )
    exports: dict[str, PeftExport] = {}
    for name in having:
        component = found.component(name)
        try:
            exports[name] = peft_export(models[name], adapter, prefix=component + "." if component else "")
        except LoraOnnxError as exc:
            raise model_label(name, exc) from exc
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    shared: dict[str, list[str]] = {}
    for name, export in exports.items():
        for key, value in export.tensors.items():
            if key not in tensors:
                tensors[key], owner[key] = value, name
                continue
            first = tensors[key]
            if first.shape != value.shape or first.dtype != value.dtype or not np.array_equal(first, value):
                raise AdapterError(
                    f"module {_module_of(key)!r} is in {owner[key]} and {name} with different tensors "
                    f"({key}); one PEFT adapter has one per module: export those files one by one"
                )
            shared.setdefault(name, []).append(key)
    configs = [export.config for export in exports.values()]
    if all(config is not None for config in configs) and all(config == configs[0] for config in configs):
        config = configs[0]
    else:
        config = derived_config([branch for export in exports.values() for branch in export.branches])
    assert config is not None
    write_peft_folder(out, tensors, config)
    files: list[ExportFile] = []
    warnings: list[str] = []
    for name in found.models:
        export = exports.get(name)
        if export is None:
            note = f"has no branches of adapter {adapter!r}: nothing taken"
            warnings.append(f"{name} {note}")
            files.append(ExportFile(name, note=note))
            continue
        paths = tuple(dict.fromkeys(b.peft_path for b in export.branches))
        same = shared.get(name, [])
        note = ""
        if same:
            modules = len({_module_of(key) for key in same})
            others = ", ".join(dict.fromkeys(owner[key] for key in same))
            note = f"{modules} module(s) equal to {others}'s, written once"
        files.append(ExportFile(name, paths, out, len(export.tensors) - len(same), note))
    return FolderExportResult(
        found.root, tuple(files), out, "peft", adapter, f"folder {found.root}", (), tuple(warnings)
    )
