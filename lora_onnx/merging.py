"""``merge``: fold a rewritten model's branches into its weights, giving a plain model as fast as the base."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_onnx import validation
from lora_onnx.fold import FoldResult, Kept, fold_branches
from lora_onnx.load import LoadedModel, ModelLike, load_model
from lora_onnx.manifest import BranchRecord
from lora_onnx.quantized_proof import dequantized_rtol
from lora_onnx.save import save_model
from lora_onnx.validation import ValidationReport


@dataclass(frozen=True)
class MergeResult:
    model: LoadedModel
    folded: tuple[BranchRecord, ...]
    kept: tuple[Kept, ...]
    output: Path | None = None
    validation: ValidationReport | None = None


def merge(
    model: ModelLike,
    *,
    output: str | os.PathLike | None = None,
    adapters: Collection[str] | None = None,
    partial: bool = False,
    dequantize: bool = False,
    validate: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
) -> MergeResult:
    """Fold the branches of ``adapters`` (all by default) into their base weights and optionally save.

    Refuses a branch that cannot be folded (with its reason) unless ``partial``, which keeps such
    branches in place and lists them in ``kept``. Branches on quantized weights (QDQ, MatMulNBits)
    are refused unless ``dequantize``, which writes those weights in float (see
    :mod:`lora_onnx.quantized`). With ``validate`` the merged model is compared with the input in
    onnxruntime before anything is written.
    """
    source = load_model(model)
    result: FoldResult = fold_branches(source, adapters=adapters, partial=partial, dequantize=dequantize)
    report = None
    if validate:
        rtol = dequantized_rtol(source, adapters, partial, providers, dims) if dequantize else None
        report = validation.validate(source, result.model, providers=providers, dims=dims, rtol=rtol)
    written = None
    if output is not None and (report is None or report.ok):
        written = save_model(result.model, output)
    return MergeResult(result.model, result.folded, result.kept, written, report)
