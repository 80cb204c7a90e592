"""Swap adapters at run time: put LoRA slots in a model, write adapter files for them, check and fold them.

Every adapter, whatever produced it, reaches the slots the same way: as an :class:`AdapterSource`
(branch plans + A/B values in storage layouts, the scale in each plan), converted to slot form by
:func:`lora_onnx.stages.slots.retarget`. Producers: the fresh planner (:func:`fresh_source`), a PEFT folder
(:func:`peft_source`, through ``lora_onnx.adapters.peft``) and a model carrying constant branches
(:func:`model_source`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_onnx.adapters.check import check_tensors, fitting_adapter
from lora_onnx.adapters.files import FORMATS, format_for, read_adapter_file, write_adapter_file
from lora_onnx.adapters.peft.export import export_peft_adapter
from lora_onnx.adapters.peft.mapping import AdapterModule
from lora_onnx.adapters.peft.modules_to_save import refuse_saved_modules
from lora_onnx.adapters.peft.planning import PeftPlan, plan_peft_adapter
from lora_onnx.common.atomic import check_outputs
from lora_onnx.common.finite import finite_number, require_finite_tensors
from lora_onnx.errors import AdapterError, LoraOnnxError
from lora_onnx.kinds import form_of, kind_of
from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord, read_branches
from lora_onnx.model.save import model_inputs, planned_writes, save_model
from lora_onnx.model.tensors import scale_into_b
from lora_onnx.proofs import validation
from lora_onnx.proofs.validation import ValidationReport
from lora_onnx.recipes.config import DEFAULT_ADAPTER, LoraConfig
from lora_onnx.recipes.init import initial_values
from lora_onnx.recipes.plan import BranchPlan, plan_branches, tensor_stem, unique_stem
from lora_onnx.sites.find import DEFAULT_OPS, Skipped, refuse_existing_adapter, scan_sites
from lora_onnx.stages.insert import insert_branches
from lora_onnx.stages.slots import (
    Bound,
    bake,
    base_view,
    bind,
    choose_adapter,
    insert_slots,
    retarget,
    slot_adapters,
    slot_records,
    slot_tensors,
    strength_name,
)
from lora_onnx.variants import variant_for


@dataclass(frozen=True)
class AdapterSource:
    """An adapter as a producer gives it: plans (sites, names, groups, scale) and A/B values."""

    plans: tuple[BranchPlan, ...]
    values: Mapping[str, np.ndarray]
    origin: str
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()
    #: PEFT keys left out with ``skip_unmatched`` (modules the graph does not have).
    skipped_keys: tuple[str, ...] = ()


def fresh_source(model: LoadedModel, config: LoraConfig, *, check_ranks: bool = True) -> AdapterSource:
    """A fresh adapter from a recipe, planned on ``model`` as ``inject`` plans it (``check_ranks``: see
    :func:`~lora_onnx.recipes.plan.plan_branches`)."""
    scan = scan_sites(model, config.ops)
    # The stems of new branch tensors must be free in the graph (unique_stem asks is_free / reserve).
    names = FreshNames(model.to_ir().graph)
    plan = plan_branches(scan, config, names, check_ranks=check_ranks).require_branches()
    values: dict[str, np.ndarray] = {}
    for branch in plan.branches:
        if branch.a_name not in values:
            values[branch.a_name], values[branch.b_name] = initial_values(branch, config.init, config.seed)
    return AdapterSource(plan.branches, values, "fresh", (*scan.skipped, *plan.skipped), plan.warnings)


def peft_source(
    model: LoadedModel,
    adapter_dir: str | os.PathLike,
    adapter: str,
    *,
    purpose: str = "LoRA slots",
    base_weights: str | os.PathLike | None = None,
    skip_unmatched: bool = False,
    modules: Sequence[AdapterModule] | None = None,
) -> AdapterSource:
    """A PEFT adapter folder as an :class:`AdapterSource` on ``model`` (which may already carry branches).

    PEFT planning (issue 3's ``plan_peft_adapter``) runs on the model's base graph; its branches are
    then moved onto ``model`` (same nodes; the join value may differ when branches are stacked) and
    named after ``model``'s free names for ``adapter``. Adapter parts a slot cannot hold (DoRA
    magnitudes, lora_B biases, embedding adapters) are refused with the reason; ``purpose`` names what
    the adapter is for in that message (mixed-batch branches hold only A and B too). ``base_weights``:
    the base's original parameters, for sites the exporter folded a BatchNorm into. ``skip_unmatched``
    and ``modules`` as for :func:`~lora_onnx.adapters.peft.planning.plan_peft_adapter`.
    """
    result = plan_peft_adapter(
        base_view(model), adapter_dir, adapter_name=adapter, base_weights=base_weights,
        skip_unmatched=skip_unmatched, modules=modules,
    )  # fmt: skip
    _refuse_slotless(result, adapter_dir, purpose)
    plans_in = tuple(result.plan.require_branches().branches)
    sites = {site.node: site for site in scan_sites(model, DEFAULT_OPS).sites}
    names = FreshNames(model.to_ir().graph)
    stems: dict[str, str] = {}
    plans: list[BranchPlan] = []
    values: dict[str, np.ndarray] = {}
    for plan in plans_in:
        here = sites.get(plan.site.node)
        if here is None:
            raise AdapterError(f"{model.name}: node {plan.site.node!r} of the PEFT plan is not a LoRA site")
        if plan.stem not in stems:
            stems[plan.stem] = unique_stem(names, tensor_stem(plan.site.module_path, adapter))
        stem = stems[plan.stem]
        moved = dataclasses.replace(
            plan, site=dataclasses.replace(plan.site, output=here.output), adapter=adapter, stem=stem,
            a_name=f"{stem}.lora_A.weight", b_name=f"{stem}.lora_B.weight",
        )  # fmt: skip
        values[moved.a_name] = np.asarray(result.values[plan.a_name])
        values[moved.b_name] = np.asarray(result.values[plan.b_name])
        plans.append(moved)
    origin = f"PEFT {adapter_dir}"
    return AdapterSource(
        tuple(plans), values, origin, tuple(result.plan.skipped), result.plan.warnings, result.skipped_keys
    )


def _refuse_slotless(peft: PeftPlan, adapter_dir: str | os.PathLike, purpose: str = "LoRA slots") -> None:
    """A slot holds A and B only: DoRA magnitudes, lora_B biases and embedding adapters cannot be slotted."""
    reason = (
        f"which {purpose} cannot carry (they hold only A and B); apply it as constant branches "
        "(inject --peft DIR) or merge it instead"
    )
    for extras in peft.extras.values():
        part = "a DoRA magnitude" if extras.magnitude else "a lora_B bias" if extras.lora_bias else ""
        if part:
            raise AdapterError(f"{adapter_dir}: the adapter has {part} on {extras.adapter_path}, {reason}")
    for plan in peft.plan.branches:
        if not kind_of(plan.site.op).slottable:
            raise AdapterError(
                f"{adapter_dir}: the adapter adapts {plan.site.module_path} ({plan.site.op}), {reason}"
            )


def model_source(model: LoadedModel, adapter: str | None = None) -> AdapterSource:
    """The adapter ``model`` carries as constant branches (``adapter``, or the model's only one)."""
    records = [b for b in read_branches(model.ir_model) if variant_for(b).constant_tensors]
    names = list(dict.fromkeys(b.adapter for b in records))
    if not records:
        kind = "only empty LoRA slots" if slot_records(model) else "no lora-onnx branches"
        raise AdapterError(
            f"{model.name} carries {kind}, so it holds no adapter values to export; use a model injected "
            "with constant branches (inject without --as-inputs) or --peft DIR --for MODEL"
        )
    if adapter is None:
        if len(names) > 1:
            raise AdapterError(f"{model.name} carries adapters {names}; choose one with --name")
        adapter = names[0]
    elif adapter not in names:
        raise AdapterError(f"{model.name} carries no adapter {adapter!r}; it carries {names}")
    refuse_saved_modules(model, adapter)
    sites = {site.node: site for site in scan_sites(model, DEFAULT_OPS).sites}
    plans: list[BranchPlan] = []
    values: dict[str, np.ndarray] = {}
    for record in records:
        if record.adapter != adapter:
            continue
        site = sites.get(record.site)
        if site is None:
            raise AdapterError(f"{model.name}: the branch's node {record.site!r} is no longer a LoRA site")
        plans.append(_record_plan(record, site, record.rank, record.alpha, record.scale))
        for name in (record.a, record.b):
            values.setdefault(name, model.array(name))
    require_finite_tensors(values, model.name)  # an export must not write a file no reader would take
    return AdapterSource(tuple(plans), values, f"model {model.name}")


def _record_plan(record: BranchRecord, site: object, rank: int, alpha: float, scale: float) -> BranchPlan:
    return BranchPlan(
        site=site, adapter=record.adapter, rank=rank, alpha=alpha, scale=scale,
        stem=record.a.removesuffix(".lora_A.weight"), a_name=record.a, b_name=record.b,
        a_group=record.a_group, b_group=record.b_group,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# inject --as-inputs


@dataclass(frozen=True)
class SlotInjectResult:
    """What ``inject_slots`` did: the slotted model, its slot records, the adapter it was planned from
    (in slot form: ``tensors``), and the proofs: ``validation`` (no adapter == base, exactly) and
    ``adapter_validation`` (adapter active == the same tensors as constant branches)."""

    model: LoadedModel
    branches: tuple[BranchRecord, ...]
    source: AdapterSource
    tensors: Mapping[str, np.ndarray]
    output: Path | None = None
    adapter_output: Path | None = None
    validation: ValidationReport | None = None
    adapter_validation: ValidationReport | None = None

    @property
    def ok(self) -> bool:
        return all(r is None or r.ok for r in (self.validation, self.adapter_validation))


def inject_slots(
    model: ModelLike,
    config: LoraConfig | None = None,
    *,
    peft: str | os.PathLike | None = None,
    strength_input: bool = False,
    output: str | os.PathLike | None = None,
    adapter_output: str | os.PathLike | None = None,
    adapter_format: str | None = None,
    validate: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
    base_weights: str | os.PathLike | None = None,
    link_data: bool = False,
    skip_unmatched: bool = False,
    modules: Sequence[AdapterModule] | None = None,
    inputs: validation.InputsLike = None,
) -> SlotInjectResult:
    """Add LoRA slots (graph inputs with empty defaults) for adapter ``config.adapter_name``.

    Sites come from the recipe ``config`` (``--rank``/``--target``...) or from the PEFT adapter
    ``peft``. ``strength_input`` adds the per-adapter strength input (float32, shape (1,), default 1).
    ``adapter_output`` also writes the adapter the slots were planned from (the fresh init, or the PEFT
    adapter) as a file for them. With
    ``validate``, before anything is written: outputs with no adapter active must equal the base's
    exactly, and (when an adapter file is asked for or ``peft`` given) outputs with it active must equal
    the same tensors inserted as constant branches (NaN / Inf outputs fail unless ``allow_nonfinite``).
    ``base_weights``, ``skip_unmatched`` and ``modules`` go with ``peft`` (see :func:`~lora_onnx.apply_peft`);
    ``inputs`` (an .npz path or arrays) replaces the validation's generated inputs.
    """
    config = config or LoraConfig()
    source = load_model(model)
    protect = [*model_inputs(source), *([Path(peft)] if peft is not None else [])]
    writes = [*(planned_writes(source, output) if output is not None else [])]
    check_outputs([*writes, *([adapter_output] if adapter_output is not None else [])], protect)
    adapter = config.adapter_name
    refuse_existing_adapter(source, adapter)
    if base_weights is not None and peft is None:
        raise LoraOnnxError("--base-weights applies with --peft (the base of a trained PEFT adapter)")
    # The slots' rank is free (a symbolic dim): the recipe's rank only shapes an --adapter-out file.
    produced = (
        peft_source(
            source, peft, adapter, base_weights=base_weights, skip_unmatched=skip_unmatched, modules=modules
        )
        if peft is not None
        else fresh_source(source, config, check_ranks=adapter_output is not None)
    )
    inserted = insert_slots(source, produced.plans, strength_input=strength_input)
    slotted, records = inserted.model, inserted.records
    tensors = retarget(produced.plans, produced.values, slotted, adapter)
    report = adapter_report = None
    if validate:
        report = validation.validate(
            source,
            slotted,
            providers=providers,
            rtol=0.0,
            atol=0.0,
            dims=dims,
            allow_nonfinite=allow_nonfinite,
            inputs=inputs,
        )
        if report.ok and (adapter_output is not None or peft is not None):
            constant = insert_branches(source, produced.plans, produced.values).model
            adapter_report = validation.validate(
                constant,
                bake(slotted, tensors),
                providers=providers,
                dims=dims,
                allow_nonfinite=allow_nonfinite,
                inputs=inputs,
            )
    written = adapter_written = None
    if all(r is None or r.ok for r in (report, adapter_report)):
        if adapter_output is not None:
            adapter_written = write_adapter_file(tensors, adapter_output, adapter_format, protect=protect)
        if output is not None:
            written = save_model(slotted, output, protect=protect, link_data=link_data)
    return SlotInjectResult(
        slotted, records, produced, tensors, written, adapter_written, report, adapter_report
    )


# ----------------------------------------------------------------------------------------------------
# Adapter files for slots


@dataclass(frozen=True)
class ExportResult:
    """An exported adapter: where, in which format, for which adapter, and the slots it leaves empty."""

    output: Path
    format: str
    adapter: str | None
    tensors: Mapping[str, tuple[int, ...]]
    empty: tuple[str, ...] = ()
    origin: str = ""
    #: PEFT keys left out with ``skip_unmatched`` (modules the graph does not have).
    skipped_keys: tuple[str, ...] = ()


def write_export(
    tensors: Mapping[str, np.ndarray],
    output: str | os.PathLike,
    format: str | None,
    adapter: str | None,
    origin: str,
    protect: Sequence[Path],
    adapter_version: int,
    model_version: int,
) -> ExportResult:
    kind = format_for(output, format)
    metadata = {"lora_onnx.adapter": adapter or "", "lora_onnx.source": origin}
    path = write_adapter_file(
        tensors, output, kind, adapter_version=adapter_version, model_version=model_version,
        metadata=metadata, protect=protect,
    )  # fmt: skip
    empty = tuple(
        name for name, value in tensors.items() if value.size == 0 and name.endswith(".lora_A.weight")
    )
    shapes = {name: tuple(value.shape) for name, value in tensors.items()}
    return ExportResult(path, kind, adapter, shapes, empty, origin)


def _inputs_of(*models: LoadedModel | None) -> list[Path]:
    paths: list[Path] = []
    for model in models:
        if model is not None:
            paths.extend(p for p in (model.path, *model.external_files()) if p is not None)
    return paths


def export_adapter(
    model: ModelLike | None = None,
    output: str | os.PathLike | None = None,
    *,
    peft: str | os.PathLike | None = None,
    for_model: ModelLike | None = None,
    adapter: str | None = None,
    format: str | None = None,
    adapter_version: int = 1,
    model_version: int = 1,
    base_weights: str | os.PathLike | None = None,
    skip_unmatched: bool = False,
    modules: Sequence[AdapterModule] | None = None,
) -> ExportResult:
    """Write an adapter file for LoRA slots (``format``: onnx_adapter, safetensors, npz or peft).

    Sources: ``peft`` (a PEFT folder; ``for_model``, a model with slots, is then required) or ``model``
    (a model carrying the adapter as constant branches). With ``for_model`` the tensors take that
    model's slot names, layouts and dtypes (matched by node), slots the adapter does not cover are
    written empty; without it they keep ``model``'s names. The LoRA scale is folded into B.
    ``format="peft"`` writes ``model``'s adapter as a PEFT folder (issue 3's exporter). ``skip_unmatched``
    goes with ``peft``: keys of modules the graph does not have are left out (as ``inject --peft``).
    ``base_weights`` and ``modules`` (the adapter modules to take, as a folder run routes them) go with
    ``peft`` (see :func:`~lora_onnx.apply_peft`).
    """
    if base_weights is not None and peft is None:
        raise LoraOnnxError("--base-weights applies with --peft (the base of a trained PEFT adapter)")
    if output is None:
        raise LoraOnnxError("export-adapter needs an output path (-o FILE)")
    if format == "peft":
        if model is None or peft is not None or for_model is not None:
            raise LoraOnnxError("--format peft exports the constant branches of MODEL: give MODEL only")
        loaded = load_model(model)
        path = export_peft_adapter(loaded, output, adapter=adapter)
        return ExportResult(Path(path), "peft", adapter, {}, (), f"model {loaded.name}")
    if format is not None and format not in FORMATS:
        raise LoraOnnxError(f"unknown --format {format!r}; use one of {', '.join((*FORMATS, 'peft'))}")
    format_for(output, format)  # an unknown suffix fails before any work
    target = load_model(for_model) if for_model is not None else None
    if peft is not None:
        if model is not None:
            raise LoraOnnxError("give either MODEL or --peft DIR, not both")
        if target is None:
            raise LoraOnnxError("--peft DIR needs --for MODEL (the model whose slots the file is for)")
        tensors, chosen, source = peft_slot_tensors(
            target, peft, adapter, base_weights=base_weights, skip_unmatched=skip_unmatched, modules=modules
        )
        protect = [*_inputs_of(target), Path(peft)]
        written = write_export(
            tensors, output, format, chosen, source.origin, protect, adapter_version, model_version
        )
        return dataclasses.replace(written, skipped_keys=source.skipped_keys)
    if modules is not None:
        raise LoraOnnxError("modules go with peft (the adapter modules to take from the PEFT adapter)")
    if model is None:
        raise LoraOnnxError("give MODEL (a model with constant LoRA branches) or --peft DIR --for MODEL")
    loaded = load_model(model)
    tensors, chosen, source = model_slot_tensors(loaded, target, adapter)
    protect = _inputs_of(loaded, target)
    return write_export(
        tensors, output, format, chosen, source.origin, protect, adapter_version, model_version
    )


def model_slot_tensors(
    loaded: LoadedModel, target: LoadedModel | None = None, adapter: str | None = None
) -> tuple[dict[str, np.ndarray], str, AdapterSource]:
    """The constant branches ``loaded`` carries for ``adapter`` in slot form: named for ``target``'s slots
    when given (``adapter`` may then name the target's slot adapter), else keeping ``loaded``'s names.
    Returns (tensors, the adapter's name, the source)."""
    carried = {b.adapter for b in read_branches(loaded.ir_model) if variant_for(b).constant_tensors}
    # With a target, ``adapter`` may name the target's slots only (the source then has one adapter).
    source = model_source(loaded, adapter if target is None or adapter in carried else None)
    chosen = source.plans[0].adapter
    if target is None:
        return slot_tensors(source.plans, source.values), chosen, source
    slot_names = slot_adapters(target)
    wanted = adapter if adapter in slot_names else (chosen if chosen in slot_names else None)
    if adapter is not None and wanted is None:
        raise AdapterError(
            f"neither {loaded.name} nor the slots of {target.name} have an adapter {adapter!r}"
        )
    chosen = choose_adapter(target, wanted)
    return retarget(source.plans, source.values, target, chosen), chosen, source


def peft_slot_tensors(
    target: LoadedModel,
    peft: str | os.PathLike,
    adapter: str | None = None,
    *,
    base_weights: str | os.PathLike | None = None,
    skip_unmatched: bool = False,
    modules: Sequence[AdapterModule] | None = None,
) -> tuple[dict[str, np.ndarray], str, AdapterSource]:
    """The PEFT adapter ``peft`` in the form ``target``'s slots of ``adapter`` (its only slot adapter when
    None) take: (tensors, the slot adapter's name, the source they came from). Options as for
    :func:`peft_source`."""
    chosen = choose_adapter(target, adapter)
    source = peft_source(
        target, peft, chosen, base_weights=base_weights, skip_unmatched=skip_unmatched, modules=modules
    )
    return retarget(source.plans, source.values, target, chosen), chosen, source


def fresh_adapter(
    model: ModelLike,
    config: LoraConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    format: str | None = None,
) -> dict[str, np.ndarray]:
    """A fresh adapter for every slot of ``model`` (adapter ``config.adapter_name``, or the only one).

    Rank, alpha and init come from ``config`` per slot (``rank_pattern`` etc. apply; targets do not:
    the slots are the sites). Values equal those ``inject`` gives the same sites with the same recipe
    and seed. Returns the tensors in slot form; ``output`` also writes them.
    """
    config = config or LoraConfig()
    loaded = load_model(model)
    wanted = config.adapter_name
    if wanted == DEFAULT_ADAPTER and wanted not in slot_adapters(loaded):
        wanted = None  # the default name means "the model's slots" when the model has one slot adapter
    adapter = choose_adapter(loaded, wanted)
    sites = {site.node: site for site in scan_sites(base_view(loaded), DEFAULT_OPS).sites}
    plans: list[BranchPlan] = []
    seen: set[str] = set()
    for record in slot_records(loaded, adapter):
        if record.a in seen:
            continue
        seen.add(record.a)
        site = sites[record.site]
        rank, alpha = config.rank_for(site.module_path), config.alpha_for(site.module_path)
        refusal = form_of(record.kind).rank_group_refusal(rank, record.a_group, record.b_group)
        if refusal:
            raise AdapterError(f"{site.module_path}: {refusal}; use a rank_pattern for it")
        plans.append(_record_plan(record, site, rank, alpha, config.scale(rank, alpha)))
    values: dict[str, np.ndarray] = {}
    for plan in plans:
        values[plan.a_name], values[plan.b_name] = initial_values(plan, config.init, config.seed)
    tensors = slot_tensors(plans, values)
    if output is not None:
        write_adapter_file(tensors, output, format, protect=_inputs_of(loaded))
    return tensors


def bind_adapter_file(
    model: LoadedModel,
    adapter_file: str | os.PathLike,
    *,
    adapter: str | None = None,
    strength: float | None = None,
) -> tuple[Bound, LoadedModel]:
    """``model`` with the adapter of ``adapter_file`` as constant branches (other slots removed), and the
    reference it must equal: ``model`` run with that file active. The file must fit (see check-adapter);
    slots it leaves out or empty add zero and are removed. ``strength``: a finite number >= 0."""
    if strength is not None:
        strength = finite_number(strength, "--strength")
    file = read_adapter_file(adapter_file)
    check = check_tensors(model, file.tensors, adapter=adapter, partial=True, label=str(file.path))
    chosen = fitting_adapter(check, "a fold takes one adapter's file")
    bound = bind(model, file.tensors, chosen, strength=strength)
    active = dict(file.tensors)
    if strength is not None:
        # The reference runs the file with each B scaled by ``strength`` (a strength input, if any, at 1).
        for record in slot_records(model, chosen):
            if record.b in active:
                active[record.b] = scale_into_b(active[record.b], strength)
        active[strength_name(chosen)] = np.ones(1, np.float32)
    return bound, bake(model, active)
