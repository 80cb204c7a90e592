"""``inject --peft``: apply a trained PEFT adapter (plan -> rewrite -> optional fold -> prove -> save)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lora_onnx.adapters.peft.fused_attention import fold_fused, fused_note, fused_reference
from lora_onnx.adapters.peft.mapping import AdapterModule
from lora_onnx.adapters.peft.modules_to_save import replace_saved
from lora_onnx.adapters.peft.planning import PeftPlan, plan_peft_adapter
from lora_onnx.adapters.peft.rewrite import insert_peft_branches
from lora_onnx.errors import AdapterError, FoldError
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.save import check_output_paths, save_model
from lora_onnx.proofs import validation
from lora_onnx.proofs.quantized import dequantized_rtol
from lora_onnx.proofs.validation import ValidationReport
from lora_onnx.recipes.config import DEFAULT_ADAPTER
from lora_onnx.recipes.plan import Plan
from lora_onnx.sites.find import refuse_existing_adapter
from lora_onnx.stages.fold import fold_branches

#: One adapter to apply: a path (PEFT folder or single-file LoRA), or (path, strength).
AdapterSpec = str | os.PathLike | tuple[str | os.PathLike, float]


@dataclass(frozen=True)
class PeftResult:
    """What ``apply_peft`` did.

    ``model`` is the result (merged when ``merge`` was asked), ``branches`` the branches inserted (all of
    them folded when ``folded`` is not empty), ``peft`` the plan they came from (the first adapter's;
    ``plans`` holds one per adapter, in the order given, ``adapters`` their names).
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
    plans: tuple[PeftPlan, ...] = ()
    adapters: tuple[str, ...] = ()

    @property
    def plan(self) -> Plan:
        if len(self.plans) < 2:
            return self.peft.plan
        return Plan(
            tuple(b for p in self.plans for b in p.plan.branches),
            tuple(s for p in self.plans for s in p.plan.skipped),
            tuple(w for p in self.plans for w in p.plan.warnings),
        )

    @property
    def warnings(self) -> tuple[str, ...]:
        return (*self.plan.warnings, *self.notes)


def default_adapter_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Names for several adapters: each file's stem (folder's name), as letters, digits, '_' and '-',
    made unique (``style``, ``lcm``, ``lcm_2``)."""
    names: list[str] = []
    for path in paths:
        stem = Path(path).name.removesuffix(".safetensors")
        name = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "adapter"
        wanted, number = name, 1
        while name in names:
            number += 1
            name = f"{wanted}_{number}"
        names.append(name)
    return names


def _specs(
    adapters: AdapterSpec | Sequence[AdapterSpec], strength: float
) -> list[tuple[os.PathLike[str], float]]:
    """(path, strength) per adapter; a path-like such as a ``PeftRef`` is kept (its own strength and
    component are read by planning, times ``strength``)."""

    def path(value: str | os.PathLike) -> os.PathLike[str]:
        return Path(value) if isinstance(value, str) else value  # type: ignore[return-value]

    if isinstance(adapters, (str, os.PathLike)):
        return [(path(adapters), strength)]
    if isinstance(adapters, tuple) and len(adapters) == 2 and isinstance(adapters[1], (int, float)):
        return [(path(adapters[0]), float(adapters[1]))]  # type: ignore[arg-type]
    specs = []
    for item in adapters:  # type: ignore[union-attr]
        if isinstance(item, tuple):
            specs.append((path(item[0]), float(item[1])))
        else:
            specs.append((path(item), strength))
    if not specs:
        raise AdapterError("no adapter given")
    return specs


def apply_peft(
    model: ModelLike,
    adapter_dir: AdapterSpec | Sequence[AdapterSpec],
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
    component: str | None = None,
    strength: float = 1.0,
    adapter_names: Sequence[str] | None = None,
    skip_unmatched: bool = False,
    modules: Sequence[AdapterModule] | None = None,
    module_map: Sequence[str] = (),
) -> PeftResult:
    """Apply the PEFT LoRA adapter in ``adapter_dir`` to ``model`` with PEFT's numerics; optionally fold it
    (``merge``: PEFT's ``merge_and_unload``), prove it and save it.

    ``adapter_dir`` is a PEFT folder or a single-file LoRA (``.safetensors``, diffusers or kohya; its
    ``component`` for this model: ``unet``, ``text_encoder``..., by default the one matching the graph),
    applied at ``strength`` (every scale times it); or several of them, each a path or ``(path,
    strength)``: each becomes its own adapter (branches side by side), named ``adapter_names`` or after
    its file (:func:`default_adapter_names`), and ``merge`` folds them all.

    Every adapter key must map to a site (by module path, tolerating a wrapper prefix on either side);
    ``modules_to_save`` copies replace the base's tensors of their modules
    (:mod:`lora_onnx.adapters.peft.modules_to_save`); anything that does not fit raises
    :class:`~lora_onnx.errors.AdapterError` before anything is written.
    With ``validate`` the unmerged model is compared in onnxruntime with its own fold (the merged model
    when ``merge``); a branch on a quantized weight (MatMulNBits, QDQ) is proven against its fold into the
    dequantized base, within the quantized kernels' measured rounding
    (:func:`~lora_onnx.proofs.quantized.dequantized_rtol`); a branch that cannot be folded (a grouped conv,
    as in PEFT) stays unproven, with a note.
    NaN / Inf outputs fail the proof unless ``allow_nonfinite`` (adapter tensors with any are refused).
    ``base_weights``: the base model's original parameters (safetensors), needed where the exporter
    folded a BatchNorm into an adapted weight (see :mod:`lora_onnx.sites.folded_weights`).
    ``link_data`` and ``inputs`` (the proof's .npz / arrays) as for :func:`~lora_onnx.commands.inject.inject`.
    ``skip_unmatched`` and ``modules`` as for :func:`~lora_onnx.adapters.peft.planning.plan_peft_adapter`
    (skipped keys: ``result.peft.skipped_keys``; ``modules`` with one adapter only). ``module_map``
    (``REGEX=REPL``) renames adapter modules the graph does not have, before the builder's renames and
    packed projections (q / k / v on genai's ``qkv_proj``; :mod:`lora_onnx.adapters.peft.packed`).
    """
    source = load_model(model)
    specs = _specs(adapter_dir, strength)
    if modules is not None and len(specs) > 1:
        raise AdapterError("modules= selects one adapter's modules; give one adapter with it")
    protect = [Path(path) for path, _ in specs]
    if output is not None:
        check_output_paths(source, output, protect)  # before any work; the adapter's files included
    if adapter_names is not None:
        names = list(adapter_names)
        if len(names) != len(specs):
            raise AdapterError(f"{len(specs)} adapter(s) but {len(names)} adapter name(s)")
    else:
        names = [adapter_name] if len(specs) == 1 else default_adapter_names([path for path, _ in specs])
    if len(set(names)) != len(names):
        raise AdapterError(f"adapter names must differ, got {names}")
    for name in names:
        refuse_existing_adapter(source, name)
    rewritten = source
    plans: list[PeftPlan] = []
    all_records: list[BranchRecord] = []
    notes: list[str] = []
    for (path, weight), name in zip(specs, names, strict=True):
        peft = plan_peft_adapter(
            rewritten, path, adapter_name=name, base_weights=base_weights, component=component,
            strength=weight, fused_merge=merge, modules_to_save=True, skip_unmatched=skip_unmatched,
            modules=modules, module_map=module_map,
        )  # fmt: skip
        # Modules inside fused Attention nodes go straight into the packed weights (merge only; see
        # lora_onnx.adapters.peft.fused_attention).
        rewritten = fold_fused(rewritten, peft.fused)
        if peft.branches:
            inserted = insert_peft_branches(rewritten, peft)
            rewritten = inserted.model
            all_records.extend(inserted.records)
        if peft.saved and peft.saved_weights is not None:
            rewritten = replace_saved(rewritten, peft.saved, peft.saved_weights, name)
        if peft.fused:
            notes.append(fused_note(peft.fused))
        plans.append(peft)
    peft, records = plans[0], tuple(all_records)
    folding = (merge or validate) and bool(records)
    # The proof of an unmerged model folds into dequantized weights where the base is quantized
    # (MatMulNBits, QDQ): the reference is the branches folded into the float base; a merge never
    # dequantizes (that is merge --dequantize's to ask).
    fold = fold_branches(rewritten, adapters=names, partial=True, dequantize=not merge) if folding else None
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
    if validate and any(p.fused for p in plans):
        # The reference computes the fused modules' packed weights in the graph, the rest as branches.
        reference = source
        for plan in plans:
            reference = fused_reference(reference, plan.fused)
            reference = insert_peft_branches(reference, plan).model if plan.branches else reference
        report = validation.validate(
            reference, result, providers=providers, dims=dims, allow_nonfinite=allow_nonfinite,
            inputs=inputs,
        )  # fmt: skip
    elif validate and fold is not None and fold.folded:
        # A quantized base runs its own kernels (int4 MatMulNBits, integer GEMMs) while the dequantized
        # fold computes in float: their measured difference on the base is allowed (proofs.quantized).
        # The baseline runs the base itself where the rewrite only added branches (no saved modules).
        base = None if any(p.saved for p in plans) else source
        rtol = None if merge else dequantized_rtol(rewritten, names, True, providers, dims, inputs, base)
        report = validation.validate(
            rewritten, fold.model, providers=providers, rtol=rtol, dims=dims,
            allow_nonfinite=allow_nonfinite, inputs=inputs,
        )  # fmt: skip
    written = None
    if output is not None and (report is None or report.ok):
        written = save_model(result, output, protect=protect, link_data=link_data)
    folded = fold.folded if merge and fold is not None else ()
    untied = fold.notes if merge and fold is not None else ()  # shared weights the merge untied
    return PeftResult(
        result, records, peft, folded, written, report, tuple(notes), fold_notes=untied, plans=tuple(plans),
        adapters=tuple(names),
    )  # fmt: skip
