"""``inject --mixed``: one model that runs a different LoRA adapter on each batch row.

Adapters come from the producers :mod:`lora_onnx.commands.swap` already has: PEFT folders (through
``lora_onnx.adapters.peft``), :class:`~lora_onnx.commands.swap.AdapterSource` records (the fresh planner, a
model's constant branches) and adapter files (``.onnx_adapter``, ``.safetensors``, ``.npz``) as
``export-adapter`` writes them for a slotted model.

How adapter files map to sites: a file's tensors are named after a slotted model's slots
(``<module>.lora_A.weight``...), so they are matched through that model's manifest, slot by slot, to the
slot's node; the slotted model is MODEL itself when it has slots, else ``slots`` (``--slots``), a slotted
model of the same base (nodes are matched by name, and each slot's node must be a site of MODEL with the
same kind and features). A file must fit those slots as ``check-adapter --partial`` says; it may leave
slots out (that adapter then has no branch there) and must address the slots of one adapter name. The
scale is already in B; a strength tensor in the file (else the model's default, 1.0) multiplies B.

Every site any adapter adapts gets one mixed branch (:mod:`lora_onnx.stages.stacked`), after the batch-row
probe (:mod:`lora_onnx.proofs.batch_rows`) has shown its input keeps batch rows apart; sites that fail are
skipped with the reason and a warning per adapter that loses a branch there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_onnx.adapters.check import check_tensors, fitting_adapter
from lora_onnx.adapters.files import read_adapter_file, write_adapter_file
from lora_onnx.adapters.formats.source import PeftRef
from lora_onnx.commands.swap import AdapterSource, peft_source
from lora_onnx.common.atomic import check_outputs
from lora_onnx.common.finite import require_finite_tensors
from lora_onnx.errors import AdapterError, LoraOnnxError
from lora_onnx.kinds import form_of, kind_of
from lora_onnx.model.graph import FreshNames
from lora_onnx.model.load import LoadedModel, ModelLike, load_model
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.model.save import planned_writes, save_model
from lora_onnx.model.tensors import scale_into_b
from lora_onnx.proofs.batch_rows import batch_axes, feeds_for, probe_sites, take_rows
from lora_onnx.proofs.validation import (
    InputsLike,
    OutputComparison,
    ValidationReport,
    compare,
    create_session,
    given_inputs,
    input_specs,
    parse_providers,
    run_model,
    session_source,
)
from lora_onnx.sites.find import DEFAULT_OPS, Site, Skipped, scan_sites
from lora_onnx.stages.insert import insert_branches
from lora_onnx.stages.slots import adapter_strength, bake, slot_records
from lora_onnx.stages.stacked import (
    INDEX_INPUT,
    BatchAxes,
    MixedSite,
    SiteForm,
    SitePair,
    check_pair,
    insert_mixed,
    mixed_info,
    mixed_records,
    require_opset,
    site_form,
    stack_names,
    stack_pairs,
    strip_mixed,
)
from lora_onnx.variants import SlotBranch, plug_in

#: What :func:`inject_mixed` takes as one adapter: a PEFT folder or an adapter file (a path), an
#: :class:`AdapterSource`, or adapter tensors in slot form (as an adapter file holds them).
AdapterLike = str | os.PathLike | AdapterSource | Mapping[str, np.ndarray]


@dataclass(frozen=True)
class MixedAdapter:
    """One adapter of the stacks: its label, its (A, B) per site node, and how to build the reference
    it must equal on a row (the host model with this adapter active at the given sites)."""

    label: str
    pairs: Mapping[str, SitePair]
    reference: Callable[[Collection[str]], LoadedModel]


@dataclass(frozen=True)
class MixedInjectResult:
    """What ``inject_mixed`` did: the model, its mixed branches, the adapters in stack order, sites left
    out (and per-adapter warnings), and the proof (``rows``: the index of each row of its batch)."""

    model: LoadedModel
    branches: tuple[BranchRecord, ...]
    adapters: tuple[str, ...]
    skipped: tuple[Skipped, ...] = ()
    warnings: tuple[str, ...] = ()
    output: Path | None = None
    validation: ValidationReport | None = None
    rows: tuple[int, ...] = ()
    index_name: str = INDEX_INPUT
    #: The model's fixed batch size (``rows`` then holds consecutive batches of it), None when symbolic.
    batch_size: int | None = None

    @property
    def ok(self) -> bool:
        return self.validation is None or self.validation.ok


# ----------------------------------------------------------------------------------------------------
# Adapters -> (A, B) per site


def from_source(
    source: AdapterSource, host: LoadedModel, sites: Mapping[str, Site], label: str
) -> MixedAdapter:
    """An :class:`AdapterSource` (plans + values, the scale in each plan) as a mixed-batch adapter."""
    require_finite_tensors(source.values, label)
    pairs: dict[str, SitePair] = {}
    plans = []
    for plan in source.plans:
        site = sites.get(plan.site.node)
        if site is None:
            raise AdapterError(
                f"{label}: node {plan.site.node!r} ({plan.site.module_path}) is not a LoRA site of "
                f"{host.name}"
            )
        pair = SitePair(
            np.asarray(source.values[plan.a_name]),
            scale_into_b(source.values[plan.b_name], plan.scale),
            plan.a_group,
            plan.b_group,
        )
        check_pair(site, pair, f"{label} at {site.module_path}")
        pairs[site.node] = pair
        plans.append(dataclasses.replace(plan, site=site))

    def reference(kept: Collection[str]) -> LoadedModel:
        names = FreshNames(host.ir_model.graph)
        chosen, values = [], {}
        for plan in plans:
            if plan.site.node not in kept:
                continue
            a_name = names(f"{plan.stem}.lora_ref_A")
            b_name = names(f"{plan.stem}.lora_ref_B")
            values[a_name], values[b_name] = source.values[plan.a_name], source.values[plan.b_name]
            chosen.append(dataclasses.replace(plan, a_name=a_name, b_name=b_name))
        return insert_branches(host, chosen, values).model if chosen else host

    return MixedAdapter(label, pairs, reference)


def from_tensors(
    tensors: Mapping[str, np.ndarray],
    slots: LoadedModel,
    sites: Mapping[str, Site],
    label: str,
    host: LoadedModel,
) -> MixedAdapter:
    """Adapter tensors in slot form (an adapter file's), matched to sites through ``slots``' manifest."""
    require_finite_tensors(tensors, label)  # tensors given in Python skip the file readers' check
    if not slot_records(slots):
        raise AdapterError(
            f"{label}: adapter files name LoRA slots, and {slots.name} has none; give the slotted model the "
            "files were exported for (MODEL itself, or --slots SLOTTED)"
        )
    check = check_tensors(slots, tensors, partial=True, label=label)
    adapter = fitting_adapter(check, "a mixed-batch adapter is one slot adapter's file")
    strength = adapter_strength(slots, tensors, adapter)
    pairs: dict[str, SitePair] = {}
    records = slot_records(slots, adapter)
    for record in records:
        a, b = tensors.get(record.a), tensors.get(record.b)
        if a is None or b is None or np.asarray(a).size == 0:
            continue  # left out or empty: this adapter has no branch at that slot
        site = sites.get(record.site)
        if site is None or kind_of(site.op).form.name != record.kind:
            raise AdapterError(
                f"{label}: slot {record.a!r} of {slots.name} is at node {record.site!r}, which is not a "
                f"{record.op} site of {host.name}; --slots must be a slotted model of the same base"
            )
        pair = SitePair(np.asarray(a), scale_into_b(b, strength), record.a_group, record.b_group)
        check_pair(site, pair, f"{label} at {site.module_path}")
        pairs[site.node] = pair

    def reference(kept: Collection[str]) -> LoadedModel:
        active = dict(tensors)
        for record in records:
            if record.site not in kept:  # a site left out of the mixed model: its slot stays off
                active[record.a], active[record.b] = slots.array(record.a), slots.array(record.b)
        return bake(slots, active)

    return MixedAdapter(label, pairs, reference)


def resolve_adapters(
    adapters: Sequence[AdapterLike],
    host: LoadedModel,
    slots: LoadedModel,
    *,
    purpose: str = "mixed-batch branches",
    base_weights: str | os.PathLike | None = None,
    allow_empty: bool = False,
) -> list[MixedAdapter]:
    """Every adapter as a :class:`MixedAdapter`, in order (the order is the stack index). An adapter with
    no branch at any site is refused unless ``allow_empty`` (a folder run keeps every adapter's index in
    every model file, also where an adapter has no module)."""
    sites = {site.node: site for site in scan_sites(host, DEFAULT_OPS).sites}
    resolved: list[MixedAdapter] = []
    for i, item in enumerate(adapters):
        if isinstance(item, AdapterSource):
            resolved.append(from_source(item, host, sites, item.origin or f"adapter {i}"))
        elif isinstance(item, Mapping):
            resolved.append(from_tensors(item, slots, sites, f"adapter {i} (tensors)", host))
        else:
            path = Path(item)
            if path.is_dir() or isinstance(item, PeftRef):  # a PeftRef: --peft, a folder or LoRA file
                peft = item if isinstance(item, PeftRef) else path
                source = peft_source(host, peft, f"mixed_{i}", purpose=purpose, base_weights=base_weights)
                resolved.append(from_source(source, host, sites, f"PEFT {path}"))
            elif path.is_file():
                file = read_adapter_file(path)
                resolved.append(from_tensors(file.tensors, slots, sites, str(path), host))
            else:
                raise AdapterError(f"{path}: no such adapter file or PEFT adapter folder")
        if not resolved[-1].pairs and not allow_empty:
            raise AdapterError(
                f"{resolved[-1].label} has no branch at any site (every slot left out or empty)"
            )
    return resolved


# ----------------------------------------------------------------------------------------------------
# inject --mixed


def _inputs(adapters: Sequence[AdapterLike], *models: LoadedModel) -> list[Path]:
    """Every file the inputs read (models, their data, adapter files and folders): never an output."""
    paths = [p for m in models for p in (m.path, *m.external_files()) if p is not None]
    return paths + [Path(a) for a in adapters if isinstance(a, (str, os.PathLike))]


def host_model(source: LoadedModel) -> LoadedModel:
    """The model mixed branches go on: ``source`` without its LoRA slots (constant branches stay)."""
    if mixed_records(source) or mixed_info(source) is not None:
        raise LoraOnnxError(
            f"{source.name} already has mixed-batch branches; start from the model without them"
        )
    return plug_in(SlotBranch).strip(source)


def inject_mixed(
    model: ModelLike,
    adapters: Sequence[AdapterLike],
    *,
    slots: ModelLike | None = None,
    stacks_as_inputs: bool = False,
    output: str | os.PathLike | None = None,
    validate: bool = False,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    allow_nonfinite: bool = False,
    base_weights: str | os.PathLike | None = None,
    link_data: bool = False,
    inputs: InputsLike = None,
    allow_empty: bool = False,
) -> MixedInjectResult:
    """Add mixed-batch branches holding ``adapters`` (stack index = position) and the index input
    ``lora_adapter_index`` (int64, one entry per batch row, negative = the base model for that row).

    Adapters: PEFT folders or adapter files (paths), :class:`AdapterSource` records, or tensors in slot
    form; files and tensors are matched to sites through ``slots`` (default: ``model``, which may carry
    the slots; they are removed from the output). ``stacks_as_inputs`` makes the stacks graph inputs
    backed by initializers (see :func:`stack_adapters`). ``dims`` sizes symbolic input dims for the
    batch-row probe and the proof. With ``validate``, before anything is written, a batch mixing every
    adapter and base rows must equal each row run alone with its adapter active (rel <= 1e-4; NaN / Inf
    fail unless ``allow_nonfinite``, see :func:`lora_onnx.proofs.validation.compare`).
    ``base_weights``: the base's original parameters, for PEFT folders on sites the exporter folded a
    BatchNorm into (see :mod:`lora_onnx.sites.folded_weights`). ``inputs`` (an .npz path or arrays by input
    name) gives the probe's and the proof's batch rows instead of generated ones (cycled to the size of
    each run; see :func:`lora_onnx.proofs.batch_rows.feeds_for`). ``allow_empty``: an adapter may have no
    branch here (its rows then run the base model), so that every file of a folder keeps one index.
    """
    if not adapters:
        raise AdapterError("a mixed batch needs at least one adapter (a PEFT folder or an adapter file)")
    source = load_model(model)
    require_opset(source)
    host = host_model(source)
    slots_model = load_model(slots) if slots is not None else source
    protect = _inputs(adapters, source, slots_model)
    if output is not None:
        check_outputs(planned_writes(host, output), protect)  # before any work
    resolved = resolve_adapters(
        adapters, host, slots_model, base_weights=base_weights, allow_empty=allow_empty
    )
    labels = tuple(a.label for a in resolved)
    covered = {node for adapter in resolved for node in adapter.pairs}
    sites = [site for site in scan_sites(host, DEFAULT_OPS).sites if site.node in covered]
    axes = batch_axes(host)
    probe = probe_sites(host, sites, axes, dims=dims, providers=providers, inputs=inputs)
    kept, skipped = probe.kept, probe.skipped
    warnings = tuple(
        f"{adapter.label}: its branch at {skip.module_path} is left out: {skip.reason}"
        for skip in skipped
        for adapter in resolved
        if skip.node in adapter.pairs
    )
    if not kept:
        reasons = "; ".join(f"{s.module_path}: {s.reason}" for s in skipped[:2])
        raise AdapterError(f"no site the adapters adapt can mix batch rows ({reasons})")
    names = FreshNames(host.ir_model.graph)
    items = []
    for site in kept:
        pairs = [adapter.pairs.get(site.node) for adapter in resolved]
        form = site_form(kind_of(site.op).form.name, pairs)
        a_stack, b_stack = stack_pairs(site, pairs, form, labels)
        stem, a_name, b_name = stack_names(names, site.module_path)
        batched = site.node in probe.batched
        items.append(MixedSite(site, stem, a_name, b_name, a_stack, b_stack, form, batched))
    inserted = insert_mixed(host, items, axes, labels, stacks_as_inputs=stacks_as_inputs)
    mixed, records = inserted.model, inserted.records
    rows = proof_rows(len(resolved), axes.size)
    report = None
    if validate:
        kept_nodes = {site.node for site in kept}
        references = [adapter.reference(kept_nodes) for adapter in resolved]
        report = prove_rows(
            mixed,
            host,
            references,
            rows,
            axes,
            providers=providers,
            dims=dims,
            allow_nonfinite=allow_nonfinite,
            inputs=inputs,
        )
    written = None
    if output is not None and (report is None or report.ok):
        written = save_model(mixed, output, protect=protect, link_data=link_data)
    return MixedInjectResult(
        mixed, records, labels, skipped, warnings, written, report, rows, batch_size=axes.size
    )


# ----------------------------------------------------------------------------------------------------
# Proof: a mixed batch equals each row run alone


def proof_rows(count: int, batch: int | None = None) -> tuple[int, ...]:
    """The index of each row of a proof batch: every adapter, base rows, an adapter on two rows. With a
    fixed ``batch`` size, the rows of consecutive batches of that size (the last one filled up from
    the start of the pattern)."""
    pattern = (0, -1, *range(1, count), 0)
    if batch is None:
        return pattern
    cycled = pattern * (-(-batch // len(pattern)) + 1)
    return pattern + cycled[: -len(pattern) % batch]


def prove_rows(
    mixed: LoadedModel,
    host: LoadedModel,
    references: Sequence[LoadedModel],
    rows: Sequence[int],
    axes: BatchAxes,
    *,
    providers: str | Sequence[str] = ("cpu",),
    dims: Mapping[str, int] | None = None,
    index_name: str = INDEX_INPUT,
    seed: int = 0,
    allow_nonfinite: bool = False,
    inputs: InputsLike = None,
) -> ValidationReport:
    """Run ``mixed`` on one batch whose row i takes adapter ``rows[i]``, and every row alone through its
    reference (``references[rows[i]]``, or ``host`` for a negative index); compare every output.

    With a fixed batch size (``axes.size``), ``rows`` holds consecutive batches of that size; a row
    cannot run alone, so row i of each batch is compared with row i of its reference run on that batch
    (the probe showed rows do not mix)."""
    chosen = parse_providers(providers)
    if axes.size is not None:
        return _prove_fixed_rows(
            mixed, host, references, rows, axes, providers=chosen, dims=dims, index_name=index_name,
            seed=seed, allow_nonfinite=allow_nonfinite, inputs=inputs,
        )  # fmt: skip
    comparisons: list[OutputComparison] = []
    shapes: dict[str, tuple[int, ...]] = {}
    with ExitStack() as stack:
        paths = {
            "mixed": session_source(mixed, stack, "mixed.onnx"),
            "base": session_source(host, stack, "base.onnx"),
        }
        for i in sorted({r for r in rows if r >= 0}):
            paths[i] = session_source(references[i], stack, f"adapter_{i}.onnx")  # type: ignore[index]
        for provider in chosen:
            sessions = {
                key: create_session(path, provider, f"{mixed.name} ({key})") for key, path in paths.items()
            }
            specs = input_specs(sessions["base"])
            given = given_inputs(inputs, specs)
            feeds = feeds_for(specs, axes, len(rows), dims, seed, host.proto.graph, given)
            shapes = {name: tuple(value.shape) for name, value in feeds.items()}
            got = run_model(sessions["mixed"], {**feeds, index_name: np.array(rows, np.int64)}, mixed.name)
            per_row = [
                run_model(sessions["base" if r < 0 else r], take_rows(feeds, axes, [b]), f"row {b}")
                for b, r in enumerate(rows)
            ]
            for name, value in got.items():
                parts = [row[name] for row in per_row]
                axis = axes.outputs.get(name)
                comparisons.append(_compare_rows(name, value, parts, axis, provider, allow_nonfinite))
    return ValidationReport(tuple(comparisons), chosen, shapes)


def _prove_fixed_rows(
    mixed: LoadedModel,
    host: LoadedModel,
    references: Sequence[LoadedModel],
    rows: Sequence[int],
    axes: BatchAxes,
    *,
    providers: Sequence[str],
    dims: Mapping[str, int] | None,
    index_name: str,
    seed: int,
    allow_nonfinite: bool,
    inputs: InputsLike,
) -> ValidationReport:
    """:func:`prove_rows` for a fixed batch size: each batch of ``rows`` against its references' rows."""
    size = axes.size
    assert size is not None
    if not rows or len(rows) % size:
        raise LoraOnnxError(
            f"the model's batch size is fixed at {size}; the proof rows {list(rows)} do not fill it"
        )
    batches = [tuple(rows[i : i + size]) for i in range(0, len(rows), size)]
    comparisons: list[OutputComparison] = []
    shapes: dict[str, tuple[int, ...]] = {}
    with ExitStack() as stack:
        paths = {
            "mixed": session_source(mixed, stack, "mixed.onnx"),
            -1: session_source(host, stack, "base.onnx"),
        }
        for i in sorted({r for r in rows if r >= 0}):
            paths[i] = session_source(references[i], stack, f"adapter_{i}.onnx")
        for provider in providers:
            sessions = {
                key: create_session(path, provider, f"{mixed.name} ({key})") for key, path in paths.items()
            }
            for number, batch in enumerate(batches):
                specs = input_specs(sessions[-1])
                given = given_inputs(inputs, specs)
                start = seed + number * size if given is not None else seed + number  # the next rows
                feeds = feeds_for(specs, axes, size, dims, start, host.proto.graph, given)
                shapes = {name: tuple(value.shape) for name, value in feeds.items()}
                index = np.array(batch, np.int64)
                got = run_model(sessions["mixed"], {**feeds, index_name: index}, mixed.name)
                alone = {
                    r: run_model(sessions[max(r, -1)], feeds, f"{mixed.name} (adapter {r})")
                    for r in sorted(set(batch))
                }
                for name, value in got.items():
                    comparisons.append(
                        _compare_fixed(
                            name, value, alone, batch, axes.outputs.get(name), provider, allow_nonfinite
                        )
                    )
    return ValidationReport(tuple(comparisons), tuple(providers), shapes)


def _compare_fixed(
    name: str,
    value: np.ndarray,
    alone: Mapping[int, Mapping[str, np.ndarray]],
    batch: Sequence[int],
    axis: int | None,
    provider: str,
    allow_nonfinite: bool,
) -> OutputComparison:
    """The mixed output against, block by block along the batch axis (axis 0 when the output declares
    none and splits into one block per row), block i of row i's reference run on the same batch."""
    axis = 0 if axis is None else axis
    runs = [alone[max(r, -1)][name] for r in batch]
    if value.ndim <= axis or value.shape[axis] % len(batch) or any(run.shape != value.shape for run in runs):
        note = f"shape {list(value.shape)} has no batch axis of {len(batch)} rows to compare rows by"
        return OutputComparison(
            provider, name, tuple(value.shape), float("inf"), float("inf"), 0, 0, False, note
        )
    parts = [np.split(run, len(batch), axis=axis)[b] for b, run in enumerate(runs)]
    reference = np.concatenate(parts, axis=axis)
    return compare(
        reference, value, name=name, provider=provider, rtol=None, atol=None, allow_nonfinite=allow_nonfinite
    )


def _compare_rows(
    name: str,
    value: np.ndarray,
    parts: Sequence[np.ndarray],
    axis: int | None,
    provider: str,
    allow_nonfinite: bool = False,
) -> OutputComparison:
    """The mixed output against the rows run alone: concatenated along the output's declared batch axis;
    for an output that declares none, along axis 0 when that gives the mixed output's shape (rows may be
    flattened into it, as ``[B*S, out]``), else each row's run must give the mixed output itself (an
    output that depends on no row)."""
    if axis is None and np.concatenate(parts).shape != value.shape:
        if all(part.shape == value.shape for part in parts):
            checks = [
                compare(
                    part,
                    value,
                    name=name,
                    provider=provider,
                    rtol=None,
                    atol=None,
                    allow_nonfinite=allow_nonfinite,
                )
                for part in parts
            ]
            return max(checks, key=lambda c: (not c.ok, c.max_rel))
        note = f"rows run alone give shape {list(parts[0].shape)}: no batch axis to compare rows by"
        return OutputComparison(
            provider, name, tuple(value.shape), float("inf"), float("inf"), 0, 0, False, note
        )
    reference = np.concatenate(parts, axis=axis or 0)
    return compare(
        reference, value, name=name, provider=provider, rtol=None, atol=None, allow_nonfinite=allow_nonfinite
    )


# ----------------------------------------------------------------------------------------------------
# Run-time stacks


def stack_adapters(
    model: ModelLike,
    adapters: Sequence[AdapterLike],
    *,
    slots: ModelLike | None = None,
    output: str | os.PathLike | None = None,
    format: str | None = None,
) -> dict[str, np.ndarray]:
    """Stacks holding ``adapters`` (stack index = position) for a mixed model made with
    ``stacks_as_inputs``: feed them by name per run, or write them (``output``: .onnx_adapter,
    .safetensors, .npz) and activate the file with ``onnxruntime.LoraAdapter``. Adapters may adapt only
    sites that have a mixed branch; ranks and the adapter count are free (the dims are symbolic).
    Files and tensors are matched through ``slots`` (required for them)."""
    loaded = load_model(model)
    info = mixed_info(loaded)
    records = mixed_records(loaded)
    if info is None or not records:
        raise AdapterError(f"{loaded.name} has no mixed-batch branches (make them with inject --mixed)")
    if not info.stacks_as_inputs:
        raise AdapterError(
            f"{loaded.name}'s stacks are constants, not inputs; rebuild it with inject --mixed "
            "--stacks-as-inputs to feed other adapters at run time"
        )
    if not adapters:
        raise AdapterError("stacks need at least one adapter")
    host = strip_mixed(loaded)
    slots_model = load_model(slots) if slots is not None else loaded
    resolved = resolve_adapters(adapters, host, slots_model)
    labels = [a.label for a in resolved]
    sites = {site.node: site for site in scan_sites(host, DEFAULT_OPS).sites}
    by_node = {record.site: record for record in records}
    for adapter in resolved:
        for node in adapter.pairs:
            if node not in by_node:
                raise AdapterError(
                    f"{adapter.label} adapts {sites[node].module_path}, which has no mixed branch in "
                    f"{loaded.name}; rebuild the mixed model with this adapter"
                )
    tensors: dict[str, np.ndarray] = {}
    for record in records:
        site = sites[record.site]
        pairs = [adapter.pairs.get(record.site) for adapter in resolved]
        blocks = max(record.a_group, record.b_group)
        rank_of = form_of(record.kind).rank_of
        widest = max([blocks, *(rank_of(p.a, p.a_group) for p in pairs if p is not None)])
        form = SiteForm(-(-widest // blocks) * blocks, record.a_group, record.b_group)
        tensors[record.a], tensors[record.b] = stack_pairs(site, pairs, form, labels)
    if output is not None:
        write_adapter_file(tensors, output, format, protect=_inputs(adapters, loaded, slots_model))
    return tensors
