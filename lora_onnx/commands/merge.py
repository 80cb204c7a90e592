"""``merge``: fold a rewritten model's branches into its weights, giving a plain model as fast as the base."""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_onnx.common.finite import finite_number
from lora_onnx.errors import LoraOnnxError
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.save import check_output_paths, save_model
from lora_onnx.proofs import validation
from lora_onnx.proofs.quantized import dequantized_rtol
from lora_onnx.proofs.validation import ValidationReport
from lora_onnx.stages.fold import FoldResult, Kept, fold_branches, fold_tolerance
from lora_onnx.variants import AdapterChoice, binder_for


@dataclass(frozen=True)
class MergeResult:
    model: LoadedModel
    folded: tuple[BranchRecord, ...]
    kept: tuple[Kept, ...]
    output: Path | None = None
    validation: ValidationReport | None = None
    #: With an adapter file: the slots dropped because they stay off (not in the file, or other adapters).
    slots_removed: tuple[BranchRecord, ...] = ()
    #: What the user should know about the fold: shared weights it untied (:mod:`lora_onnx.stages.untie`).
    notes: tuple[str, ...] = ()


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
    adapter_file: str | os.PathLike | None = None,
    strength: float | None = None,
    adapter_index: int | None = None,
    remedy: str | None = None,
    allow_nonfinite: bool = False,
    inputs: validation.InputsLike = None,
) -> MergeResult:
    """Fold the branches of ``adapters`` (all by default) into their base weights and optionally save.

    Refuses a branch that cannot be folded (with its reason) unless ``partial``, which keeps such
    branches in place and lists them in ``kept``. Branches on quantized weights (QDQ, MatMulNBits)
    are refused unless ``dequantize``, which writes those weights in float (see
    :mod:`lora_onnx.sites.quantized`). With ``validate`` the merged model is compared with the input in
    onnxruntime before anything is written.

    A model with LoRA slots (``inject --as-inputs``) is folded with a chosen ``adapter_file``: its
    adapter becomes constant branches (at ``strength``, default the model's strength default, 1.0)
    and every other slot, which adds zero when inactive, is removed; ``validate`` then compares the
    merged model with the input running that file active.

    A model with mixed-batch branches (``inject --mixed``) is folded with a chosen ``adapter_index``
    (a position in its stacks): that adapter becomes constant branches, the rest of the mixed form is
    removed; ``validate`` compares with the input running that index on every row.

    ``strength`` must be a finite number >= 0; NaN / Inf outputs fail the validation unless
    ``allow_nonfinite`` (see :func:`lora_onnx.proofs.validation.compare`). ``inputs`` (an .npz path or arrays)
    replaces the validation's generated inputs.
    """
    if strength is not None:
        strength = finite_number(strength, "--strength")
    source = reference = load_model(model)
    protect = [Path(adapter_file)] if adapter_file else []
    if output is not None:
        check_output_paths(source, output, protect)
    removed: tuple[BranchRecord, ...] = ()
    if strength is not None and adapter_file is None:
        raise LoraOnnxError("a strength applies to an adapter file: pass --adapter-file FILE with it")
    if adapter_index is not None and adapter_file is not None:
        raise LoraOnnxError("give an adapter file or an adapter index, not both")
    # The variant that holds several adapters in one place (slots, stacks) binds the chosen one.
    choice = AdapterChoice(file=adapter_file, strength=strength, index=adapter_index)
    binder = binder_for(choice)
    if binder is not None:
        binding = binder.bind(source, choice)
        source, reference, removed = binding.model, binding.reference, binding.removed
    extra = {"remedy": remedy} if remedy is not None else {}  # the refusal's way out, if not --partial
    result: FoldResult = fold_branches(
        source, adapters=adapters, partial=partial, dequantize=dequantize, **extra
    )
    rtol, atol = fold_tolerance(result)
    if validate and dequantize:
        rtol = dequantized_rtol(source, adapters, partial, providers, dims, inputs) or rtol
    report = (
        validation.validate(
            reference,
            result.model,
            providers=providers,
            rtol=rtol,
            atol=atol,
            dims=dims,
            allow_nonfinite=allow_nonfinite,
            inputs=inputs,
        )
        if validate
        else None
    )
    written = None
    if output is not None and (report is None or report.ok):
        written = save_model(result.model, output, protect=protect)
    return MergeResult(result.model, result.folded, result.kept, written, report, removed, result.notes)
