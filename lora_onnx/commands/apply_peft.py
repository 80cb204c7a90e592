"""``inject --peft``: apply a trained PEFT adapter (plan -> rewrite -> optional fold -> prove -> save)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_onnx.adapters.peft.fused_attention import fold_fused, fused_note, fused_reference
from lora_onnx.adapters.peft.modules_to_save import replace_saved
from lora_onnx.adapters.peft.planning import PeftPlan, plan_peft_adapter
from lora_onnx.adapters.peft.rewrite import insert_peft_branches
from lora_onnx.errors import FoldError
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.save import check_output_paths, save_model
from lora_onnx.proofs import validation
from lora_onnx.proofs.validation import ValidationReport
from lora_onnx.recipes.config import DEFAULT_ADAPTER
from lora_onnx.recipes.plan import Plan
from lora_onnx.sites.find import refuse_existing_adapter
from lora_onnx.stages.fold import fold_branches


@dataclass(frozen=True)
class PeftResult:
    """What ``apply_peft`` did.

    ``model`` is the result (merged when ``merge`` was asked), ``branches`` the branches inserted (all of
    them folded when ``folded`` is not empty), ``peft`` the plan they came from.
    """

    model: LoadedModel
    branches: tuple[BranchRecord, ...]
    peft: PeftPlan
    folded: tuple[BranchRecord, ...] = ()
    output: Path | None = None
    validation: ValidationReport | None = None
    notes: tuple[str, ...] = ()
    #: Shared weights the merge untied (:mod:`lora_onnx.stages.untie`): information, not warnings.
    fold_notes: tuple[str, ...] = ()

    @property
    def plan(self) -> Plan:
        return self.peft.plan

    @property
    def warnings(self) -> tuple[str, ...]:
        return (*self.peft.plan.warnings, *self.notes)


def apply_peft(
    model: ModelLike,
    adapter_dir: str | os.PathLike,
    *,
    output: str | os.PathLike | None = None,
    merge: bool = False,
    validate: bool = False,
    adapter_name: str = DEFAULT_ADAPTER,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
    base_weights: str | os.PathLike | None = None,
    link_data: bool = False,
    inputs: validation.InputsLike = None,
) -> PeftResult:
    """Apply the PEFT LoRA adapter in ``adapter_dir`` to ``model`` with PEFT's numerics; optionally fold it
    (``merge``: PEFT's ``merge_and_unload``), prove it and save it.

    Every adapter key must map to a site (by module path, tolerating a wrapper prefix on either side);
    ``modules_to_save`` copies replace the base's tensors of their modules
    (:mod:`lora_onnx.adapters.peft.modules_to_save`); anything that does not fit raises
    :class:`~lora_onnx.errors.AdapterError` before anything is written.
    With ``validate`` the unmerged model is compared in onnxruntime with its own fold (the merged model
    when ``merge``); a branch that cannot be folded (a grouped conv, as in PEFT) stays unproven, with a note.
    NaN / Inf outputs fail the proof unless ``allow_nonfinite`` (adapter tensors with any are refused).
    ``base_weights``: the base model's original parameters (safetensors), needed where the exporter
    folded a BatchNorm into an adapted weight (see :mod:`lora_onnx.sites.folded_weights`).
    ``link_data`` and ``inputs`` (the proof's .npz / arrays) as for :func:`~lora_onnx.commands.inject.inject`.
    """
    source = load_model(model)
    protect = [Path(adapter_dir)]
    if output is not None:
        check_output_paths(source, output, protect)  # before any work; the adapter's files included
    refuse_existing_adapter(source, adapter_name)
    peft = plan_peft_adapter(
        source,
        adapter_dir,
        adapter_name=adapter_name,
        base_weights=base_weights,
        fused_merge=merge,
        modules_to_save=True,
    )
    # Modules inside fused Attention nodes go straight into the packed weights (merge only; see
    # lora_onnx.adapters.peft.fused_attention).
    fused = fold_fused(source, peft.fused)
    if peft.branches:
        inserted = insert_peft_branches(fused, peft)
        rewritten, records = inserted.model, inserted.records
    else:
        rewritten, records = fused, ()
    if peft.saved and peft.saved_weights is not None:
        rewritten = replace_saved(rewritten, peft.saved, peft.saved_weights, adapter_name)
    folding = (merge or validate) and bool(records)
    fold = fold_branches(rewritten, adapters=[adapter_name], partial=True) if folding else None
    notes: list[str] = [fused_note(peft.fused)] if peft.fused else []
    if fold is not None and fold.kept:
        first = fold.kept[0]
        where = f"the branch at node {first.branch.site!r} ({first.branch.module_path})"
        if merge:
            more = f" (and {len(fold.kept) - 1} more)" if len(fold.kept) > 1 else ""
            raise FoldError(f"cannot merge {where}: {first.reason}{more}; apply the adapter without merging")
        notes.append(
            f"{len(fold.kept)} branch(es) cannot be folded, so the proof does not cover them: {first.reason}"
        )
    result = fold.model if merge and fold is not None else rewritten
    report = None
    if validate and peft.fused:
        # The reference computes the fused modules' packed weights in the graph, the rest as branches.
        reference = fused_reference(source, peft.fused)
        reference = insert_peft_branches(reference, peft).model if peft.branches else reference
        report = validation.validate(
            reference, result, providers=providers, dims=dims, allow_nonfinite=allow_nonfinite
        )
    elif validate and fold is not None and fold.folded:
        report = validation.validate(
            rewritten, fold.model, providers=providers, dims=dims, allow_nonfinite=allow_nonfinite,
            inputs=inputs,
        )  # fmt: skip
    written = None
    if output is not None and (report is None or report.ok):
        written = save_model(result, output, protect=protect, link_data=link_data)
    folded = fold.folded if merge and fold is not None else ()
    untied = fold.notes if merge and fold is not None else ()  # shared weights the merge untied
    return PeftResult(result, records, peft, folded, written, report, tuple(notes), untied)
