"""lora-onnx: add, apply, swap and fold LoRA adapters in exported ONNX models, proven in onnxruntime.

The pipeline, one module per stage: :mod:`~lora_onnx.load` (graph only) -> :mod:`~lora_onnx.sites`
(find sites from metadata) -> :mod:`~lora_onnx.plan` (ranks, names, shapes) -> :mod:`~lora_onnx.rewrite`
(insert branches) -> :mod:`~lora_onnx.save` (atomic, external data linked or streamed) ->
:mod:`~lora_onnx.validation` (onnxruntime). :mod:`~lora_onnx.fold` undoes a rewrite into the weights.

The functions below are what the ``lora-onnx`` command line calls. :mod:`lora_onnx.peft` applies
trained PEFT adapters (``apply_peft``, ``inject --peft``) and exports adapters back to PEFT;
:mod:`~lora_onnx.folder_runs` applies one across a folder's model files (``apply_peft_folder``,
``merge_folder``: Optimum split exports, genai folders, pipelines). Run-time
adapters (LoRA slots that onnxruntime fills per run from adapter files) live in :mod:`~lora_onnx.slots`
(graph), :mod:`~lora_onnx.adapter_files` (file formats), :mod:`~lora_onnx.adapter_check` and
:mod:`~lora_onnx.swapping` (``inject_slots``, ``export_adapter``, ``fresh_adapter``).
Mixed-adapter batches (a different adapter per batch row) live in :mod:`~lora_onnx.mixed` (graph) and
:mod:`~lora_onnx.mixing` (``inject_mixed``, ``stack_adapters``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names for type checkers and IDEs; at run time they load on first use
    from lora_onnx.adapter_check import AdapterCheck, check_adapter
    from lora_onnx.adapter_files import read_adapter_file, write_adapter_file
    from lora_onnx.config import LoraConfig
    from lora_onnx.errors import LoraOnnxError
    from lora_onnx.folder_runs import FolderResult, apply_peft_folder, merge_folder
    from lora_onnx.injection import InjectResult, inject
    from lora_onnx.inspection import Inspection, inspect_model
    from lora_onnx.load import LoadedModel, load_model
    from lora_onnx.merging import MergeResult, merge
    from lora_onnx.mixing import MixedInjectResult, inject_mixed, stack_adapters
    from lora_onnx.peft import PeftResult, apply_peft, export_peft_adapter
    from lora_onnx.save import save_model
    from lora_onnx.sites import Site, SiteScan, Skipped, find_sites
    from lora_onnx.swapping import ExportResult, SlotInjectResult, export_adapter, fresh_adapter, inject_slots
    from lora_onnx.targets import TargetSelector
    from lora_onnx.validation import ValidationReport, validate

    inspect = inspect_model

#: Public name -> (module, attribute). Importing ``lora_onnx`` stays cheap (the command line's ``--help``
#: needs no onnx / onnxruntime); a name's module is imported when the name is first used.
_LAZY = {
    "AdapterCheck": ("adapter_check", "AdapterCheck"),
    "check_adapter": ("adapter_check", "check_adapter"),
    "read_adapter_file": ("adapter_files", "read_adapter_file"),
    "write_adapter_file": ("adapter_files", "write_adapter_file"),
    "LoraConfig": ("config", "LoraConfig"),
    "LoraOnnxError": ("errors", "LoraOnnxError"),
    "FolderResult": ("folder_runs", "FolderResult"),
    "apply_peft_folder": ("folder_runs", "apply_peft_folder"),
    "merge_folder": ("folder_runs", "merge_folder"),
    "InjectResult": ("injection", "InjectResult"),
    "inject": ("injection", "inject"),
    "Inspection": ("inspection", "Inspection"),
    "inspect_model": ("inspection", "inspect_model"),
    "inspect": ("inspection", "inspect_model"),
    "LoadedModel": ("load", "LoadedModel"),
    "load_model": ("load", "load_model"),
    "MergeResult": ("merging", "MergeResult"),
    "merge": ("merging", "merge"),
    "MixedInjectResult": ("mixing", "MixedInjectResult"),
    "inject_mixed": ("mixing", "inject_mixed"),
    "stack_adapters": ("mixing", "stack_adapters"),
    "PeftResult": ("peft", "PeftResult"),
    "apply_peft": ("peft", "apply_peft"),
    "export_peft_adapter": ("peft", "export_peft_adapter"),
    "save_model": ("save", "save_model"),
    "Site": ("sites", "Site"),
    "SiteScan": ("sites", "SiteScan"),
    "Skipped": ("sites", "Skipped"),
    "find_sites": ("sites", "find_sites"),
    "ExportResult": ("swapping", "ExportResult"),
    "SlotInjectResult": ("swapping", "SlotInjectResult"),
    "export_adapter": ("swapping", "export_adapter"),
    "fresh_adapter": ("swapping", "fresh_adapter"),
    "inject_slots": ("swapping", "inject_slots"),
    "TargetSelector": ("targets", "TargetSelector"),
    "ValidationReport": ("validation", "ValidationReport"),
    "validate": ("validation", "validate"),
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
    "export_peft_adapter",
    "find_sites",
    "fresh_adapter",
    "inject",
    "inject_mixed",
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
