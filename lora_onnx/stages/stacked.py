"""Mixed-adapter batches in the graph: every site holds n adapters stacked, each batch row picks one.

The model takes one more input, ``lora_adapter_index`` (int64, one entry per batch row; a negative entry
means the base model for that row). Shared nodes, computed once per run::

    idx    = Reshape(lora_adapter_index, [B])       # B from an input's batch dim: a wrong length fails
    neg    = idx < 0
    safe   = Gather(Range(0, n), Where(neg, 0, idx)) # an index >= n fails here ("out of data bounds")
    keep   = Cast(not neg)                           # dense: 0 for base rows, as [B, 1, 1]
    onehot = Cast(Where(neg, -1, safe)[:, None] == Range(0, n))    # conv: [B, n], all 0 for base rows

Dense site (MatMul, Gemm; stacks A [n, in, R], B [n, R, out], each adapter's scale folded into B, ranks
zero-padded to the site's largest)::

    h = MatMul(Reshape(x', [B, -1, in]), Gather(A, safe)) * keep   # rows are batch-major (see batch_rows)
    y = y.lora_base + Reshape(MatMul(h, Gather(B, safe)), Shape(y.lora_base))

x' is x, or x^T for a Gemm with transA; a Gemm's alpha multiplies ``keep``. When the probe saw x as
``[B, k, in]`` already (a MatMul on ``[B, S, in]``) both Reshapes are left out. Conv site (stacks
A [n, R, C/ga, k...], B [n, out, R/gb, 1...]): a conv's group is a static attribute, so per-row weights
cannot be gathered; instead ConvA runs every adapter's A at once (the stack rearranged into one
[n*R, C/ga, k...] weight, group-major so each input group's channels stay together), a one-hot mask keeps
the row's adapter's channels, and a 1x1 ConvB with every B side by side (group gb) adds them up. That
costs n times one adapter's low-rank FLOPs, still small beside the base conv. Grouped A and B (a fresh
adapter on a grouped conv) and dense A with grouped B (PEFT) can share one site: when adapters' groups
differ, the grouped ones are expanded to their dense, block-diagonal equivalents.

Branches are recorded in the manifest with variant ``"mixed"`` (A/B = the stacks, rank = R), so fold
refuses them with that reason; :func:`bind_index` turns one adapter of the stacks into ordinary constant
branches (``merge --adapter-index``). Shared nodes and the index input are listed under the model
metadata key :data:`MIXED_KEY`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from lora_onnx.common import json_input
from lora_onnx.common.constants import ADAPTER_INDEX
from lora_onnx.errors import AdapterError, LoraOnnxError
from lora_onnx.kinds import BranchForm, SiteForm, SitePair, form_of, kind_of
from lora_onnx.kinds.base import NodeMaker
from lora_onnx.model.graph import (
    FreshNames,
    add_initializer,
    nodes_by_name,
    take_over,
    values_by_name,
)
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import (
    BranchRecord,
    metadata_entries,
    read_branches,
    replace_metadata,
    write_branches,
)
from lora_onnx.model.tensors import make_tensor, np_dtype
from lora_onnx.recipes.plan import BranchPlan, tensor_stem, unique_stem
from lora_onnx.sites.find import DEFAULT_OPS, Site, scan_sites, source_layout
from lora_onnx.stages.branch_metadata import stamp_branches, stamp_shared
from lora_onnx.stages.contract import Stage, StageResult
from lora_onnx.stages.contract import require_opset as require_model_opset
from lora_onnx.stages.fold import remove_branches
from lora_onnx.stages.insert import insert_branches
from lora_onnx.variants import StackedBranch, records_of

#: ``BranchRecord.variant`` and adapter name of a mixed-batch branch (its plug-in:
#: :mod:`lora_onnx.variants.stacked`).
MIXED = StackedBranch.recorded_as
#: The per-row adapter index input (generated validation inputs set it to 0: lora_onnx.proofs.inputs).
INDEX_INPUT = ADAPTER_INDEX
#: Model metadata key: the index input, the adapters' labels, the shared nodes.
MIXED_KEY = "lora_onnx.stages.stacked"
#: Symbolic dim of the adapter count when stacks are graph inputs.
ADAPTERS_DIM = "lora_adapters"
#: Branches use Range (opset 11) and Gather / Where / Less on int64.
MIN_OPSET = 11


@dataclass(frozen=True)
class BatchAxes:
    """The batch dim of a model: its symbolic ``name``, the batch axis of every graph input that has one
    (inputs without it are shared by all rows) and of every output that declares it (None otherwise),
    and ``anchor``, an input whose batch dim sizes the batch at run time. ``size`` is the batch size when
    it is fixed (``name`` is then empty), None when it is symbolic."""

    name: str
    inputs: Mapping[str, int]
    outputs: Mapping[str, int | None]
    size: int | None = None

    @property
    def anchor(self) -> str:
        return next(iter(self.inputs))


@dataclass(frozen=True)
class MixedInfo:
    """What :data:`MIXED_KEY` records: the index input, how many adapters the stacks hold (and their
    labels), the batch dim the index follows, the shared nodes, and whether the stacks are inputs."""

    index: str
    count: int
    adapters: tuple[str, ...]
    batch_dim: str
    batch_input: str
    batch_axis: int
    nodes: tuple[str, ...]
    stacks_as_inputs: bool

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        return json.dumps({"version": 1, **data}, separators=(",", ":"))


def mixed_info(model: LoadedModel) -> MixedInfo | None:
    """The mixed-batch metadata of ``model``; None when it has no mixed branches."""
    for key, text in metadata_entries(model.ir_model):
        if key == MIXED_KEY:
            try:
                data = json_input.loads(text)
                data.pop("version", None)
                data["adapters"], data["nodes"] = tuple(data["adapters"]), tuple(data["nodes"])
                return MixedInfo(**data)
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise LoraOnnxError(f"{model.name}: the {MIXED_KEY} metadata is unreadable: {exc}") from exc
    return None


def mixed_records(model: LoadedModel) -> tuple[BranchRecord, ...]:
    return records_of(read_branches(model.ir_model), StackedBranch)


def _write_info(model: ir.Model, info: MixedInfo | None) -> None:
    """Set (or, for None, remove) the :data:`MIXED_KEY` entry."""
    if info is None:
        replace_metadata(model, lambda key: key != MIXED_KEY, None)
    else:
        replace_metadata(model, lambda key: key != MIXED_KEY, MIXED_KEY, info.to_json())


# ----------------------------------------------------------------------------------------------------
# Stacks


def site_form(kind: str, pairs: Sequence[SitePair | None], rank: int | None = None) -> SiteForm:
    """The stacked layout holding every pair, in branch form ``kind`` (see each form's ``site_form``)."""
    return form_of(kind).site_form(pairs, rank)


def fit_pair(site: Site, pair: SitePair, form: SiteForm, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``pair`` in ``form``: groups expanded where the form is dense, rank zero-padded to ``form.rank``."""
    return kind_of(site.op).form.fit_pair(site, pair, form, where)


def check_pair(site: Site, pair: SitePair, where: str) -> None:
    """Raise :class:`AdapterError` when ``pair`` does not fit ``site`` (shapes, groups, ranks)."""
    a, b = np.asarray(pair.a), np.asarray(pair.b)
    want = kind_of(site.op).form.pair_refusal(site, a, b, pair.a_group, pair.b_group)
    if want is not None:
        raise AdapterError(
            f"{where}: the adapter's A {list(a.shape)} and B {list(b.shape)} do not fit {site.op} node "
            f"{site.node!r} ({site.module_path}), which takes {want}"
        )


def stack_pairs(
    site: Site, pairs: Sequence[SitePair | None], form: SiteForm, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The site's A and B stacks (adapter i at index i; zeros where an adapter has no branch)."""
    dtype = np_dtype(site.dtype)
    a_shape, b_shape = kind_of(site.op).form.stack_shapes(site, form)
    a_stack = np.zeros((len(pairs), *a_shape), dtype)
    b_stack = np.zeros((len(pairs), *b_shape), dtype)
    for i, pair in enumerate(pairs):
        if pair is not None:
            where = f"{labels[i]} at {site.module_path}"
            a_stack[i], b_stack[i] = fit_pair(site, pair, form, where)
    return a_stack, b_stack


# ----------------------------------------------------------------------------------------------------
# Graph


@dataclass(frozen=True)
class MixedSite:
    """One site's mixed branch: the stacks (and their names) and their layout."""

    site: Site
    stem: str
    a_name: str
    b_name: str
    a_stack: np.ndarray
    b_stack: np.ndarray
    form: SiteForm
    #: The data input already is [B, k, in] (see :class:`lora_onnx.proofs.batch_rows.Probe`): no reshapes.
    batched: bool = False

    @property
    def form_kind(self) -> BranchForm:
        return kind_of(self.site.op).form

    @property
    def kind(self) -> str:
        return self.form_kind.name


def stack_names(names: FreshNames, module_path: str) -> tuple[str, str, str]:
    """A free stem and its ``<stem>.lora_A.stack`` / ``<stem>.lora_B.stack`` names (reserved)."""
    stem = unique_stem(names, module_path, (".lora_A.stack", ".lora_B.stack"))
    return stem, f"{stem}.lora_A.stack", f"{stem}.lora_B.stack"


def require_opset(model: LoadedModel) -> None:
    require_model_opset(model, "mixed-batch branches", MIN_OPSET)


class _Builder:
    """Adds the shared index nodes and one mixed branch per site to an onnx-ir graph.

    Nodes are made from value names (:class:`~lora_onnx.kinds.base.NodeMaker`): ``node(into, ...)`` adds
    one to ``into`` (:attr:`shared`, or a site's maker from :meth:`maker`) and returns its output's name.
    """

    def __init__(self, graph: ir.Graph, axes: BatchAxes, index_name: str) -> None:
        self.graph = graph
        self.names = FreshNames(graph)
        self.values = values_by_name(graph)
        self.axes = axes
        self.index_name = index_name
        #: The shared index nodes (placed first in the graph).
        self.shared = NodeMaker(self.names, self.values)
        self.cache: dict[object, str] = {}
        self.first_stack = ""

    # -- helpers
    def name(self, wanted: str) -> str:
        return self.names(wanted)

    def maker(self) -> NodeMaker:
        """A maker for one site's nodes (same names and values as every other)."""
        return NodeMaker(self.names, self.values)

    def const(self, wanted: str, value: np.ndarray) -> str:
        key = ("const", value.dtype.str, value.shape, value.tobytes())
        if key not in self.cache:
            name = self.name(f"{self.index_name}.{wanted}")
            # from_array keeps 0-d scalars 0-d
            self.values[name] = add_initializer(self.graph, numpy_helper.from_array(value, name))
            self.cache[key] = name
        return self.cache[key]

    def node(self, into: NodeMaker, op: str, inputs: list[str], wanted: str, **attrs: object) -> str:
        out = self.name(wanted)
        into.node(op, inputs, [out], self.name(f"{wanted}_node"), **attrs)
        return out

    def shared_value(self, key: object, make: object) -> str:
        if key not in self.cache:
            self.cache[key] = make()  # type: ignore[operator]
        return self.cache[key]

    # -- shared index values
    def batch_shape(self) -> str:
        def make() -> str:
            shape = self.node(self.shared, "Shape", [self.axes.anchor], f"{self.index_name}.input_shape")
            axis = self.const("batch_axis", np.array([self.axes.inputs[self.axes.anchor]], np.int64))
            return self.node(self.shared, "Gather", [shape, axis], f"{self.index_name}.batch", axis=0)

        return self.shared_value("batch", make)

    def checked(self) -> tuple[str, str, str]:
        """(idx, neg, safe): the index checked against the batch, its base rows, and a range-checked
        index with base rows at 0."""

        def make() -> tuple[str, str, str]:
            s = self.shared
            idx = self.node(s, "Reshape", [self.index_name, self.batch_shape()], f"{self.index_name}.per_row")
            neg = self.node(
                s, "Less", [idx, self.const("zero", np.array(0, np.int64))], f"{self.index_name}.base_rows"
            )
            zero = self.const("zero", np.array(0, np.int64))
            clipped = self.node(s, "Where", [neg, zero, idx], f"{self.index_name}.clipped")
            safe = self.node(s, "Gather", [self.adapters(), clipped], f"{self.index_name}.in_range", axis=0)
            return idx, neg, safe

        return self.shared_value("checked", make)  # type: ignore[return-value]

    def adapters(self) -> str:
        """Range(0, n): n read from the first stack's shape, so stacks fed at run time may hold more."""

        def make() -> str:
            s = self.shared
            shape = self.node(s, "Shape", [self.first_stack], f"{self.index_name}.stack_shape")
            count = self.node(
                s,
                "Gather",
                [shape, self.const("zero", np.array(0, np.int64))],
                f"{self.index_name}.count",
                axis=0,
            )
            zero, one = self.const("zero", np.array(0, np.int64)), self.const("one", np.array(1, np.int64))
            return self.node(s, "Range", [zero, count, one], f"{self.index_name}.adapters")

        return self.shared_value("adapters", make)

    def keep(self, dtype: int, alpha: float) -> str:
        """[B, 1, 1] of the site's type: ``alpha`` for rows with an adapter, 0 for base rows."""

        def make() -> str:
            if alpha != 1.0:
                base = self.keep(dtype, 1.0)
                factor = self.const("alpha", np.array(alpha, np_dtype(dtype)))
                return self.node(self.shared, "Mul", [base, factor], f"{self.index_name}.keep_alpha")
            _, neg, _ = self.checked()
            s = self.shared
            kept = self.node(s, "Not", [neg], f"{self.index_name}.adapter_rows")
            cast = self.node(s, "Cast", [kept], f"{self.index_name}.keep_flat", to=dtype)
            shape = self.const("keep_shape", np.array([-1, 1, 1], np.int64))
            return self.node(s, "Reshape", [cast, shape], f"{self.index_name}.keep")

        return self.shared_value(("keep", dtype, alpha), make)

    def onehot(self, dtype: int) -> str:
        """[B, 1, n, 1] of the site's type: 1 at the row's adapter, all 0 for base rows."""

        def make() -> str:
            _, neg, safe = self.checked()
            s = self.shared
            minus = self.const("minus_one", np.array(-1, np.int64))
            chosen = self.node(s, "Where", [neg, minus, safe], f"{self.index_name}.chosen")
            column = self.node(
                s,
                "Reshape",
                [chosen, self.const("column", np.array([-1, 1], np.int64))],
                f"{self.index_name}.column",
            )
            equal = self.node(s, "Equal", [column, self.adapters()], f"{self.index_name}.onehot_bool")
            cast = self.node(s, "Cast", [equal], f"{self.index_name}.onehot_flat", to=dtype)
            shape = self.const("onehot_shape", np.array([0, 1, -1, 1], np.int64))
            return self.node(s, "Reshape", [cast, shape], f"{self.index_name}.onehot")

        return self.shared_value(("onehot", dtype), make)


def insert_mixed(
    model: LoadedModel,
    items: Sequence[MixedSite],
    axes: BatchAxes,
    labels: Sequence[str],
    *,
    stacks_as_inputs: bool = False,
    index_name: str = INDEX_INPUT,
) -> StageResult:
    """A copy of ``model`` with one mixed branch per item and the index input (see the module doc)."""
    stage = InsertMixed(items, axes, labels, stacks_as_inputs=stacks_as_inputs, index_name=index_name)
    return stage(model)


class InsertMixed(Stage):
    """Mixed-batch branches: the stacks, the shared index nodes and the index input."""

    name = "insert mixed-batch branches"

    def __init__(
        self,
        items: Sequence[MixedSite],
        axes: BatchAxes,
        labels: Sequence[str],
        *,
        stacks_as_inputs: bool = False,
        index_name: str = INDEX_INPUT,
    ) -> None:
        self.items, self.axes, self.labels = tuple(items), axes, tuple(labels)
        self.stacks_as_inputs, self.index_name = stacks_as_inputs, index_name

    def requires(self, model: LoadedModel) -> None:
        require_opset(model)
        if not self.items:
            raise AdapterError("no site to put a mixed-batch branch on")
        if mixed_records(model) or mixed_info(model) is not None:
            raise LoraOnnxError(
                f"{model.name} already has mixed-batch branches; start from the model without them"
            )

    def call(self, model: LoadedModel) -> StageResult:
        return _insert_mixed(
            model, self.items, self.axes, self.labels, self.stacks_as_inputs, self.index_name
        )


def _insert_mixed(
    model: LoadedModel,
    items: Sequence[MixedSite],
    axes: BatchAxes,
    labels: Sequence[str],
    stacks_as_inputs: bool,
    index_name: str,
) -> StageResult:
    rewritten = model.to_ir()
    graph = rewritten.graph
    builder = _Builder(graph, axes, index_name)
    if not builder.names.is_free(index_name):
        raise LoraOnnxError(f"{model.name} already has a value named {index_name!r}")
    builder.names.reserve(index_name)
    index_dim = axes.name if axes.size is None else axes.size  # a fixed batch: a fixed-length index
    int64 = ir.TensorType(ir.DataType.INT64)
    index_input = ir.Value(name=index_name, type=int64, shape=ir.Shape([index_dim]))
    builder.values[index_name] = index_input
    stacks: list[ir.Value] = []
    for item in items:
        for name, stack in ((item.a_name, item.a_stack), (item.b_name, item.b_stack)):
            builder.names.reserve(name)
            builder.values[name] = _stack_value(make_tensor(name, stack, item.site.dtype))
            stacks.append(builder.values[name])
    builder.first_stack = items[0].a_name
    after: dict[int, tuple[ir.Node, list[ir.Node]]] = {}
    records: list[BranchRecord] = []
    for item in items:
        site = item.site
        join = site.output
        base = builder.name(f"{join}.lora_base")
        base_value = builder.values[join]
        producer = base_value.producer()
        assert producer is not None, f"{join!r} is no node output"
        data = site.data_input
        make = builder.maker()
        if site.gemm is not None and site.gemm.trans_a:
            data = builder.node(make, "Transpose", [data], f"{item.stem}.lora_input_t", perm=[1, 0])
        # The base output is renamed and the branch's Add takes its name, so every reader keeps its input.
        base_value.name = base
        builder.values[base] = builder.values.pop(join)
        item.form_kind.build_mixed(builder, item, data, base, join, make)
        take_over(base_value, builder.values[join], keep=make.nodes)  # the declared shape moves too
        after.setdefault(id(producer), (producer, []))[1].extend(make.nodes)
        records.append(
            BranchRecord(
                adapter=MIXED, site=site.node, op=site.op, module_path=site.module_path, kind=item.kind,
                weight=site.weight.initializer, source_layout=source_layout(site), rank=item.form.rank,
                alpha=0.0, scale=1.0, a=item.a_name, b=item.b_name, scale_tensor="", join=join,
                base_join=base,
                nodes=tuple(n.name for n in make.nodes), a_group=item.form.a_group, b_group=item.form.b_group,
                base_group=site.group, gemm_alpha=site.gemm.alpha if site.gemm else 1.0, variant=MIXED,
            )
        )  # fmt: skip
    first = graph[0]
    for producer, nodes in after.values():
        graph.insert_after(producer, nodes)
    graph.insert_before(first, builder.shared.nodes)
    for value in stacks:
        graph.register_initializer(value)
    if stacks_as_inputs:
        for item in items:
            for name in (item.a_name, item.b_name):
                value = builder.values[name]
                value.shape = ir.Shape(_stack_dims(item, name, tuple(value.const_value.shape)))
                graph.inputs.append(value)
    graph.inputs.append(index_input)
    info = MixedInfo(
        index=index_name, count=len(labels), adapters=tuple(labels), batch_dim=axes.name,
        batch_input=axes.anchor, batch_axis=axes.inputs[axes.anchor],
        nodes=tuple(n.name for n in builder.shared.nodes), stacks_as_inputs=stacks_as_inputs,
    )  # fmt: skip
    _write_info(rewritten, info)
    stamp_branches(graph, records)
    stamp_shared(graph, info.nodes, records)
    write_branches(rewritten, read_branches(rewritten) + tuple(records))
    return StageResult(model.with_ir(rewritten), tuple(records))


def _stack_value(tensor: onnx.TensorProto) -> ir.Value:
    """A stack as a constant value, registered as an initializer once every branch reads it."""
    wrapped = ir.TensorProtoTensor(tensor)
    value = ir.Value(name=tensor.name, shape=wrapped.shape, type=ir.TensorType(wrapped.dtype))
    value.const_value = wrapped
    return value


def _stack_dims(item: MixedSite, name: str, shape: tuple[int, ...]) -> list[int | str]:
    """Declared dims of a stack input: the adapter count and the rank are symbolic, so run-time stacks
    may hold other adapters of other ranks."""
    rank = f"{item.stem}.rank"
    return [ADAPTERS_DIM, *item.form_kind.stack_dims(name == item.a_name, shape[1:], rank, item.form)]


# ----------------------------------------------------------------------------------------------------
# Leaving the mixed form


def strip_mixed(model: LoadedModel) -> LoadedModel:
    """``model`` without its mixed branches, shared index nodes and index input (nothing folded)."""
    info = mixed_info(model)
    records = mixed_records(model)
    if info is None and not records:
        return model
    rewritten = model.to_ir()
    graph = rewritten.graph
    if info is not None:
        # Shared nodes go first: they read a stack, which must not count as still used below.
        nodes = nodes_by_name(graph)
        shared = [nodes[name] for name in info.nodes if name in nodes]
        for node in shared:
            for position in range(len(node.inputs)):
                node.replace_input_with(position, None)
        graph.remove(shared)
        for index_input in [v for v in graph.inputs if v.name == info.index]:
            graph.inputs.remove(index_input)
    remaining = tuple(b for b in read_branches(rewritten) if b not in records)
    remove_branches(graph, records, remaining)
    write_branches(rewritten, remaining)
    if info is not None:  # the shared constants nothing reads any more
        prefix = f"{info.index}."
        for name, value in list(graph.initializers.items()):
            if name.startswith(prefix) and not value.uses() and not value.is_graph_output():
                graph.initializers.pop(name)
    _write_info(rewritten, None)
    return model.with_ir(rewritten)


def pin_index(model: LoadedModel, value: int) -> LoadedModel:
    """``model`` with the index input replaced by ``value`` for every row (a reference for folds)."""
    info = mixed_info(model)
    if info is None:
        raise LoraOnnxError(f"{model.name} has no mixed-batch branches")
    rewritten = model.to_ir()
    graph = rewritten.graph
    index_inputs = [v for v in graph.inputs if v.name == info.index]
    for index_input in index_inputs:
        graph.inputs.remove(index_input)
    names = FreshNames(graph)
    values = values_by_name(graph)
    prefix = f"{info.index}.pin"
    shape, batch, axis = (names(f"{prefix}_{part}") for part in ("shape", "batch", "axis"))
    values[axis] = add_initializer(graph, make_tensor(axis, np.array([info.batch_axis], np.int64)))
    make = NodeMaker(names, values)
    make.node("Shape", [info.batch_input], [shape], names(f"{prefix}_shape_node"))
    make.node("Gather", [shape, axis], [batch], names(f"{prefix}_batch_node"), axis=0)
    pinned = make.node(
        "ConstantOfShape", [batch], [info.index], names(prefix),
        value=ir.tensor(np.array([value], np.int64), name="value"),
    )  # fmt: skip
    for index_input in index_inputs:
        index_input.replace_all_uses_with(pinned.outputs[0])
    graph.insert_before(graph[0], make.nodes)
    return model.with_ir(rewritten)


def bind_index(model: LoadedModel, index: int) -> tuple[LoadedModel, tuple[BranchRecord, ...], LoadedModel]:
    """Adapter ``index`` of the stacks as ordinary constant branches (every other mixed part removed),
    its branch records, and the reference it must equal: ``model`` run with that index on every row.

    The stacks' slices carry the scale in B, so each branch has scale 1 (a Gemm's alpha stays). Sites
    where the adapter has no branch (an all-zero slice) get none. A dense conv A on a grouped conv can
    be applied but not folded, as for any branch.
    """
    info = mixed_info(model)
    records = mixed_records(model)
    if info is None or not records:
        raise LoraOnnxError(
            f"{model.name} has no mixed-batch branches; --adapter-index applies to inject --mixed models"
        )
    if not 0 <= index < info.count:
        listing = ", ".join(f"{i}: {label}" for i, label in enumerate(info.adapters))
        raise LoraOnnxError(
            f"{model.name} stacks {info.count} adapter(s) ({listing}); there is no index {index}"
        )
    stripped = strip_mixed(model)
    sites = {site.node: site for site in scan_sites(stripped, DEFAULT_OPS).sites}
    names = FreshNames(stripped.ir_model.graph)
    adapter = f"{MIXED}_{index}"
    plans, values = [], {}
    for record in records:
        a, b = np.asarray(model.array(record.a)[index]), np.asarray(model.array(record.b)[index])
        if not (a.any() and b.any()):
            continue
        site = sites.get(record.site)
        if site is None:
            raise LoraOnnxError(
                f"{model.name}: the mixed branch's node {record.site!r} is no longer a LoRA site"
            )
        stem = unique_stem(names, tensor_stem(site.module_path, adapter))
        plan = BranchPlan(
            site=site, adapter=adapter, rank=record.rank, alpha=float(record.rank), scale=1.0, stem=stem,
            a_name=f"{stem}.lora_A.weight", b_name=f"{stem}.lora_B.weight", a_group=record.a_group,
            b_group=record.b_group,
        )  # fmt: skip
        plans.append(plan)
        values[plan.a_name], values[plan.b_name] = a, b
    inserted = insert_branches(stripped, plans, values) if plans else StageResult(stripped, modified=False)
    bound, added = inserted.model, inserted.records
    return bound, added, pin_index(model, index)
