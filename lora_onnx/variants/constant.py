"""Plain LoRA branches: A and B are constants, the fold adds ``s * delta`` to the weight (the base hooks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lora_onnx.variants.base import BranchVariant, register

if TYPE_CHECKING:
    from lora_onnx.model.manifest import BranchRecord


@register
class ConstantBranch(BranchVariant):
    """``y = base(x) + s * B(A(x))`` with A and B initializers (``inject``, ``inject --peft``).

    Folds as ``W' = W + s * delta`` (the delta in the weight's layout: :mod:`lora_onnx.stages.fold`), unless
    its conv A is dense on a grouped conv (:meth:`BranchVariant.fold_refusal`). Removed by folding it.
    """

    name = "constant"

    def matches(self, record: BranchRecord) -> bool:
        return super().matches(record) and not record.magnitude and not record.lora_bias
