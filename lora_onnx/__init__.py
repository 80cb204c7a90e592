"""lora-onnx: add, apply, swap and fold LoRA adapters in exported ONNX models, proven in onnxruntime.

The pipeline, one package per step: :mod:`~lora_onnx.model.load` (graph only) ->
:mod:`~lora_onnx.sites.find` (find sites from metadata; each op kind in :mod:`lora_onnx.kinds`) ->
:mod:`~lora_onnx.recipes.plan` (ranks, names, shapes) -> :mod:`~lora_onnx.stages.insert` (insert branches) ->
:mod:`~lora_onnx.model.save` (atomic, external data linked or streamed) -> :mod:`~lora_onnx.proofs.validation`
(onnxruntime). :mod:`~lora_onnx.stages.fold` undoes a rewrite into the weights;
:mod:`lora_onnx.commands` holds one module per command.

The functions below are what the ``lora-onnx`` command line calls. :mod:`lora_onnx.adapters.peft` applies
trained PEFT adapters (``apply_peft``, ``inject --peft``) and exports adapters back to PEFT;
:mod:`~lora_onnx.commands.folders` applies one across a folder's model files (``apply_peft_folder``,
``merge_folder``: Optimum split exports, genai folders, pipelines), :mod:`~lora_onnx.commands.folder_exports`
exports a folder's adapter (``export_adapter_folder``, ``export_peft_folder``) and
:mod:`~lora_onnx.commands.folder_mixed` mixes adapters across one (``inject_mixed_folder``). Run-time
adapters (LoRA slots that onnxruntime fills per run from adapter files) live in :mod:`~lora_onnx.stages.slots`
(graph), :mod:`~lora_onnx.adapters.files` (file formats), :mod:`~lora_onnx.adapters.check` and
:mod:`~lora_onnx.commands.swap` (``inject_slots``, ``export_adapter``, ``fresh_adapter``).
Mixed-adapter batches (a different adapter per batch row) live in :mod:`~lora_onnx.stages.stacked` (graph) and
:mod:`~lora_onnx.commands.inject_mixed` (``inject_mixed``, ``stack_adapters``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lora_onnx.common.deferred_imports import defer

defer()  # before onnx-ir is imported (lora_onnx.common.deferred_imports says why)

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time they load on first use
    from lora_onnx.adapters.check import AdapterCheck, check_adapter
    from lora_onnx.adapters.files import read_adapter_file, write_adapter_file
    from lora_onnx.adapters.peft import export_peft_adapter
    from lora_onnx.commands.apply_peft import PeftResult, apply_peft
    from lora_onnx.commands.folder_exports import (
        FolderExportResult,
        export_adapter_folder,
        export_peft_folder,
    )
    from lora_onnx.commands.folder_mixed import inject_mixed_folder
    from lora_onnx.commands.folders import FolderResult, apply_peft_folder, merge_folder
    from lora_onnx.commands.inject import InjectResult, inject
    from lora_onnx.commands.inject_mixed import MixedInjectResult, inject_mixed, stack_adapters
    from lora_onnx.commands.inspect import Inspection, inspect_model
    from lora_onnx.commands.merge import MergeResult, merge
    from lora_onnx.commands.swap import (
        ExportResult,
        SlotInjectResult,
        export_adapter,
        fresh_adapter,
        inject_slots,
    )
    from lora_onnx.errors import LoraOnnxError
    from lora_onnx.model.load import LoadedModel, load_model
    from lora_onnx.model.save import save_model
    from lora_onnx.proofs.validation import ValidationReport, validate
    from lora_onnx.recipes.config import LoraConfig
    from lora_onnx.sites.find import Site, SiteScan, Skipped, find_sites
    from lora_onnx.sites.targets import TargetSelector

    inspect = inspect_model

#: Public name -> (module, attribute). Importing ``lora_onnx`` stays cheap (the command line's ``--help``
#: needs no onnx / onnxruntime); a name's module is imported when the name is first used.
_LAZY = {
    "AdapterCheck": ("adapters.check", "AdapterCheck"),
    "check_adapter": ("adapters.check", "check_adapter"),
    "read_adapter_file": ("adapters.files", "read_adapter_file"),
    "write_adapter_file": ("adapters.files", "write_adapter_file"),
    "LoraConfig": ("recipes.config", "LoraConfig"),
    "LoraOnnxError": ("errors", "LoraOnnxError"),
    "FolderResult": ("commands.folders", "FolderResult"),
    "apply_peft_folder": ("commands.folders", "apply_peft_folder"),
    "merge_folder": ("commands.folders", "merge_folder"),
    "FolderExportResult": ("commands.folder_exports", "FolderExportResult"),
    "export_adapter_folder": ("commands.folder_exports", "export_adapter_folder"),
    "export_peft_folder": ("commands.folder_exports", "export_peft_folder"),
    "inject_mixed_folder": ("commands.folder_mixed", "inject_mixed_folder"),
    "InjectResult": ("commands.inject", "InjectResult"),
    "inject": ("commands.inject", "inject"),
    "Inspection": ("commands.inspect", "Inspection"),
    "inspect_model": ("commands.inspect", "inspect_model"),
    "inspect": ("commands.inspect", "inspect_model"),
    "LoadedModel": ("model.load", "LoadedModel"),
    "load_model": ("model.load", "load_model"),
    "MergeResult": ("commands.merge", "MergeResult"),
    "merge": ("commands.merge", "merge"),
    "MixedInjectResult": ("commands.inject_mixed", "MixedInjectResult"),
    "inject_mixed": ("commands.inject_mixed", "inject_mixed"),
    "stack_adapters": ("commands.inject_mixed", "stack_adapters"),
    "PeftResult": ("commands.apply_peft", "PeftResult"),
    "apply_peft": ("commands.apply_peft", "apply_peft"),
    "export_peft_adapter": ("adapters.peft", "export_peft_adapter"),
    "save_model": ("model.save", "save_model"),
    "Site": ("sites.find", "Site"),
    "SiteScan": ("sites.find", "SiteScan"),
    "Skipped": ("sites.find", "Skipped"),
    "find_sites": ("sites.find", "find_sites"),
    "ExportResult": ("commands.swap", "ExportResult"),
    "SlotInjectResult": ("commands.swap", "SlotInjectResult"),
    "export_adapter": ("commands.swap", "export_adapter"),
    "fresh_adapter": ("commands.swap", "fresh_adapter"),
    "inject_slots": ("commands.swap", "inject_slots"),
    "TargetSelector": ("sites.targets", "TargetSelector"),
    "ValidationReport": ("proofs.validation", "ValidationReport"),
    "validate": ("proofs.validation", "validate"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'lora_onnx' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"lora_onnx.{module}"), attribute)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdapterCheck",
    "ExportResult",
    "FolderExportResult",
    "FolderResult",
    "InjectResult",
    "Inspection",
    "LoadedModel",
    "LoraConfig",
    "LoraOnnxError",
    "MergeResult",
    "MixedInjectResult",
    "PeftResult",
    "Site",
    "SiteScan",
    "Skipped",
    "SlotInjectResult",
    "TargetSelector",
    "ValidationReport",
    "apply_peft",
    "apply_peft_folder",
    "check_adapter",
    "export_adapter",
    "export_adapter_folder",
    "export_peft_adapter",
    "export_peft_folder",
    "find_sites",
    "fresh_adapter",
    "inject",
    "inject_mixed",
    "inject_mixed_folder",
    "inject_slots",
    "inspect",
    "inspect_model",
    "load_model",
    "merge",
    "merge_folder",
    "read_adapter_file",
    "save_model",
    "stack_adapters",
    "validate",
    "write_adapter_file",
]

__version__ = "0.1.0"
