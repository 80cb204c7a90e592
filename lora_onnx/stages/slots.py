"""LoRA slots: branches whose A and B are graph inputs, so onnxruntime can swap adapters per run.

A slot is the core branch (:mod:`lora_onnx.stages.insert`) with its two tensors turned into graph inputs, each
backed by a same-named initializer holding an *empty* default (rank 0)::

    dense:  y = y.lora_base + MatMul(MatMul(x', A), B)     A (in, R), B (R, out)
    conv:   y = y.lora_base + ConvB(ConvA(x))              A (R, in/ga, k...), B (out, R/gb, 1...)
    ConvTranspose: ConvB(ConvTransposeA(x))                A (in, R/ga, k...), B (out, R/gb, 1...)

``R`` is a symbolic per-site dim ``"<stem>.rank"``, so one session accepts adapters of any rank per site.
With no adapter active the branch adds exact zeros (a rank-0 product), so outputs equal the base's.
Adapter files carry the LoRA scale folded into B, so a slot has no scale Mul; it keeps a constant Mul
only for a Gemm's own ``alpha`` (as the core branch does). An optional per-adapter strength input
``"<adapter>.lora_strength"`` (shape (1,), default 1.0) multiplies the rank-R intermediate, so an
application can blend or switch off adapters per run.

An adapter in *slot form* is a mapping tensor name -> array in these layouts, B already scaled. Any
producer of branch plans + values (the fresh planner, a PEFT import, a model with constant branches)
becomes one through :func:`slot_tensors` / :func:`retarget`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from lora_onnx.errors import AdapterError
from lora_onnx.kinds import form_of
from lora_onnx.model.graph import FreshNames, nodes_by_name, values_by_name
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord, read_branches, write_branches
from lora_onnx.model.tensors import make_tensor, np_dtype, scale_into_b
from lora_onnx.recipes.plan import BranchPlan
from lora_onnx.sites.find import DEFAULT_OPS, scan_sites
from lora_onnx.stages.branch_metadata import stamp_branches
from lora_onnx.stages.contract import Stage, StageResult, require_free
from lora_onnx.stages.fold import remove_branches
from lora_onnx.stages.foreign_slots import foreign_slot_records
from lora_onnx.stages.insert import insert_branches
from lora_onnx.variants import SlotBranch, records_of

#: ``BranchRecord.variant`` of a slot branch (its plug-in: :mod:`lora_onnx.variants.slot`).
SLOT = SlotBranch.recorded_as
STRENGTH_SUFFIX = ".lora_strength"


def strength_name(adapter: str) -> str:
    """The per-adapter strength input's name."""
    return f"{adapter}{STRENGTH_SUFFIX}"


def rank_dim(stem: str) -> str:
    return f"{stem}.rank"


@dataclass(frozen=True)
class SlotSpec:
    """One tensor a model's slots accept: its declared dims (ints and symbolic names) and dtype.

    ``role`` is ``A``, ``B`` or ``strength``; ``branch`` is the slot's record (None for a strength).
    """

    name: str
    adapter: str
    role: str
    dims: tuple[int | str, ...]
    dtype: np.dtype
    branch: BranchRecord | None = None

    @property
    def dtype_name(self) -> str:
        return str(self.dtype)


def slot_records(model: LoadedModel, adapter: str | None = None) -> tuple[BranchRecord, ...]:
    """The slot branches of ``model`` (of one adapter when given).

    A model whose manifest records no slot may still have slots made by another tool (Olive,
    onnxruntime's LoRA test model): those are recognised from the graph
    (:mod:`lora_onnx.stages.foreign_slots`).
    """
    slots = records_of(read_branches(model.ir_model), SlotBranch)
    if not slots:
        slots = foreign_slot_records(model)
    return tuple(b for b in slots if adapter is None or b.adapter == adapter)


def slot_adapters(model: LoadedModel) -> list[str]:
    return list(dict.fromkeys(b.adapter for b in slot_records(model)))


def choose_adapter(model: LoadedModel, adapter: str | None) -> str:
    """``adapter`` if the model has slots for it, else the model's only slot adapter; else an error."""
    names = slot_adapters(model)
    if not names:
        raise AdapterError(
            f"{model.name} has no LoRA slots; add them with inject --as-inputs (or use a model with slots)"
        )
    if adapter is None:
        if len(names) > 1:
            raise AdapterError(f"{model.name} has slots for adapters {names}; choose one with --name")
        return names[0]
    if adapter not in names:
        raise AdapterError(f"{model.name} has no slots for adapter {adapter!r}; it has slots for {names}")
    return adapter


def slot_specs(model: LoadedModel, adapter: str | None = None) -> dict[str, SlotSpec]:
    """Every tensor the slots (of ``adapter``, or all) accept, as the graph declares it."""
    declared = {value.name: value for value in model.to_ir().graph.inputs if value.name}
    specs: dict[str, SlotSpec] = {}
    for branch in slot_records(model, adapter):
        for role, name in (("A", branch.a), ("B", branch.b)):
            if name not in specs:
                specs[name] = _spec(model, declared, name, branch.adapter, role, branch)
        strength = strength_name(branch.adapter)
        if strength in declared and strength not in specs:
            specs[strength] = _spec(model, declared, strength, branch.adapter, "strength", None)
    return specs


def _spec(
    model: LoadedModel,
    declared: Mapping[str, ir.Value],
    name: str,
    adapter: str,
    role: str,
    branch: BranchRecord | None,
) -> SlotSpec:
    value = declared.get(name)
    if value is None:
        raise AdapterError(
            f"{model.name}: slot tensor {name!r} is not a graph input; was the model edited after lora-onnx "
            "added its slots?"
        )
    # A dim with neither a size nor a name reads as 0, as in ONNX's protobuf.
    dims = tuple(d if isinstance(d, int) else d.value or 0 for d in value.shape or ())
    return SlotSpec(name, adapter, role, dims, np_dtype(value.dtype or 0), branch)


# ----------------------------------------------------------------------------------------------------
# Inserting slots


def insert_slots(
    model: LoadedModel, plans: Sequence[BranchPlan], *, strength_input: bool = False
) -> StageResult:
    """A copy of ``model`` with one slot per plan (only sites, groups and names of the plans are used).

    The core rewrite builds each branch from empty tensors; the branch is then turned into a slot:
    A and B become graph inputs with a symbolic rank dim, and the scale Mul is dropped (adapter files
    carry the scale) or multiplies by the strength input / the Gemm's alpha.
    """
    return InsertSlots(plans, strength_input=strength_input)(model)


class InsertSlots(Stage):
    """LoRA slots beside the planned sites (see the module doc)."""

    name = "insert LoRA slots"

    def __init__(self, plans: Sequence[BranchPlan], *, strength_input: bool = False) -> None:
        self.plans, self.strength_input = tuple(plans), strength_input

    def requires(self, model: LoadedModel) -> None:
        if not self.plans:
            raise AdapterError("no site to put a LoRA slot on")
        if self.strength_input:
            require_free(model, {strength_name(self.plans[0].adapter)}, self.name)

    def call(self, model: LoadedModel) -> StageResult:
        return _insert_slots(model, self.plans, self.strength_input)


def _insert_slots(model: LoadedModel, plans: Sequence[BranchPlan], strength_input: bool) -> StageResult:
    # The graph applies no LoRA scale (1.0); the rank is symbolic (recorded as 0: any rank fits).
    plans = [dataclasses.replace(p, rank=0, alpha=0.0, scale=1.0) for p in plans]
    empties = {}
    for plan in plans:
        dtype = np_dtype(plan.site.dtype)
        empties[plan.a_name] = np.zeros(plan.a_shape, dtype)
        empties[plan.b_name] = np.zeros(plan.b_shape, dtype)
    inserted = insert_branches(model, plans, empties, zero_init=True)
    rewritten, records = inserted.model, inserted.records
    earlier = read_branches(rewritten.ir_model)[: -len(records)]
    slotted = rewritten.to_ir()
    editor = _SlotEditor(slotted.graph, plans[0].adapter, strength_input)
    slots = tuple(editor.convert(plan, record) for plan, record in zip(plans, records, strict=True))
    editor.finish()
    stamp_branches(slotted.graph, slots)
    write_branches(slotted, earlier + slots)
    return StageResult(rewritten.with_ir(slotted), slots)


class _SlotEditor:
    """Turns freshly inserted constant branches into slots, in place on one onnx-ir graph."""

    def __init__(self, graph: ir.Graph, adapter: str, strength: bool) -> None:
        self.graph = graph
        self.names = FreshNames(graph)
        self.values = values_by_name(graph)
        self.nodes = nodes_by_name(graph)
        # float32 whatever the sites compute in, so applications feed one type; fp16 sites Cast it.
        self.strength_type = onnx.TensorProto.FLOAT
        self.strength: ir.Value | None = None
        if strength:
            name = strength_name(adapter)
            if not self.names.is_free(name):
                raise AdapterError(f"the model already has a value named {name!r}; choose another --name")
            self.names.reserve(name)
            # A graph input with a same-named initializer (the default, 1.0), both added by finish().
            self.strength = ir.Value(
                name=name, type=ir.TensorType(ir.DataType(self.strength_type)), shape=ir.Shape([1])
            )
        self.inputs_added: set[str] = set()

    def convert(self, plan: BranchPlan, record: BranchRecord) -> BranchRecord:
        nodes = list(record.nodes)
        branch = [self.nodes[name] for name in nodes]
        scale = self.values[record.scale_tensor]
        mul = next(node for node in branch if scale in node.inputs)
        consumer = next(node for node in branch if mul.outputs[0] in node.inputs)
        scale_tensor = record.scale_tensor
        tape = ir.tape.Tape()  # nodes to put right before the scale Mul
        factor = self._factor(plan, tape)
        if record.gemm_alpha == 1.0:
            scale_tensor = ""
            if factor is None:  # nothing to multiply: B reads A's output directly
                consumer.replace_input_with(consumer.inputs.index(mul.outputs[0]), mul.inputs[0])
                nodes.remove(mul.name)
                self.graph.remove(mul, safe=True)
            else:
                mul.replace_input_with(1, factor)
            self.graph.initializers.pop(record.scale_tensor)
        elif factor is not None:  # a Gemm alpha (constant Mul, kept) and a strength: two Muls
            scaled = ir.Value(name=self.names(f"{plan.stem}.lora_strength_mul.output"))
            name = self.names(f"{plan.stem}.lora_strength_mul")
            mul.replace_input_with(0, tape.op("Mul", [mul.inputs[0], factor], name=name, output=scaled))
        if tape.nodes:
            self.graph.insert_before(mul, tape.nodes)
            position = nodes.index(mul.name)
            nodes[position:position] = [node.name for node in tape.nodes]
        for name in (record.a, record.b):
            self._declare_input(name, plan)
        return dataclasses.replace(
            record, nodes=tuple(nodes), scale_tensor=scale_tensor, variant=SLOT, rank=0, alpha=0.0, scale=1.0
        )

    def _factor(self, plan: BranchPlan, tape: ir.tape.Tape) -> ir.Value | None:
        if self.strength is None:
            return None
        if plan.site.dtype == self.strength_type:
            return self.strength
        cast = ir.Value(name=self.names(f"{plan.stem}.lora_strength_cast.output"))
        name = self.names(f"{plan.stem}.lora_strength_cast")
        return tape.op("Cast", [self.strength], {"to": plan.site.dtype}, name=name, output=cast)

    def _declare_input(self, name: str, plan: BranchPlan) -> None:
        """Make the initializer holding ``name``'s empty default a graph input too, its rank symbolic."""
        if name in self.inputs_added:
            return
        self.inputs_added.add(name)
        shape = plan.a_shape if name == plan.a_name else plan.b_shape
        rank = rank_dim(plan.stem)
        # The rank is the only zero dim of an empty default; a grouped conv's B holds rank / group.
        split = plan.form.rank_split(name == plan.a_name, plan.a_group, plan.b_group)
        symbol = rank if split == 1 else f"{rank}_per_group"
        value = self.values[name]
        value.type = ir.TensorType(ir.DataType(plan.site.dtype))
        value.shape = ir.Shape([symbol if d == 0 else d for d in shape])
        self.graph.inputs.append(value)

    def finish(self) -> None:
        strength = self.strength
        if strength is not None and strength.name is not None:
            self.graph.inputs.append(strength)
            strength.const_value = ir.TensorProtoTensor(
                make_tensor(strength.name, np.ones(1), self.strength_type)
            )
            self.graph.register_initializer(strength)


# ----------------------------------------------------------------------------------------------------
# Adapters in slot form


def slot_tensors(plans: Sequence[BranchPlan], values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``values`` (A and B in storage layouts) with each branch's scale folded into B, named as planned."""
    tensors: dict[str, np.ndarray] = {}
    for plan in plans:
        a, b = _scaled_pair(plan, values)
        _put(tensors, plan.a_name, a, plan.site.module_path)
        _put(tensors, plan.b_name, b, plan.site.module_path)
    return tensors


def _scaled_pair(plan: BranchPlan, values: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(values[plan.a_name]), scale_into_b(values[plan.b_name], plan.scale)


def _put(tensors: dict[str, np.ndarray], name: str, value: np.ndarray, where: str) -> None:
    if name in tensors and not np.array_equal(tensors[name], value):
        raise AdapterError(
            f"slot tensor {name!r} is shared by several sites but the adapter gives them different values "
            f"(at {where}); such an adapter needs separate slots"
        )
    tensors[name] = value


def retarget(
    plans: Sequence[BranchPlan], values: Mapping[str, np.ndarray], model: LoadedModel, adapter: str
) -> dict[str, np.ndarray]:
    """The tensors ``model``'s slots of ``adapter`` expect, from an adapter given as plans + values.

    Branches are matched to slots by site node; names, dtypes and layouts are the slots'. Slots the
    adapter does not cover get explicit empty tensors, so the file is complete and that slot adds zero.
    """
    slots: dict[str, BranchRecord] = {}
    for record in slot_records(model, adapter):
        slots.setdefault(record.site, record)
    specs = slot_specs(model, adapter)
    tensors: dict[str, np.ndarray] = {}
    for plan in plans:
        record = slots.get(plan.site.node)
        if record is None:
            raise AdapterError(
                f"the adapter has a branch for {plan.site.module_path} (node {plan.site.node!r}) but "
                f"{model.name} has no slot there for adapter {adapter!r}; add slots for it "
                "(inject --as-inputs with --target, or --peft DIR)"
            )
        _check_compatible(plan, record, model)
        a, b = _scaled_pair(plan, values)
        _put(tensors, record.a, a.astype(specs[record.a].dtype, copy=False), plan.site.module_path)
        _put(tensors, record.b, b.astype(specs[record.b].dtype, copy=False), plan.site.module_path)
    for record in slots.values():
        for name in (record.a, record.b):
            if name not in tensors:
                tensors[name] = model.array(name)  # the slot's empty default
    return tensors


def _check_compatible(plan: BranchPlan, record: BranchRecord, model: LoadedModel) -> None:
    where = f"{plan.site.module_path} (node {plan.site.node!r})"
    if plan.kind != record.kind:
        raise AdapterError(f"the adapter's branch at {where} is {plan.kind} but the slot is {record.kind}")
    if plan.form.groups_refusal((plan.a_group, plan.b_group), (record.a_group, record.b_group)):
        raise AdapterError(
            f"the adapter's {plan.kind} branch at {where} has A group {plan.a_group} and B group "
            f"{plan.b_group}, "
            f"but {model.name}'s slot has {record.a_group} and {record.b_group} (PEFT's conv A is dense, "
            "group 1); make slots from this adapter with inject --as-inputs --peft DIR"
        )


# ----------------------------------------------------------------------------------------------------
# Using an adapter inside the graph


def bake(model: LoadedModel, tensors: Mapping[str, np.ndarray]) -> LoadedModel:
    """A copy whose slot defaults are ``tensors``: it runs exactly as ``model`` with that adapter active.

    A reference for proofs; the graph (inputs, manifest) is unchanged.
    """
    baked = model.to_ir()
    for value in baked.graph.inputs:
        default = value.const_value
        if value.name in tensors and value.is_initializer() and default is not None:
            tensor = make_tensor(value.name, tensors[value.name], default.dtype.value)
            value.const_value = ir.TensorProtoTensor(tensor)
    return model.with_ir(baked)


def remove_slots(model: LoadedModel, records: Iterable[BranchRecord]) -> LoadedModel:
    """A copy without the slot branches ``records`` (and without strength inputs nothing uses any more)."""
    removing = list(records)
    rewritten = model.to_ir()
    remaining = tuple(b for b in read_branches(rewritten) if b not in removing)
    remove_branches(rewritten.graph, removing, remaining)
    write_branches(rewritten, remaining)
    return _without_unused_strengths(rewritten, model)


def base_view(model: LoadedModel) -> LoadedModel:
    """``model`` without any lora-onnx branch (nothing folded): the base graph its branches were added to."""
    branches = read_branches(model.ir_model)
    if not branches:
        return model
    rewritten = model.to_ir()
    remove_branches(rewritten.graph, branches, ())
    write_branches(rewritten, ())
    return _without_unused_strengths(rewritten, model)


def _without_unused_strengths(rewritten: ir.Model, model: LoadedModel) -> LoadedModel:
    """``rewritten`` (a copy of ``model``) without the strength inputs (and their defaults) no node reads
    any more."""
    graph = rewritten.graph
    unused = [v for v in graph.inputs if v.name and v.name.endswith(STRENGTH_SUFFIX) and not v.uses()]
    for value in unused:
        graph.inputs.remove(value)
        graph.initializers.pop(value.name, None)  # type: ignore[arg-type]
    return model.with_ir(rewritten)


@dataclass(frozen=True)
class Bound:
    """A slotted model with one adapter file turned into constant branches (see :func:`bind`)."""

    model: LoadedModel
    adapter: str
    bound: tuple[BranchRecord, ...]
    removed: tuple[BranchRecord, ...]
    strength: float


def bind(
    model: LoadedModel,
    tensors: Mapping[str, np.ndarray],
    adapter: str,
    *,
    strength: float | None = None,
) -> Bound:
    """Replace every slot of the model by what running with ``tensors`` (adapter ``adapter``) active gives.

    The adapter's covered slots become ordinary constant branches (the core's branch, scale = strength,
    since files carry the LoRA scale in B) that :func:`lora_onnx.stages.fold.fold_branches` can fold; every
    other slot (uncovered, empty in the file, or of another adapter) adds zeros when inactive and is removed.
    ``strength`` defaults to the file's strength tensor, else the model's default (1.0).
    """
    records = slot_records(model)
    chosen = [r for r in records if r.adapter == adapter]
    if strength is None:
        strength = adapter_strength(model, tensors, adapter)
    covered = [r for r in chosen if _rank_of(tensors, r) > 0]
    stripped = remove_slots(model, records)
    sites = {site.node: site for site in scan_sites(stripped, DEFAULT_OPS).sites}
    plans: list[BranchPlan] = []
    values: dict[str, np.ndarray] = {}
    for record in covered:
        site = sites.get(record.site)
        if site is None:
            raise AdapterError(f"{model.name}: the slot's node {record.site!r} is no longer a LoRA site")
        rank = _rank_of(tensors, record)
        # The slot's module path (another tool's slot names it by its tensors, the graph may not).
        site = dataclasses.replace(site, module_path=record.module_path)
        stem = record.a.removesuffix(".lora_A.weight")
        # A lora-onnx slot's scale is 1 (files carry it in B); another tool's chain may multiply by its own.
        scale = strength * record.scale
        plans.append(
            BranchPlan(
                site=site, adapter=adapter, rank=rank, alpha=scale * rank, scale=scale, stem=stem,
                a_name=record.a, b_name=record.b, a_group=record.a_group, b_group=record.b_group,
            )
        )  # fmt: skip
        values[record.a], values[record.b] = tensors[record.a], tensors[record.b]
    inserted = insert_branches(stripped, plans, values) if plans else StageResult(stripped, modified=False)
    bound_model, bound = inserted.model, inserted.records
    removed = tuple(r for r in records if r not in covered)
    return Bound(bound_model, adapter, tuple(bound), removed, strength)


def _rank_of(tensors: Mapping[str, np.ndarray], record: BranchRecord) -> int:
    a = tensors.get(record.a)
    if a is None or tensors.get(record.b) is None or a.size == 0:
        return 0
    return form_of(record.kind).rank_of(a, record.a_group)


def adapter_strength(model: LoadedModel, tensors: Mapping[str, np.ndarray], adapter: str) -> float:
    """An adapter file's strength for ``adapter`` (its strength tensor), else the model's default, else 1."""
    name = strength_name(adapter)
    if name in tensors:
        return float(np.asarray(tensors[name]).reshape(-1)[0])
    try:
        return float(np.asarray(model.array(name)).reshape(-1)[0])
    except KeyError:
        return 1.0
