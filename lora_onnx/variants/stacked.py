"""Mixed-batch branches (``inject --mixed``): several adapters stacked, each batch row picks one.

A/B are the stacks (rank = the padded R), recorded with variant ``"mixed"``; the shared index nodes and
the index input are under :data:`lora_onnx.stages.stacked.MIXED_KEY`. The stacks hold several adapters, so
they cannot be folded as they are: ``merge --adapter-index I`` binds stack position I
(:func:`lora_onnx.stages.stacked.bind_index`), which becomes constant branches, and removes the whole mixed
form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_onnx.variants.base import AdapterChoice, Binding, BranchVariant, register

if TYPE_CHECKING:
    from lora_onnx.model.load import LoadedModel
    from lora_onnx.model.manifest import BranchRecord


@register
class StackedBranch(BranchVariant):
    """A branch holding several adapters' A and B as stacks (see the module doc)."""

    name = "stacked"
    recorded_as = "mixed"
    constant_tensors = False

    def fold_refusal(self, record: BranchRecord) -> str | None:
        return "it holds several adapters stacked (mixed batches); fold one of them (merge --adapter-index I)"

    def takes(self, choice: AdapterChoice) -> bool:
        return choice.index is not None

    def bind(self, model: LoadedModel, choice: AdapterChoice) -> Binding:
        # Imported here: lora_onnx.stages.stacked builds on the fold, which asks this registry.
        from lora_onnx.stages.stacked import bind_index

        assert choice.index is not None
        bound, added, reference = bind_index(model, choice.index)
        return Binding(bound, reference, added)

    def strip(self, model: LoadedModel) -> LoadedModel:
        from lora_onnx.stages.stacked import strip_mixed

        return strip_mixed(model)
