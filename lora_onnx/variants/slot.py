"""LoRA slots (``inject --as-inputs``): A and B are graph inputs with empty defaults, swapped per run.

A slot holds no adapter values, so it cannot be folded as it is: ``merge --adapter-file FILE`` binds
one adapter file (:func:`lora_onnx.commands.swap.bind_adapter_file`), whose adapter becomes constant
branches, and removes every other slot (uncovered, empty in the file, or of another adapter), which
adds zeros when inactive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_onnx.variants.base import AdapterChoice, Binding, BranchVariant, register

if TYPE_CHECKING:
    from lora_onnx.model.load import LoadedModel
    from lora_onnx.model.manifest import BranchRecord


@register
class SlotBranch(BranchVariant):
    """A branch whose A and B are graph inputs (see the module doc)."""

    name = "slot"
    recorded_as = "slot"
    constant_tensors = False

    def fold_refusal(self, record: BranchRecord) -> str | None:
        return (
            f"its tensors are {self.recorded_as} inputs, not constants; fold it with a chosen adapter file "
            "(merge --adapter-file FILE)"
        )

    def takes(self, choice: AdapterChoice) -> bool:
        return choice.file is not None

    def bind(self, model: LoadedModel, choice: AdapterChoice) -> Binding:
        # Imported here: the slot modules build on the fold, which asks this registry.
        from lora_onnx.commands.swap import bind_adapter_file

        assert choice.file is not None
        bound, reference = bind_adapter_file(model, choice.file, strength=choice.strength)
        return Binding(bound.model, reference, bound.bound, bound.removed)

    def strip(self, model: LoadedModel) -> LoadedModel:
        from lora_onnx.stages.slots import remove_slots, slot_records

        records = slot_records(model)
        return remove_slots(model, records) if records else model
