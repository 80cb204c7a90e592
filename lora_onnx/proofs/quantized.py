"""How closely a quantized model must match its dequantized fold in onnxruntime.

Kept apart from :mod:`lora_onnx.commands.merge` and :mod:`lora_onnx.commands.inject`, which both use it, so
neither imports the other.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence

from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import read_branches
from lora_onnx.proofs import validation
from lora_onnx.sites import quantized
from lora_onnx.stages.fold import fold_branches

#: How many times the base's own quantized-vs-float error a dequantized fold may differ by.
QUANTIZED_SLACK = 4.0


def dequantized_rtol(
    model: LoadedModel,
    adapters: Collection[str] | None = None,
    partial: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    inputs: validation.InputsLike = None,
    base: LoadedModel | None = None,
) -> dict[str, float] | None:
    """Per-output rtol for comparing ``model`` with its dequantized fold, or None without quantized bases.

    A dequantized fold computes in float, while onnxruntime runs the quantized base with its own kernels
    (int8 activations for MatMulNBits at accuracy_level 4, integer GEMMs for QDQ), which differ from
    float by their rounding. That difference is measured on the base itself (``model`` with B = 0 against
    its fold) and allowed :data:`QUANTIZED_SLACK` times on top of the default tolerance.

    ``base``, when given, is the model before the rewrite (the same graph without the branches): the
    baseline then runs it, not ``model`` with B = 0, against the dequantized fold, so the tolerance never
    depends on the branches under proof (a branch that is not inert at B = 0, such as a join that drops the
    base output, would otherwise widen the tolerance it is judged by). A ``base`` with branches of its
    own is not used: the baseline's fold runs every constant branch at B = 0, the base would not.
    """
    if not quantized.has_quantized_branches(model, adapters):
        return None
    if base is not None and read_branches(base.ir_model):
        base = None
    zeroed = quantized.without_deltas(model)
    float_base = fold_branches(zeroed, adapters=adapters, partial=partial, dequantize=True).model
    baseline = validation.validate(
        base if base is not None else zeroed, float_base, providers=providers, dims=dims,
        allow_nonfinite=True, inputs=inputs,
    )  # fmt: skip
    # NaN / Inf are the main proof's to judge; a baseline that measured nothing (NaN where the base is
    # finite, a shape) gives no slack rather than an infinite rtol that would pass any output.
    return {
        c.name: c.rtol + (QUANTIZED_SLACK * c.max_rel if math.isfinite(c.max_rel) else 0.0)
        for c in baseline.comparisons
    }
