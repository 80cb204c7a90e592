"""Apply Hugging Face PEFT LoRA adapters to exported models, fold them, and export them back.

- :func:`plan_peft_adapter` reads an adapter folder (:mod:`~lora_onnx.adapters.peft.config`,
  :mod:`~lora_onnx.adapters.peft.tensors`), maps its keys to sites (:mod:`~lora_onnx.adapters.peft.mapping`)
  and converts its tensors (:mod:`~lora_onnx.adapters.peft.planning`, DoRA norms in
  :mod:`~lora_onnx.adapters.peft.dora`);
- :func:`insert_peft_branches` adds the branches (:mod:`~lora_onnx.adapters.peft.rewrite`);
- ``inject --peft [--merge]`` is :func:`lora_onnx.apply_peft` (:mod:`~lora_onnx.commands.apply_peft`);
- :func:`export_peft_adapter` writes an adapter folder back (:mod:`~lora_onnx.adapters.peft.export`).

Nothing here imports torch or peft.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_onnx.adapters.peft.config import PeftAdapterConfig, read_adapter_config
    from lora_onnx.adapters.peft.export import export_peft_adapter
    from lora_onnx.adapters.peft.planning import PEFT_OPS, PeftBranchExtras, PeftPlan, plan_peft_adapter
    from lora_onnx.adapters.peft.rewrite import insert_peft_branches

#: Name -> module. Loaded on first use: the single-file LoRA formats (lora_onnx.adapters.formats) read
#: this package's config and tensors modules, and planning reads the formats.
_LAZY = {
    "PEFT_OPS": "planning",
    "PeftAdapterConfig": "config",
    "PeftBranchExtras": "planning",
    "PeftPlan": "planning",
    "export_peft_adapter": "export",
    "insert_peft_branches": "rewrite",
    "plan_peft_adapter": "planning",
    "read_adapter_config": "config",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'lora_onnx.adapters.peft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lora_onnx.adapters.peft.{_LAZY[name]}"), name)
    globals()[name] = value
    return value


__all__ = [
    "PEFT_OPS",
    "PeftAdapterConfig",
    "PeftBranchExtras",
    "PeftPlan",
    "export_peft_adapter",
    "insert_peft_branches",
    "plan_peft_adapter",
    "read_adapter_config",
]
