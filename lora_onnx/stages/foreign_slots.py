"""LoRA slots made by other tools, recognised from the graph itself (no lora-onnx manifest).

Olive's ``ExtractAdapters`` pass (``olive generate-adapter``) and onnxruntime's own LoRA test model
(``two_params_lora_model``) give a model LoRA inputs the way lora-onnx's slots do: A and B are graph
inputs, each backed by a same-named initializer holding an empty default (a 0-sized rank dim), so the
model runs as the base until ``onnxruntime.LoraAdapter`` feeds them. The chain they feed is::

    y = base(x) + MatMul(MatMul(x, A), B) [* s]        A (in, R), B (R, out), s a constant scalar
    y = base(x) + Conv(Conv(x, A), B) [* s]            A (R, in/ga, k...), B (out, R/gb, 1...)

where ``base`` is the site (a MatMul or Gemm on a constant weight, possibly with its bias Add, or a Conv
whose kernel, strides, dilations and padding conv A repeats; conv B is 1x1, stride 1) and the
constant Muls (PEFT's ``scaling``, exported by TorchScript as a ``Constant`` node) may sit anywhere in
the chain. Each chain found becomes the :class:`~lora_onnx.model.manifest.BranchRecord` a lora-onnx slot
would have (variant ``slot``, adapter :data:`FOREIGN_ADAPTER`), with the chain's scale in ``scale``, so
``check-adapter`` and ``merge --adapter-file`` take these models unchanged. Only chains whose every
intermediate value feeds the next node alone, and whose ``x`` is the site's own data input, are taken:
anything else could not be removed or folded without changing another value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from lora_onnx.kinds import all_kinds, form_of, kind_of
from lora_onnx.kinds.base import BranchForm
from lora_onnx.model.graph import attribute_values
from lora_onnx.model.load import LoadedModel
from lora_onnx.model.manifest import BranchRecord
from lora_onnx.sites.find import DEFAULT_OPS, Site, find_sites, source_layout
from lora_onnx.variants import SlotBranch

#: The adapter name foreign slots are recorded under (PEFT's default adapter name).
FOREIGN_ADAPTER = "default"
_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_NAME_SUFFIX = ".lora_A.weight"


@dataclass(frozen=True)
class _Chain:
    """One recognised chain, before its site is looked up."""

    kind: str
    a: str
    b: str
    a_node: ir.Node
    b_node: ir.Node
    data: str
    scale: float
    scale_tensor: str
    join: str
    base_join: ir.Value
    nodes: tuple[str, ...]


def foreign_slot_records(model: LoadedModel) -> tuple[BranchRecord, ...]:
    """The slots of ``model`` recognised from its graph (see the module doc); empty if there are none."""
    graph = model.to_ir().graph
    empties = _empty_inputs(graph)
    if len(empties) < 2:
        return ()
    chains = [chain for a in empties.values() if (chain := _chain(model, a, empties)) is not None]
    if not chains:
        return ()
    ignore = {name for chain in chains for name in chain.nodes}
    sites = {site.node: site for site in find_sites(model, DEFAULT_OPS, ignore_nodes=ignore).sites}
    records = []
    for chain in chains:
        site = _site_of(chain, sites)
        groups = _fits(chain, site, _dims(empties[chain.a]), _dims(empties[chain.b])) if site else None
        if site is not None and groups is not None:
            record = _record(chain, site, groups)
            if record is not None:
                records.append(record)
    return tuple(records)


def _empty_inputs(graph: ir.Graph) -> dict[str, ir.Value]:
    """Float graph inputs (2-D or more) backed by an initializer with one 0-sized dim (a rank-0
    default), by name."""
    found = {}
    for value in graph.inputs:
        tensor = value.const_value if value.is_initializer() else None
        if tensor is None or tensor.dtype not in _FLOAT_TYPES or len(tensor.shape) < 2:
            continue
        if _dims(value).count(0) == 1:
            found[value.name] = value
    return found  # type: ignore[return-value]


def _dims(value: ir.Value) -> tuple[int, ...]:
    """The dims of an initializer's stored tensor (a slot input declares its rank symbolically)."""
    assert value.const_value is not None
    return tuple(int(d) for d in value.const_value.shape.numpy())


def _only_consumer(value: ir.Value | None) -> ir.Node | None:
    if value is None:
        return None
    users = value.uses()
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users)).node


def _chain_forms() -> dict[str, BranchForm]:
    """The branch forms whose slot chains can be recognised, by the op of their A and B nodes (where the
    rank-0 dim of A and B sits is each form's ``rank_axes``)."""
    return {kind.form.chain_op: kind.form for kind in all_kinds() if kind.form.chain_op}


def _chain(model: LoadedModel, a: ir.Value, empties: dict[str, ir.Value]) -> _Chain | None:
    users = list(a.uses())
    forms = _chain_forms()
    if len(users) != 1:
        return None
    first = users[0].node
    if first.op_type not in forms or len(first.inputs) != 2 or first.inputs[1] is not a:
        return None
    op = first.op_type
    form = forms[op]
    axis_a, axis_b = form.rank_axes
    a_dims = _dims(a)
    if a_dims[axis_a] != 0 or not form.fits_ndim(len(a_dims)):
        return None
    nodes = [first.name]
    scale, scale_tensor = 1.0, ""
    value, b, b_node = first.outputs[0], None, None
    while True:
        node = _only_consumer(value)
        if node is None:
            return None
        if node.op_type == "Mul":
            factor = _scalar_factor(model, node, value)
            if factor is None:
                return None
            scale *= factor[0]
            scale_tensor = factor[1] or scale_tensor
            nodes.extend(factor[2])
            nodes.append(node.name)
        elif node.op_type == op and b is None and len(node.inputs) == 2 and node.inputs[0] is value:
            b, b_node = node.inputs[1], node
            if b is None or b.name not in empties or empties[b.name] is not b:
                return None
            b_dims = _dims(b)
            if len(b_dims) != len(a_dims) or b_dims[axis_b] != 0 or len(b.uses()) != 1:
                return None
            nodes.append(node.name)
        elif node.op_type == "Add" and b is not None and b_node is not None and len(node.inputs) == 2:
            base_join = node.inputs[1] if node.inputs[0] is value else node.inputs[0]
            # Removing the slot renames the base output to the Add's: nothing else may read it.
            if base_join is None or base_join is value or _only_consumer(base_join) is not node:
                return None
            nodes.append(node.name)
            return _Chain(
                form.name, a.name, b.name, first, b_node, _name(first.inputs[0]), scale,  # type: ignore[arg-type]
                scale_tensor, _name(node.outputs[0]), base_join, tuple(nodes),
            )  # fmt: skip
        else:
            return None
        value = node.outputs[0]


def _name(value: ir.Value | None) -> str:
    return (value.name or "") if value is not None else ""


def _fits(
    chain: _Chain, site: Site, a_dims: tuple[int, ...], b_dims: tuple[int, ...]
) -> tuple[int, int] | None:
    """A's and B's groups if the chain computes the branch lora-onnx would put on ``site`` (shapes, and
    for convs every attribute: A the site's kernel, strides, dilations and padding; B 1x1, stride 1);
    else None."""
    if not form_of(chain.kind).grouped:
        return (1, 1) if (a_dims[0], b_dims[1]) == (site.in_features, site.out_features) else None
    conv = site.conv
    if conv is None or b_dims[0] != site.out_features or a_dims[2:] != conv.kernel_shape:
        return None
    a_attrs, b_attrs = _conv_attrs(chain.a_node, a_dims), _conv_attrs(chain.b_node, b_dims)
    a_group, b_group = a_attrs["group"], b_attrs["group"]
    if a_dims[1] * a_group != site.in_features or site.out_features % b_group:
        return None
    ones, zeros = (1,) * len(conv.kernel_shape), (0,) * (2 * len(conv.kernel_shape))
    same_a = (a_attrs["strides"], a_attrs["dilations"]) == (conv.strides, conv.dilations) and (
        (a_attrs["auto_pad"], a_attrs["pads"]) == (conv.auto_pad, conv.pads)
        if conv.auto_pad == "NOTSET"
        else a_attrs["auto_pad"] == conv.auto_pad
    )
    plain_b = b_dims[2:] == ones and b_attrs["strides"] == ones and b_attrs["dilations"] == ones
    plain_b = plain_b and b_attrs["pads"] == zeros and b_attrs["auto_pad"] in ("NOTSET", "VALID")
    return (int(a_group), int(b_group)) if same_a and plain_b else None  # type: ignore[call-overload]


def _conv_attrs(node: ir.Node, dims: tuple[int, ...]) -> dict[str, object]:
    """A Conv node's attributes with ONNX's defaults filled in."""
    attrs = attribute_values(node)
    spatial = len(dims) - 2
    auto_pad = attrs.get("auto_pad", "NOTSET")
    return {
        "strides": tuple(attrs.get("strides", (1,) * spatial)),  # type: ignore[arg-type]
        "dilations": tuple(attrs.get("dilations", (1,) * spatial)),  # type: ignore[arg-type]
        "pads": tuple(attrs.get("pads", (0,) * (2 * spatial))),  # type: ignore[arg-type]
        "auto_pad": auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad,
        "group": int(attrs.get("group", 1)),  # type: ignore[call-overload]
    }


def _scalar_factor(model: LoadedModel, mul: ir.Node, value: ir.Value) -> tuple[float, str, list[str]] | None:
    """The constant scalar ``mul`` multiplies ``value`` by: (factor, its initializer or "", Constant nodes
    that only this Mul reads, which go with the branch). None if the other input is not such a scalar."""
    if len(mul.inputs) != 2:
        return None
    other = mul.inputs[1] if mul.inputs[0] is value else mul.inputs[0]
    if other is None or other is value:
        return None
    if other.is_initializer() and not other.is_graph_input():
        array = np.asarray(model.array(other.name))  # type: ignore[arg-type]
        owned = "" if len(other.uses()) > 1 else other.name
        return (float(array.reshape(-1)[0]), owned, []) if array.size == 1 else None  # type: ignore[return-value]
    producer = other.producer()
    if producer is None or producer.op_type != "Constant":
        return None
    attrs = producer.attributes
    if "value" in attrs:
        array = attrs["value"].as_tensor().numpy()
    elif "value_float" in attrs:
        array = np.array(attrs["value_float"].as_float())
    else:
        return None
    if array.size != 1:
        return None
    owned = [producer.name] if len(other.uses()) == 1 else []
    return float(array.reshape(-1)[0]), "", owned  # type: ignore[list-item]


def _site_of(chain: _Chain, sites: dict[str, Site]) -> Site | None:
    """The site whose output (directly, or after its bias Add) is the chain's base side."""
    producer = chain.base_join.producer()
    if producer is None:
        return None
    site = sites.get(producer.name)  # type: ignore[arg-type]
    if site is None and producer.op_type == "Add":
        for value in producer.inputs:
            upstream = value.producer() if value is not None else None
            if upstream is not None and upstream.name in sites:
                other = next(v for v in producer.inputs if v is not value)
                if other is not None and other.is_initializer():
                    site = sites[upstream.name]  # type: ignore[index]
    if site is None or site.data_input != chain.data or kind_of(site.op).form.name != chain.kind:
        return None
    if site.gemm is not None and site.gemm.trans_a:
        return None  # the chain reads x, the site x^T: not one branch
    return site


def _record(chain: _Chain, site: Site, groups: tuple[int, int]) -> BranchRecord | None:
    gemm_alpha = site.gemm.alpha if site.gemm else 1.0
    if gemm_alpha == 0.0:
        return None
    module = chain.a.removesuffix(_NAME_SUFFIX) if chain.a.endswith(_NAME_SUFFIX) else site.module_path
    return BranchRecord(
        adapter=FOREIGN_ADAPTER, site=site.node, op=site.op, module_path=module, kind=chain.kind,
        weight=site.weight.initializer, source_layout=source_layout(site), rank=0, alpha=0.0,
        # A lora-onnx branch on a Gemm also applies its alpha (lora_onnx.stages.insert); the chain does not.
        scale=chain.scale / gemm_alpha, a=chain.a, b=chain.b, scale_tensor=chain.scale_tensor,
        join=chain.join, base_join=_name(chain.base_join), nodes=chain.nodes, a_group=groups[0],
        b_group=groups[1], base_group=site.group, gemm_alpha=gemm_alpha, zero_init=True,
        variant=SlotBranch.recorded_as,
    )  # fmt: skip
