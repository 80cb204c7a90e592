"""Branch variants as plug-ins: constant, DoRA, lora_bias, slot and stacked (mixed-batch) branches.

Each module says, in one place, how its branches fold (or why they refuse), how a chosen adapter file
or adapter index binds them, how they are removed and which checks apply (see :mod:`.base`); other
modules ask :func:`variant_for` instead of testing ``BranchRecord.variant``.
"""

from lora_onnx.variants.base import (
    VARIANTS,
    AdapterChoice,
    Binding,
    BranchVariant,
    binder_for,
    by_variant,
    plug_in,
    records_of,
    resolve,
    variant_for,
)
from lora_onnx.variants.constant import ConstantBranch
from lora_onnx.variants.dora import DoraBranch
from lora_onnx.variants.lora_bias import LoraBiasBranch
from lora_onnx.variants.slot import SlotBranch
from lora_onnx.variants.stacked import StackedBranch

__all__ = [
    "VARIANTS",
    "AdapterChoice",
    "Binding",
    "BranchVariant",
    "ConstantBranch",
    "DoraBranch",
    "LoraBiasBranch",
    "SlotBranch",
    "StackedBranch",
    "binder_for",
    "by_variant",
    "plug_in",
    "records_of",
    "resolve",
    "variant_for",
]
