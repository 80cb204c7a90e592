"""DoRA branches (PEFT ``use_dora``): the joined output is rescaled per output channel by ``m / norm``.

The graph multiplies the joined output by ``magnitude / weight_norm`` (both constants; the norm of
``W + s * delta`` is computed when the adapter is applied, :mod:`lora_onnx.adapters.peft.dora`). Folding gives
PEFT's ``merge_and_unload``: ``W' = (m / norm) * (W + s * delta)``, each output channel scaled, so a
DoRA branch must be its weight's only delta.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lora_onnx.kinds import form_of
from lora_onnx.variants.base import register
from lora_onnx.variants.constant import ConstantBranch

if TYPE_CHECKING:
    from lora_onnx.model.load import LoadedModel
    from lora_onnx.model.manifest import BranchRecord


@register
class DoraBranch(ConstantBranch):
    """A constant branch with a DoRA magnitude and weight norm (see the module doc)."""

    name = "dora"
    rescales_weight = True

    def matches(self, record: BranchRecord) -> bool:
        return record.variant == self.recorded_as and bool(record.magnitude)

    def weight_refusal(self, weight: str, on_weight: Sequence[BranchRecord]) -> str | None:
        # DoRA's norm and rescaling are of one exact weight: beside any other delta (folded or not),
        # neither can be folded without changing the other's output.
        if len({(b.a, b.b, b.scale) for b in on_weight}) > 1:
            return (
                f"its weight {weight!r} carries a DoRA branch and another branch; DoRA rescales the whole "
                "weight, so neither folds without changing the other's output (keep them unmerged)"
            )
        return None

    def channel_factor(self, model: LoadedModel, record: BranchRecord, ndim: int) -> np.ndarray:
        """``magnitude / weight_norm``, shaped to scale the output channels of the source weight."""
        factor = np.asarray(model.array(record.magnitude), np.float32) / np.asarray(
            model.array(record.weight_norm), np.float32
        )
        return factor.reshape(form_of(record.kind).channel_factor_shape(record.source_layout, ndim))
